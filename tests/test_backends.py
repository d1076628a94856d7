"""Backends on the CPU: the interface (life cycle, memory statistics, uniform opening), ONNX Runtime
batching, backend selection, the PyTorch backend's CPU mode, the reference model loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facemoe.bundle import MANIFEST_NAME, Bundle
from facemoe.errors import BundleError, FaceMoEError
from facemoe.fileio import write_json_atomic
from facemoe.runtime.backends import BackendUnavailable, open_backend
from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from facemoe.runtime.engine_identity import detect_device, import_tensorrt

torch = pytest.importorskip("torch")

from facemoe.export.onnx_export import run_onnx  # noqa: E402  (needs torch)
from facemoe.model.inference import apply_fp16, load_reference_model, model_fingerprint  # noqa: E402
from facemoe.runtime.backends.torch_backend import TorchBackend, buckets_for  # noqa: E402

NO_GPU = not detect_device().has_gpu


def faces(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 120, 120)).astype(np.float32)


def test_onnxruntime_splits_batches_above_max_batch(tiny_bundle: Path) -> None:
    bundle = Bundle(tiny_bundle)
    backend = OnnxRuntimeBackend.from_bundle(bundle, "fp32", max_batch=4, threads=1)
    batch = faces(10)
    calls = []
    original = backend._embed_batch

    def spy(chunk: np.ndarray) -> np.ndarray:
        calls.append(len(chunk))
        return original(chunk)

    backend._embed_batch = spy  # type: ignore[method-assign]
    got = backend.embed(batch)
    assert calls == [4, 4, 2]
    expected = run_onnx(bundle.artifact_path("fp32"), batch)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (10, bundle.manifest.embedding_size) and got.dtype == np.float32
    assert backend.embed(np.zeros((0, 3, 120, 120), np.float32)).shape == (0, backend.embedding_size)


def test_onnxruntime_refuses_a_modified_artifact(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="does not match the manifest"):
        OnnxRuntimeBackend.from_bundle(Bundle(copy), "fp32")


def test_backend_is_a_context_manager_that_releases_its_session(tiny_bundle: Path) -> None:
    with open_backend(tiny_bundle, "onnxruntime", "fp32", max_batch=2, threads=1) as backend:
        assert backend.embed(faces(3)).shape == (3, backend.embedding_size)
        stats = backend.memory_stats()
    assert backend.session is None  # type: ignore[attr-defined]
    with pytest.raises(FaceMoEError, match="onnxruntime backend was closed"):
        backend.embed(faces(1))
    backend.close()  # idempotent
    # ONNX Runtime reports no arena statistics: the process's resident set, now and at its peak.
    assert "peak_device_memory_bytes" not in stats
    assert 0 < stats["host_rss_bytes"] <= stats["peak_host_rss_bytes"]
    assert backend.notes() == [] and backend.use_cuda_graphs(True) is False and not backend.cuda_graphs


def test_uniform_from_bundle_signature(tiny_bundle: Path) -> None:
    """Every backend opens with (bundle, precision, max_batch, *, device, threads)."""
    bundle = Bundle(tiny_bundle)
    batch = faces(4, seed=2)
    ort_cpu = OnnxRuntimeBackend.from_bundle(bundle, "fp32", 2, device="cpu", threads=1)
    assert ort_cpu.provider == "CPUExecutionProvider" and ort_cpu.max_batch == 2
    with pytest.raises(BackendUnavailable, match="cpu or cuda"):
        OnnxRuntimeBackend.from_bundle(bundle, "fp32", device="cuda:1")
    threads = torch.get_num_threads()
    with TorchBackend.from_bundle(bundle, "fp32", 2, device="cpu", threads=threads) as torch_cpu:
        np.testing.assert_allclose(torch_cpu.embed(batch), ort_cpu.embed(batch), atol=1e-4, rtol=1e-4)
        assert torch_cpu.use_cuda_graphs(True) is False  # graphs need a CUDA device
        assert "peak_device_memory_bytes" not in torch_cpu.memory_stats()
    assert not hasattr(torch_cpu, "model")  # close drops the model


@pytest.mark.skipif(not NO_GPU, reason="auto picks a GPU backend where there is one")
def test_auto_picks_onnxruntime_without_gpu(tiny_bundle: Path) -> None:
    backend = open_backend(tiny_bundle, "auto", threads=1)
    assert backend.name == "onnxruntime" and backend.precision == "fp32"


@pytest.mark.skipif(import_tensorrt() is not None and not NO_GPU, reason="TensorRT and a GPU are present")
def test_explicit_tensorrt_is_unavailable_with_a_reason(tiny_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        open_backend(tiny_bundle, "tensorrt")
    message = str(info.value)
    assert any(
        reason in message
        for reason in ("TensorRT is not installed", "cuda-python is not installed", "no NVIDIA GPU found")
    ), message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_explicit_torch_backend_needs_cuda_for_fp16(tiny_bundle: Path) -> None:
    # Without a CUDA GPU, --backend torch runs fp32 on the CPU (tests/test_backend_policy.py); fp16 is refused.
    with pytest.raises(BackendUnavailable, match="fp16 needs a CUDA GPU"):
        open_backend(tiny_bundle, "torch", precision="fp16")


def test_torch_cpu_backend_matches_onnxruntime(tiny_bundle: Path) -> None:
    """Rebuilt from the bundle (random-weight seed, checked against weights_sha256), fp32 static on the CPU."""
    bundle = Bundle(tiny_bundle)
    backend = TorchBackend.from_bundle(bundle, "fp32", max_batch=3, device="cpu")
    assert (backend.device, backend.cuda_graphs, backend.routing) == ("cpu", False, "static")
    batch = faces(5, seed=11)
    got = backend.embed(batch)
    expected = OnnxRuntimeBackend.from_bundle(bundle, "fp32", threads=1).embed(batch)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_torch_sparse_routing_equals_static(tiny_model) -> None:
    batch = faces(3, seed=3)
    static = TorchBackend(tiny_model, precision="fp32", device="cpu").embed(batch)
    sparse = TorchBackend(tiny_model, precision="fp32", device="cpu", routing="sparse").embed(batch)
    np.testing.assert_allclose(static, sparse, atol=1e-5)
    assert tiny_model.routing == "static"  # the backend converts a copy


def test_torch_backend_refusals(tiny_model, tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="fp16 needs a CUDA GPU"):
        TorchBackend(tiny_model, precision="fp16", device="cpu")
    with pytest.raises(BackendUnavailable, match="fp32 or fp16"):
        TorchBackend(tiny_model, precision="int8", device="cpu")
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["model"]["source"] = {}
    data["model"]["random_weights"] = False
    write_json_atomic(copy / MANIFEST_NAME, data)
    with pytest.raises(BackendUnavailable, match=r"records none \(model.source.path is empty\).*--checkpoint"):
        TorchBackend.from_bundle(Bundle(copy), "fp32", device="cpu")
    data["model"]["source"] = {"path": str(tmp_path / "gone.pt")}
    write_json_atomic(copy / MANIFEST_NAME, data)
    with pytest.raises(BackendUnavailable, match=r"gone\.pt"):
        TorchBackend.from_bundle(Bundle(copy), "fp32", device="cpu")
    data["model"]["source"] = {"random_weights": True, "seed": 1}
    data["model"]["random_weights"] = True
    write_json_atomic(copy / MANIFEST_NAME, data)
    with pytest.raises(BundleError, match="do not match the bundle's"):
        TorchBackend.from_bundle(Bundle(copy), "fp32", device="cpu")


def test_reference_loader_checks_weights_sha256(tiny_model, tiny_bundle: Path, tmp_path: Path) -> None:
    """``facemoe parity`` and the torch backend share one loader: the bundle's weights or a one-line error."""
    from typer.testing import CliRunner

    from facemoe.cli.main import app
    from facemoe.model.random_weights import randomize

    bundle = Bundle(tiny_bundle)
    assert model_fingerprint(load_reference_model(bundle)) == bundle.manifest.model["weights_sha256"]
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save(tiny_model.state_dict(), same)
    torch.save(randomize(copy_of(tiny_model), seed=1).state_dict(), other)
    assert model_fingerprint(load_reference_model(bundle, same)) == model_fingerprint(tiny_model)
    with pytest.raises(BundleError, match=r"weights_sha256"):
        load_reference_model(bundle, other)
    result = CliRunner().invoke(app, ["parity", str(tiny_bundle), "--checkpoint", str(other)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "do not match the bundle's (weights_sha256)" in lines[0], result.output


def copy_of(model):  # type: ignore[no-untyped-def]
    import copy

    return copy.deepcopy(model)


def test_buckets() -> None:
    assert buckets_for(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_for(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets_for(1) == (1,)


def test_fp16_conversion_keeps_fp32_islands_and_stays_finite(tiny_model) -> None:
    """The fp16 recipe, run on the CPU (PyTorch has CPU fp16 kernels): no overflow, close to fp32."""
    import copy

    half = apply_fp16(copy.deepcopy(tiny_model).set_routing("static"))
    assert half.layers[0].blocks[0].mlp.experts[0].fc1.weight.dtype == torch.float16
    assert half.layers[0].blocks[0].attn.qkv.weight.dtype == torch.float16
    assert half.layers[0].blocks[0].mlp.router.gate.weight.dtype == torch.float32
    assert half.layers[0].blocks[0].norm1.weight.dtype == torch.float32
    assert half.feature_layer[2].weight.dtype == torch.float32
    batch = torch.from_numpy(faces(8, seed=5))
    with torch.inference_mode():
        ref = tiny_model.eval()(batch).numpy()
        got = half(batch).numpy()
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    # Most faces agree to ~1e-6; a token whose 2nd/3rd router logits are nearly tied can flip under any
    # rounding and, weighted by its raw logit, move one embedding by ~1e-2.
    assert np.median(cos) > 0.9999 and cos.min() > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_fp16_graphs_match_eager(tiny_model) -> None:
    batch = faces(5, seed=9)
    eager = TorchBackend(tiny_model, precision="fp16", cuda_graphs=False, max_batch=8).embed(batch)
    graphs = TorchBackend(tiny_model, precision="fp16", cuda_graphs=True, max_batch=8)
    got = graphs.embed(batch)
    assert set(graphs._graphs) == {8}  # 5 faces padded to the 8 bucket
    np.testing.assert_allclose(got, eager, atol=2e-2)
    ref = TorchBackend(tiny_model, precision="fp32", device="cpu").embed(batch)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_compiled_whole_fp16_matches_eager(tiny_model) -> None:
    batch = faces(5, seed=9)
    eager = TorchBackend(tiny_model, precision="fp16", half="all", cuda_graphs=False, max_batch=8).embed(batch)
    backend = TorchBackend(tiny_model, precision="fp16", half="all", compile=True, max_batch=8)
    got = backend.embed(batch)
    assert backend.compiled and "compiled" in backend.describe()
    cos = (eager * got).sum(1) / np.linalg.norm(eager, axis=1) / np.linalg.norm(got, axis=1)
    # Fused kernels round differently; a near-tied router logit may flip one token's expert.
    assert np.median(cos) > 0.999 and cos.min() > 0.98


def test_torch_backend_refuses_unknown_half_mode(tiny_model) -> None:
    with pytest.raises(BackendUnavailable, match="half must be"):
        TorchBackend(tiny_model, precision="fp32", device="cpu", half="bf16")
    with pytest.raises(BackendUnavailable, match="compile needs static routing"):
        TorchBackend(tiny_model, precision="fp32", device="cpu", routing="sparse", compile=True)
    # fp32 and whole-network fp16 run the packed experts; the hybrid keeps its per-expert fp16 hooks.
    backend = TorchBackend(tiny_model, precision="fp32", device="cpu")
    assert all(moe._packed is not None for _, moe in backend.model.moe_layers())
    assert all(moe._packed is None for _, moe in tiny_model.moe_layers()), "the caller's model is untouched"
