"""Every bad command-line value fails before any work: exit code 2, one ``error:`` line naming the problem,
nothing written. In-process (typer's CliRunner), so each case takes milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facemoe.cli.bench_cmd import app as bench_app
from facemoe.cli.engine_cmd import app as engine_app
from facemoe.cli.enroll_cmd import app as enroll_app
from facemoe.cli.export_cmd import app as export_app
from facemoe.cli.main import app as main_app

runner = CliRunner()


def fails(app: object, args: list[object], *needles: str) -> str:
    """Run ``app``; assert exit 2 and exactly one non-empty output line, an ``error:`` naming ``needles``."""
    result = runner.invoke(app, [str(a) for a in args])  # type: ignore[arg-type]
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def only(directory: Path, *names: str) -> None:
    """``directory`` holds exactly ``names``: a refused command wrote nothing, not even a temporary file."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# ------------------------------------------------------------------------------------------ facemoe-export

EXPORT_CASES = [
    (["--k", "-1"], ["'--k'", "greater than or equal to 1"]),
    (["--k", "0"], ["'--k'", "greater than or equal to 1"]),
    (["--calib-count", "0"], ["'--calib-count'", "greater than or equal to 1"]),
    (["--calib-method", "bogus"], ["'--calib-method'", "'bogus'", "'max', 'percentile', 'entropy'"]),
    (["--max-batch", "-4"], ["'--max-batch'", "greater than or equal to 1"]),
    (["--opset", "16"], ["'--opset'", "17"]),
    (["--opset", "99"], ["'--opset'", "20"]),
    (["--int8-float-blocks", "-1"], ["'--int8-float-blocks'", "greater than or equal to 0"]),
    (["--seed", "-3"], ["'--seed'"]),
    (["--preset", "huge"], ["'--preset'", "'full', 'tiny', 'small'"]),
    (["--gating", "trt"], ["'--gating'", "'onnx', 'plugin'"]),
    (["--config", "medium"], ["--config 'medium'", "infer"]),
    (["--gate", "fp32.bogus_metric=0.5"], ["unknown metric 'bogus_metric'", "cosine_mean, cosine_min, routing_min"]),
    (["--gate", "fp8.cosine_mean=0.5"], ["unknown precision 'fp8'"]),
    (["--gate", "int8.cosine_mean=0.9"], ["writes no int8 artifact", "--int8"]),
    (["--gate", "fp16.cosine_mean=0.9"], ["writes no fp16 artifact", "--fp16"]),
    (["--gate", "fp32.cosine_min=1.5"], ["cosine_min must be between -1 and 1"]),
    (["--gate", "fp32.routing_min=-0.1"], ["routing_min must be between 0 and 1"]),
    (["--gate", "fp32.cosine_min=nan"], ["cosine_min must be between"]),
    (["--gate", "fp32.cosine_min=high"], ["'high' is not a number"]),
    (["--gate", "fp32cosine_min=0.5"], ["expected PRECISION.METRIC=VALUE"]),
    (["--gating", "plugin", "--gate", "fp32.routing_min=0.9"], ["not measured"]),
    (["--int8"], ["--int8 needs --calib"]),
]


@pytest.mark.parametrize(("args", "needles"), EXPORT_CASES, ids=[" ".join(a) for a, _ in EXPORT_CASES])
def test_export_refuses_bad_values(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    fails(export_app, ["--random-weights", *args, "--out", tmp_path / "b"], *needles)
    only(tmp_path)


def test_export_refuses_bad_combinations_and_paths(tmp_path: Path) -> None:
    out = tmp_path / "b"
    calib = tmp_path / "faces"
    calib.mkdir()
    fails(export_app, ["--random-weights", "--calib", calib, "--out", out], "--calib is only used", "--int8")
    fails(export_app, ["--random-weights", "--int8", "--calib", tmp_path / "nope", "--out", out], "nope", "not found")
    fails(export_app, ["--random-weights", "--checkpoint", tmp_path / "m.pt", "--out", out], "exclude each other")
    fails(export_app, ["--checkpoint", tmp_path / "m.pt", "--out", out], "m.pt: checkpoint file not found")
    (tmp_path / "cfg.json").write_text("[1, 2]")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not really a checkpoint")
    fails(export_app, ["--checkpoint", ckpt, "--config", tmp_path / "cfg.json", "--out", out], "expected a JSON object")
    # Outputs that must never be replaced, with or without --overwrite.
    fails(export_app, ["--checkpoint", ckpt, "--out", ckpt, "--overwrite"], "would replace the input")
    fails(export_app, ["--checkpoint", ckpt, "--out", tmp_path, "--overwrite"], "would replace the input")
    fails(export_app, ["--random-weights", "--out", ckpt, "--overwrite"], "is a file, expected a bundle directory")
    fails(export_app, ["--random-weights", "--out", calib], "already exists", "--overwrite")
    (calib / "face.png").write_bytes(b"x")
    fails(export_app, ["--random-weights", "--out", calib, "--overwrite"], "not a FaceMoE bundle")
    only(tmp_path, "faces", "cfg.json", "model.pt")
    only(calib, "face.png")


def test_export_k_above_the_expert_count() -> None:
    pytest.importorskip("torch")
    out = Path("never-written-bundle")
    fails(export_app, ["--random-weights", "--k", "4", "--out", out], "--k 4", "3 experts per block", "1..3")
    assert not out.exists()


def test_export_checks_run_before_torch_is_imported(tmp_path: Path) -> None:
    """With torch made unimportable, the argument errors still come out as one-line errors (exit 2)."""
    code = f"""
import importlib.abc, importlib.machinery, sys
class Refuse(importlib.abc.Loader):
    def create_module(self, spec): raise ImportError("torch imported during validation")
    def exec_module(self, module): pass
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None
sys.meta_path.insert(0, NoTorch())
from typer.testing import CliRunner
from facemoe.cli.export_cmd import app
out = {str(tmp_path / "b")!r}
for args in (["--int8"], ["--gate", "fp32.bogus_metric=0.5"], ["--k", "-1"], ["--calib-method", "bogus"]):
    result = CliRunner().invoke(app, ["--random-weights", *args, "--out", out])
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
assert "torch" not in sys.modules
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr + result.stdout
    only(tmp_path)


def test_export_help_shows_choices_and_ranges() -> None:
    result = runner.invoke(export_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("max|percentile|entropy", "onnx|plugin", "(full, small, tiny)", "x>=1", "17<=x<=20", "routing_min"):
        assert text in result.output, text


def test_gate_metrics_match_what_parity_checks() -> None:
    """Every name --gate accepts is one ``compare`` enforces, and every default gate is accepted."""
    pytest.importorskip("torch")
    from facemoe.cli.export_cmd import GATE_METRICS
    from facemoe.export.parity import DEFAULT_GATES, compare

    assert {m for gates in DEFAULT_GATES.values() for m in gates} <= set(GATE_METRICS)
    rng = np.random.default_rng(0)
    reference = (rng.normal(size=(8, 16)), [np.tile([0, 1], (10, 1))])
    artifact = (reference[0] + rng.normal(scale=0.5, size=(8, 16)), [np.tile([0, 2], (10, 1))])
    for metric, (_, high) in GATE_METRICS.items():
        result = compare("fp32", reference, artifact, ["layer"], {metric: high})
        assert len(result.failures) == 1, (metric, result.failures)


def test_parity_count_must_allow_pairs(tmp_path: Path) -> None:
    fails(main_app, ["parity", tmp_path, "--count", "0"], "'--count'", "greater than or equal to 2")
    fails(main_app, ["parity", tmp_path, "--count", "-5"], "'--count'")


def test_sub_commands_of_facemoe_give_one_line_too(tmp_path: Path) -> None:
    """The commands ``facemoe`` mounts from other modules keep one-line errors under the group."""
    fails(main_app, ["export", "--random-weights", "--k", "-1", "--out", tmp_path / "b"], "'--k'")
    fails(main_app, ["bench", "--random-weights", "--iterations", "0"], "'--iterations'")
    fails(main_app, ["no-such-command"], "No such command")
    only(tmp_path)


# -------------------------------------------------------------------------------------------- facemoe bench

BENCH_CASES = [
    (["--iterations", "0"], ["'--iterations'"]),
    (["--warmup", "-1"], ["'--warmup'"]),
    (["--threads", "0"], ["'--threads'"]),
    (["--batch", "0,8"], ["--batch '0,8'", ">= 1"]),
    (["--sparse-batch", "x"], ["--sparse-batch 'x'", "comma-separated integers"]),
    (["--precision", "fp8"], ["unknown precision fp8", "fp32, fp16, int8"]),
    (["--backend", "torch,magic"], ["unknown backend magic", "torch, sparse, onnxruntime, tensorrt"]),
    (["--half", "most"], ["'--half'", "'gemm', 'all'"]),
    (["--cuda-graphs", "maybe"], ["'--cuda-graphs'", "'on', 'off', 'both'"]),
    (["--preset", "huge"], ["'--preset'"]),
    (["--device", "gpu"], ["--device 'gpu'", "cuda:N"]),
    (["--backend", "torch", "--precision", "int8"], ["torch has no int8 rows"]),
    (["--checkpoint", "nope.pt"], ["exclude each other"]),
]


@pytest.mark.parametrize(("args", "needles"), BENCH_CASES, ids=[" ".join(a) for a, _ in BENCH_CASES])
def test_bench_refuses_bad_values(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    fails(bench_app, ["--random-weights", *args, "--json", tmp_path / "b.json"], *needles)
    only(tmp_path)


def test_bench_outputs_need_overwrite(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text("{}")
    fails(bench_app, ["--random-weights", "--json", tmp_path / "b.json"], "already exists", "--overwrite")
    fails(bench_app, ["--random-weights", "--json", tmp_path / "x", "--markdown", tmp_path / "x"], "same file")
    assert (tmp_path / "b.json").read_text() == "{}"
    only(tmp_path, "b.json")


def test_bench_fails_when_every_row_is_skipped(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch fp16 rows run on this GPU")
    args = ["--random-weights", "--backend", "torch", "--precision", "fp16", "--device", "cpu", "--batch", "1"]
    result = runner.invoke(bench_app, [*args, "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing was measured" in errors[0] and "fp16 needs a CUDA GPU" in errors[0]
    only(tmp_path)


# ----------------------------------------------------------------------------------- facemoe build-engine


def _bundle(tmp_path: Path) -> Path:
    """The smallest directory ``Bundle`` opens: a manifest with one fp32 artifact (never run here)."""
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "model.fp32.onnx").write_bytes(b"onnx")
    from facemoe.bundle import Artifact, Manifest

    artifact = Artifact("fp32", "model.fp32.onnx", "0" * 64, 17)
    manifest = Manifest(model={}, preprocessing={}, routing={}, embedding_size=8, artifacts={"fp32": artifact})
    (root / "manifest.json").write_text(json.dumps(manifest.to_json()))
    return root


ENGINE_CASES = [
    (["--opt-level", "9"], ["'--opt-level'", "less than or equal to 5"]),
    (["--precision", "int4"], ["'--precision'", "'fp32', 'fp16', 'int8'"]),
    (["--min-batch", "0"], ["'--min-batch'"]),
    (["--min-batch", "8", "--opt-batch", "4"], ["--min-batch <= --opt-batch <= --max-batch", "8/4/32"]),
    (["--workspace", "lots"], ["--workspace 'lots'"]),
    (["--device", "-1"], ["'--device'"]),
    (["--precision", "fp32", "--weak-fp16"], ["--weak-fp16 builds fp16 engines only"]),
    (["--plugin", "missing.so"], ["missing.so: plugin library not found"]),
]


@pytest.mark.parametrize(("args", "needles"), ENGINE_CASES, ids=[" ".join(a) for a, _ in ENGINE_CASES])
def test_build_engine_refuses_bad_values(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    fails(engine_app, [tmp_path / "no-bundle", *args], *needles)
    only(tmp_path)


def test_build_engine_checks_the_bundle_first(tmp_path: Path) -> None:
    from facemoe.bundle import Bundle

    root = _bundle(tmp_path)
    assert Bundle(root).precisions == ["fp32"]  # the minimal bundle opens, so the errors below are the CLI's
    fails(engine_app, [root, "--precision", "fp16"], "no fp16 ONNX to build from", "re-export with --fp16")
    fails(engine_app, [tmp_path / "nope"], "nope")
    (root / "engines").write_text("")
    fails(engine_app, [root, "--precision", "fp32"], "is a file, expected the bundle's engines directory")


def test_build_engine_overwrite_and_its_old_name(tmp_path: Path) -> None:
    result = runner.invoke(engine_app, ["--help"], env={"COLUMNS": "200"})
    assert "--overwrite" in result.output and "--force" not in result.output
    assert "fp32|fp16|int8" in result.output and "0<=x<=5" in result.output
    # --force still parses: the error that follows is about the bundle, not the option.
    fails(engine_app, [tmp_path / "nope", "--force"], "nope")
    fails(engine_app, [tmp_path / "nope", "--overwrite"], "nope")


# ----------------------------------------------------------------------------------------- facemoe enroll

ENROLL_CASES = [
    (["--det-threshold", "2"], ["'--det-threshold'", "less than or equal to 1"]),
    (["--min-eye-distance", "-1"], ["'--min-eye-distance'"]),
    (["--backend", "cuda"], ["'--backend'", "'auto', 'tensorrt', 'onnxruntime', 'torch'"]),
    (["--precision", "fp64"], ["'--precision'", "'fp32', 'fp16', 'int8'"]),
    (["--detector", "missing.onnx"], ["missing.onnx: detector ONNX not found"]),
]


@pytest.mark.parametrize(("args", "needles"), ENROLL_CASES, ids=[" ".join(a) for a, _ in ENROLL_CASES])
def test_enroll_refuses_bad_values(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    base = ["--images", tmp_path, "--bundle", tmp_path / "b", "--out", tmp_path / "g.npz"]
    fails(enroll_app, [*base, *args], *needles)
    only(tmp_path)


def test_enroll_keeps_an_existing_gallery(tmp_path: Path) -> None:
    gallery = tmp_path / "g.npz"
    gallery.write_bytes(b"precious")
    base = ["--images", tmp_path, "--bundle", tmp_path / "b"]
    fails(enroll_app, [*base, "--out", gallery], "g.npz: already exists", "--overwrite")
    fails(enroll_app, [*base, "--out", tmp_path], "is a directory")
    fails(enroll_app, [*base, "--out", tmp_path / "sub" / "g.npz"], "does not exist")
    assert gallery.read_bytes() == b"precious"
    only(tmp_path, "g.npz")


def test_enroll_reads_phone_photos_upright(tmp_path: Path) -> None:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise") decodes as it is shown."""
    image_module = pytest.importorskip("PIL.Image")
    from facemoe.cli.enroll_cmd import read_image

    stored = np.zeros((60, 100, 3), np.uint8)  # as the sensor wrote it: landscape, bright band on the left
    stored[:, :25] = (40, 200, 240)
    exif = image_module.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image_module.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    upright = read_image(path)
    assert upright.shape == (100, 60, 3)  # portrait, as every viewer shows it
    expected = np.rot90(stored[:, :, ::-1], k=-1)  # RGB -> BGR, rotated 90 degrees clockwise
    assert np.abs(upright.astype(int) - expected.astype(int)).mean() < 3
    plain = tmp_path / "plain.jpg"
    image_module.fromarray(stored).save(plain, "JPEG", quality=95)
    assert read_image(plain).shape == (60, 100, 3)


# ---------------------------------------------------------------------------------------- gallery files


@pytest.mark.parametrize("content", [b"garbage, not a zip" * 4, b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'}"])
def test_garbage_gallery_is_named_as_such(tmp_path: Path, content: bytes) -> None:
    from facemoe.errors import InputError
    from facemoe.runtime.gallery import Gallery

    path = tmp_path / "g.npz"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        Gallery.load(path)
    assert str(info.value).startswith(f"{path}: not a FaceMoE gallery file")
    assert "pickle" not in str(info.value)


def test_gallery_with_python_objects_is_not_loaded(tmp_path: Path) -> None:
    from facemoe.errors import InputError
    from facemoe.runtime.gallery import Gallery

    path = tmp_path / "g.npz"
    meta = np.array(json.dumps({"format": "facemoe-gallery"}))
    np.savez(path, names=np.array([{"a": 1}], dtype=object), embeddings=np.ones((1, 4)), meta=meta)
    with pytest.raises(InputError, match=r"not a FaceMoE gallery file \(it holds Python objects") as info:
        Gallery.load(path)
    assert "allow_pickle" not in str(info.value)
