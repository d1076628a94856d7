"""Full-preset export (fp32 + fp16 + int8) wall time and peak RAM, then ONNX Runtime CPU latency per artifact.

    python benchmarks/export_full.py --out /tmp/full-bundle --calib-count 256 --json results.json

The model has random weights (official ones are hub-only); speed and memory do not depend on the values.
Calibration faces come from the packaged sample video through the detector (degraded copies up to
``--calib-count``). Prints one JSON document; copy the figures into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def export(out: Path, calib: list[str], count: int) -> dict[str, float]:
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "facemoe.cli.export_cmd",
        "--random-weights",
        "--preset",
        "full",
        "--fp16",
        "--int8",
        "--no-gate",  # random weights: report parity, do not gate on it
        "--calib-count",
        str(count),
        "--calib-cache",
        str(out.parent / "calib-cache-bench"),
        "--out",
        str(out),
    ]
    for path in calib:
        cmd += ["--calib", path]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 1024**2, 2)}


def latency(path: Path, batch: int, iters: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 120, 120)).astype(np.float32)
    session.run(None, {"input": x})
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/facemoe-full-bundle"))
    parser.add_argument(
        "--calib", nargs="*", default=[str(Path(__file__).parents[1] / "src/facemoe/data/carphone_pristine.mp4")]
    )
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"cpu_count": os.cpu_count(), "threads": args.threads}
    if not args.skip_export:
        result["export"] = export(args.out, args.calib, args.calib_count)
        print(json.dumps(result), flush=True)
    manifest = json.loads((args.out / "manifest.json").read_text())
    result["parity"] = {
        name: {k: art["parity"].get(k) for k in ("cosine_min", "cosine_mean", "routing_agreement_min", "passed")}
        for name, art in manifest["artifacts"].items()
    }
    result["sizes_mb"] = {
        name: round((args.out / art["file"]).stat().st_size / 1e6, 1) for name, art in manifest["artifacts"].items()
    }
    lat: dict[str, dict[str, object]] = {}
    for name, art in manifest["artifacts"].items():
        lat[name] = {f"batch{b}": latency(args.out / art["file"], b, args.iters, args.threads) for b in (1, 8)}
        print(name, lat[name], flush=True)
    result["ort_cpu_latency"] = lat
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
