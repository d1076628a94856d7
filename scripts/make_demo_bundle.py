"""Regenerate the demo bundle that ships in the package (``src/facemoe/data/demo-bundle``).

    python scripts/make_demo_bundle.py            # needs the export extra (PyTorch)

``facemoe-run --demo`` loads this bundle with ONNX Runtime, so a plain ``pip install`` (no PyTorch) runs
the whole pipeline. It is the tiny preset with random weights (fixed seed) and only the fp32 artifact:
the one the CPU path picks by default (ORT's fp16 CPU kernels are slower, docs/BENCHMARKS.md), and the
export's parity check against PyTorch has to pass as usual. Re-run this after a change to the model,
the exporter or the manifest schema, and commit the result (``facemoe parity`` re-checks it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "src" / "facemoe" / "data" / "demo-bundle"
PRESET, SEED = "tiny", 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TARGET, help="Where the bundle goes (replaced).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="facemoe-demo-") as tmp:
        staged = Path(tmp) / "demo-bundle"
        cmd = [sys.executable, "-m", "facemoe.cli.export_cmd", "--random-weights", "--config", PRESET]
        cmd += ["--seed", str(SEED), "--out", str(staged), "--quiet"]
        subprocess.run(cmd, check=True)
        # The parity plot is for people reading an export; the runtime needs the manifest and the ONNX.
        (staged / "parity.png").unlink(missing_ok=True)
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staged, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"demo bundle: {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
