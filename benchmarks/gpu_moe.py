"""One GPU run for the top-2 expert compute (docs/GATING_OP.md): dense vs sparse Triton vs PyTorch grouped GEMM.

    PYTHONPATH=src python benchmarks/gpu_moe.py --out "$OUT"                 # H100/H200, about 3-5 minutes
    PYTHONPATH=src python benchmarks/gpu_moe.py --device cpu --tiny --out /tmp/gpu_moe_dry   # dry run (CPU)

Sections (the JSON is rewritten after each, so a cut-off run still leaves what it measured):

1. ``probe``: which grouped-GEMM dtypes this torch build runs on the device (torch 2.11's CUDA one: bf16).
2. ``blocks``: per MoE block shape and batch, fp16 tokens: dense static (fused fc1, what the ONNX graph
   computes) vs the Triton pipeline (two-step sum, and the sum in fc2's epilogue) vs ``grouped`` (fp16
   experts) vs ``grouped_bf16``; median ms and speedup over dense.
3. ``accuracy``: the whole model in fp16 on the device, every kernel, against the fp32 CPU sparse reference:
   embedding cosine, and routing agreement per block (the torch and grouped kernels record their routing).
4. ``model``: the whole fp16 model (``.half()``, packed dense experts) at each batch, eager and CUDA graphs,
   every kernel; ``speedup`` = dense / best sparse kernel; host (launch) time of an eager call at batch 1.
5. ``bench``: ``facemoe bench`` rows (torch backend, fp16 ``--half all``, CUDA graphs) with each kernel,
   through the backend's own code (the model is built with ``kernel=...``): ``bench_moe.json``.

Writes ``gpu_moe.json`` (kernel JSON: ``model`` is a list of ``batch``/``speedup`` rows), ``bench_moe.json``
(the bench JSON with its ``rows``) and ``gpu_moe.md``. ``--tiny`` (tiny preset, small batches, 2 iterations)
and ``--device cpu`` (Triton's interpreter, fp32 bench rows) exist so this file is checked before the GPU run;
their timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel_gpu import graphed, random_block, time_fn

from facemoe.bench.report import BenchReport
from facemoe.bench.sweep import BenchConfig, BenchSource, run_bench
from facemoe.gating import triton as smt
from facemoe.gating.grouped_mm import grouped_mm_function
from facemoe.model import build_model
from facemoe.model.random_weights import randomize
from facemoe.model.swin import FaceMoE

KERNELS = ("torch", "triton", "grouped", "grouped_bf16")  # "torch": the dense static path
TARGET_LARGE = 1.25


def probe_grouped(device: str) -> dict[str, str]:
    """'ok' or the error, per dtype, of a small grouped GEMM on ``device``."""
    mm = grouped_mm_function()
    result = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if mm is None:
            result[name] = "no grouped GEMM in this torch"
            continue
        try:
            a = torch.randn(40, 64, device=device).to(dtype)
            b = torch.randn(3, 128, 64, device=device).to(dtype).transpose(1, 2)
            mm(a, b, offs=torch.tensor([10, 10, 40], dtype=torch.int32, device=device))
            result[name] = "ok"
        except Exception as exc:  # the dtype/device is unsupported in this build: record why
            result[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return result


def usable(kernel: str, probe: dict[str, str], dtype_name: str) -> bool:
    if kernel == "grouped":
        return probe.get(dtype_name) == "ok"
    if kernel == "grouped_bf16":
        return probe.get("bf16") == "ok"
    return True


def timed(fn: Callable[[], Any], args: argparse.Namespace) -> float | None:
    try:
        return time_fn(fn, args.device, args.iters)["median_ms"]
    except Exception:  # one failing variant must not end the run
        traceback.print_exc()
        return None


def blocks(args: argparse.Namespace, cfg: Any, probe: dict[str, str]) -> list[dict[str, Any]]:
    from facemoe.gating.grouped_mm import expert_weights

    rows = []
    dev, dtype = args.device, torch.float16
    for stage in range(cfg.num_stages):
        dim = cfg.stage_dim(stage)
        hidden = int(dim * cfg.mlp_ratio)
        moe = random_block(dim, hidden, cfg.num_experts, cfg.k, seed=dim).half().to(dev)
        router, w1, b1, w2, b2 = (w.detach().contiguous() for w in moe.stacked_weights())
        for batch in args.batches:
            tokens = cfg.stage_resolution(stage) ** 2 * batch
            x = torch.randn(tokens, dim, device=dev, dtype=dtype)
            row: dict[str, Any] = {"dim": dim, "hidden": hidden, "batch": batch, "tokens": tokens}
            ws = (router.float(), w1, b1, w2, b2)
            runs: dict[str, Callable[[], Any]] = {
                "triton": lambda x=x, ws=ws: smt.sparse_moe(x, *ws, k=cfg.k),
                "triton_sum_in_fc2": lambda x=x, ws=ws: smt.sparse_moe(x, *ws, k=cfg.k, add_into_output=True),
            }
            for kernel, edt in (("grouped", dtype), ("grouped_bf16", torch.bfloat16)):
                if usable(kernel, probe, "fp16"):
                    ew = expert_weights(w1, b1, w2, b2, edt)  # prepared once, as the module caches them
                    runs[kernel] = lambda x=x, ew=ew, rt=router: grouped_prepared(x, rt, ew, cfg.k)
            with torch.no_grad():
                with moe.tracing():
                    row["dense_ms"] = timed(lambda moe=moe, x=x: moe(x), args)
                for name, run in runs.items():
                    row[f"{name}_ms"] = timed(run, args)
            for key in [k for k in row if k.endswith("_ms") and k != "dense_ms"]:
                if row[key] and row["dense_ms"]:
                    row[key.replace("_ms", "_speedup")] = row["dense_ms"] / row[key]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del moe
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def grouped_prepared(x: torch.Tensor, router: torch.Tensor, ew: tuple, k: int) -> torch.Tensor:
    """The MoE module's grouped path on prepared weights: router + top-k in x's dtype, then the grouped experts."""
    from facemoe.gating.grouped_mm import grouped_experts

    top_val, top_idx = torch.topk(torch.nn.functional.linear(x, router), k, dim=-1)
    return grouped_experts(x, top_val, top_idx, *ew)


def _routes(calls: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return [c[0].sort(dim=-1).values.cpu() for c in calls.values()]


def accuracy(args: argparse.Namespace, model: Any, probe: dict[str, str], dtype: torch.dtype) -> dict[str, Any]:
    x = torch.rand(args.probe_images, 3, 120, 120, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad(), model.using_routing("sparse"), model.recording_routing() as ref_calls:
        reference = model(x)  # fp32 on the CPU: the reference
    ref_routes = _routes(ref_calls)
    half = copy.deepcopy(model).to(dtype).to(args.device)
    result: dict[str, Any] = {"images": args.probe_images, "dtype": str(dtype)}
    for kernel in KERNELS:
        if not usable(kernel, probe, "fp16" if dtype == torch.float16 else "fp32"):
            result[kernel] = "unsupported here"
            continue
        try:
            with torch.no_grad(), half.using_kernel(kernel):
                if kernel == "triton":
                    got, routes = half(x.to(args.device, dtype)).float().cpu(), None
                else:
                    with half.recording_routing() as calls:
                        got = half(x.to(args.device, dtype)).float().cpu()
                    routes = _routes(calls)
        except Exception as exc:
            result[kernel] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        cos = torch.nn.functional.cosine_similarity(got, reference)
        entry = {
            "cos_min": cos.min().item(),
            "cos_mean": cos.mean().item(),
            "max_abs": (got - reference).abs().max().item(),
        }
        if routes is not None:
            agree = [(a == b).all(dim=-1).float().mean().item() for a, b in zip(routes, ref_routes, strict=True)]
            entry |= {"routing_min": min(agree), "routing_mean": sum(agree) / len(agree)}
        result[kernel] = entry
        print(kernel, json.dumps(entry), flush=True)
    return result


def whole_model(args: argparse.Namespace, model: Any, probe: dict[str, str], dtype: torch.dtype) -> list[dict]:
    dev = args.device
    net = copy.deepcopy(model).to(dtype).to(dev).eval()
    net.pack_experts()  # the dense path at its best (docs/BENCHMARKS.md); the kernels ignore the packing
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, 120, 120, device=dev, dtype=dtype)
        row: dict[str, Any] = {"batch": batch}
        for kernel in KERNELS:
            if not usable(kernel, probe, "fp16" if dtype == torch.float16 else "fp32"):
                continue
            name = "dense" if kernel == "torch" else kernel
            try:
                with torch.no_grad(), net.using_kernel(kernel):
                    times = {"eager": time_fn(lambda x=x: net(x), dev, args.iters)["median_ms"]}
                    if batch == 1:  # host side of one eager call: launch-bound when close to the total
                        t0 = time.perf_counter()
                        net(x)
                        row[f"{name}_host_ms"] = (time.perf_counter() - t0) * 1e3
                        if dev == "cuda":
                            torch.cuda.synchronize()
                    replay = graphed(lambda x=x: net(x), dev)
                    if replay is not None:
                        times["graph"] = time_fn(replay, dev, args.iters)["median_ms"]
                        del replay
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            row |= {f"{name}_{mode}_ms": ms for mode, ms in times.items()}
            row[f"{name}_ms"] = min(times.values())
            if dev == "cuda":
                torch.cuda.empty_cache()
        sparse = {k: row[f"{k}_ms"] for k in KERNELS[1:] if f"{k}_ms" in row}
        if "dense_ms" in row and sparse:
            best = min(sparse, key=sparse.__getitem__)
            row |= {f"speedup_{k}": row["dense_ms"] / ms for k, ms in sparse.items()}
            row |= {"best_kernel": best, "speedup": row["dense_ms"] / sparse[best]}
            row["img_per_s_best"] = batch / sparse[best] * 1e3
            row["target"] = TARGET_LARGE if batch >= 64 else 1.0
            row["meets_target"] = row["speedup"] >= row["target"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench(args: argparse.Namespace, model: Any, probe: dict[str, str], out: Path) -> dict[str, Any]:
    """``facemoe bench`` rows per kernel through the torch backend; one bench JSON with every row."""
    cuda = args.device == "cuda"
    precision = "fp16" if cuda else "fp32"  # the torch backend runs fp16 on CUDA only
    all_rows, last = [], None
    for kernel in KERNELS:
        if not usable(kernel, probe, precision):
            continue
        built = FaceMoE(model.config, kernel=kernel)  # the backend keeps the model's kernel
        built.load_state_dict(model.state_dict())
        config = BenchConfig(
            backends=("torch",),
            precisions=(precision,),
            batch_sizes=tuple(args.batches),
            cuda_graphs=(cuda,),
            torch_half="all",
            warmup=2,
            iterations=args.iters,
            device=args.device,
        )
        try:
            last = run_bench(config, BenchSource(f"{args.preset} preset, random weights, kernel={kernel}", model=built))
        except Exception:
            traceback.print_exc()
            continue
        for row in last.rows:
            row.note = f"kernel={kernel}" + (f"; {row.note}" if row.note else "")
        all_rows += last.rows
        del built
    if last is None:
        return {}
    report = BenchReport(
        all_rows, last.config | {"kernels": list(KERNELS)}, last.source, last.environment, last.created
    )
    report.write_json(out / "bench_moe.json")
    return report.to_json()


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"# Top-2 expert compute on {env['device']}", "", "```", json.dumps(env), "```", ""]
    lines += [
        "## Per block (fp16), speedup over dense",
        "",
        "| C | batch | tokens | dense ms | "
        + " | ".join(("triton", "triton sum in fc2", "grouped", "grouped_bf16"))
        + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["blocks"]:
        cells = [
            f"{r[k]:.2f}x" if r.get(k) else "-"
            for k in ("triton_speedup", "triton_sum_in_fc2_speedup", "grouped_speedup", "grouped_bf16_speedup")
        ]
        lines.append(
            f"| {r['dim']} | {r['batch']} | {r['tokens']} | {r['dense_ms'] or float('nan'):.3f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "## Whole model", "", f"Accuracy vs fp32 CPU: `{json.dumps(report['accuracy'])}`", ""]
    lines += ["| batch | dense ms | best kernel | ms | speedup | target | img/s |", "|---|---|---|---|---|---|---|"]
    for r in report["model"]:
        if "speedup" in r:
            best = r["best_kernel"]
            mark = "ok" if r["meets_target"] else "MISSED"
            lines.append(
                f"| {r['batch']} | {r['dense_ms']:.2f} | {best} | {r[best + '_ms']:.2f} | {r['speedup']:.2f}x"
                f" | >= {r['target']}x {mark} | {r['img_per_s_best']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny preset, batches 1,2, 2 iterations (dry run)")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--probe-images", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma list of sections to skip: blocks,accuracy,model,bench")
    args = parser.parse_args()
    args.preset = "tiny" if args.tiny else "full"
    args.batches = [1, 2] if args.tiny else [int(b) for b in args.batches.split(",")]
    args.iters = 2 if args.tiny else args.iters
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = randomize(build_model(args.preset), seed=0).eval()
    probe = probe_grouped(args.device)
    dtype = torch.float16
    env = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "grouped_mm": probe,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(env), flush=True)
    report: dict[str, Any] = {"env": env, "blocks": [], "accuracy": {}, "model": [], "bench_rows": 0}
    started = time.time()

    def save() -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        (out / "gpu_moe.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_moe.md").write_text(markdown(report))

    sections: list[tuple[str, Callable[[], Any]]] = [
        ("blocks", lambda: blocks(args, model.config, probe)),
        ("accuracy", lambda: accuracy(args, model, probe, dtype)),
        ("model", lambda: whole_model(args, model, probe, dtype)),
        ("bench", lambda: len(bench(args, model, probe, out).get("rows", []))),
    ]
    try:
        for name, run in sections:
            if name in skip:
                continue
            t0 = time.time()
            try:
                report["bench_rows" if name == "bench" else name] = run()
            except Exception:  # keep the other sections
                traceback.print_exc()
                report.setdefault("errors", []).append(name)
            print(f"== {name}: {time.time() - t0:.1f} s", flush=True)
            save()
    finally:
        save()
    print((out / "gpu_moe.md").read_text())


if __name__ == "__main__":
    main()
