"""``facemoe-run`` refuses bad values and unfit bundles before any work; ``facemoe info`` verifies bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facemoe.cli.main import app as main_app
from facemoe.cli.run_cmd import app as run_app
from facemoe.fileio import sha256_file

from runtime_fixtures import SAMPLE_VIDEO, error_lines, invoke, read_events


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _fails(app, args: list[object], message: str) -> str:  # type: ignore[no-untyped-def]
    result = invoke(app, args)
    lines = error_lines(result.stderr)
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- option values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--threshold", "5", "Invalid value for '--threshold'"),
        ("--threshold", "nan", "Invalid value for '--threshold'"),
        ("--max-age", "-1", "Invalid value for '--max-age'"),
        ("--threads", "-2", "Invalid value for '--threads'"),
        ("--max-frames", "0", "Invalid value for '--max-frames'"),
        ("--embed-every", "0", "Invalid value for '--embed-every'"),
        ("--det-size", "8", "Invalid value for '--det-size'"),
        ("--max-latency-ms", "-5", "Invalid value for '--max-latency-ms'"),
        ("--precision", "fp64", "'fp64' is not one of 'fp32', 'fp16', 'int8'"),
        ("--backend", "cuda", "'cuda' is not one of 'auto', 'tensorrt', 'onnxruntime', 'torch'"),
    ],
)
def test_bad_values_are_refused_before_work(
    tiny_bundle: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = invoke(run_app, ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle, option, value])
    text = " ".join(result.stderr.replace("│", " ").split())
    assert result.exit_code == 2 and message in text, result.stderr
    assert "--fp64" not in text and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_values_typer_ranges_let_through(tiny_bundle: Path) -> None:
    base = ["--video", SAMPLE_VIDEO, "--bundle", tiny_bundle]
    _fails(run_app, [*base, "--min-eye-distance", "inf"], "--min-eye-distance must be a finite number")
    _fails(run_app, [*base, "--det-threshold", "1"], "--det-threshold must be between 0 and 1")
    _fails(run_app, [*base, "--det-threshold", "0"], "--det-threshold must be between 0 and 1")


def test_help_shows_ranges_and_choices() -> None:
    result = invoke(run_app, ["--help"])
    text = " ".join(result.stdout.replace("│", " ").split())
    for shown in ("[-1.0<=x<=1.0]", "fp32|fp16|int8", "--overwrite", "--allow-failed-parity", "events-<date>-<time>"):
        assert shown in text, shown
    assert text.count("[x>=1]") >= 5


def test_urls_keep_their_slashes(tiny_bundle: Path) -> None:
    line = _fails(run_app, ["--video", "ftp://example.com/clip.mp4", "--bundle", tiny_bundle], "unsupported URL")
    assert line.startswith("error: ftp://example.com/clip.mp4:") and "'ftp'" in line and "rtsp" in line
    _fails(run_app, ["--video", "file:///data/clip.mp4", "--bundle", tiny_bundle], "without file://")


# -- bundles checked when opened ----------------------------------------------------------------------


def _model(path: Path, *, input_name: str = "input", size: int = 120, width: int = 512, rank: int = 4) -> None:
    """A small stand-in model: mean over the pixels of each channel, then a (3, width) projection."""
    shape = ["batch", 3, size, size][:rank]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["pooled"], axes=list(range(2, rank)), keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "standin",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.ones((3, width), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _rehashed(tiny_bundle: Path, root: Path, **model: object) -> Path:
    """The tiny bundle with another model in place of model.fp32.onnx, its sha256 updated in the manifest."""
    copy = root / "bundle"
    shutil.copytree(tiny_bundle, copy)
    _model(copy / "model.fp32.onnx", **model)  # type: ignore[arg-type]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["fp32"]["sha256"] = sha256_file(copy / "model.fp32.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ({"input_name": "x"}, "inputs ['x'], the manifest says one named 'input'"),
        ({"rank": 3}, "input rank 3"),
        ({"size": 112}, "input shape ['batch', 3, 112, 112], the manifest says (batch, 3, 120, 120)"),
        ({"width": 128}, "output shape ['batch', 128], the manifest says (batch, 512)"),
    ],
)
def test_a_model_that_does_not_fit_the_manifest(tiny_bundle: Path, tmp_path: Path, model: dict, problem: str) -> None:
    bundle = _rehashed(tiny_bundle, tmp_path, **model)
    out = tmp_path / "events.jsonl"
    args = ["--video", SAMPLE_VIDEO, "--bundle", bundle, "--backend", "onnxruntime", "--out", out]
    line = _fails(run_app, args, "does not fit the bundle manifest")
    assert f"{bundle / 'model.fp32.onnx'}:" in line and problem in line
    assert not out.exists(), "refused before the run started"


def test_the_stand_in_model_fits_when_its_interface_is_right(tiny_bundle: Path, tmp_path: Path) -> None:
    """The check above refuses only the mismatch: the same stand-in with the right interface runs."""
    bundle = _rehashed(tiny_bundle, tmp_path)
    out = tmp_path / "events.jsonl"
    result = invoke(run_app, ["--video", SAMPLE_VIDEO, "--bundle", bundle, "--max-frames", "3", "--out", out])
    assert result.exit_code == 0, result.output
    assert read_events(out)[-1]["frames"] == 3


def _with_failed_int8(tiny_bundle: Path, root: Path) -> Path:
    """An int8 artifact whose recorded export parity failed (as ``facemoe-export --no-gate`` leaves it)."""
    copy = root / "bundle"
    shutil.copytree(tiny_bundle, copy)
    shutil.copy(copy / "model.fp32.onnx", copy / "model.int8.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = dict(manifest["artifacts"]["fp32"], precision="int8", file="model.int8.onnx")
    entry["parity"] = dict(entry["parity"], passed=False, failures=["cosine mean 0.912000 < 0.93"])
    manifest["artifacts"]["int8"] = entry
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_failed_parity_is_refused_unless_allowed(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _with_failed_int8(tiny_bundle, tmp_path)
    out = tmp_path / "events.jsonl"
    args = ["--video", SAMPLE_VIDEO, "--bundle", bundle, "--precision", "int8", "--out", out, "--max-frames", "3"]
    line = _fails(run_app, args, "the int8 model failed its parity check at export (cosine mean 0.912000 < 0.93)")
    assert "--allow-failed-parity" in line and not out.exists()

    result = invoke(run_app, [*args, "--allow-failed-parity"])
    assert result.exit_code == 0, result.output
    assert "warning: the int8 model failed its parity check" in " ".join(result.stderr.split())
    started = read_events(out)[0]
    assert started["precision"] == "int8" and "cosine mean 0.912000 < 0.93" in started["warnings"][0]
    # fp32 passed its check: the same bundle runs at fp32 without the flag, with no warning.
    out32 = tmp_path / "fp32.jsonl"
    result = invoke(run_app, ["--video", SAMPLE_VIDEO, "--bundle", bundle, "--out", out32, "--max-frames", "2"])
    assert result.exit_code == 0 and read_events(out32)[0]["warnings"] == []


def test_info_verifies_every_artifact(tiny_bundle: Path, tmp_path: Path) -> None:
    result = invoke(main_app, ["info", tiny_bundle])
    assert result.exit_code == 0 and "verified 2 artifacts" in result.stderr, result.output

    _fails(main_app, ["info", SAMPLE_VIDEO], f"{SAMPLE_VIDEO}: not a bundle directory")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "model.fp16.onnx").unlink()
    with open(broken / "model.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    line = _fails(main_app, ["info", broken], "broken bundle")
    assert f"{broken / 'model.fp16.onnx'}: artifact listed in the manifest is missing" in line
    assert f"{broken / 'model.fp32.onnx'}: sha256" in line and "does not match the manifest" in line
    assert "BROKEN" in " ".join(invoke(main_app, ["info", broken]).stdout.split())

    with_engine = tmp_path / "with_engine"
    shutil.copytree(tiny_bundle, with_engine)
    manifest = json.loads((with_engine / "manifest.json").read_text())
    manifest["engines"] = [{"file": "engines/gone.engine", "sha256": "0" * 64, "precision": "fp16"}]
    (with_engine / "manifest.json").write_text(json.dumps(manifest))
    _fails(main_app, ["info", with_engine], f"{with_engine / 'engines/gone.engine'}: engine listed in the manifest")
