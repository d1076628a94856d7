"""Stored compiled packages on a GPU (docs/COMPILED.md#stored-compiled-packages), one prepared run.

1. A torch-only bundle of random ``--preset`` weights (manifest only: the torch backend rebuilds the model
   from the recorded seed), then ``build_package`` for this device: the compile time.
2. In a fresh process: ``open_backend(--backend torch)`` loading the stored package (load time, first call),
   and ``facemoe bench`` rows at batch 1, 8, 64, 256 loading it (``bench_package.json``, with its ``rows``).
3. Accuracy: the package's outputs against the fp32 CPU reference (cosine), and the routing agreement of the
   same precision policy run eagerly (a compiled package records no routing).

  PYTHONPATH=src python benchmarks/gpu_packages.py --out /tmp/out [--preset full] [--precision fp16]
Dry run on a CPU: --preset tiny --device cpu --precision fp32 --batch 1,8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import facemoe

LOAD = """
import json, sys, time
t0 = time.perf_counter()
from facemoe.runtime.backends.select import open_backend
import numpy as np
b = open_backend(sys.argv[1], "torch", sys.argv[2], int(sys.argv[3]), device=sys.argv[4])
t1 = time.perf_counter()
b.embed(np.zeros((1, 3, 120, 120), np.float32))
t2 = time.perf_counter()
print(json.dumps({"selection": b.selection, "open_s": t1 - t0, "package_load_s": b.package_load_s,
                  "first_call_s": t2 - t1, "stored": b.package_path is not None}))
"""


def make_bundle(root: Path, preset: str) -> Path:
    from facemoe.model import build_model
    from facemoe.model.fingerprint import model_fingerprint
    from facemoe.model.random_weights import randomize

    demo = Path(facemoe.__file__).parent / "data" / "demo-bundle"
    manifest = json.loads((demo / "manifest.json").read_text())
    model = randomize(build_model(preset), seed=0)
    manifest["model"]["config"] = model.config.to_dict()
    manifest["model"]["source"] = {"random_weights": True, "preset": preset, "seed": 0}
    manifest["model"]["weights_sha256"] = model_fingerprint(model)
    manifest["artifacts"], manifest["engines"] = {}, []
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--batch", default="1,8,64,256")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    import torch

    from facemoe.bundle import Bundle
    from facemoe.export.aoti import build_package
    from facemoe.model.inference import apply_fp16, load_reference_model, run_reference

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch": torch.__version__, "device": args.device, "preset": args.preset}
    sizes = tuple(int(b) for b in args.batch.split(","))
    root = make_bundle(Path("/tmp/facemoe_gpu_packages") / "bundle", args.preset)
    start = time.perf_counter()
    path, identity = build_package(Bundle(root), device=args.device, precision=args.precision, batch_sizes=sizes)
    result["compile_s"] = round(time.perf_counter() - start, 2)
    result["package"] = {"file": path.name, "bytes": path.stat().st_size, "identity": identity.to_json()}
    env = {"PYTHONPATH": str(Path(facemoe.__file__).parents[1])}
    load = subprocess.run(
        [sys.executable, "-c", LOAD, str(root), args.precision, str(max(sizes)), args.device],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    result["load"] = json.loads(load.stdout.strip().splitlines()[-1]) if load.returncode == 0 else load.stderr[-2000:]
    bench = args.out / "bench_package.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "facemoe.cli.bench_cmd",
            "--bundle",
            str(root),
            "--backend",
            "torch",
            "--precision",
            args.precision,
            "--batch",
            args.batch,
            "--device",
            args.device,
            "--iterations",
            str(args.iterations),
            "--json",
            str(bench),
            "--overwrite",
        ],
        check=False,
        env={**os.environ, **env},
    )
    # Accuracy against the fp32 CPU reference (sparse routing: the official function).
    x = np.random.default_rng(0).standard_normal((16, 3, 120, 120)).astype(np.float32)
    reference = load_reference_model(Bundle(root))
    ref_out, ref_routes = run_reference(reference, x, batch_size=8)
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.inference_mode():
        got = runner(torch.from_numpy(x).to(args.device)).float().cpu().numpy()
    cos = (got * ref_out).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref_out, axis=1)
    result["cosine_vs_cpu_fp32"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    eager = load_reference_model(Bundle(root)).to(args.device)
    if args.precision == "fp16":
        apply_fp16(eager)
    with torch.inference_mode(), eager.recording_routing() as record:
        eager(torch.from_numpy(x).to(args.device))
    agree = [
        float((np.sort(calls[0].cpu().numpy(), 1) == np.sort(ref, 1)).all(1).mean())
        for calls, ref in zip(record.values(), ref_routes, strict=True)
    ]
    result["routing_agreement_eager_same_policy"] = {"min": min(agree), "mean": float(np.mean(agree))}
    (args.out / "gpu_packages.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
