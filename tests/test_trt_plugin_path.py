"""``--gating plugin`` bundles to a TensorRT engine and back, and what TensorRT refuses, on the stand-in stack.

The stand-ins (tests/fakes/trt_stack.py) parse the real exported graph (facemoe::SparseMoE nodes), refuse a
custom node without a plugin creator and a Python plugin with two implementations but no preference, and
"run" the engine with ONNX Runtime plus the numpy SparseMoE kernel. The real ``tensorrt.plugin`` code is
exercised by .ci/trt_bindings.sh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fakes import trt_stack

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import FaceMoEError
from facemoe.export import tensorrt as trt_build
from facemoe.fileio import sha256_file
from facemoe.gating import trt_plugin
from facemoe.runtime import device as probe
from facemoe.runtime import engine_identity as ei
from facemoe.runtime.backends.base import BackendUnavailable
from facemoe.runtime.engine_identity import DeviceInfo, EngineUnavailable

pytest.importorskip("onnxruntime_extensions")


def options(precision: str = "fp32", max_batch: int = 8, **kwargs: Any) -> trt_build.BuildOptions:
    return trt_build.BuildOptions(precision=precision, opt_batch=min(8, max_batch), max_batch=max_batch, **kwargs)


def faces(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 120, 120)).astype(np.float32)


def _set_artifact(root: Path, precision: str, onnx_path: Path, gating: str) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    art = data["artifacts"][precision]
    art.update(file=onnx_path.name, sha256=sha256_file(onnx_path), gating=gating, external_data=[])
    data["routing"]["gating"] = gating
    (root / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def plugin_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_model: Any) -> Path:
    """The tiny bundle with its fp32 artifact re-exported as a plugin graph (one SparseMoE node per block)."""
    from facemoe.export.onnx_export import export_fp32

    root = tmp_path_factory.mktemp("plugin") / "bundle"
    shutil.copytree(tiny_bundle, root)
    path = root / "model.fp32.onnx"
    export_fp32(tiny_model, path, verify_batches=(1,), gating="plugin")
    assert any(n.op_type == "SparseMoE" for n in onnx.load(path, load_external_data=False).graph.node)
    _set_artifact(root, "fp32", path, "plugin")
    data = json.loads((root / MANIFEST_NAME).read_text())
    del data["artifacts"]["fp16"]
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return root


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plugin_bundle: Path, request: Any) -> Any:
    root = tmp_path / "bundle"
    shutil.copytree(plugin_bundle, root)
    return trt_stack.install(monkeypatch, tmp_path, root, getattr(request, "param", "10.13.3.9"))


def _reference(root: Path, batch: np.ndarray) -> np.ndarray:
    from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend.from_bundle(Bundle(root), "fp32", threads=1).embed(batch)


def _new_process(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget every Python plugin registration, as a fresh process that never imported the plugin."""
    stack.trt.get_plugin_registry().python_plugins.clear()
    monkeypatch.setattr(trt_plugin, "_registered", set())


@pytest.mark.parametrize("stack", ["10.13.3.9", "11.4.0.106"], indirect=True)
def test_aot_plugin_engine_runs_without_the_plugin_code(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    built = trt_build.build_engine(stack.root, options(precision="fp32", max_batch=4))
    plan = stack.trt.built[-1]
    prefer_aot = int(stack.trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    assert plan["python_plugin"] == "aot" and plan["network_flags"] & (1 << prefer_aot)
    assert built.identity.python_plugin == "aot" and ei.read_sidecar(built.path)[0].python_plugin == "aot"
    assert Bundle(stack.root).manifest.engines[-1]["python_plugin"] == "aot"

    _new_process(stack, monkeypatch)

    def no_plugin_code(aot: bool = True) -> frozenset[str]:
        raise AssertionError("an AOT engine must not need the plugin's Python code")

    monkeypatch.setattr(trt_plugin, "register", no_plugin_code)
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend.from_bundle(Bundle(stack.root), "fp32", max_batch=4)
    batch = faces(3)
    np.testing.assert_allclose(backend.embed(batch), _reference(stack.root, batch), atol=1e-5)
    backend.close()


def test_jit_plugin_engine_registers_the_plugin_before_deserialising(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(precision="fp32", max_batch=4, plugin_mode="jit")
    built = trt_build.build_engine(stack.root, opts)
    prefer_jit = int(stack.trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS)
    assert stack.trt.built[-1]["network_flags"] & (1 << prefer_jit) and built.identity.python_plugin == "jit"
    # AOT and JIT engines of one ONNX are different engines (different cache keys and files).
    aot = trt_build.build_engine(stack.root, options(precision="fp32", max_batch=4))
    assert aot.path != built.path and aot.identity.python_plugin == "aot"

    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    _new_process(stack, monkeypatch)
    backend = TensorRTBackend(built.path, precision="fp32", max_batch=4, identity=built.identity)
    assert "jit" in trt_plugin._registered
    batch = faces(2)
    np.testing.assert_allclose(backend.embed(batch), _reference(stack.root, batch), atol=1e-5)
    backend.close()

    # Without the plugin's run-time needs the JIT engine is refused with what to do, before TensorRT.
    _new_process(stack, monkeypatch)
    monkeypatch.setattr(trt_plugin, "register", lambda aot=True: frozenset())
    with pytest.raises(EngineUnavailable, match=r"JIT Python plugin.*--plugin-mode aot"):
        TensorRTBackend(built.path, precision="fp32", max_batch=4, identity=built.identity)


@pytest.mark.parametrize(
    ("stack", "mode", "message"),
    [
        ("10.3.0.30", "auto", r"cannot host their Python plugin \(it needs TensorRT 10\.6\)"),
        ("10.6.0", "aot", r"it needs TensorRT 10\.9 for the AOT implementation"),
    ],
    indirect=["stack"],
)
def test_plugin_graph_refused_where_tensorrt_cannot_host_it(stack: Any, mode: str, message: str) -> None:
    with pytest.raises(FaceMoEError, match=message):
        trt_build.build_engine(stack.root, options(precision="fp32", plugin_mode=mode))


@pytest.mark.parametrize("stack", ["10.6.0"], indirect=True)
def test_jit_only_tensorrt_builds_jit_without_a_preference_flag(stack: Any) -> None:
    built = trt_build.build_engine(stack.root, options(precision="fp32", max_batch=2))
    assert built.identity.python_plugin == "jit" and stack.trt.built[-1]["network_flags"] == 1 << 1


def test_parser_refuses_plugin_nodes_it_cannot_resolve(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both implementations registered and no preference: TensorRT >= 10.9 refuses to create the plugin.
    monkeypatch.setattr(trt_build, "_network_flags", lambda caps, weak, mode=None: 1 << 1)
    with pytest.raises(FaceMoEError, match=r"ONNX parser failed: .*has both AOT and JIT.*PREFER_AOT_PYTHON_PLUGINS"):
        trt_build.build_engine(stack.root, options(precision="fp32"))
    # A registration that never reached TensorRT's registry: the parser finds no creator for the node.
    stack.trt.get_plugin_registry().python_plugins.clear()
    monkeypatch.setattr(trt_plugin, "register", lambda aot=True: frozenset({"aot", "jit"}))
    with pytest.raises(FaceMoEError, match=r"No importer registered for op: SparseMoE"):
        trt_build.build_engine(stack.root, options(precision="fp32"))


def test_failed_aot_registration_is_retried(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(trtp: Any, trt: Any) -> None:
        calls.append(1)
        raise ValueError("Signature of the aot_impl function does not match")

    monkeypatch.setattr(trt_plugin, "_define_aot", broken)
    with pytest.raises(FaceMoEError, match="refused the AOT implementation"):
        trt_plugin.register(aot=True)
    assert trt_plugin._registered == {"describe", "jit"}  # what succeeded stays, AOT is not claimed
    with pytest.raises(FaceMoEError, match="refused the AOT implementation"):
        trt_plugin.register(aot=True)
    assert len(calls) == 2


# ------------------------------------------------------------------------------ what TensorRT refuses


def test_static_batch_dimension_is_refused_with_the_fix(fake_root: Any) -> None:
    stack = fake_root
    path = stack.root / "model.fp32.onnx"
    model = onnx.load(path, load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, path)
    _set_artifact(stack.root, "fp32", path, "onnx")
    with pytest.raises(FaceMoEError, match=r"static batch dimension of 1.*re-export the bundle"):
        trt_build.build_engine(stack.root, options(precision="fp32", max_batch=8))
    opts = trt_build.BuildOptions(precision="fp32", min_batch=1, opt_batch=1, max_batch=1)
    assert trt_build.build_engine(stack.root, opts).identity.max_batch == 1


def test_inconsistent_profile_refused_by_tensorrt_surfaces(fake_root: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_build.BuildOptions, "validate", lambda self: None)  # let TensorRT see it
    opts = trt_build.BuildOptions(precision="fp32", min_batch=8, opt_batch=2, max_batch=4)
    with pytest.raises(FaceMoEError, match=r"rejected the optimisation profile \(batch 8/2/4\): .*out of order"):
        trt_build.build_engine(fake_root.root, opts)


def test_cuda_that_cannot_start_is_a_clear_error(fake_root: Any) -> None:
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    built = trt_build.build_engine(fake_root.root, options(precision="fp32", max_batch=2))
    fake_root.cuda.driver_ok = False
    gpu = DeviceInfo("Orin (fake)", "sm_87", tensorrt_version=fake_root.version)
    with pytest.raises(FaceMoEError, match=r"could not create a builder: CUDA failed to initialise"):
        trt_build.build_engine(fake_root.root, options(precision="fp32", force=True), device=gpu)
    with pytest.raises(BackendUnavailable, match=r"could not create its runtime: CUDA failed to initialise"):
        TensorRTBackend(built.path, precision="fp32", max_batch=2)
    assert not probe.detect_device().has_gpu  # cuda-python's error code is read as "no GPU", not raised


def test_invalidated_cuda_graph_capture_falls_back_to_eager(fake_root: Any) -> None:
    from facemoe.runtime.backends.tensorrt_backend import TensorRTBackend

    trt_build.build_engine(fake_root.root, options(precision="fp32", max_batch=4))
    backend = TensorRTBackend.from_bundle(Bundle(fake_root.root), "fp32", max_batch=4, cuda_graphs=True)
    fake_root.cuda.invalidate_capture = True
    batch = faces(3)
    got = backend.embed(batch)
    assert not backend.cuda_graphs and "cudaErrorStreamCaptureInvalidated" in (backend.cuda_graph_error or "")
    np.testing.assert_allclose(got, _reference(fake_root.root, batch), atol=1e-5)
    np.testing.assert_allclose(backend.embed(batch), got, atol=1e-6)  # the stream left capture mode
    backend.close()


def test_tensorrt_log_goes_to_stderr(fake_root: Any, capsys: pytest.CaptureFixture[str]) -> None:
    logger = trt_build._logger(False, messages := [])
    logger.log(fake_root.trt.ILogger.Severity.WARNING, "tactic warning")
    captured = capsys.readouterr()
    assert captured.out == "" and "tactic warning" in captured.err and messages == [(2, "tactic warning")]


@pytest.fixture
def fake_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_bundle: Path) -> Any:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    return trt_stack.install(monkeypatch, tmp_path, root, "10.13.3.9")


def test_build_engine_command_defaults_and_plugin_mode(stack: Any) -> None:
    from typer.testing import CliRunner

    from facemoe.cli.engine_cmd import app

    # No --precision: the fastest precision that passed parity (this bundle has only its fp32 plugin graph).
    result = CliRunner().invoke(app, [str(stack.root), "--max-batch", "4", "--opt-batch", "4", "--plugin-mode", "jit"])
    assert result.exit_code == 0, result.output
    (entry,) = Bundle(stack.root).manifest.engines
    assert (entry["precision"], entry["python_plugin"]) == ("fp32", "jit")
    result = CliRunner().invoke(app, [str(stack.root), "--plugin-mode", "sideways"])
    assert result.exit_code == 2 and "unknown plugin mode 'sideways'" in result.output


def test_plugin_availability_with_stubs_or_a_broken_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorrt-stubs installs an importable, empty ``tensorrt``; a broken install raises from its import."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # no __version__, no Builder
    assert trt_plugin.trt_version() is None and not trt_plugin.available() and trt_plugin.register() == frozenset()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert trt_plugin.trt_version() is None and trt_plugin.plugin_module() is None
    broken = types.ModuleType("tensorrt")
    broken.Builder, broken.Runtime, broken.__version__ = object, object, "10.x-custom"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", broken)
    assert trt_plugin.trt_version() is None and trt_plugin.default_mode() is None
