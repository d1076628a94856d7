"""GPU check of the sparse-MoE Triton kernels (docs/GATING_OP.md): correctness sweep, then dense vs kernel timing.

Prepared for a GPU session (H100/H200, torch with CUDA, triton); writes ``moe_kernel.json`` and
``moe_kernel.md`` to ``--out`` (default ``$OUT``, else ``.``):

    PYTHONPATH=src python benchmarks/moe_kernel_gpu.py --out "$OUT" --iters 10

1. Correctness: the grouped kernel (``sparse_moe``) and the single-launch kernel (``fused_sparse_moe``, the
   TensorRT AOT one) against the fp32 PyTorch reference over the full preset's block shapes, token counts
   from one token to batch 64, fp32 and fp16, balanced and skewed routing (one expert hot, one unused).
2. Per-block timing at each stage shape: dense static MoE (fused fc1, what the ONNX graph computes) vs the
   grouped kernel, with a small sweep of tile configs (so a later session can tune ``pick_config``).
3. Whole model (full preset, random weights, fp16): dense static vs kernel at batch 1, 8, 64, 256, with
   CUDA graphs at batch <= 8 (launch-bound there). Target: >= 1.25x at batch >= 64, no slower at 1-8.

Smoke-test without a GPU: ``TRITON_INTERPRET=1 python benchmarks/moe_kernel_gpu.py --device cpu --preset tiny
--batches 1 --iters 1 --sweep-tokens 1,50`` (the timings then mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from facemoe.gating import triton as smt
from facemoe.gating.torch_op import reference_sparse_moe
from facemoe.model import build_model
from facemoe.model.moe import MoE
from facemoe.model.random_weights import randomize

TARGET_SPEEDUP_LARGE = 1.25


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, iters: int, warmup: int = 3) -> dict[str, float]:
    """Median and min milliseconds per call (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def graphed(fn: Callable[[], torch.Tensor], device: str) -> Callable[[], torch.Tensor] | None:
    """``fn`` replayed from a CUDA graph, or None when capture fails (the failure is reported, not fatal)."""
    if device != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception:  # capture is best effort: report eager numbers instead
        traceback.print_exc()
        return None

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def random_block(dim: int, hidden: int, experts: int, k: int, seed: int) -> MoE:
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(dim, hidden, experts, k, routing="sparse")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return moe.eval()


def correctness(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    dev = args.device
    for dim, hidden in shapes:
        for tokens in args.sweep_tokens:
            for dtype in (torch.float32, torch.float16):
                for skew in (False, True):
                    moe = random_block(dim, hidden, 3, 2, seed=tokens + dim)
                    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens))
                    if skew:  # expert 0 picked by every token, expert 2 by none
                        x[:, 0] = 5.0
                        with torch.no_grad():
                            moe.router.gate.weight[:, 0] = torch.tensor([10.0, 0.0, -10.0])
                    weights = [w.detach() for w in moe.stacked_weights()]
                    xr = x.to(dtype).float().to(dev)
                    ref_w = [weights[0].to(dev)] + [w.to(dtype).float().to(dev) for w in weights[1:]]
                    with torch.no_grad():
                        want = reference_sparse_moe(xr, *ref_w, k=2)
                        dw = [weights[0].to(dev)] + [w.to(dtype).to(dev) for w in weights[1:]]
                        grouped = smt.sparse_moe(x.to(dtype).to(dev), *dw, k=2).float()
                        row = {"dim": dim, "hidden": hidden, "tokens": tokens, "dtype": str(dtype), "skewed": skew}
                        scale = want.abs().max().item() or 1.0
                        row["grouped_rel_err"] = (grouped - want).abs().max().item() / scale
                        if tokens <= args.fused_max_tokens:
                            fw = [weights[0].to(dtype).to(dev), *dw[1:]]
                            want_f = reference_sparse_moe(xr, fw[0].float(), *ref_w[1:], k=2)
                            fused = smt.fused_sparse_moe(x.to(dtype).to(dev), *fw, k=2).float()
                            row["fused_rel_err"] = (fused - want_f).abs().max().item() / (
                                want_f.abs().max().item() or 1
                            )
                    limit = 1e-5 if dtype == torch.float32 else 3e-3
                    row["ok"] = row["grouped_rel_err"] <= limit and row.get("fused_rel_err", 0.0) <= limit
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def block_timing(args: argparse.Namespace, shapes: list[tuple[int, int]], tokens_per_image: list[int]) -> list[dict]:
    rows = []
    dev = args.device
    for (dim, hidden), per_image in zip(shapes, tokens_per_image, strict=True):
        for batch in args.batches:
            tokens = per_image * batch
            moe = random_block(dim, hidden, 3, 2, seed=dim).half().to(dev)
            x = torch.randn(tokens, dim, device=dev, dtype=torch.float16)
            weights = [w.detach().contiguous() for w in moe.stacked_weights()]
            weights[0] = weights[0].float()
            with torch.no_grad():
                with moe.tracing():  # static routing, fused fc1: the dense path the export traces
                    dense = time_fn(lambda moe=moe, x=x: moe(x), dev, args.iters)
                default = smt.pick_config(tokens, dim, hidden, 2, 3)
                configs = {default}
                if args.tune:
                    for bm in (16, 32, 64, 128):
                        for bn in (64, 128):
                            configs.add(smt.KernelConfig(bm, bn, 64, 8 if bm * bn >= 8192 else 4, 3))
                results = {}
                for cfg in configs:
                    try:
                        results[cfg] = time_fn(
                            lambda cfg=cfg, x=x, weights=weights: smt.sparse_moe(x, *weights, k=2, config=cfg),
                            dev,
                            args.iters,
                        )["median_ms"]
                    except Exception as exc:  # an over-large tile: skip it, keep the sweep going
                        print(f"config {cfg} failed: {exc}", file=sys.stderr)
            best_cfg = min(results, key=results.get)  # type: ignore[arg-type]
            row = {
                "dim": dim,
                "hidden": hidden,
                "batch": batch,
                "tokens": tokens,
                "dense_ms": dense["median_ms"],
                "kernel_default_ms": results.get(default),
                "kernel_best_ms": results[best_cfg],
                "best_config": best_cfg.__dict__,
                "default_config": default.__dict__,
                "speedup_default": dense["median_ms"] / results[default] if default in results else None,
                "speedup_best": dense["median_ms"] / results[best_cfg],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def model_timing(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    dev = args.device
    model = randomize(build_model(args.preset), seed=0).eval()
    probe = torch.randn(4, 3, 120, 120, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_routing("sparse")
        reference = model.to(dev)(probe.to(dev)).float().cpu()  # fp32 reference
    model.half()
    # The dense path is the one the export traces: static routing, the experts' fc1 fused into one matmul.
    with model.tracing():
        return _time_model(args, model, probe, reference)


def _time_model(
    args: argparse.Namespace, model: Any, probe: torch.Tensor, reference: torch.Tensor
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    dev = args.device
    accuracy: dict[str, Any] = {}
    with torch.no_grad():
        dense_out = model(probe.to(dev).half()).float().cpu()
        with model.using_kernel("triton"):
            kernel_out = model(probe.to(dev).half()).float().cpu()
    cos = torch.nn.functional.cosine_similarity
    accuracy["dense_fp16_cos_min"] = cos(dense_out, reference).min().item()
    accuracy["kernel_fp16_cos_min"] = cos(kernel_out, reference).min().item()
    accuracy["kernel_vs_dense_fp16_cos_min"] = cos(kernel_out, dense_out).min().item()
    print(json.dumps(accuracy), flush=True)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, 120, 120, device=dev, dtype=torch.float16)
        row: dict[str, Any] = {"batch": batch}
        for mode in ("dense", "kernel"):
            kernel = model.using_kernel("triton") if mode == "kernel" else contextlib.nullcontext()
            with kernel, torch.no_grad():
                eager = time_fn(lambda x=x: model(x), dev, args.iters)
                row[f"{mode}_eager_ms"] = eager["median_ms"]
                best = eager["median_ms"]
                if batch <= args.graph_max_batch:
                    replay = graphed(lambda x=x: model(x), dev)
                    if replay is not None:
                        row[f"{mode}_graph_ms"] = time_fn(replay, dev, args.iters)["median_ms"]
                        best = min(best, row[f"{mode}_graph_ms"])
                row[f"{mode}_ms"] = best
            if dev == "cuda":
                torch.cuda.empty_cache()
        row["speedup"] = row["dense_ms"] / row["kernel_ms"]
        row["img_per_s_kernel"] = batch / row["kernel_ms"] * 1e3
        row["target"] = TARGET_SPEEDUP_LARGE if batch >= 64 else 1.0
        row["meets_target"] = row["speedup"] >= row["target"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, accuracy


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Sparse-MoE kernel on {report['env']['device_name']}", "", "```", json.dumps(report["env"]), "```", ""]
    ok = sum(r["ok"] for r in report["correctness"])
    lines += [f"## Correctness: {ok}/{len(report['correctness'])} cases within tolerance", ""]
    bad = [r for r in report["correctness"] if not r["ok"]]
    lines += [f"- FAIL {json.dumps(r)}" for r in bad] or ["All cases passed."]
    lines += [
        "",
        "## Per block (fp16)",
        "",
        "| C | H | batch | dense ms | kernel ms (default) | best ms | speedup best |",
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in report["blocks"]:
        default_ms = r["kernel_default_ms"] or float("nan")
        lines.append(
            f"| {r['dim']} | {r['hidden']} | {r['batch']} | {r['dense_ms']:.3f} | {default_ms:.3f}"
            f" | {r['kernel_best_ms']:.3f} | {r['speedup_best']:.2f}x |"
        )
    lines += ["", "## Whole model (fp16)", "", f"Accuracy: `{json.dumps(report['accuracy'])}`", ""]
    lines += ["| batch | dense ms | kernel ms | speedup | target | img/s (kernel) |", "|---|---|---|---|---|---|"]
    for r in report["model"]:
        mark = "ok" if r["meets_target"] else "MISSED"
        lines.append(
            f"| {r['batch']} | {r['dense_ms']:.2f} | {r['kernel_ms']:.2f} | {r['speedup']:.2f}x | "
            f">= {r['target']}x {mark} | {r['img_per_s_kernel']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep-tokens", default="1,25,100,400,1603,6400")
    parser.add_argument("--fused-max-tokens", type=int, default=1603)
    parser.add_argument("--graph-max-batch", type=int, default=8)
    parser.add_argument("--no-tune", dest="tune", action="store_false")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: correctness,blocks,model")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sweep_tokens = [int(t) for t in args.sweep_tokens.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be exact fp32
        torch.backends.cudnn.allow_tf32 = False
    import triton

    cfg = build_model(args.preset).config
    shapes = [(cfg.stage_dim(i), int(cfg.stage_dim(i) * cfg.mlp_ratio)) for i in range(cfg.num_stages)]
    per_image = [cfg.stage_resolution(i) ** 2 for i in range(cfg.num_stages)]
    env = {
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "shapes": shapes,
    }
    report: dict[str, Any] = {"env": env, "correctness": [], "blocks": [], "model": [], "accuracy": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def save() -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        (out / "moe_kernel.json").write_text(json.dumps(report, indent=2, default=str))
        if report["model"] or report["blocks"] or report["correctness"]:
            (out / "moe_kernel.md").write_text(markdown(report))

    try:
        if "correctness" not in skip:
            report["correctness"] = correctness(args, shapes)
            save()
        if "blocks" not in skip:
            report["blocks"] = block_timing(args, shapes, per_image)
            save()
        if "model" not in skip:
            report["model"], report["accuracy"] = model_timing(args)
    finally:
        save()
    print((out / "moe_kernel.md").read_text())
    failed = [r for r in report["correctness"] if not r["ok"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
