"""The facemoe::SparseMoE custom op: export, ONNX Runtime kernel, parity with the standard-op graph."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime_extensions")

from facemoe.errors import ExportError  # noqa: E402
from facemoe.export.graph_check import check_graph  # noqa: E402
from facemoe.export.onnx_export import export_fp32, run_onnx  # noqa: E402
from facemoe.gating import ort as gating_ort  # noqa: E402
from facemoe.gating.torch_op import reference_sparse_moe  # noqa: E402
from facemoe.model import build_model  # noqa: E402
from facemoe.model.moe import MoE  # noqa: E402

PARITY_BATCHES = (1, 5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("gating")
    standard, plugin = folder / "standard.onnx", folder / "plugin.onnx"
    export_fp32(tiny_model, standard, verify_batches=(1,))
    report = export_fp32(tiny_model, plugin, verify_batches=(1,), gating="plugin")
    return standard, plugin, report


def test_plugin_graph_has_one_node_per_moe_block(exported, tiny_model):
    _, plugin, report = exported
    model = onnx.load(str(plugin))
    nodes = [n for n in model.graph.node if n.op_type == "SparseMoE"]
    moe_layers = tiny_model.moe_layers()
    assert len(nodes) == len(moe_layers) == report["ops"]["SparseMoE"]
    assert {"facemoe": 1}.items() <= {o.domain: o.version for o in model.opset_import}.items()
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"TopK", "ScatterElements", "Erf"}, "routing and experts must live inside the custom node"
    assert check_graph(model).ok
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for node, (prefix, moe) in zip(nodes, moe_layers, strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "facemoe"
        assert attrs == {"k": 2, "num_experts": 3, "plugin_namespace": b"facemoe"}
        assert len(node.input) == 6 and len(node.output) == 1
        n, hidden, dim = moe.num_experts, moe.experts[0].fc1.out_features, moe.experts[0].fc1.in_features
        expected = [(n, dim), (n, hidden, dim), (n, hidden), (n, dim, hidden), (n, dim)]
        assert [shapes[name] for name in node.input[1:]] == expected
        assert node.input[2] == f"{prefix}.experts.fc1_weight"


@pytest.mark.parametrize("batch", PARITY_BATCHES)
def test_plugin_graph_matches_standard_graph(exported, tiny_model, batch):
    standard, plugin, _ = exported
    x = np.random.default_rng(100 + batch).standard_normal((batch, 3, 120, 120)).astype(np.float32)
    want = run_onnx(standard, x)
    got = run_onnx(plugin, x, custom_ops=True)
    assert np.abs(got - want).max() <= 1e-5
    with torch.no_grad(), tiny_model.using_routing("sparse"):
        reference = tiny_model(torch.from_numpy(x)).numpy()
    assert np.abs(got - reference).max() <= 1e-4


def test_onnxruntime_backend_loads_plugin_graph(exported):
    from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    standard, plugin, _ = exported
    x = np.random.default_rng(7).standard_normal((2, 3, 120, 120)).astype(np.float32)
    backend = OnnxRuntimeBackend(plugin, providers=["CPUExecutionProvider"], threads=1, custom_ops=True)
    assert np.abs(backend._embed_batch(x) - run_onnx(standard, x)).max() <= 1e-5


def test_onnxruntime_kernel_runs_without_torch(exported):
    """An ONNX Runtime deployment carries no torch: registering and running the op must not import it."""
    _, plugin, _ = exported
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "from facemoe.gating.ort import register_custom_ops\n"
        "options = ort.SessionOptions()\n"
        "assert register_custom_ops(options, required=True)\n"
        f"session = ort.InferenceSession({str(plugin)!r}, options, providers=['CPUExecutionProvider'])\n"
        "out = session.run(None, {'input': np.zeros((1, 3, 120, 120), np.float32)})[0]\n"
        "print(out.shape, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["(1,", "512)", "False"]


def test_export_refuses_unsupported_configurations(tmp_path):
    model = build_model("tiny").set_k(3)
    with pytest.raises(ExportError, match=r"k=3 \(supported: 1, 2\).*--gating onnx"):
        export_fp32(model, tmp_path / "k3.onnx", gating="plugin")
    odd = build_model({"embed_dim": 24, "depths": [2, 2, 2], "num_heads": [2, 4, 4]})
    with pytest.raises(ExportError, match="channels 24 not a multiple of 16"):
        export_fp32(odd, tmp_path / "c24.onnx", gating="plugin")
    with pytest.raises(ExportError, match="gating must be one of"):
        export_fp32(odd, tmp_path / "bad.onnx", gating="fused")
    assert not list(tmp_path.iterdir()), "a refused export must not leave files behind"


def test_numpy_kernel_matches_reference_with_uneven_routing():
    gen = torch.Generator().manual_seed(5)
    moe = MoE(32, 64, num_experts=4, k=2, routing="sparse")
    x = torch.randn(37, 32, generator=gen)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        # Channel 0 is a constant that pushes expert 0 up and expert 3 down: expert 0 is picked by every
        # token, expert 3 by none (an empty group), experts 1 and 2 share the second places.
        x[:, 0] = 5.0
        moe.router.gate.weight[:, 0] = torch.tensor([10.0, 0.0, 0.0, -10.0])
    with torch.no_grad(), moe.recording_routing() as calls:
        want = moe(x).numpy()
        weights = [w.detach().numpy() for w in moe.stacked_weights()]
    load = torch.bincount(calls[0].flatten(), minlength=4).tolist()
    assert load[0] == 37 and load[3] == 0 and 0 < load[1] < 37
    got = gating_ort.sparse_moe(x.numpy(), *weights, k=2)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    empty = gating_ort.sparse_moe(np.zeros((0, 32), np.float32), *weights, k=2)
    assert empty.shape == (0, 32)


def test_top_k_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, -5.0, -1.0]], np.float32)
    np.testing.assert_array_equal(gating_ort.top_k(logits, 2), [[1, 2], [0, 1], [0, 2]])
    torch_idx = torch.topk(torch.from_numpy(logits), 2, dim=-1).indices.numpy()
    np.testing.assert_array_equal(gating_ort.top_k(logits, 2), torch_idx)


def test_erf_is_accurate():
    x = np.linspace(-9.0, 9.0, 4001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(gating_ort.erf(x) - want).max() <= 1e-14


def test_reference_function_matches_moe_module():
    gen = torch.Generator().manual_seed(2)
    moe = MoE(16, 32, num_experts=3, k=1, routing="sparse")
    x = torch.randn(11, 16, generator=gen)
    with torch.no_grad():
        want = moe(x)
        got = reference_sparse_moe(x, *moe.stacked_weights(), k=1)
        with moe.tracing(gating="plugin"):
            via_op = moe(x.reshape(1, 11, 16)).reshape(11, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_op, want, rtol=0, atol=1e-6)


def test_old_import_paths_still_work():
    """The TensorRT plugin and older callers import the op from its former modules."""
    from facemoe.export import gating_ort as old_ort
    from facemoe.gating import onnx_graph, spec
    from facemoe.model import moe_plugin

    assert old_ort.register_custom_ops is gating_ort.register_custom_ops
    assert old_ort.name_op_weights is onnx_graph.name_op_weights
    assert moe_plugin.reference_sparse_moe is reference_sparse_moe
    assert (moe_plugin.DOMAIN, moe_plugin.OP_TYPE, moe_plugin.OP_VERSION) == (spec.DOMAIN, spec.OP_TYPE, 1)
    moe = MoE(16, 32, num_experts=3, k=2)
    assert moe_plugin.block_shape(moe) == (16, 32)
    assert [tuple(w.shape) for w in moe_plugin.stacked_weights(moe)] == [
        (3, 16),
        (3, 32, 16),
        (3, 32),
        (3, 16, 32),
        (3, 16),
    ]


def test_gating_package_imports_no_model_export_or_runtime():
    """The op sits below the model, the export and the runtime: importing it pulls in none of them (no cycle),
    and the ONNX Runtime side imports neither torch nor onnxruntime-extensions until registration."""
    code = (
        "import sys\n"
        "import facemoe.gating.spec, facemoe.gating.ort, facemoe.gating.onnx_graph\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('facemoe.model', 'facemoe.export', "
        "'facemoe.runtime', 'onnxruntime_extensions')))\n"
        "import facemoe.gating.torch_op\n"
        "layers = ('facemoe.model', 'facemoe.export', 'facemoe.runtime')\n"
        "bad += sorted(m for m in sys.modules if m.startswith(layers))\n"
        "import facemoe.model.moe\n"
        "bad += [m for m in ('facemoe.model.moe_plugin', 'facemoe.gating.triton') if m in sys.modules]\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
