"""Several cameras on one CPU: one ``facemoe-run`` process for N sources against N processes, and ``--detect-every``.

    python benchmarks/multi_source.py [--bundle DIR] [--video FILE] [--copies 1 2 4 8] [--detect-every 1 2 4]
        [--repeat 4] [--max-frames N] [--threads T] [--out-dir benchmarks/results/<date>-cpu] [--overwrite]

(a) N copies of one real video (default: the packaged sample, played ``--repeat`` times with a 36-frame
empty gap between plays, so each play is a new track) in ONE process (``--video v --video v ...``) against
N separate processes started together. (b) ``--detect-every 1/2/4`` on a 768x576 video: no clip of that size
ships with the project, so it is made from the sample (4x, centred on a grey 768x576 canvas) unless
``--large-video`` names one. Without ``--bundle`` a small-preset random-weight bundle is exported once into
the work directory (``facemoe-export``; needs PyTorch); a gallery of the sample's person is enrolled with it,
so every track gets an ``identity_assigned`` event.

Figures per row: total frames/s and embeddings/s over the processing window (from the earliest pipeline
start to the last ``run_ended``; model loading excluded, and "launch to exit" including it), mean
embedding batch (``run_ended.mean_batch`` where the CLI writes it, else the summary line's "embedded in B
batches"), and face-to-event latency. Events carry media time, not wall-clock time, so the latency is
taken from when each line reaches the benchmark (``--out -``, read as written): a track's first embedding is
of the face on its confirmation frame, so ``identity_assigned`` minus the ``track_started`` of the same
frame and track is how long that face waited for its batch and the model. One sample per track.

Options this ``facemoe-run`` refuses (several ``--video``, ``--detect-every``) are skipped with a message.
Writes ``multi_source.json`` into ``--out-dir`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
GAP_FRAMES = 36  # longer than the default --max-age (30): the next play starts a new track
LARGE = (768, 576)
REFUSED = ("No such option", "Got unexpected extra argument", "Invalid value for '--video'")


def console(*args: str) -> list[str]:
    """A FaceMoE command of this interpreter's installation (``facemoe-run ...``), without its entry point."""
    modules = {"facemoe-run": "facemoe.cli.run_cmd:main", "facemoe-export": "facemoe.cli.export_cmd:main"}
    module, func = modules.get(args[0], "facemoe.cli.main:app").split(":")
    name = args[0] if args[0] in modules else "facemoe"
    rest = args[1:] if args[0] in modules else args
    code = f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; {func}()"
    return [sys.executable, "-c", code, *rest]


def read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        sys.exit(f"{path}: no frames could be decoded")
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def played(frames: list[np.ndarray], repeat: int) -> list[np.ndarray]:
    gap = [np.full_like(frames[0], 100)] * GAP_FRAMES
    return [f for _ in range(repeat) for f in [*frames, *gap]]


def make_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, Path]:
    """The bundle, the clip for (a), the 768x576 clip for (b) and a gallery of the sample's person."""
    bundle = args.bundle or work / "small-bundle"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting a small-preset random-weight bundle to {bundle} ...", file=sys.stderr)
        cmd = console("facemoe-export", "--random-weights", "--config", "small", "--out", str(bundle), "--quiet")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    source = read_frames(args.video)
    fps = cv2.VideoCapture(str(args.video)).get(cv2.CAP_PROP_FPS) or 25.0
    clip = write_clip(work / f"{args.video.stem}-x{args.repeat}.mp4", played(source, args.repeat), fps)
    if args.large_video:
        large = args.large_video
    else:
        sample = read_frames(SAMPLE)
        canvas = []
        for frame in sample:
            big = cv2.resize(frame, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
            out = np.full((LARGE[1], LARGE[0], 3), 100, np.uint8)
            top, left = (LARGE[1] - big.shape[0]) // 2, (LARGE[0] - big.shape[1]) // 2
            out[top : top + big.shape[0], left : left + big.shape[1]] = big
            canvas.append(out)
        large = write_clip(work / "sample-768x576.mp4", played(canvas, args.repeat), 29.97)
    people = work / "people" / "person"
    people.mkdir(parents=True, exist_ok=True)
    for i in range(0, min(40, len(source)), 8):
        cv2.imwrite(str(people / f"frame{i:03d}.png"), source[i])
    gallery = work / "gallery.npz"
    if not gallery.is_file():
        cmd = console("enroll", "--images", str(people.parent), "--bundle", str(bundle), "--out", str(gallery))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bundle, clip, large, gallery


@dataclass
class Proc:
    """One ``facemoe-run`` process: its events stamped with the time each line arrived."""

    cmd: list[str]
    started: float = 0.0
    exited: float = 0.0
    rc: int | None = None
    stderr: str = ""
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


def launch_all(cmds: list[list[str]]) -> list[Proc]:
    """Start every command at once, read their stdout lines as written, wait for all."""
    procs = [Proc(cmd) for cmd in cmds]
    env = {**os.environ, "COLUMNS": "400"}  # the summary on one line
    handles = []
    stack = contextlib.ExitStack()
    for proc in procs:
        err = stack.enter_context(tempfile.TemporaryFile(mode="w+"))  # noqa: SIM115 (closed by the stack)
        proc.started = time.perf_counter()
        child = subprocess.Popen(proc.cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env)
        handles.append((proc, child, err))

    def read(proc: Proc, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            stamp = time.perf_counter()
            if line.startswith("{"):
                proc.events.append((stamp, json.loads(line)))
        proc.rc = child.wait()
        proc.exited = time.perf_counter()

    readers = [threading.Thread(target=read, args=(proc, child)) for proc, child, _ in handles]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    for proc, _, err in handles:
        err.seek(0)
        proc.stderr = err.read()
    stack.close()
    return procs


def refusal(procs: list[Proc]) -> str | None:
    for proc in procs:
        if proc.rc != 0:
            lines = [ln.strip(" │╭╰─") for ln in proc.stderr.splitlines() if ln.strip(" │╭╰─")]
            reason = next((ln for ln in lines if any(r in ln for r in REFUSED)), None)
            return reason or f"exit {proc.rc}: {' / '.join(lines[-3:])}"
    return None


def summarise(procs: list[Proc], sources: int) -> dict[str, Any]:
    ends = [{**e, "_at": t} for p in procs for t, e in p.events if e["event"] == "run_ended"]
    frames = sum(e["frames"] for e in ends)
    embedded = sum(e["faces_embedded"] for e in ends)
    window = max(e["_at"] for e in ends) - min(e["_at"] - e["seconds"] for e in ends)
    launch = max(p.exited for p in procs) - min(p.started for p in procs)
    batches = 0
    for proc, end in zip(procs, ends, strict=True):
        if end.get("mean_batch"):
            batches += end["faces_embedded"] / end["mean_batch"]
        else:
            found = re.search(r"embedded in (\d+) batches", proc.stderr)
            batches += int(found.group(1)) if found else 0
    latencies = [lat for p in procs for lat in face_to_event(p.events)]
    return {
        "sources": sources,
        "processes": len(procs),
        "frames": frames,
        "faces_embedded": embedded,
        "tracks": sum(e["tracks"] for e in ends),
        "window_s": round(window, 3),
        "launch_to_exit_s": round(launch, 3),
        "frames_per_s": round(frames / window, 1),
        "embeddings_per_s": round(embedded / window, 1),
        "mean_batch": round(embedded / batches, 2) if batches else None,
        "latency_samples": len(latencies),
        "latency_p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1) if latencies else None,
        "detect_share": round(
            sum(e["stage_seconds"]["detect"] for e in ends) / sum(sum(e["stage_seconds"].values()) for e in ends), 3
        ),
        "per_process_seconds": [e["seconds"] for e in ends],
    }


def face_to_event(events: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """Seconds from a track's confirmation (its face queued) to its ``identity_assigned`` line, same frame."""
    started: dict[tuple[Any, ...], float] = {}
    waits = []
    for stamp, event in events:
        key = (event.get("source"), event.get("track_id"), event.get("frame"))
        if event["event"] == "track_started":
            started[key] = stamp
        elif event["event"] == "identity_assigned" and key in started:
            waits.append(stamp - started.pop(key))
    return waits


def base_cmd(args: argparse.Namespace, bundle: Path, gallery: Path) -> list[str]:
    cmd = console("facemoe-run", "--bundle", str(bundle), "--gallery", str(gallery), "--out", "-", "--quiet")
    cmd += ["--audit-rate", "0"]
    if args.max_frames:
        cmd += ["--max-frames", str(args.max_frames)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_latency_ms is not None:
        cmd += ["--max-latency-ms", str(args.max_latency_ms)]
    return cmd


def part_a(args: argparse.Namespace, base: list[str], clip: Path) -> list[dict[str, Any]]:
    rows = []
    for n in args.copies:
        for mode in ("one process", "separate processes"):
            if mode == "one process":
                cmds = [[*base, *[a for _ in range(n) for a in ("--video", str(clip))]]]
            else:
                cmds = [[*base, "--video", str(clip)] for _ in range(n)]
            print(f"(a) {n} x {clip.name}, {mode} ...", file=sys.stderr)
            procs = launch_all(cmds)
            row: dict[str, Any] = {"copies": n, "mode": mode}
            reason = refusal(procs)
            if reason is None and mode == "one process" and n > 1:
                ended = [e for _, e in procs[0].events if e["event"] == "run_ended"]
                if not ended or len(ended[0].get("sources") or ()) != n:
                    reason = "run_ended has no per-source 'sources': several --video are not one run here"
            if reason:
                print(f"  skipped: facemoe-run refused it ({reason})", file=sys.stderr)
                row["skipped"] = reason
            else:
                row |= summarise(procs, n)
            rows.append(row)
    return rows


def part_b(args: argparse.Namespace, base: list[str], large: Path) -> list[dict[str, Any]]:
    rows = []
    for every in args.detect_every:
        extra = [] if every == 1 else ["--detect-every", str(every)]  # 1 is the default: today's CLI too
        print(f"(b) --detect-every {every} on {large.name} ...", file=sys.stderr)
        procs = launch_all([[*base, "--video", str(large), *extra]])
        row: dict[str, Any] = {"detect_every": every}
        reason = refusal(procs)
        if reason:
            print(f"  skipped: facemoe-run refused it ({reason})", file=sys.stderr)
            row["skipped"] = reason
        else:
            row |= summarise(procs, 1)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    body = []
    for row in rows:
        if "skipped" in row:
            cells = [str(row.get(k, "")) for k in keys[:2]] + [f"skipped: {row['skipped']}"] + [""] * (len(keys) - 3)
        else:
            cells = ["" if row.get(k) is None else str(row[k]) for k in keys]
        body.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: export the small preset)")
    parser.add_argument("--video", type=Path, default=SAMPLE, help="the real video of (a)")
    parser.add_argument("--large-video", type=Path, help="the video of (b) (default: the sample on 768x576)")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--detect-every", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=4, help="plays of the video per clip (a new track each)")
    parser.add_argument("--max-frames", type=int, help="passed to every run (short runs while developing)")
    parser.add_argument("--max-latency-ms", type=float, help="passed to every run")
    parser.add_argument("--threads", type=int, help="--threads of every run (default: all cores per process)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b"])
    parser.add_argument("--work", type=Path, help="where the bundle, clips and gallery go (default: a temp dir)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results" / f"{dt.date.today()}-cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing multi_source.json")
    args = parser.parse_args()
    out = args.out_dir / "multi_source.json"
    if out.exists() and not args.overwrite:
        sys.exit(f"{out}: already exists (pass --overwrite to replace it)")
    work = args.work or Path(tempfile.mkdtemp(prefix="facemoe-multi-source-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle, clip, large, gallery = make_inputs(args, work)
    base = base_cmd(args, bundle, gallery)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_cores": os.cpu_count(),
        "bundle": str(bundle),
        "command": base,
        "clip": {"path": str(clip), "video": str(args.video), "repeat": args.repeat, "gap_frames": GAP_FRAMES},
        "large_clip": str(large),
        "latency_note": "wall-clock arrival of identity_assigned minus that of track_started of the same frame",
    }
    if "a" not in args.skip:
        result["multi_source"] = part_a(args, base, clip)
    if "b" not in args.skip:
        result["detect_every"] = part_b(args, base, large)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ["copies", "mode", "frames_per_s", "embeddings_per_s", "mean_batch", "latency_p95_ms", "latency_samples"]
    if "multi_source" in result:
        print(table(result["multi_source"], keys))
    if "detect_every" in result:
        keys = ["detect_every", "frames", "frames_per_s", "detect_share", "embeddings_per_s", "tracks"]
        print("\n" + table(result["detect_every"], keys))
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
