"""Stored AOTInductor packages (docs/COMPILED.md#stored-compiled-packages): identity, refusal, loading.

One CPU package of the tiny demo bundle is compiled per module (about a minute on two shared cores).
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathlib import Path  # noqa: E402

import facemoe  # noqa: E402
from facemoe.bundle import Bundle  # noqa: E402

DEMO = Path(facemoe.__file__).parent / "data" / "demo-bundle"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from facemoe.export.aoti import build_package

    root = tmp_path_factory.mktemp("aoti") / "bundle"
    shutil.copytree(DEMO, root)
    start = time.perf_counter()
    path, identity = build_package(Bundle(root), device="cpu", batch_sizes=(1, 8), log=lambda m: None)
    print(f"\nAOTInductor CPU package of the tiny preset compiled in {time.perf_counter() - start:.1f} s")
    return root, path, identity


def _here(root, max_batch=8):
    from facemoe.runtime.torch_package import probe

    return probe("cpu", Bundle(root), "fp32", "gemm", max_batch)


def test_identity_written_recorded_and_read(built):
    from facemoe.runtime.engine_identity import read_sidecar, select_engine
    from facemoe.runtime.torch_package import PackageIdentity, select_package

    root, path, identity = built
    recorded, digest = read_sidecar(path, PackageIdentity)
    assert recorded == identity and recorded.batch_buckets == (1, 8) and recorded.device_kind == "cpu"
    assert recorded.torch_version == torch.__version__ and recorded.cpu_isa
    bundle = Bundle(root)
    [entry] = [e for e in bundle.manifest.engines if e.get("kind") == "torch-aoti"]
    assert entry["sha256"] == digest and bundle.verify() == []
    assert select_package(bundle, _here(root))[0] == path
    with pytest.raises(Exception, match="no fp32 TensorRT engine"):  # TensorRT selection ignores packages
        select_engine(bundle, "fp32", 8, device=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("torch_version", "2.13.0+cu128", "compiled with torch 2.13, this is torch 2.14"),
        ("weights_sha256", "0" * 64, "compiled from weights 000000000000..."),
        ("max_batch", 4, "serves batches 1..4, 8 was requested"),
        ("cpu_isa", "neon", "compiled for the neon CPU vector ISA"),
    ],
)
def test_mismatched_package_refused(built, tmp_path, field, value, reason):
    from facemoe.runtime.torch_package import PackageUnavailable, select_package

    root, path, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    sidecar = copy / "engines" / (path.name + ".json")
    data = json.loads(sidecar.read_text())
    data["identity"][field] = value
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PackageUnavailable, match="no usable stored torch package") as info:
        select_package(Bundle(copy), _here(copy))
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_modified_package_bytes_refused(built, tmp_path):
    from facemoe.errors import EngineMismatchError
    from facemoe.runtime.torch_package import select_package

    root, path, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    with open(copy / "engines" / path.name, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(EngineMismatchError, match="does not match its sidecar"):
        select_package(Bundle(copy), _here(copy))


def test_loaded_package_matches_eager(built):
    from facemoe.export.aoti import load_package
    from facemoe.model.inference import load_reference_model

    root, path, _ = built
    runner, seconds = load_package(path)
    print(f"\nstored package loaded in {seconds:.3f} s")
    assert seconds < 5.0
    model = load_reference_model(Bundle(root))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 3, 120, 120)).astype(np.float32))
    with torch.inference_mode():
        got, want = runner(x), model(x)
    cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cosine > 1 - 1e-4 and (got - want).abs().max().item() < 1e-3


def test_torch_backend_loads_stored_package_or_falls_back_saying_why(built, tmp_path):
    from facemoe.runtime.backends.select import open_backend

    root, path, _ = built
    x = np.random.default_rng(1).standard_normal((3, 3, 120, 120)).astype(np.float32)
    with open_backend(root, "torch", max_batch=8, device="cpu") as backend:
        assert backend.package_path == path and backend.package_load_s < 5.0
        assert f"stored package {path.name}" in backend.selection
        stored = backend.embed(x)
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    sidecar = copy / "engines" / (path.name + ".json")
    data = json.loads(sidecar.read_text())
    data["identity"]["torch_version"] = "2.13.0"
    sidecar.write_text(json.dumps(data))
    with open_backend(copy, "torch", max_batch=8, device="cpu") as backend:
        assert backend.package_path is None
        assert "stored package not used" in backend.selection and "compiled with torch 2.13" in backend.selection
        eager = backend.embed(x)
    dots = (stored * eager).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(eager, axis=1)
    assert dots.min() > 1 - 1e-4


def test_build_engine_cli_torch(built):
    from typer.testing import CliRunner

    from facemoe.cli.engine_cmd import app

    root, path, _ = built
    runner = CliRunner()
    result = runner.invoke(app, [str(root), "--backend", "torch", "--torch-device", "cpu", "--batch-sizes", "1,8"])
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and path.name in result.output.replace("\n", "")
    bad = runner.invoke(app, [str(root), "--backend", "torch", "--batch-sizes", "1,x"])
    assert bad.exit_code != 0 and "--batch-sizes" in bad.output
    bad = runner.invoke(app, [str(root), "--backend", "onnx"])
    assert bad.exit_code != 0 and "choose tensorrt or torch" in bad.output


def test_bench_torch_rows_use_the_stored_package(built, tmp_path):
    from typer.testing import CliRunner

    from facemoe.cli.bench_cmd import app

    root, _, _ = built
    out = tmp_path / "bench.json"
    args = ["--bundle", str(root), "--backend", "torch", "--precision", "fp32", "--batch", "1,4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--iterations", "2", "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["status"] == "ok" for r in rows)
    assert all("stored package loaded in" in r["note"] for r in rows)


def test_prepare_backend_rebuild_reuses_a_fitting_package(built):
    from facemoe.deploy import prepare_backend

    root, path, _ = built
    with prepare_backend(root, "torch", max_batch=8, device="cpu", rebuild=True) as backend:
        assert backend.package_path == path


def test_prepare_backend_rebuild_replaces_a_refused_package(built, tmp_path):
    from facemoe.deploy import prepare_backend

    root, path, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    sidecar = copy / "engines" / (path.name + ".json")
    data = json.loads(sidecar.read_text())
    data["identity"]["weights_sha256"] = "1" * 64
    sidecar.write_text(json.dumps(data))
    with prepare_backend(copy, "torch", max_batch=8, device="cpu", rebuild=True, log=lambda m: None) as backend:
        assert backend.package_path is not None and "stored package" in backend.selection
    assert json.loads(sidecar.read_text())["identity"]["weights_sha256"] == Bundle(copy).weights_fingerprint
