"""Device check of the PyTorch CUDA backend on the full FaceMoE (random weights): 40 s to ~4 min on an H200.

    OUT=/some/dir bash benchmarks/gpu_check.sh        # or: PYTHONPATH=src python benchmarks/gpu_check.py --out DIR

1. fp16 parity: the CUDA fp16 backend (static routing, fp16 GEMMs in an fp32 network) against the PyTorch
   fp32 CPU reference in sparse routing (the official semantics) on a few held-out inputs: embedding cosine
   (min/mean), max abs error, per-layer routing agreement; CUDA graphs vs eager; fp32 CUDA as a control.
2. ``facemoe bench`` rows (the same library call the command makes): torch fp16 static with CUDA graphs on
   and off at batch 1, 8, 64, 256, and the sparse fp32 baseline (official-code-equivalent) at batch 1 and 64.
3. Precision variants, device time only (CUDA graphs, events, no host copies): the backend's hybrid fp16
   (fp16 GEMMs in an fp32 network) against the whole network in fp16 and in bf16, with their cosine to the
   fp32 reference, to show what the hybrid costs in speed and buys in accuracy; "compiled" variants run
   every Swin block through TorchInductor (~25-30 s of compilation per batch size).
4. ``facemoe bench --compile --half all`` rows (whole network fp16, compiled blocks, CUDA graphs).

Writes ``gpu_check.json`` (and ``bench.json``, ``bench_compiled.json``) and ``gpu_check.md`` into --out after
every step, so a run cut short still returns what it measured. Needs torch with CUDA and numpy only (no onnx,
OpenCV, typer or rich).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemoe.bench import BenchConfig, BenchSource, run_bench
from facemoe.model import build_model
from facemoe.model.random_weights import randomize
from facemoe.runtime.backends.torch_backend import TorchBackend


def smooth_inputs(count: int, size: int, seed: int) -> np.ndarray:
    """Image-like inputs in [-1, 1] (smooth low-frequency fields + a little noise), numpy only."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((count, 3, 8, 8)).astype(np.float32)
    up = np.repeat(np.repeat(low, size // 8 + 1, axis=2), size // 8 + 1, axis=3)[:, :, :size, :size]
    kernel = np.ones(9, dtype=np.float32) / 9.0
    for axis in (2, 3):
        up = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, up)
    return np.tanh(up + 0.15 * rng.standard_normal(up.shape).astype(np.float32)).astype(np.float32)


def record_routes(model: Any) -> Any:
    """Start recording every MoE block's routing (``FaceMoE.recording_routing``); ``take_routes`` ends it."""
    recording = model.recording_routing()
    return recording, recording.__enter__()


def take_routes(handle: Any) -> list[np.ndarray]:
    """The last recorded forward's (tokens, k) expert indices per block, and the recording ended."""
    recording, record = handle
    recording.__exit__(None, None, None)
    return [calls[-1].cpu().numpy() for calls in record.values()]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> list[float]:
    return [float((np.sort(a, 1) == np.sort(b, 1)).all(1).mean()) for a, b in zip(ref, got, strict=True)]


def compare(ref: np.ndarray, got: np.ndarray, ref_routes: list[np.ndarray] | None = None, routes: Any = None) -> dict:
    cos = cosine(ref, got)
    out = {
        "finite": bool(np.isfinite(got).all()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs": float(np.abs(ref - got).max()),
    }
    if ref_routes is not None and routes is not None:
        agr = agreement(ref_routes, routes)
        out |= {"routing_min": min(agr), "routing_mean": float(np.mean(agr)), "routing_per_layer": agr}
    return out


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict[str, Any] = {"steps": {}, "errors": {}}
        self.bench_md = ""
        self.bench_compiled_md = ""

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2) + "\n")
        lines = ["# FaceMoE GPU check (torch CUDA backend, full preset, random weights)", ""]
        env = self.data.get("environment", {})
        lines.append(
            f"Device: {env.get('gpu')}; torch {env.get('torch')} (CUDA {env.get('cuda')}); python {env.get('python')}"
        )
        parity = self.data["steps"].get("parity")
        if parity:
            lines += ["", "## fp16 parity against the fp32 CPU reference (sparse routing)", ""]
            lines += [
                "| variant | finite | cos min | cos mean | max abs | routing min | routing mean |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, r in parity["results"].items():
                lines.append(
                    f"| {name} | {r['finite']} | {r['cosine_min']:.6f} | {r['cosine_mean']:.6f} | {r['max_abs']:.3g} | "
                    f"{r.get('routing_min', float('nan')):.4f} | {r.get('routing_mean', float('nan')):.4f} |"
                )
            diff = parity["graphs_vs_eager_max_abs"]
            lines.append(f"\n{parity['inputs']} inputs; CUDA graphs vs eager fp16 max abs: {diff:.3g}")
        if self.bench_md:
            lines += ["", "## Bench", "", self.bench_md]
        if self.bench_compiled_md:
            lines += ["", "## Bench, compiled blocks", "", self.bench_compiled_md]
        variants = self.data["steps"].get("variants")
        if variants:
            batches = variants["batches"]
            lines += ["", "## Precision variants (device time of one CUDA-graph replay, median)", ""]
            lines += [
                "| variant | cos min | cos mean | " + " | ".join(f"b{b} ms | b{b} img/s" for b in batches) + " |",
                "|---|---|---|" + "---|---|" * len(batches),
            ]
            lines[-2] = lines[-2].replace("| cos mean |", "| cos mean | routing mean |")
            lines[-1] += "---|"
            for name, r in variants["results"].items():
                cells = " | ".join(
                    f"{r[f'b{b}_ms']:.3f} | {r[f'b{b}_img_per_s']:.0f}" if f"b{b}_ms" in r else "- | -" for b in batches
                )
                routing = f"{r['routing_mean']:.4f}" if "routing_mean" in r else "-"
                lines.append(f"| {name} | {r['cosine_min']:.6f} | {r['cosine_mean']:.6f} | {routing} | {cells} |")
            firsts = {
                n: {k: round(v, 1) for k, v in r.items() if k.endswith("first_call_s")}
                for n, r in variants["results"].items()
            }
            lines += ["", f"First call (compilation, capture warm-up) seconds: `{json.dumps(firsts)}`"]
        for step, err in self.data["errors"].items():
            lines += ["", f"**{step} failed:** `{err.splitlines()[-1] if err else ''}`"]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def step_parity(model: Any, report: Report, count: int) -> None:
    inputs = smooth_inputs(count, model.config.img_size, seed=2024)
    cpu = model.set_routing("sparse")
    layers = record_routes(cpu)
    t0 = time.perf_counter()
    with torch.inference_mode():
        reference = cpu(torch.from_numpy(inputs)).numpy()
    ref_routes = take_routes(layers)
    cpu_seconds = time.perf_counter() - t0
    model.set_routing("static")
    results: dict[str, Any] = {}

    eager = TorchBackend(model, precision="fp16", device="cuda", max_batch=count, cuda_graphs=False)
    layers = record_routes(eager.model)
    fp16 = eager.embed(inputs)
    results["fp16 cuda eager"] = compare(reference, fp16, ref_routes, take_routes(layers))
    eager.close()
    del eager

    graphs = TorchBackend(model, precision="fp16", device="cuda", max_batch=count, cuda_graphs=True)
    fp16_graphs = graphs.embed(inputs)
    results["fp16 cuda graphs"] = compare(reference, fp16_graphs)
    graphs.close()
    del graphs

    fp32 = TorchBackend(model, precision="fp32", device="cuda", max_batch=count, cuda_graphs=False)
    layers = record_routes(fp32.model)
    emb32 = fp32.embed(inputs)
    results["fp32 cuda eager (control)"] = compare(reference, emb32, ref_routes, take_routes(layers))
    fp32.close()
    del fp32
    torch.cuda.empty_cache()
    report.data["steps"]["parity"] = {
        "inputs": count,
        "cpu_reference_seconds": cpu_seconds,
        "results": results,
        "graphs_vs_eager_max_abs": float(np.abs(fp16 - fp16_graphs).max()),
        "tf32_matmul": bool(getattr(torch.backends.cuda.matmul, "allow_tf32", False)),
    }


def run_bench_step(report: Report, args: argparse.Namespace, step: str, model: Any, **options: Any) -> str:
    """``facemoe bench`` rows on the GPU (the command's own library call); JSON to ``<step>.json``."""
    config = BenchConfig(
        precisions=("fp16",),
        batch_sizes=tuple(args.batch),
        warmup=args.warmup,
        iterations=args.iterations,
        device="cuda",
        **options,
    )
    source = BenchSource(f"{args.preset} preset, random weights (seed 0)", model=model)
    bench = run_bench(config, source, log=lambda m: print(m, flush=True))
    bench.write_json(report.out / f"{step}.json")
    report.data["steps"][step] = bench.to_json()
    return bench.markdown()


def step_bench(model: Any, report: Report, args: argparse.Namespace) -> None:
    report.bench_md = run_bench_step(
        report,
        args,
        "bench",
        model,
        backends=("torch", "sparse"),
        sparse_batch_sizes=tuple(args.sparse_batch),
        cuda_graphs=(True, False),
    )


def graph_time_ms(model: Any, batch: int, size: int, iters: int) -> tuple[float, float]:
    """(median device ms of one CUDA-graph replay at ``batch``, seconds of the first call: compilation)."""
    static_in = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(static_in)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_in)
        for _ in range(3):
            graph.replay()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    del graph
    return float(np.median(times)), first_s


VARIANTS = ("hybrid fp16", "all fp16", "all bf16", "all fp16 compiled", "hybrid fp16 compiled")


def make_variant(model: Any, name: str) -> Any:
    """A CUDA copy of ``model`` in one precision policy; every variant takes and returns fp32."""
    if "bf16" not in name:  # exactly what the torch backend runs (its packing and compilation included)
        half = "gemm" if name.startswith("hybrid") else "all"
        compile = name.endswith("compiled")
        return TorchBackend(model, precision="fp16", half=half, compile=compile, cuda_graphs=False).model
    import copy

    variant = copy.deepcopy(model).eval().set_routing("static").bfloat16()
    variant.register_forward_pre_hook(lambda _m, args: tuple(a.bfloat16() for a in args))
    variant.register_forward_hook(lambda _m, _a, out: out.float())
    for _, moe in variant.cuda().moe_layers():
        moe.pack_experts()
    return variant


def step_variants(model: Any, report: Report, args: argparse.Namespace) -> None:
    size = model.config.img_size
    inputs = smooth_inputs(args.inputs, size, seed=2024)
    layers = record_routes(model.set_routing("sparse"))
    with torch.inference_mode():
        reference = model(torch.from_numpy(inputs)).numpy()
    ref_routes = take_routes(layers)
    model.set_routing("static")
    rows: dict[str, Any] = {}
    for name in args.variants:
        variant = make_variant(model, name)
        compiled = name.endswith("compiled")
        layers = [] if compiled else record_routes(variant)
        with torch.inference_mode():
            t0 = time.perf_counter()
            emb = variant(torch.from_numpy(inputs).cuda()).float().cpu().numpy()
            first_s = time.perf_counter() - t0
        row: dict[str, Any] = compare(reference, emb, *((ref_routes, take_routes(layers)) if layers else ()))
        row[f"b{args.inputs}_first_call_s"] = first_s
        for batch in args.variant_batch:
            torch.cuda.reset_peak_memory_stats()
            ms, first = graph_time_ms(variant, batch, size, args.iterations)
            row[f"b{batch}_ms"] = ms
            row[f"b{batch}_img_per_s"] = batch / ms * 1e3
            row[f"b{batch}_first_call_s"] = first
            row[f"b{batch}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(name, batch, f"{ms:.3f} ms, first call {first:.1f} s", flush=True)
            report.data["steps"]["variants"] = {"batches": list(args.variant_batch), "results": rows | {name: row}}
            report.save()
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        del variant
        torch.cuda.empty_cache()
        report.data["steps"]["variants"] = {"batches": list(args.variant_batch), "results": rows}
        report.save()


def step_bench_compiled(model: Any, report: Report, args: argparse.Namespace) -> None:
    report.bench_compiled_md = run_bench_step(
        report,
        args,
        "bench_compiled",
        model,
        backends=("torch",),
        cuda_graphs=(True,),
        torch_compile=True,
        torch_half=args.compiled_half,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--inputs", type=int, default=8, help="parity inputs")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--sparse-batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--variant-batch", type=int, nargs="+", default=[1, 8, 256])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["hybrid fp16", "all fp16", "all fp16 compiled"],  # each compiled one costs ~90 s (3 batch sizes)
        choices=VARIANTS,
    )
    parser.add_argument("--compiled-half", default="all", choices=["gemm", "all"], help="bench_compiled fp16 mode")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "bench", "variants", "bench_compiled"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to check", file=sys.stderr)
        sys.exit(2)
    report.data["environment"] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    model = randomize(build_model(args.preset), seed=0)
    report.data["model_build_seconds"] = time.perf_counter() - start
    print(f"model built in {report.data['model_build_seconds']:.1f} s", flush=True)
    report.save()
    for name, step in (
        ("parity", lambda: step_parity(model, report, args.inputs)),
        ("bench", lambda: step_bench(model, report, args)),
        ("variants", lambda: step_variants(model, report, args)),
        ("bench_compiled", lambda: step_bench_compiled(model, report, args)),
    ):
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            step()
        except Exception:  # keep going: the other step's figures are still worth returning
            report.data["errors"][name] = traceback.format_exc()
            print(report.data["errors"][name], file=sys.stderr, flush=True)
        report.data.setdefault("seconds", {})[name] = time.perf_counter() - t0
        report.save()
        print(f"{name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print((args.out / "gpu_check.md").read_text())
    sys.exit(1 if report.data["errors"] else 0)


if __name__ == "__main__":
    main()
