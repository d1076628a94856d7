"""Engine identity, sidecars, cache keys, mismatch messages and engine selection: no TensorRT, no GPU."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest

from facemoe.bundle import MANIFEST_NAME, Artifact, Bundle, Manifest, default_preprocessing
from facemoe.errors import BundleError, EngineMismatchError
from facemoe.fileio import sha256_file, write_json_atomic
from facemoe.runtime import device as probe
from facemoe.runtime import engine_identity as ei
from facemoe.runtime.backends.base import BackendUnavailable
from facemoe.runtime.engine_identity import DeviceInfo, EngineIdentity, EngineUnavailable, compare

ORIN = DeviceInfo("Jetson AGX Orin", "sm_87", tensorrt_version="10.3.0.30", is_jetson=True)
L4 = DeviceInfo("NVIDIA L4", "sm_89", tensorrt_version="10.13.0.35")


def identity(**changes: object) -> EngineIdentity:
    base = EngineIdentity(
        gpu_name="Jetson AGX Orin",
        compute_capability="sm_87",
        tensorrt_version="10.3.0.30",
        precision="fp16",
        min_batch=1,
        opt_batch=8,
        max_batch=32,
        onnx_sha256="a" * 64,
        onnx_file="model.fp16.onnx",
        plugin_hashes={},
        build_time="2026-01-01T00:00:00+00:00",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_cache_key_is_deterministic_and_covers_compatibility_fields() -> None:
    ref = identity()
    assert ref.cache_key == identity().cache_key
    assert len(ref.cache_key) == 16
    # What decides compatibility changes the key ...
    for change in (
        {"compute_capability": "sm_89"},
        {"tensorrt_version": "10.3.0.31"},
        {"precision": "int8"},
        {"max_batch": 64},
        {"opt_batch": 4},
        {"onnx_sha256": "b" * 64},
        {"plugin_hashes": {"libfacemoe_plugins.so": "c" * 64}},
        # TensorRT tunes a plan for the GPU model, not only its architecture, and for the build settings.
        {"gpu_name": "Jetson Orin NX"},
        {"builder_optimization_level": 5},
        {"workspace_bytes": 1 << 30},
        {"strongly_typed": False},
        {"python_plugin": "aot"},
    ):
        assert identity(**change).cache_key != ref.cache_key, change
    # ... what merely describes the build does not, nor how a source spells the GPU's name.
    for change in (
        {"build_time": "2027-01-01"},
        {"build_seconds": 12.0},
        {"gpu_name": "NVIDIA  jetson agx orin"},
    ):
        assert identity(**change).cache_key == ref.cache_key, change
    # Plugin order does not matter.
    a = identity(plugin_hashes={"a.so": "1" * 64, "b.so": "2" * 64})
    b = identity(plugin_hashes={"b.so": "2" * 64, "a.so": "1" * 64})
    assert a.cache_key == b.cache_key


def test_engine_file_name_spells_the_identity() -> None:
    ref = identity()
    name = ref.engine_file_name()
    assert name == f"model.fp16.sm_87.trt10.3.0.b1-8-32.{ref.cache_key[:12]}.engine"


def test_identity_json_round_trip_and_malformed() -> None:
    ref = identity(plugin_hashes={"p.so": "d" * 64}, workspace_bytes=1 << 30)
    assert EngineIdentity.from_json(json.loads(json.dumps(ref.to_json()))) == ref
    with pytest.raises(BundleError, match="malformed engine identity"):
        EngineIdentity.from_json({"precision": "fp16"})


def test_compare_explains_device_and_tensorrt_mismatch() -> None:
    current = identity(gpu_name="NVIDIA L4", compute_capability="sm_89", tensorrt_version="10.13.0.35")
    problems = compare(identity(), current)
    assert problems == [
        "built on sm_87 (Jetson AGX Orin) with TensorRT 10.3, this is sm_89 (NVIDIA L4) with TensorRT 10.13"
    ]
    # Versions are shown as far as they differ.
    assert "TensorRT 10.3.0.30, this is sm_87 (Jetson AGX Orin) with TensorRT 10.3.0.31" in compare(
        identity(), identity(tensorrt_version="10.3.0.31")
    )[0].replace("built on sm_87 (Jetson AGX Orin) with ", "")
    assert compare(identity(), identity()) == []


def test_compare_other_fields() -> None:
    ref = identity(plugin_hashes={"libfacemoe_plugins.so": "1" * 64})
    problems = compare(
        ref,
        identity(precision="int8", onnx_sha256="b" * 64, plugin_hashes={}, max_batch=64),
    )
    text = " | ".join(problems)
    assert "built for fp16, int8 was requested" in text
    assert "the model was re-exported" in text and "model.fp16.onnx" in text
    assert "plugin library libfacemoe_plugins.so, which is not available here" in text
    assert "built for batch 1..32 (opt 8), 1..64 (opt 8) was requested" in text
    other = compare(ref, identity(plugin_hashes={"libfacemoe_plugins.so": "2" * 64}), check_profile=False)
    assert other == [f"built with plugin library libfacemoe_plugins.so {'1' * 12}..., the one here is {'2' * 12}..."]
    # A plugin loaded here that the engine does not use is no reason to refuse it.
    assert compare(identity(), identity(plugin_hashes={"extra.so": "3" * 64})) == []


def test_sidecar_and_sha256_refusal(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine bytes")
    ref = identity()
    side = ei.write_sidecar(engine, ref)
    assert side == tmp_path / "model.engine.json"
    loaded, digest = ei.read_sidecar(engine)
    assert loaded == ref and digest == sha256_file(engine)
    data = json.loads(side.read_text())
    assert data["format"] == "facemoe-engine" and data["cache_key"] == ref.cache_key
    ei.verify_engine_file(engine, digest)

    engine.write_bytes(b"serialized engine bytes, tampered")
    with pytest.raises(EngineMismatchError, match=r"model\.engine: sha256 .* does not match its sidecar"):
        ei.verify_engine_file(engine, digest)
    engine.unlink()
    with pytest.raises(BundleError, match="engine file is missing"):
        ei.verify_engine_file(engine, digest)
    with pytest.raises(BundleError, match="sidecar is missing"):
        ei.read_sidecar(tmp_path / "other.engine")
    side.write_text("{not json")
    with pytest.raises(BundleError, match="unreadable engine sidecar"):
        ei.read_sidecar(engine)


# ------------------------------------------------------------------------------------ engine selection


def make_bundle(root: Path) -> Bundle:
    """A bundle with a (fake) fp16 ONNX and no engines: selection only reads manifests and sidecars."""
    root.mkdir(parents=True)
    onnx_file = root / "model.fp16.onnx"
    onnx_file.write_bytes(b"not really onnx")
    manifest = Manifest(
        model={"config": {}},
        preprocessing=default_preprocessing(),
        routing={"mode": "static", "gating": "onnx"},
        embedding_size=512,
        artifacts={"fp16": Artifact("fp16", onnx_file.name, sha256_file(onnx_file), 17)},
    )
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return Bundle(root)


def add_engine(bundle: Bundle, ident: EngineIdentity, payload: bytes = b"engine") -> Path:
    path = bundle.root / "engines" / ident.engine_file_name()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(payload)
    digest = sha256_file(path)
    ei.write_sidecar(path, ident, digest)
    data = json.loads((bundle.root / MANIFEST_NAME).read_text())
    data["engines"].append(ei.manifest_entry(bundle.root, path, ident, digest))
    write_json_atomic(bundle.root / MANIFEST_NAME, data)
    return path


def test_select_engine(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    onnx_sha = bundle.artifact("fp16").sha256
    with pytest.raises(EngineUnavailable, match=r"no fp16 TensorRT engine in the bundle.*facemoe build-engine"):
        ei.select_engine(bundle, "fp16", 8, ORIN)

    small = add_engine(bundle, identity(onnx_sha256=onnx_sha, max_batch=16, opt_batch=8), b"small")
    large = add_engine(bundle, identity(onnx_sha256=onnx_sha, max_batch=64), b"large")
    bundle = Bundle(bundle.root)
    assert ei.select_engine(bundle, "fp16", 8, ORIN).path == small  # smallest max batch that fits
    assert ei.select_engine(bundle, "fp16", 32, ORIN).path == large

    with pytest.raises(EngineUnavailable) as info:
        ei.select_engine(bundle, "fp16", 8, L4)
    message = str(info.value)
    assert (
        "built on sm_87 (Jetson AGX Orin) with TensorRT 10.3, this is sm_89 (NVIDIA L4) with TensorRT 10.13" in message
    )
    assert "facemoe build-engine" in message
    # Both kinds: `auto` moves on to the next backend, an explicit request sees an engine mismatch.
    assert isinstance(info.value, BackendUnavailable) and isinstance(info.value, EngineMismatchError)

    with pytest.raises(EngineUnavailable, match=r"serves batches 1\.\.64, max batch 128 was requested"):
        ei.select_engine(bundle, "fp16", 128, ORIN)

    large.write_bytes(b"LARGE")  # same size class, different bytes
    with pytest.raises(EngineMismatchError, match="does not match its sidecar"):
        ei.select_engine(bundle, "fp16", 32, ORIN)


def test_select_engine_prefers_this_gpu_model(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    onnx_sha = bundle.artifact("fp16").sha256
    nx = add_engine(bundle, identity(onnx_sha256=onnx_sha, gpu_name="Jetson Orin NX", max_batch=16), b"nx")
    choice = ei.select_engine(Bundle(bundle.root), "fp16", 8, ORIN)
    # Same architecture, another model: TensorRT runs it (with a warning), so it is used, and said so.
    assert choice.path == nx and "built on Jetson Orin NX, this is Jetson AGX Orin (same sm_87)" in choice.note
    agx = add_engine(bundle, identity(onnx_sha256=onnx_sha, gpu_name="NVIDIA Jetson AGX Orin", max_batch=64), b"a")
    choice = ei.select_engine(Bundle(bundle.root), "fp16", 8, ORIN)
    assert choice.path == agx and choice.note == ""  # tuned on this model beats a smaller max batch


def test_select_engine_refuses_engine_of_an_older_export(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    add_engine(bundle, identity(onnx_sha256="0" * 64))
    with pytest.raises(EngineUnavailable, match="the model was re-exported"):
        ei.select_engine(Bundle(bundle.root), "fp16", 8, ORIN)


# ----------------------------------------------------------------------------------- device detection


@pytest.fixture
def no_probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(probe, "load_cudart", lambda: None)
    monkeypatch.setattr(probe, "_run_nvidia_smi", lambda args: None)
    monkeypatch.setattr(probe, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    monkeypatch.setattr(probe, "DEVICE_TREE", tmp_path / "device-tree")
    monkeypatch.setattr(probe, "tensorrt_version", lambda: None)


@pytest.mark.usefixtures("no_probes")
def test_detect_device_without_gpu() -> None:
    device = probe.detect_device()
    assert not device.has_gpu and device.source == "none"
    assert device.describe() == "no GPU with no TensorRT"


@pytest.mark.usefixtures("no_probes")
def test_detect_device_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def smi(args: list[str]) -> str:
        seen.append(args)
        return "NVIDIA H200, 9.0, 143771\n"

    monkeypatch.setattr(probe, "_run_nvidia_smi", smi)
    device = probe.detect_device(0)
    assert (device.gpu_name, device.compute_capability, device.source) == ("NVIDIA H200", "sm_90", "nvidia-smi")
    assert device.total_memory_bytes == 143771 * 2**20
    assert "--query-gpu=name,compute_cap,memory.total" in seen[0]


@pytest.mark.usefixtures("no_probes")
def test_detect_device_from_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    prop = types.SimpleNamespace(name=b"NVIDIA L4", major=8, minor=9, totalGlobalMem=24 * 2**30)
    fake = types.SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1), cudaGetDeviceProperties=lambda i: (0, prop))
    monkeypatch.setattr(probe, "load_cudart", lambda: fake)
    device = probe.detect_device()
    assert (device.gpu_name, device.compute_capability, device.source) == ("NVIDIA L4", "sm_89", "cuda-python")
    # cuda-python present but no driver (this machine): falls through to the next probe.
    fake.cudaGetDeviceCount = lambda: (35, None)
    assert not probe.detect_device().has_gpu


@pytest.mark.usefixtures("no_probes")
def test_detect_jetson_from_device_tree(tmp_path: Path) -> None:
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0")
    tree = tmp_path / "device-tree"
    tree.mkdir()
    (tree / "compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0")
    (tree / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    device = probe.detect_device()
    assert device.is_jetson
    assert (device.compute_capability, device.gpu_name) == ("sm_87", "NVIDIA Jetson AGX Orin Developer Kit")


def test_stub_only_tensorrt_is_not_tensorrt() -> None:
    """tensorrt-stubs installs an importable but empty ``tensorrt`` namespace package."""
    trt = probe.import_tensorrt()
    if trt is not None:
        assert hasattr(trt, "Builder")
    else:
        assert probe.tensorrt_version() is None
