"""INT8 explicit quantization (Q/DQ ONNX) of the tiny preset with realistic random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calib_fixtures import held_out_faces, make_aligned_face_folder

pytest.importorskip("torch")

import facemoe.export.int8.quantize as quantize_module
from facemoe.calibration import CalibrationCache, build_calibration_set
from facemoe.errors import InputError
from facemoe.export.int8 import (
    Int8Options,
    cosine,
    describe_qdq,
    ort_cpu_fusion,
    quantize_int8,
    router_gate_nodes,
    run_quantized,
)
from facemoe.export.int8.calibrate import _entropy_amax, _percentile_amax, _TensorRange
from facemoe.export.onnx_export import export_fp32, run_onnx
from facemoe.export.onnx_graph import routing_agreement
from facemoe.export.parity import run_artifact
from facemoe.model import build_model
from facemoe.model.random_weights import randomize
from facemoe.preprocess import preprocess_batch
from facemoe.runtime.ort_session import CUSTOM_DOMAIN

FLOAT_ONLY_OPS = ("LayerNormalization", "Softmax", "TopK", "ScatterElements", "Erf", "BatchNormalization")


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "tiny.fp32.onnx"
    export_fp32(randomize(build_model("tiny"), seed=0), path, verify_batches=(2,))
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, Any]]:
    folder = make_aligned_face_folder(tmp_path_factory.mktemp("calib") / "crops", count=40)
    return build_calibration_set(folder, count=64, seed=0)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return preprocess_batch(held_out_faces())


@pytest.fixture(scope="module")
def default_int8(fp32_path: Path, calibration: tuple[np.ndarray, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    batch, summary = calibration
    out = fp32_path.with_name("tiny.int8.onnx")
    report = quantize_int8(fp32_path, out, batch, calibration_summary=summary)
    return out, report


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_qdq_graph_is_symmetric_int8_with_per_channel_weights(default_int8: tuple[Path, dict[str, Any]]) -> None:
    path, report = default_int8
    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    producers = _producers(model)
    facts = describe_qdq(model)
    assert facts["int8_zero_points"] and facts["zero_points_all_zero"]
    assert facts["per_tensor_activations"] == facts["quantize_linear"] == report["quantized_activations"] > 0
    assert facts["per_channel_weights"] == report["quantized_nodes"] == report["qdq"]["per_channel_weights"]

    checked = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        weight_dq = producers.get(node.input[1])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or weight_dq.input[0] not in initializers:
            continue
        weight = initializers[weight_dq.input[0]]
        scale = numpy_helper.to_array(initializers[weight_dq.input[1]])
        axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        expected = {"MatMul": len(weight.dims) - 1, "Gemm": 0 if trans_b else 1, "Conv": 0}[node.op_type]
        assert weight.data_type == TensorProto.INT8 and axis == expected, node.name
        assert scale.shape == (weight.dims[axis],) and np.all(scale > 0), node.name
        assert np.abs(numpy_helper.to_array(weight)).max() <= 127
        act_dq = producers[node.input[0]]
        act_q = producers[act_dq.input[0]]
        assert act_dq.op_type == "DequantizeLinear" and act_q.op_type == "QuantizeLinear", node.name
        assert initializers[act_q.input[2]].data_type == TensorProto.INT8
        assert len(initializers[act_q.input[1]].dims) == 0  # per-tensor activation scale
        if node.op_type == "Gemm":
            assert len(node.input) == 2  # the bias moved to an Add so ORT can fuse QGemm
        checked += 1
    assert checked == report["quantized_nodes"]
    assert path.stat().st_size < 0.45 * path.with_name("tiny.fp32.onnx").stat().st_size


def test_router_norms_softmax_and_outputs_stay_float(
    fp32_path: Path, default_int8: tuple[Path, dict[str, Any]]
) -> None:
    path, report = default_int8
    model = onnx.load(str(path))
    producers = _producers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def from_dq(tensor: str) -> bool:
        node = producers.get(tensor)
        return node is not None and node.op_type == "DequantizeLinear"

    routers = router_gate_nodes(onnx.load(str(fp32_path)))
    assert len(routers) == 6  # one per MoE block of the tiny preset
    for node in model.graph.node:
        if node.name in routers or node.op_type in FLOAT_ONLY_OPS:
            assert not any(from_dq(t) for t in node.input), f"{node.name} reads a dequantized tensor"
        if node.name in routers or node.op_type in ("Softmax", "TopK"):
            for out in node.output:
                assert not any(c.op_type == "QuantizeLinear" for c in consumers.get(out, [])), node.name
    for output in model.graph.output:
        assert producers[output.name].op_type not in ("DequantizeLinear", "QuantizeLinear")
    reasons = report["excluded_nodes"]
    assert sum("router gate" in r for r in reasons.values()) == 6
    assert sum("activation-activation" in r for r in reasons.values()) == 12  # q@kT and attn@v per block
    assert any("first layer" in r for r in reasons.values())
    first_block = [k for k, r in reasons.items() if "transformer block" in r]
    assert len(first_block) == 6 and all(k.startswith("/layers.0/blocks.0/") for k in first_block)
    assert report["quantized_ops"] == {"MatMul": 12, "Gemm": 21}


def test_runs_at_batch_1_and_5_with_a_dynamic_batch(
    default_int8: tuple[Path, dict[str, Any]], held_out: np.ndarray
) -> None:
    path, _ = default_int8
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param
    one = run_quantized(path, held_out[:1])
    five = run_quantized(path, held_out[:5])
    assert one.shape == (1, 512) and five.shape == (5, 512) and np.all(np.isfinite(five))
    assert np.allclose(one[0], five[0], atol=1e-4)


def test_parity_with_fp32_on_held_out_faces(
    fp32_path: Path, default_int8: tuple[Path, dict[str, Any]], held_out: np.ndarray
) -> None:
    path, report = default_int8
    reference = run_onnx(fp32_path, held_out)
    got = run_quantized(path, held_out)
    similarity = cosine(reference, got)
    agreement = routing_agreement(run_artifact(fp32_path, held_out)[1], run_artifact(path, held_out)[1])
    print(
        f"\nint8 vs fp32 on {len(held_out)} held-out faces: cosine min {similarity.min():.4f} "
        f"mean {similarity.mean():.4f}; routing agreement min {min(agreement):.4f} mean {np.mean(agreement):.4f}"
    )
    assert similarity.mean() >= 0.98 and similarity.min() >= 0.93
    assert len(agreement) == 6
    assert np.mean(agreement) >= 0.95 and min(agreement) >= 0.9
    assert report["check_on_calibration_faces"]["cosine_mean"] >= 0.97


def test_onnxruntime_fuses_every_quantized_op(default_int8: tuple[Path, dict[str, Any]]) -> None:
    path, report = default_int8
    fusion = ort_cpu_fusion(path)
    assert fusion["dequantize_linear_left"] == 0, fusion["ops"]
    assert sum(fusion["fused_int8_ops"].values()) == report["quantized_nodes"]


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_other_calibration_methods(
    fp32_path: Path, calibration: tuple[np.ndarray, dict[str, Any]], held_out: np.ndarray, method: str
) -> None:
    out = fp32_path.with_name(f"tiny.{method}.onnx")
    report = quantize_int8(fp32_path, out, calibration[0][:24], Int8Options(method=method, batch_size=8))
    assert report["calibration"]["method"] == method and report["calibration"]["batches_run"] == 3
    similarity = cosine(run_onnx(fp32_path, held_out[:16]), run_quantized(out, held_out[:16]))
    assert similarity.mean() >= 0.97


def test_placement_options(fp32_path: Path, calibration: tuple[np.ndarray, dict[str, Any]]) -> None:
    batch = calibration[0][:16]
    out = fp32_path.with_name("tiny.options.onnx")
    report = quantize_int8(
        fp32_path,
        out,
        batch,
        Int8Options(
            method="max",
            exclude_router=False,
            quantize_attention_matmuls=True,
            quantize_head=False,
            quantize_first_layer=True,
            float_blocks=0,
            nodes_to_exclude=["/layers.2/blocks.1/attn/qkv/*"],
            check_samples=0,
        ),
    )
    reasons = report["excluded_nodes"]
    assert report["quantized_roles"] == {"activation-matmul": 12, "conv": 1, "weight-gemm": 43}
    assert reasons == {
        "/feature_layer/feature_layer.2/Gemm": "head Linear (quantize_head=False)",
        "/layers.2/blocks.1/attn/qkv/MatMul": "nodes_to_exclude",
    }
    model = onnx.load(str(out))
    producers = _producers(model)
    routers = router_gate_nodes(onnx.load(str(fp32_path)))
    attention = [n for n in model.graph.node if n.name.endswith(("attn/MatMul", "attn/MatMul_1"))]
    for node in [n for n in model.graph.node if n.name in routers] + attention:
        assert all(producers[t].op_type == "DequantizeLinear" for t in node.input), node.name
    assert np.all(np.isfinite(run_quantized(out, batch[:2])))


def test_calibration_cache_hit_and_miss(
    fp32_path: Path,
    calibration: tuple[np.ndarray, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    work_dirs: list[Path] = []
    real = quantize_module.collect_activation_ranges

    def spy(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(args[3] if len(args) > 3 else kwargs.get("method", "percentile"))
        work_dirs.append(kwargs["work_dir"])
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "collect_activation_ranges", spy)
    cache = CalibrationCache(tmp_path / "cache")
    batch = calibration[0][:16]
    first = quantize_int8(fp32_path, tmp_path / "a.onnx", batch, Int8Options(check_samples=0), cache=cache)
    assert first["calibration"]["cache"] == "miss" and len(calls) == 1 and cache.writes == 1
    # The calibration probe (as large as the model) goes beside the output, not to the system temp dir.
    assert work_dirs == [tmp_path] and not list(tmp_path.glob(".calibration-probe*"))

    second = quantize_int8(fp32_path, tmp_path / "b.onnx", batch, Int8Options(check_samples=0), cache=cache)
    assert second["calibration"]["cache"] == "hit" and second["calibration"]["batches_run"] == 0
    assert len(calls) == 1, "calibration ran again despite a cache hit"
    assert second["sha256"] == first["sha256"]  # same ranges, byte-identical artifact

    # A fresh cache object on the same folder (a later export run) hits too.
    third = quantize_int8(fp32_path, tmp_path / "c.onnx", batch, cache=CalibrationCache(tmp_path / "cache"))
    assert third["calibration"]["cache"] == "hit" and len(calls) == 1

    other_data = quantize_int8(fp32_path, tmp_path / "d.onnx", batch[:12], Int8Options(check_samples=0), cache=cache)
    other_method = quantize_int8(
        fp32_path, tmp_path / "e.onnx", batch, Int8Options(method="max", check_samples=0), cache=cache
    )
    other_pct = quantize_int8(
        fp32_path, tmp_path / "f.onnx", batch, Int8Options(percentile=99.9, check_samples=0), cache=cache
    )
    assert [r["calibration"]["cache"] for r in (other_data, other_method, other_pct)] == ["miss"] * 3
    assert len(calls) == 4

    changed = onnx.load(str(fp32_path))
    changed.doc_string = "another model"
    changed_path = tmp_path / "changed.onnx"
    onnx.save(changed, str(changed_path))
    other_model = quantize_int8(changed_path, tmp_path / "g.onnx", batch, Int8Options(check_samples=0), cache=cache)
    assert other_model["calibration"]["cache"] == "miss" and len(calls) == 5


def test_bad_inputs(fp32_path: Path, calibration: tuple[np.ndarray, dict[str, Any]], tmp_path: Path) -> None:
    batch = calibration[0][:4]
    missing = tmp_path / "missing.onnx"
    with pytest.raises(InputError, match=r"missing\.onnx"):
        quantize_int8(missing, tmp_path / "out.onnx", batch)
    with pytest.raises(InputError, match="calibration data"):
        quantize_int8(fp32_path, tmp_path / "out.onnx", batch[0])
    with pytest.raises(InputError, match="calibration data"):
        quantize_int8(fp32_path, tmp_path / "out.onnx", batch[:0])
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_int8(fp32_path, tmp_path / "out.onnx", batch, Int8Options(method="minmax"))
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------------ range estimators


def test_histogram_grows_without_losing_counts() -> None:
    rng = np.random.default_rng(0)
    tracker = _TensorRange(2048, with_histogram=True)
    chunks = [rng.standard_normal(10_000) * scale for scale in (0.1, 1.0, 30.0)]
    for chunk in chunks:
        tracker.update(chunk)
    values = np.abs(np.concatenate(chunks))
    assert tracker.hist is not None and tracker.hist.sum() == values.size
    assert tracker.absmax == pytest.approx(values.max())
    assert tracker.edge >= values.max()
    bin_width = tracker.edge / 2048
    estimate = _percentile_amax(tracker.hist, tracker.edge, 99.0)
    assert abs(estimate - np.percentile(values, 99.0)) <= 2 * bin_width


def test_methods_clip_outliers_differently() -> None:
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.standard_normal(200_000), [40.0, -55.0]])  # two far outliers
    tracker = _TensorRange(2048, with_histogram=True)
    tracker.update(data)
    assert tracker.amax("max", 99.99) == pytest.approx(55.0)
    percentile = tracker.amax("percentile", 99.99)
    entropy = _entropy_amax(tracker.hist, tracker.edge)  # type: ignore[arg-type]
    assert 3.0 < percentile < 6.0
    assert 2.0 < entropy < 10.0


def _naive_entropy_amax(hist: np.ndarray, edge: float, levels: int = 128) -> float:
    """The TensorRT entropy procedure written out candidate by candidate (reference for the fast one)."""
    hist = hist.astype(np.float64)
    last = int(np.flatnonzero(hist)[-1]) + 1
    best_i, best_kl = last, np.inf
    for i in range(levels, last + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        width = i // levels
        q = np.zeros(i)
        for g in range(levels):
            lo, hi = g * width, (i if g == levels - 1 else (g + 1) * width)
            if nonzero[lo:hi].any():
                q[lo:hi] = np.where(nonzero[lo:hi], hist[lo:hi].sum() / nonzero[lo:hi].sum(), 0.0)
        mask = p > 0
        p_norm = p[mask] / p.sum()
        q_norm = np.maximum(q[mask] / q.sum(), 1e-12)
        divergence = float(np.sum(p_norm * np.log(p_norm / q_norm)))
        if divergence < best_kl:
            best_kl, best_i = divergence, i
    return (best_i + 0.5) * edge / len(hist)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_entropy_matches_the_naive_procedure(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tracker = _TensorRange(512, with_histogram=True)
    tracker.update(np.concatenate([rng.standard_normal(20_000) ** (seed + 1), rng.standard_normal(3) * 30]))
    assert tracker.hist is not None
    assert _entropy_amax(tracker.hist, tracker.edge) == pytest.approx(_naive_entropy_amax(tracker.hist, tracker.edge))


def test_plugin_gating_graph_quantizes_around_the_moe_op(
    tmp_path: Path, calibration: tuple[np.ndarray, dict[str, Any]]
) -> None:
    pytest.importorskip("onnxruntime_extensions")
    fp32 = tmp_path / "plugin.fp32.onnx"
    export_fp32(randomize(build_model("tiny"), seed=0), fp32, verify_batches=(2,), gating="plugin")
    out = tmp_path / "plugin.int8.onnx"
    report = quantize_int8(fp32, out, calibration[0][:16])
    # The experts and router live inside facemoe::SparseMoE and stay float; attention, merges and head are int8.
    assert report["quantized_ops"] == {"MatMul": 12, "Gemm": 1}
    assert report["check_on_calibration_faces"]["cosine_mean"] >= 0.97
    model = onnx.load(str(out))
    moe_inputs = {t for n in model.graph.node if n.domain == CUSTOM_DOMAIN for t in n.input}
    producers = _producers(model)
    assert not any(producers[t].op_type == "DequantizeLinear" for t in moe_inputs if t in producers)
