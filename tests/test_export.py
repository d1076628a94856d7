"""ONNX export: golden parity through ONNX Runtime, graph checks, fp16 graph, atomic bundles, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from facemoe.bundle import Bundle  # noqa: E402
from facemoe.errors import BundleError, ExportError  # noqa: E402
from facemoe.export.bundle_writer import export_bundle  # noqa: E402
from facemoe.export.graph_check import check_graph  # noqa: E402
from facemoe.export.onnx_export import export_fp32, run_onnx  # noqa: E402


@pytest.fixture(scope="module")
def golden_onnx(tmp_path_factory, golden_model):
    path = tmp_path_factory.mktemp("golden") / "golden.onnx"
    report = export_fp32(golden_model, path)
    return path, report


def test_golden_parity_through_onnxruntime(golden_onnx, golden):
    path, report = golden_onnx
    got = run_onnx(path, golden["inputs"].numpy())
    assert np.abs(got - golden["outputs"].numpy()).max() <= 1e-4
    # The export itself verified batch sizes 1, 3 and 8 on fresh inputs.
    assert set(report["max_abs_by_batch"]) == {"1", "3", "8"}
    assert max(report["max_abs_by_batch"].values()) <= 1e-4


def test_static_routing_graph_has_no_data_dependent_ops(golden_onnx):
    path, _ = golden_onnx
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "ScatterElements", "LayerNormalization"} <= ops
    assert not ops & {"NonZero", "Unique", "Loop", "If"}
    assert model.opset_import[0].version >= 17
    assert check_graph(model).ok
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")


def _tiny_graph(nodes, initializers=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_check_rejects_nonzero():
    model = _tiny_graph(
        [
            helper.make_node("NonZero", ["input"], ["idx"], name="routing_nonzero"),
            helper.make_node("Cast", ["idx"], ["out"], to=TensorProto.FLOAT),
        ]
    )
    report = check_graph(model)
    assert not report.ok
    assert "NonZero" in report.problems[0] and "routing_nonzero" in report.problems[0]


def test_graph_check_rejects_trace_batch_reshape():
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [7 * 16, 2, 2])
    model = _tiny_graph([helper.make_node("Reshape", ["input", "shape"], ["out"], name="window_reverse")], [shape])
    report = check_graph(model)
    assert not report.ok
    assert "baked in" in report.problems[0]
    ok_shape = helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 2, 2])
    assert check_graph(_tiny_graph([helper.make_node("Reshape", ["input", "shape"], ["out"])], [ok_shape])).ok


def test_tiny_bundle_layout_and_manifest(tiny_bundle):
    bundle = Bundle(tiny_bundle)
    assert bundle.precisions == ["fp32", "fp16"]
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["routing"] == {"mode": "static", "k": 2, "num_experts": 3, "gating": "onnx"}
    assert manifest["model"]["random_weights"] is True
    assert manifest["preprocessing"]["input_size"] == 120
    for precision in ("fp32", "fp16"):
        bundle.artifact_path(precision, verify=True)
        parity = manifest["artifacts"][precision]["parity"]
        assert parity["passed"] and parity["num_inputs"] >= 32
        assert set(parity["routing_agreement_per_layer"]) == {
            f"layers.{s}.blocks.{b}.mlp" for s in range(3) for b in range(2)
        }
    assert manifest["artifacts"]["fp32"]["parity"]["cosine_min"] >= 0.99999
    # The reference's own sensitivity to sub-quantisation input noise is recorded for context, ungated.
    floor = manifest["model"]["export"]["parity_noise_floor"]
    assert floor["gates"] == {} and 0.0 < floor["cosine_mean"] < 1.0


def test_fp16_graph_keeps_sensitive_ops_in_fp32(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "model.fp16.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    by_op: dict[str, set[int]] = {}
    for node in model.graph.node:
        if node.input and node.input[0] in types:
            by_op.setdefault(node.op_type, set()).add(types[node.input[0]])
    for op in ("LayerNormalization", "Softmax", "TopK", "BatchNormalization"):
        assert by_op[op] == {TensorProto.FLOAT}, op
    # The expert and attention GEMMs run in fp16.
    assert TensorProto.FLOAT16 in by_op["MatMul"] | by_op.get("Gemm", set())
    half_params = sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16)
    assert half_params > 20


def test_fp16_parity_gate_fails_export_and_writes_nothing(tmp_path, tiny_model):
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="parity gate missed: fp16: cosine mean"):
        export_bundle(tiny_model, out, precisions=("fp32", "fp16"), gates={"fp16": {"cosine_mean": 1.01}})
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.partial-*"))
    report = json.loads((tmp_path / "bundle.parity-failed.json").read_text())
    assert report["fp16"]["passed"] is False and report["fp32"]["passed"] is True


def test_interrupted_export_leaves_no_bundle(tmp_path, tiny_model, monkeypatch):
    import facemoe.export.fp16 as fp16_pass

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fp16_pass, "convert_to_fp16", boom)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_model, out, precisions=("fp32", "fp16"))
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(BundleError, match="does not exist"):
        Bundle(out)


def test_existing_bundle_is_not_overwritten(tmp_path, tiny_model):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        export_bundle(tiny_model, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_corrupted_artifact_is_detected(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.fp32.onnx", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match=r"sha256 .* does not match the manifest"):
        Bundle(copy).artifact_path("fp32", verify=True)
    (copy / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle(copy)


def test_simplify_with_offloaded_weights_matches_plain_onnxslim(tmp_path, tiny_model):
    """The memory-saving simplify (weights parked on disk during onnxslim) yields onnxslim's own graph."""
    onnxslim = pytest.importorskip("onnxslim")
    from facemoe.export.onnx_export import offload_weights, simplify, trace_to_onnx

    raw = tmp_path / "model.raw.onnx"
    trace_to_onnx(tiny_model, raw)
    plain = onnxslim.slim(onnx.load(str(raw)))
    parked = onnx.load(str(raw))
    moved = offload_weights(parked, tmp_path / "weights.bin")
    weight_inputs = {n.input[1] for n in parked.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")}
    external = {t.name for t in parked.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert moved == (tmp_path / "weights.bin").stat().st_size > 0
    assert external and external <= weight_inputs  # biases and constants a simplifier may fold stay inline

    slim = simplify(raw, tmp_path / "model.onnx")
    assert [n.op_type for n in slim.graph.node] == [n.op_type for n in plain.graph.node]
    assert not any(t.data_location == TensorProto.EXTERNAL for t in slim.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.raw.onnx", "weights.bin"]  # nothing left over
    batch = np.random.default_rng(4).standard_normal((2, 3, 120, 120)).astype(np.float32)
    import onnxruntime as ort

    outputs = [ort.InferenceSession(m.SerializeToString()).run(None, {"input": batch})[0] for m in (plain, slim)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_routing_probe_too_large_for_memory_goes_to_the_work_dir(tmp_path, tiny_bundle, monkeypatch):
    """Over the protobuf limit the probe is written to ``work_dir`` (the staging directory), then removed."""
    from pathlib import Path

    import facemoe.export.onnx_graph as onnx_graph
    import facemoe.export.parity as parity
    from facemoe.export.inputs import synthetic_faces

    inputs = synthetic_faces(3)
    path = tiny_bundle / "model.fp32.onnx"
    in_memory, routes, _ = parity.run_artifact(path, inputs)
    written: list[tuple[Path, list[str]]] = []

    def save_and_record(model: onnx.ModelProto, target: Path) -> list[str]:
        external = onnx_graph.save_onnx(model, target)
        written.append((Path(target), external))
        return external

    monkeypatch.setattr(parity, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 0)  # the probe gets an external data file too
    monkeypatch.setattr(parity, "save_onnx", save_and_record)
    from_file, file_routes, _ = parity.run_artifact(path, inputs, work_dir=tmp_path)
    assert [(p.parent, ext) for p, ext in written] == [(tmp_path, [written[0][0].name + ".data"])]
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(in_memory, from_file)
    assert len(routes) == len(file_routes) > 0
    assert all(np.array_equal(a, b) for a, b in zip(routes, file_routes, strict=True))
