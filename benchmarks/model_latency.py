"""PyTorch CPU latency of the FaceMoE model per routing mode (issue: foundation measurements).

    python benchmarks/model_latency.py --preset full --batch 1 --iters 5

Prints a JSON line per routing mode: median / min latency in ms over ``iters`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from facemoe.model import build_model
from facemoe.model.random_weights import randomize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = randomize(build_model(args.preset), seed=0)
    x = torch.randn(args.batch, 3, 120, 120)
    for routing in ("sparse", "static"):
        model.set_routing(routing)
        with torch.inference_mode():
            model(x)
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - start) * 1e3)
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "routing": routing,
                    "batch": args.batch,
                    "threads": args.threads,
                    "median_ms": round(statistics.median(times), 1),
                    "min_ms": round(min(times), 1),
                    "torch": torch.__version__,
                }
            )
        )


if __name__ == "__main__":
    main()
