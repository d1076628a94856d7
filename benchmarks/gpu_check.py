"""Device check of the PyTorch CUDA backend on the full FaceMoE (random weights), in one run of ~5-8 minutes.

    OUT=/some/dir bash benchmarks/gpu_check.sh        # or: PYTHONPATH=src python benchmarks/gpu_check.py --out DIR

1. fp16 parity: the CUDA fp16 backend (static routing, fp16 GEMMs in an fp32 network) against the PyTorch
   fp32 CPU reference in sparse routing (the official semantics) on a few held-out inputs: embedding cosine
   (min/mean), max abs error, per-layer routing agreement; CUDA graphs vs eager; fp32 CUDA as a control.
2. ``facemoe bench`` rows (the same library call the command makes): torch fp16 static with CUDA graphs on
   and off at batch 1, 8, 64, 256, and the sparse fp32 baseline (official-code-equivalent) at batch 1 and 64.

Writes ``gpu_check.json`` (and ``bench.json``) and ``gpu_check.md`` into --out after every step, so a run cut
short still returns what it measured. Needs torch with CUDA and numpy only (no onnx, OpenCV, typer or rich).
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


def record_routes(model: Any) -> list[Any]:
    layers = [m for _, m in model.moe_layers()]
    for moe in layers:
        moe.record_routing = True
    return layers


def take_routes(layers: list[Any]) -> list[np.ndarray]:
    routes = [moe.last_routing.cpu().numpy() for moe in layers]
    for moe in layers:
        moe.record_routing, moe.last_routing = False, None
    return routes


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


def step_bench(model: Any, report: Report, args: argparse.Namespace) -> None:
    config = BenchConfig(
        backends=("torch", "sparse"),
        precisions=("fp16",),
        batch_sizes=tuple(args.batch),
        sparse_batch_sizes=tuple(args.sparse_batch),
        cuda_graphs=(True, False),
        warmup=args.warmup,
        iterations=args.iterations,
        device="cuda",
    )
    source = BenchSource(f"{args.preset} preset, random weights (seed 0)", model=model)
    bench = run_bench(config, source, log=lambda m: print(m, flush=True))
    bench.write_json(report.out / "bench.json")
    report.data["steps"]["bench"] = bench.to_json()
    report.bench_md = bench.markdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--inputs", type=int, default=8, help="parity inputs")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--sparse-batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "bench"])
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
