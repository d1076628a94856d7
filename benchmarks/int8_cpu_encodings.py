"""INT8 weight encodings on this CPU: mean/min embedding cosine against the bundle's fp32 ONNX.

    python benchmarks/int8_cpu_encodings.py BUNDLE [--faces 8] [--json out.json]
    qemu-x86_64 -cpu Haswell "$(which python)" benchmarks/int8_cpu_encodings.py BUNDLE   # AVX2, no VNNI

For each encoding (s8 = the TensorRT graph as stored, w7, u8; docs/EXPORT.md "INT8 on CPUs without VNNI")
at graph level (ONNX Runtime optimisations off: the Q/DQ arithmetic, the same on every CPU) and as served
(all optimisations: the fused integer kernels this processor runs). Inputs: the export's synthetic
held-out faces (seed 4321) and their flipped views. With --timing, also the speed-up over fp32 at batch
1 and 8 in interleaved rounds (meaningless under an emulator).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

from facemoe.export.inputs import paired_views, synthetic_faces
from facemoe.runtime.int8_cpu import detect_cpu
from facemoe.runtime.ort_session import create_session


def with_routes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every TopK's expert indices as extra outputs (one per MoE layer)."""
    for node in model.graph.node:
        if node.op_type == "TopK":
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[1], onnx.TensorProto.INT64, None))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--faces", type=int, default=8)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    inputs = paired_views(synthetic_faces(args.faces))

    def embed(session, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:  # type: ignore[no-untyped-def]
        parts = [session.run(batch[i : i + 8]) for i in range(0, len(batch), 8)]
        routes = [
            np.sort(np.concatenate([p[j] for p in parts]).reshape(-1, 2), axis=1) for j in range(1, len(parts[0]))
        ]
        return np.concatenate([p[0] for p in parts]), routes

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    reference_embeddings, reference_routes = embed(
        create_session(with_routes(onnx.load(str(args.bundle / "model.fp32.onnx")))), inputs
    )
    reference = unit(reference_embeddings)
    isa = detect_cpu()
    result: dict[str, object] = {"cpu": isa.label, "saturates_int8": isa.saturates_int8, "faces": args.faces}
    served = {}
    for encoding in ("s8", "w7", "u8"):
        for optimization in ("disabled", "all"):
            model = with_routes(onnx.load(str(args.bundle / "model.int8.onnx")))
            session = create_session(model, optimization=optimization, int8_encoding=encoding)  # type: ignore[arg-type]
            embeddings, routes = embed(session, inputs)
            cosine = (unit(embeddings) * reference).sum(axis=1)
            agreement = [float((a == b).all(axis=1).mean()) for a, b in zip(routes, reference_routes, strict=True)]
            key = f"{encoding} {'graph' if optimization == 'disabled' else 'served'}"
            result[key] = {
                "cosine_mean": round(float(cosine.mean()), 5),
                "cosine_min": round(float(cosine.min()), 5),
                "routing_min": round(min(agreement), 4),
                "routing_mean": round(float(np.mean(agreement)), 4),
            }
            print(key, result[key], flush=True)
            if optimization == "all":
                served[encoding] = session
    if args.timing:
        served = {name: create_session(args.bundle / "model.int8.onnx", int8_encoding=name) for name in served}
        served["fp32"] = create_session(args.bundle / "model.fp32.onnx")
        for batch_size in (1, 8):
            batch = inputs[:batch_size]
            times: dict[str, list[float]] = {name: [] for name in served}
            for _ in range(args.rounds):
                for name, session in served.items():
                    start = time.perf_counter()
                    session.run(batch)
                    times[name].append(time.perf_counter() - start)
            fp32 = float(np.median(times["fp32"]))
            speedup = {name: round(fp32 / float(np.median(t)), 2) for name, t in times.items() if name != "fp32"}
            result[f"speedup_over_fp32_batch{batch_size}"] = speedup
            print(f"batch {batch_size} speed-up over fp32:", speedup, flush=True)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
