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
        "--config",
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
    child = subprocess.Popen(cmd)
    timeline: list[tuple[float, float]] = []  # (seconds, resident GiB), the most in each 5 s window
    while child.poll() is None:
        t = time.perf_counter() - start
        gib = resident_gib(child.pid)
        if timeline and int(timeline[-1][0] // 5) == int(t // 5):
            timeline[-1] = (timeline[-1][0], max(timeline[-1][1], gib))
        else:
            timeline.append((round(t, 1), gib))
        time.sleep(0.25)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 1024**2, 2),
        "rss_timeline_gib": [(t, round(g, 2)) for t, g in timeline],
    }


def resident_gib(pid: int) -> float:
    """Resident size of ``pid`` and its child processes (Linux /proc; 0 where unreadable)."""
    total_kib = 0
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    for p in pids:
        try:
            for line in (Path("/proc") / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024**2


def latency(paths: dict[str, Path], batch: int, rounds: int, threads: int) -> dict[str, dict[str, float]]:
    """Median ms per artifact, and the median per-round speed-up over fp32, with the runs interleaved.

    One call of every artifact per round, in turn: on a shared or throttling machine the speed drifts over
    minutes (fp32 batch 1 measured anywhere from 450 to 690 ms here), and back-to-back blocks per artifact
    would turn that drift into a false speed-up or slow-down.
    """
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 3, 120, 120)).astype(np.float32)
    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name].run(None, {"input": x})  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input": x})
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {}
    for name, values in times.items():
        result[name] = {"median_ms": round(statistics.median(values), 1), "min_ms": round(min(values), 1)}
        if "fp32" in times:
            ratios = [a / b for a, b in zip(times["fp32"], values, strict=True)]
            result[name]["speedup_vs_fp32"] = round(statistics.median(ratios), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/facemoe-full-bundle"))
    parser.add_argument(
        "--calib", nargs="*", default=[str(Path(__file__).parents[1] / "src/facemoe/data/carphone_pristine.mp4")]
    )
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds at batch 1 (batch 8: half)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--cold", action="store_true", help="empty the calibration cache first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"cpu_count": os.cpu_count(), "threads": args.threads}
    if args.cold:
        shutil.rmtree(args.out.parent / "calib-cache-bench", ignore_errors=True)
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
    paths = {name: args.out / art["file"] for name, art in manifest["artifacts"].items()}
    lat = {f"batch{b}": latency(paths, b, max(3, args.rounds // (1 if b == 1 else 2)), args.threads) for b in (1, 8)}
    print(json.dumps(lat), flush=True)
    result["ort_cpu_latency"] = lat
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
