"""``facemoe-export`` and ``facemoe parity`` / ``info`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def _export(*args):
    return _run("facemoe.cli.export_cmd", *args)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    joined = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in joined, joined


def test_refuses_without_checkpoint(tmp_path):
    result = _export("--out", str(tmp_path / "b"))
    _one_line_error(result, "no --checkpoint given", "--random-weights")
    assert not (tmp_path / "b").exists()


def test_missing_checkpoint_file(tmp_path):
    result = _export("--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "b"))
    _one_line_error(result, "model.pt: checkpoint file not found")


def test_int8_needs_calibration(tmp_path):
    result = _export("--random-weights", "--int8", "--out", str(tmp_path / "b"))
    _one_line_error(result, "--int8 needs --calib")


def test_wrong_config_named(tmp_path, golden):
    ckpt = tmp_path / "model.pt"
    torch.save(golden["state_dict"], ckpt)
    result = _export("--checkpoint", str(ckpt), "--config", "full", "--out", str(tmp_path / "b"))
    _one_line_error(result, "checkpoint has embed dim 32, config says embed dim 384")


def test_checkpoint_to_bundle_then_parity_and_info(tmp_path, golden):
    ckpt = tmp_path / "model.pt"
    torch.save(golden["state_dict"], ckpt)
    out = tmp_path / "bundle"
    result = _export("--checkpoint", str(ckpt), "--fp16", "--out", str(out), "--quiet", "--gate", "fp16.cosine_min=0.9")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"]["path"] == str(ckpt.resolve())
    assert manifest["model"]["random_weights"] is False
    assert manifest["artifacts"]["fp32"]["parity"]["passed"]
    again = _export("--checkpoint", str(ckpt), "--out", str(out))
    _one_line_error(again, "already exists")

    parity = _run("facemoe.cli.main", "parity", str(out))
    assert parity.returncode == 0, parity.stderr
    assert "fp32" in parity.stdout and "pass" in parity.stdout
    info = _run("facemoe.cli.main", "info", str(out))
    assert info.returncode == 0 and "model.fp16.onnx" in info.stdout


def test_info_on_missing_bundle(tmp_path):
    result = _run("facemoe.cli.main", "info", str(tmp_path / "nope"))
    _one_line_error(result, "bundle directory does not exist")


def test_engine_without_tensorrt_fails_before_exporting(tmp_path):
    from facemoe.runtime.engine_identity import import_tensorrt

    if import_tensorrt() is not None:
        pytest.skip("TensorRT is installed here")
    result = _export("--random-weights", "--engine", "--out", str(tmp_path / "b"))
    _one_line_error(result, "TensorRT is not installed")
    assert not (tmp_path / "b").exists()


def test_small_preset_fp32_fp16_int8_end_to_end_with_default_gates(tmp_path):
    """The issue's CI run: every artifact of the small preset passes the default parity gates."""
    from paths import CALIB_DIR

    cache = tmp_path / "cache"
    args = ["--random-weights", "--preset", "small", "--fp16", "--int8", "--calib", str(CALIB_DIR)]
    # --calib-count 102: calibration takes every face of the folder (2 crops + 100 LFW), so parity runs on the
    # synthetic inputs the random-weight gates were set on; on held-out real faces this random model is chaotic
    # (fp32 vs itself at +-0.5 grey level: cosine min 0.963; fp16 min 0.986 < its 0.99 gate).
    args += ["--calib-count", "102", "--calib-cache", str(cache), "--quiet"]
    result = _export(*args, "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert sorted(manifest["artifacts"]) == ["fp16", "fp32", "int8"]
    assert all(a["parity"]["passed"] for a in manifest["artifacts"].values())
    quantization = manifest["calibration"]["quantization"]
    assert quantization["calibration"]["cache"] == "miss"
    assert quantization["options"]["float_blocks"] == 1 and not quantization["options"]["quantize_attention_matmuls"]

    again = _export(*args, "--out", str(tmp_path / "b2"))  # same model, faces and method: ranges from the cache
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert manifest["calibration"]["quantization"]["calibration"]["cache"] == "hit"

    # Quantizing the first block and the attention matmuls too (faster on the CPU; on this random model it
    # misses the int8 gate, measured cosine mean 0.978 < 0.98, hence --no-gate): the options reach the graph.
    fast = _export(*args, "--int8-float-blocks", "0", "--int8-attention", "--no-gate", "--out", str(tmp_path / "b3"))
    assert fast.returncode == 0, fast.stderr
    fast_q = json.loads((tmp_path / "b3" / "manifest.json").read_text())["calibration"]["quantization"]
    assert fast_q["options"]["float_blocks"] == 0 and fast_q["options"]["quantize_attention_matmuls"]
    assert fast_q["quantized_nodes"] > quantization["quantized_nodes"]
    assert not any("float_blocks" in why or "activation-activation" in why for why in fast_q["excluded_nodes"].values())
    bad = _export(*args, "--int8-float-blocks", "-1", "--out", str(tmp_path / "b4"))
    _one_line_error(bad, "'--int8-float-blocks'", "greater than or equal to 0")
