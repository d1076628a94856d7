"""Cost of ``facemoe-run --audit-rate``: wall-time overhead on the sample video, and drops behind a slow reference.

    facemoe-export --random-weights --config tiny --fp16 --int8 --calib src/facemoe/data/carphone_pristine.mp4 \
        --out /tmp/tiny-bundle
    python benchmarks/audit_overhead.py /tmp/tiny-bundle [--precision int8] [--repeats 3] [--json out.json]

Each run is a separate ``facemoe-run`` process on the packaged sample video (120 frames, one face) with every
frame's face embedded (``--embed-every 1``, so the audit has work), the ONNX Runtime CPU backend and the
``onnx`` reference. The figure is the pipeline's own wall time from the ``run_ended`` event (model loading
excluded): the fastest and the median of the repeats, interleaved so a noisy machine affects every rate
alike; the overhead is taken from the fastest (the least disturbed run). It includes the end-of-stream
drain: samples still queued when the video ends are checked before ``run_ended``. "reference busy" is the
time the background worker spent in the reference (last repeat): the CPU the audit takes from a saturated
machine.

Drops: the ``torch`` reference (PyTorch sparse routing, one thread) against a steady stream (each frame's face
embedded at once, ``--max-latency-ms 0``) with a short queue (``--audit-queue 4``): the share of sampled
faces dropped per rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
RATES = (0.0, 0.02, 0.1, 0.5)


def run(bundle: Path, precision: str, rate: float, *extra: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.jsonl"
        cmd = [
            sys.executable, "-m", "facemoe.cli.run_cmd", "--bundle", str(bundle), "--video", str(SAMPLE),
            "--backend", "onnxruntime", "--precision", precision, "--embed-every", "1", "--max-embeddings", "1000",
            "--audit-rate", str(rate), "--allow-failed-parity", "-q", "-o", str(events), *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
        lines = [json.loads(line) for line in events.read_text().splitlines()]
    ended = next(e for e in lines if e["event"] == "run_ended")
    check = next((e for e in lines if e["event"] == "accuracy_check" and e.get("final")), {})
    return {"seconds": ended["seconds"], "embedded": ended["faces_embedded"], **check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    times: dict[float, list[float]] = {rate: [] for rate in RATES}
    last: dict[float, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for rate in RATES:
            result = run(args.bundle, args.precision, rate, "--audit-reference", "onnx")
            times[rate].append(result["seconds"])
            last[rate] = result
    base = min(times[0.0])
    rows = []
    print(f"overhead, {args.precision} on the ONNX Runtime CPU backend, onnx reference, {args.repeats} repeats")
    columns = (
        "--audit-rate",
        "faces embedded",
        "faces checked",
        "reference busy s",
        "wall s (fastest)",
        "wall s (median)",
    )
    print("| " + " | ".join((*columns, "overhead")) + " |")
    print("|---|---|---|---|---|---|---|")
    for rate in RATES:
        wall, median = min(times[rate]), statistics.median(times[rate])
        row = {"rate": rate, "embedded": last[rate]["embedded"], "checked": last[rate].get("faces", 0), "wall": wall}
        row["overhead_pct"] = 100 * (wall / base - 1)
        rows.append(row)
        label = "off (0)" if rate == 0 else f"{rate:g}"
        print(
            f"| {label} | {row['embedded']} | {row['checked']} | {last[rate].get('worker_seconds', 0.0):.3f} "
            f"| {wall:.3f} | {median:.3f} "
            f"| {row['overhead_pct']:+.1f}% |"
        )

    drops = []
    print("\ndrops, torch reference vs a steady stream (--max-latency-ms 0), --audit-queue 4")
    print("| --audit-rate | sampled | checked | dropped | dropped share | reference busy s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for rate in (0.1, 0.5, 1.0):
        steady = ("--max-latency-ms", "0", "--audit-queue", "4")
        result = run(args.bundle, args.precision, rate, "--audit-reference", "torch", *steady)
        share = result["dropped"] / result["sampled"] if result["sampled"] else 0.0
        drops.append({"rate": rate, **{k: result[k] for k in ("sampled", "faces", "dropped", "seconds")}})
        print(
            f"| {rate:g} | {result['sampled']} | {result['faces']} | {result['dropped']} | {100 * share:.0f}% "
            f"| {result['worker_seconds']:.2f} | {result['seconds']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"overhead": rows, "drops": drops, "times": times}, indent=2))


if __name__ == "__main__":
    main()
