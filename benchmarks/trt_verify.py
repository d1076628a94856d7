"""Verification of the TensorRT path on a machine with an NVIDIA GPU and TensorRT (docs/TENSORRT.md).

    PYTHONPATH=src python benchmarks/trt_verify.py --out DIR [--preset tiny|small|full] [--max-batch 32]
                                                  [--skip export]  (reuse the bundles of an earlier run)

Needs TensorRT (10.x or 11.x; the plugin steps 10.6+, AOT 10.9+), cuda-python, onnxruntime, and for the
export and plugin steps torch, triton and onnxruntime-extensions. Random weights; nothing is downloaded.

1. export: a standard bundle (fp32, fp16, int8 calibrated on the packaged sample video) and a
   ``--gating plugin`` bundle, through ``facemoe-export``;
2. engines: fp32 / fp16 / int8 built (``facemoe.export.tensorrt.build_engine``), each run at batch 1, 8 and
   max with and without CUDA graphs, compared with ONNX Runtime fp32 (CPU): cosine min / mean, max abs;
3. plugin engines: AOT and JIT built from the plugin bundle and compared the same way; the AOT engine is
   also run in a fresh process where importing torch or the plugin module fails;
4. timing cache: a forced rebuild reuses it; a corrupt and a truncated cache are replaced, not fatal;
5. refusals: a sidecar claiming another TensorRT version or GPU, and modified engine bytes, are refused
   before TensorRT deserialises anything; ``auto`` states its choice on one line.

Writes ``trt_verify.json`` and ``trt_verify.md`` into --out after every step, so a run cut short still
returns what it measured. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
# The engine against ONNX Runtime running the same ONNX: what TensorRT itself changes (kernels, fusions).
COSINE_MIN = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}


class Results:
    def __init__(self, out: Path) -> None:
        self.out, self.data, self.failed = out, {"steps": {}}, False

    def step(self, name: str, func: Callable[[], dict[str, Any]]) -> None:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            record = func()
        except Exception as exc:
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(record["traceback"], file=sys.stderr, flush=True)
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.failed |= not record.get("ok", True)
        self.data["steps"][name] = record
        self.save()
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, indent=1)[:3000], flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "trt_verify.json").write_text(json.dumps(self.data, indent=1, default=str))
        lines = ["# TensorRT verification", "", f"```\n{json.dumps(self.data.get('environment', {}), indent=1)}\n```"]
        for name, record in self.data["steps"].items():
            status = "ok" if record.get("ok", True) else "FAILED"
            lines += ["", f"## {name}: {status} ({record['seconds']} s)", ""]
            lines += [f"- {k}: {v}" for k, v in record.items() if k not in ("traceback", "seconds")]
        (self.out / "trt_verify.md").write_text("\n".join(lines) + "\n")


def environment() -> dict[str, Any]:
    from facemoe.export.tensorrt import capabilities
    from facemoe.runtime.engine_identity import detect_device, load_cudart

    device = detect_device()
    cudart = load_cudart()
    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "device": device.describe(),
        "capabilities": capabilities().__dict__,
        "cuda_python": getattr(cudart, "__file__", None),
    }


def export(work: Path, preset: str, max_batch: int) -> dict[str, Any]:
    common = ["--random-weights", "--config", preset, "--max-batch", str(max_batch), "--quiet", "--overwrite"]
    runs = {
        "standard": [*common, "--fp16", "--int8", "--calib", str(SAMPLE_VIDEO), "--no-gate"],
        "plugin": [*common, "--fp16", "--gating", "plugin", "--no-gate"],
    }
    record: dict[str, Any] = {"ok": True}
    for name, args in runs.items():
        cmd = [sys.executable, "-m", "facemoe.cli.export_cmd", *args, "--out", str(work / name)]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        record[name] = "exported" if done.returncode == 0 else f"failed: {done.stderr[-1500:]}"
        record["ok"] &= done.returncode == 0
    return record


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "max_abs": float(np.abs(got - want).max())}


def run_engine(bundle_dir: Path, precision: str, max_batch: int) -> dict[str, Any]:
    """Each batch size with and without CUDA graphs against ONNX Runtime on the CPU.

    Pass / fail compares with ONNX Runtime running the same precision's ONNX (``vs_onnx``); the comparison
    with ONNX Runtime fp32 (``vs_fp32``) is reported with whether it stays within the export's parity gate
    for that precision (random inputs are harsher than the export's parity faces, so that one is advisory).
    """
    from facemoe.bundle import Bundle
    from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    bundle = Bundle(bundle_dir)
    rng = np.random.default_rng(0)
    cpu = ["CPUExecutionProvider"]
    fp32 = OnnxRuntimeBackend.from_bundle(bundle, "fp32", providers=cpu)
    same = OnnxRuntimeBackend.from_bundle(bundle, precision, providers=cpu)
    gate = float(bundle.artifact(precision).parity.get("gates", {}).get("cosine_min", 0.0))
    record: dict[str, Any] = {"ok": True, "export_gate_cosine_min": gate}
    for graphs in (False, True):
        backend = TensorRTBackend.from_bundle(bundle, precision, max_batch, cuda_graphs=graphs)
        for batch in sorted({1, min(8, max_batch), max_batch}):
            faces = rng.uniform(-1, 1, (batch, 3, backend.input_size, backend.input_size)).astype(np.float32)
            backend.embed(faces)  # warm-up (and the graph capture)
            start = time.perf_counter()
            got = backend.embed(faces)
            ms = (time.perf_counter() - start) * 1e3
            vs_onnx, vs_fp32 = _compare(got, same.embed(faces)), _compare(got, fp32.embed(faces))
            row: dict[str, Any] = {"ms": round(ms, 2), "vs_onnx": vs_onnx, "vs_fp32": vs_fp32}
            row["vs_fp32_within_gate"] = vs_fp32["cos_min"] >= gate
            row["ok"] = vs_onnx["cos_min"] >= COSINE_MIN[precision]
            record[f"batch{batch}{'_graphs' if graphs else ''}"] = row
            record["ok"] &= row["ok"]
        if graphs:
            record["cuda_graphs_active"] = backend.cuda_graphs
            record["cuda_graph_error"] = backend.cuda_graph_error
        record["memory"] = backend.memory_stats()
        backend.close()
    return record


def build(bundle_dir: Path, precision: str, max_batch: int, **options: Any) -> dict[str, Any]:
    from facemoe.export.tensorrt import BuildOptions, build_engine

    opts = BuildOptions(precision=precision, opt_batch=min(8, max_batch), max_batch=max_batch, force=True, **options)
    built = build_engine(bundle_dir, opts, log=print)
    return {"engine": built.path.name, "build_s": built.identity.build_seconds, "notes": built.notes}


def engines(work: Path, max_batch: int) -> dict[str, Any]:
    record: dict[str, Any] = {"ok": True}
    for precision in ("fp32", "fp16", "int8"):
        try:
            built = build(work / "standard", precision, max_batch)
            record[precision] = built | run_engine(work / "standard", precision, max_batch)
        except Exception as exc:
            record[precision] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        record["ok"] &= bool(record[precision].get("ok"))
    return record


AOT_CHILD = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] == "torch" or name in ("facemoe.export.trt_plugin", "facemoe.gating.trt_plugin"):
        raise ImportError(f"{name} is blocked: an AOT engine must run without it")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import numpy as np
from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend
backend = TensorRTBackend.from_engine_file(sys.argv[1], max_batch=4)
out = backend.embed(np.zeros((2, 3, backend.input_size, backend.input_size), np.float32))
print("AOT-OK", out.shape, "torch" in sys.modules)
"""


def plugin_engines(work: Path, max_batch: int) -> dict[str, Any]:
    from facemoe.gating import trt_plugin

    record: dict[str, Any] = {"ok": True, "available": trt_plugin.available(), "aot": trt_plugin.available(aot=True)}
    modes = ["jit", "aot"] if record["aot"] else ["jit"]
    for mode in modes:
        try:
            built = build(work / "plugin", "fp32", max_batch, plugin_mode=mode)
            record[mode] = built | run_engine(work / "plugin", "fp32", max_batch)
        except Exception as exc:
            record[mode] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        record["ok"] &= bool(record[mode].get("ok"))
    if "aot" in modes and record["aot"].get("ok"):
        engine = work / "plugin" / "engines" / record["aot"]["engine"]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        )
        child = subprocess.run(
            [sys.executable, "-c", AOT_CHILD, str(engine)], capture_output=True, text=True, check=False, env=env
        )
        record["aot_without_torch"] = child.stdout.strip() or child.stderr[-1500:]
        record["ok"] &= "AOT-OK" in child.stdout and child.stdout.strip().endswith("False")
    return record


def timing_cache(work: Path, max_batch: int) -> dict[str, Any]:
    from facemoe.export.tensorrt import timing_cache_path
    from facemoe.runtime.engine_identity import detect_device

    device = detect_device()
    path = timing_cache_path(work / "standard", device.compute_capability or "", device.tensorrt_version or "")
    record: dict[str, Any] = {
        "ok": path.is_file(),
        "cache": path.name,
        "bytes": path.stat().st_size if path.exists() else 0,
    }
    reused = build(work / "standard", "fp16", max_batch)
    record["reuse"] = reused["notes"]
    record["ok"] &= any("reused timing cache" in n for n in reused["notes"])
    good = path.read_bytes()
    for name, blob in (("corrupt", b"\x00not a timing cache" * 64), ("truncated", good[: len(good) // 2])):
        path.write_bytes(blob)
        replaced = build(work / "standard", "fp16", max_batch)
        record[name] = replaced["notes"]
        record["ok"] &= any("corrupt or from another GPU" in n for n in replaced["notes"])
    return record


def refusals(work: Path, max_batch: int) -> dict[str, Any]:
    from facemoe.bundle import Bundle
    from facemoe.errors import EngineMismatchError
    from facemoe.runtime.backends.select import open_backend
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend
    from facemoe.runtime.engine_identity import sidecar_path

    root = work / "refusals"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(work / "standard", root)
    record: dict[str, Any] = {"ok": True}
    lines: list[str] = []
    backend = open_backend(root, "auto", max_batch=max_batch, report=lines.append)
    record["auto"] = lines
    record["ok"] &= backend.name == "tensorrt"
    backend.close()
    engine = Bundle(root).manifest.engines[0]
    sidecar = sidecar_path(root / engine["file"])
    original = sidecar.read_text()
    for field, value in (("tensorrt_version", "9.0.0.1"), ("compute_capability", "sm_53")):
        data = json.loads(original)
        data["identity"][field] = value
        sidecar.write_text(json.dumps(data))
        try:
            TensorRTBackend.from_bundle(Bundle(root), engine["precision"], 1).close()
            record[field] = "NOT refused"
            record["ok"] = False
        except EngineMismatchError as exc:
            record[field] = str(exc)[:300]
    sidecar.write_text(original)
    path = root / engine["file"]
    path.write_bytes(path.read_bytes() + b"\0")
    try:
        TensorRTBackend.from_bundle(Bundle(root), engine["precision"], 1).close()
        record["modified_bytes"], record["ok"] = "NOT refused", False
    except EngineMismatchError as exc:
        record["modified_bytes"] = str(exc)[:300]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--work", type=Path, help="where bundles go (default: OUT/work)")
    parser.add_argument(
        "--skip", action="append", default=[], help="skip a step (repeatable), e.g. --skip export to reuse bundles"
    )
    args = parser.parse_args()
    work = args.work or args.out / "work"
    results = Results(args.out)
    results.data["environment"] = environment()
    results.data["arguments"] = {"preset": args.preset, "max_batch": args.max_batch}
    results.save()
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "export": lambda: export(work, args.preset, args.max_batch),
        "engines": lambda: engines(work, args.max_batch),
        "plugin engines": lambda: plugin_engines(work, args.max_batch),
        "timing cache": lambda: timing_cache(work, args.max_batch),
        "refusals": lambda: refusals(work, args.max_batch),
    }
    for name, step in steps.items():
        if name not in args.skip:
            results.step(name, step)
    print(f"results in {args.out}/trt_verify.md; {'FAILED' if results.failed else 'all checks passed'}")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
