"""facemoe through a Triton Inference Server vs local ONNX Runtime, on this machine.

    facemoe-export --random-weights --config small --out /tmp/small-bundle
    python benchmarks/triton_vs_local.py /tmp/small-bundle --json out.json --md out.md

It starts a real ``tritonserver`` (facemoe.triton.server) on the bundle's serve repository (127.0.0.1, the
default dynamic batching: preferred sizes up to the bundle's max batch, 1 ms queue delay, one instance), then:

1. **facemoe-run end to end**: one ``facemoe-run`` process on the packaged sample video (120 frames, one face,
   ``--embed-every 1`` so every frame's face is embedded, audit off) with ``--backend onnxruntime`` and with
   ``--backend triton --triton-url grpc://...``; the pipeline's own wall time from ``run_ended`` (model
   loading excluded).
2. **concurrent clients 1 / 4 / 16**: threads in one process, each with its own backend (a TritonBackend
   over gRPC each, or one shared ONNX Runtime session locally), each sending requests of
   ``--faces`` pre-processed faces back to back: throughput (faces/s), per-request latency p50 / p95, and
   the batches Triton formed (``nv_inference_count`` / ``nv_inference_exec_count`` from its metrics).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")
ZERO = dict.fromkeys(COUNTERS, 0.0)


def metrics(url: str, model: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for name in COUNTERS:
        hit = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.M)
        found[name] = float(hit.group(1)) if hit else 0.0
    return found


def settled_metrics(url: str, model: str, requests: float, before: dict[str, float]) -> dict[str, float]:
    """Triton refreshes its metrics every ~2 s: wait until this run's requests are all counted."""
    deadline = time.monotonic() + 10
    while True:
        now = {k: v - before[k] for k, v in metrics(url, model).items()}
        if now["nv_inference_request_success"] >= requests or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def run_video(bundle: Path, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.jsonl"
        cmd = [sys.executable, "-c", "from facemoe.cli.run_cmd import main; main()", "--bundle", str(bundle)]
        cmd += ["--video", str(SAMPLE), "--embed-every", "1", "--max-embeddings", "1000", "--audit-rate", "0"]
        cmd += ["-q", "--out", str(events)]
        done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"facemoe-run failed: {done.stderr[-800:]}")
        records = [json.loads(line) for line in events.read_text().splitlines()]
    ended = records[-1]
    wall = float(ended.get("seconds") or 0.0)
    return {
        "frames": ended.get("frames"),
        "faces_embedded": ended.get("faces_embedded"),
        "tracks": sum(r["event"] == "track_started" for r in records),
        "wall_s": wall,
        "fps": round(ended["frames"] / wall, 2) if wall else None,
        "backend": records[0].get("backend"),
    }


def load(make_backend: Any, clients: int, requests: int, faces: int, size: int, mark: Any = None) -> dict[str, Any]:
    """``clients`` threads, ``requests`` requests each of ``faces`` faces; latencies in ms. ``mark()`` is
    called after the warm-up, just before the clock starts (its result is returned as ``mark``)."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    backends = [make_backend(i) for i in range(clients)]
    batch = np.random.default_rng(0).uniform(-1, 1, (faces, 3, size, size)).astype(np.float32)
    for backend in backends:
        backend.embed(batch)  # warm: connections and sessions made before the clock starts
    marked = mark() if mark is not None else None

    def client(index: int) -> None:
        mine = []
        try:
            for _ in range(requests):
                start = time.perf_counter()
                backends[index].embed(batch)
                mine.append((time.perf_counter() - start) * 1000)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"a client failed: {errors[0]}")
    q = statistics.quantiles(latencies, n=20)
    return {
        "clients": clients,
        "requests": clients * requests,
        "faces_per_request": faces,
        "faces_per_s": round(clients * requests * faces / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(q[18], 1),
        "wall_s": round(elapsed, 2),
        "mark": marked,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=96, help="Requests per setting, split over the clients.")
    parser.add_argument("--faces", type=int, default=1, help="Faces per request.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()

    from facemoe.runtime.backends import open_backend
    from facemoe.triton.repository import default_python_path
    from facemoe.triton.serve import write_serve_repository
    from facemoe.triton.server import TritonServer, stub_python_path

    result: dict[str, Any] = {"bundle": str(args.bundle), "threads_note": "clients are threads in one process"}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repository"
        served = write_serve_repository(args.bundle, repo, python_path=stub_python_path() + default_python_path())
        started = time.perf_counter()
        with TritonServer(repo) as server:
            result["server_ready_s"] = round(time.perf_counter() - started, 2)
            result["video"] = {
                "local": run_video(args.bundle, ["--backend", "onnxruntime"]),
                "triton": run_video(args.bundle, ["--backend", "triton", "--triton-url", server.grpc_url]),
            }
            rows, sent = [], 0
            local = open_backend(args.bundle, "onnxruntime", "fp32")
            for clients in args.clients:
                per_client = max(2, args.requests // clients)
                row = {"local": load(lambda _i: local, clients, per_client, args.faces, served.input_size)}
                row["local"].pop("mark")
                warmed = sent + clients  # requests counted once this setting's warm-up is
                row["triton"] = load(
                    lambda _i: open_backend(args.bundle, "triton", url=server.grpc_url),
                    clients,
                    per_client,
                    args.faces,
                    served.input_size,
                    mark=lambda w=warmed: settled_metrics(server.metrics_url, served.embedder, w, ZERO),
                )
                before = row["triton"].pop("mark")
                sent = warmed + clients * per_client
                counted = settled_metrics(server.metrics_url, served.embedder, clients * per_client, before)
                execs = counted["nv_inference_exec_count"] or 1
                row["triton"]["executions"] = int(counted["nv_inference_exec_count"])
                row["triton"]["mean_batch"] = round(counted["nv_inference_count"] / execs, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
            result["concurrency"] = rows
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.md:
        args.md.write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    video = result["video"]
    lines = [
        "| facemoe-run, sample video (120 frames, every face embedded) | fps | faces embedded | tracks |",
        "|---|---|---|---|",
    ]
    for name in ("local", "triton"):
        v = video[name]
        lines.append(f"| {name}: {v['backend']} | {v['fps']} | {v['faces_embedded']} | {v['tracks']} |")
    lines += [
        "",
        "| clients | local faces/s | local p50 / p95 ms | Triton faces/s | Triton p50 / p95 ms "
        "| Triton requests -> executions (mean batch) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["concurrency"]:
        lo, tr = row["local"], row["triton"]
        lines.append(
            f"| {lo['clients']} | {lo['faces_per_s']} | {lo['p50_ms']} / {lo['p95_ms']} | {tr['faces_per_s']} | "
            f"{tr['p50_ms']} / {tr['p95_ms']} | {tr['requests']} -> {tr['executions']} ({tr['mean_batch']}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
