"""Per-stage time of each window attention mode (docs/COMPILED.md#attention-modes), one prepared GPU run.

For every stage of the model (full preset by default, random weights), batch and mode it times one
window attention call (the stage's unshifted and shifted block) in eager and compiled form, and checks the
result against ``matmul`` in fp32. Writes ``gpu_attention.json`` and prints a Markdown table.

  PYTHONPATH=src python benchmarks/gpu_attention.py --out /tmp/out [--preset full] [--batch 1,8,64,256]
Runs on the CPU too (slow; use --preset tiny --batch 1,8 for a dry run).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from facemoe.model import build_model
from facemoe.model.attention import ATTENTION_MODES


def _time(fn, x, mask, iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn(x, mask)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x, mask)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--batch", default="1,8,64,256")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if args.dtype == "fp16" and cuda else torch.float32
    model = build_model(args.preset).eval().to(device, dtype)
    rows = []
    warnings.simplefilter("ignore")
    for stage_index, stage in enumerate(model.layers):
        blocks = list(stage.blocks)[:2]
        for block in blocks:
            attn, mask = block.attn, block.attn_mask
            windows = (block.side // block.window) ** 2
            for batch in (int(b) for b in args.batch.split(",")):
                x = torch.randn(batch * windows, block.window**2, attn.dim, device=device, dtype=dtype)
                with torch.inference_mode():
                    attn.set_mode("matmul")
                    reference = attn(x.float() if dtype == torch.float32 else x, mask).float()
                    for mode in ATTENTION_MODES:
                        attn.set_mode(mode)
                        for compiled in (False,) if args.no_compile else (False, True):
                            row = {
                                "stage": stage_index + 1,
                                "shifted": mask is not None,
                                "batch": batch,
                                "mode": mode,
                                "compiled": compiled,
                                "dtype": str(dtype).split(".")[-1],
                            }
                            try:
                                fn = torch.compile(attn, dynamic=False) if compiled else attn
                                out = fn(x, mask).float()
                                row["max_abs_vs_matmul"] = float((out - reference).abs().max())
                                row["ms"] = round(_time(fn, x, mask, args.iters, cuda), 4)
                            except Exception as exc:  # a mode that cannot run here is a row, not a crash
                                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                    attn.set_mode("matmul")
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_attention.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print("| stage | shifted | batch | mode | compiled | ms | max abs vs matmul |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['shifted']} | {r['batch']} | {r['mode']} | {r['compiled']} | "
            f"{r.get('ms', r.get('error', ''))} | {r.get('max_abs_vs_matmul', '')} |"
        )


if __name__ == "__main__":
    main()
