"""The live accuracy audit of ``facemoe-run`` on real bundles, real video and real ONNX Runtime sessions.

A healthy int8 bundle audits without an alarm; the same bundle with its int8 weight scales multiplied (and
re-hashed into the manifest, so it loads) raises ``accuracy_alarm`` within the first audited faces, saves their
crops, and those crops feed ``facemoe parity --faces`` and the export's calibration reader.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from facemoe.fileio import sha256_file

from runtime_fixtures import SAMPLE_VIDEO, _gallery, invoke, read_events, sample_frames

pytest.importorskip("torch")  # the fixture exports a bundle

CALIB_CACHE = "calib-cache"


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny preset, random weights (seed 0): fp32 and int8 calibrated on the sample video."""
    from facemoe.export.bundle_writer import CalibrationSpec, export_bundle
    from facemoe.model import build_model
    from facemoe.model.random_weights import randomize

    root = tmp_path_factory.mktemp("audit")
    out = root / "int8"
    export_bundle(
        randomize(build_model("tiny"), seed=0),
        out,
        precisions=("fp32", "int8"),
        calib=CalibrationSpec(paths=[SAMPLE_VIDEO], count=16, cache_dir=root / CALIB_CACHE),
        random_weights=True,
        source={"random_weights": True, "preset": "tiny", "seed": 0},
        parity_count=8,
    )
    return out


def break_int8(bundle: Path, out: Path, factor: float = 1.6) -> Path:
    """A copy whose int8 weight scales are multiplied by ``factor``, re-hashed into the manifest."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    path = out / manifest["artifacts"]["int8"]["file"]
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        # A weight's DequantizeLinear reads an int8 initializer; its scale is the second input.
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
            changed += 1
    assert changed > 10, changed
    onnx.save(model, str(path))
    manifest["artifacts"]["int8"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def run(bundle: Path, tmp_path: Path, *args: object, name: str = "events.jsonl"):
    from facemoe.cli.run_cmd import app

    events = tmp_path / name
    result = invoke(
        app,
        ["--bundle", bundle, "--video", SAMPLE_VIDEO, "--backend", "onnxruntime", "--out", events, "-q", *args],
    )
    return result, read_events(events)


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def test_healthy_int8_bundle_audits_without_alarm(int8_bundle: Path, tmp_path: Path) -> None:
    gallery = _gallery(str(int8_bundle))
    result, events = run(
        int8_bundle,
        tmp_path,
        "--precision", "int8", "--gallery", gallery, "--audit-rate", "1", "--audit-reference", "onnx",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert events[0]["audit"]["reference"] == "onnx" and events[0]["audit"]["min_cosine"] == 0.98
    assert not of(events, "accuracy_alarm")
    [final] = of(events, "accuracy_check")
    assert final["final"] and final["artifact"] == "int8" and final["reference"] == "onnx"
    assert final["faces"] == final["sampled"] >= 10 and final["dropped"] == 0
    assert 0.98 <= final["cosine_mean"] < 1.0 and final["cosine_min"] > 0.9
    assert final["decision_agreement"] is not None and final["decision_agreement"] >= 0.9
    assert 0.9 <= final["routing_agreement_mean"] <= 1.0 and len(final["routing_agreement_per_layer"]) == 6
    assert events[-1]["event"] == "run_ended"
    assert f"audit (onnx reference, int8): {final['faces']} faces" in result.output


def test_broken_int8_alarms_early_and_its_crops_close_the_loop(int8_bundle: Path, tmp_path: Path) -> None:
    broken = break_int8(int8_bundle, tmp_path / "broken")
    crops = tmp_path / "crops"
    result, events = run(
        broken,
        tmp_path,
        "--precision", "int8", "--audit-rate", "1", "--audit-reference", "onnx",
        "--audit-save", crops, "--audit-strict", "--allow-failed-parity",
        # Played at its frame rate, every face embedded at once: the alarm comes while the video plays.
        "--realtime", "--max-latency-ms", "0", "--embed-every", "1",
    )  # fmt: skip
    from facemoe.cli.run_audit import EXIT_ACCURACY_ALARM

    assert result.exit_code == EXIT_ACCURACY_ALARM, result.output
    [alarm] = of(events, "accuracy_alarm")
    assert alarm["faces"] <= 8 and alarm["window_cosine_mean"] < 0.98 and alarm["min_cosine"] == 0.98
    ended = events[-1]
    assert ended["event"] == "run_ended" and ended["reason"] == "accuracy_alarm" and ended["frames"] < 100
    worst = alarm["worst"]
    assert worst and [w["cosine"] for w in worst] == sorted(w["cosine"] for w in worst)
    frames = sample_frames()
    for face in worst:
        crop = cv2.imread(face["crop"])
        assert crop.shape == (112, 112, 3) and 0 <= face["frame"] < len(frames)
    assert "stopped:" in result.output and "accuracy alarm" in result.output

    # The saved crops are aligned faces: the export's calibration reader takes them as they are ...
    from facemoe.calibration import FaceDetector, gather_faces

    pool = gather_faces([crops], detector=FaceDetector())  # as facemoe-export --calib reads them
    per_file = pool.sources[0]["per_file"]
    assert len(per_file) == len(list(crops.glob("*.png"))) == pool.distinct_faces
    # Each crop is one face; the export's detector may find it a few degrees off its template and re-align it.
    assert all(f["faces"] == 1 and f["size"] == [112, 112] for f in per_file), per_file
    assert any(f["decision"] == "aligned" for f in per_file), per_file
    # ... and `facemoe parity --faces` re-checks the bundles on them: the broken int8 fails, the healthy passes.
    from facemoe.cli.main import app

    if len(worst) < 2:
        shutil.copy(worst[0]["crop"], crops / "again.png")
    bad = invoke(app, ["parity", broken, "--faces", crops])
    assert bad.exit_code == 1 and f"aligned faces from {crops}" in bad.output, bad.output
    good = invoke(app, ["parity", int8_bundle, "--faces", crops])
    assert good.exit_code == 0, good.output


def _video_inputs(bundle: Path, count: int = 12) -> np.ndarray:
    from facemoe.bundle import Bundle
    from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from facemoe.runtime.detection import RetinaFaceDetector
    from facemoe.runtime.pipeline import FaceEncoder

    loaded = Bundle(bundle)
    encoder = FaceEncoder(OnnxRuntimeBackend.from_bundle(loaded, "fp32"), loaded.manifest.preprocessing)
    detector = RetinaFaceDetector()
    tensors = []
    for frame in sample_frames()[:: len(sample_frames()) // count][:count]:
        [det] = [d for d in detector.detect(frame) if d.score > 0.5][:1]
        tensors.append(encoder.prepare(encoder.align(frame, det.landmarks)))
    return np.stack(tensors)


def test_torch_and_onnx_references_agree(int8_bundle: Path) -> None:
    from facemoe.bundle import Bundle
    from facemoe.runtime.audit_reference import OnnxReference, TorchReference, open_reference

    loaded = Bundle(int8_bundle)
    inputs = _video_inputs(int8_bundle)
    onnx_emb, onnx_routes = OnnxReference(loaded).embed(inputs)
    torch_emb, torch_routes = TorchReference(loaded).embed(inputs)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = (unit(onnx_emb) * unit(torch_emb)).sum(axis=1)
    assert cosine.min() >= 1 - 1e-4, cosine
    assert len(onnx_routes) == len(torch_routes) == 6
    for a, b in zip(onnx_routes, torch_routes, strict=True):
        assert a.shape == b.shape
        assert (np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).mean() >= 0.99
    assert open_reference(loaded, "auto").reference.name == "torch"


def test_routing_is_compared_only_where_the_backend_runs_the_artifact_graph(int8_bundle: Path) -> None:
    from facemoe.bundle import Bundle
    from facemoe.runtime.audit_reference import ArtifactRouting
    from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from facemoe.runtime.backends.torch_backend import TorchBackend

    loaded = Bundle(int8_bundle)
    inputs = _video_inputs(int8_bundle, count=2)
    ort = ArtifactRouting(loaded, OnnxRuntimeBackend.from_bundle(loaded, "int8"))
    routes = ort.routes(inputs)
    assert not ort.unavailable and routes is not None and len(routes) == 6
    assert all(r.shape[1] == 2 and r.shape[0] % 2 == 0 for r in routes)  # k = 2, batch-major tokens
    torch_side = ArtifactRouting(loaded, TorchBackend.from_bundle(loaded, "fp32", device="cpu", cuda_graphs=False))
    assert torch_side.routes(inputs) is None and "does not run the artifact's graph" in torch_side.unavailable


class SlowReference:
    """The real fp32 ONNX reference, slowed down to 0.2 s per batch: a reference behind the stream."""

    name = "onnx"
    detail = "slowed fp32 ONNX"

    def __init__(self, bundle: Path) -> None:
        from facemoe.bundle import Bundle
        from facemoe.runtime.audit_reference import OnnxReference

        self.inner = OnnxReference(Bundle(bundle))

    def embed(self, batch: np.ndarray):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return self.inner.embed(batch)


def test_a_slow_reference_drops_samples_and_says_how_many(int8_bundle: Path, tmp_path: Path) -> None:
    from facemoe.runtime.audit import AuditConfig, Auditor
    from facemoe.runtime.events import EventWriter

    inputs = _video_inputs(int8_bundle, count=4)
    raw = SlowReference(int8_bundle).inner.embed(inputs)[0]
    with EventWriter(tmp_path / "events.jsonl") as events:
        auditor = Auditor(
            SlowReference(int8_bundle), events, AuditConfig(rate=1.0, queue_size=2, drain_s=5), artifact="fp32"
        )
        slowest = 0.0
        for batch in range(10):  # 40 faces offered in ten stream batches, faster than 0.2 s per check
            start = time.perf_counter()
            auditor.offer([(batch, 1, t, None) for t in inputs], raw)
            slowest = max(slowest, time.perf_counter() - start)
        assert "dropped" in auditor.status()  # the live display's row
        final = auditor.finish()
    assert slowest < 0.1  # the stream never waits for the reference
    assert final["sampled"] == 40 and final["dropped"] > 20
    assert final["faces"] + final["dropped"] + final["unfinished"] + final["errors"] == 40
    assert final["cosine_min"] > 0.9999  # fp32 against itself
    [check] = of(read_events(tmp_path / "events.jsonl"), "accuracy_check")
    assert check["dropped"] == final["dropped"] and check["final"]


def test_audit_options_fail_in_one_line(tmp_path: Path) -> None:
    from facemoe.cli.run_cmd import app

    afile = tmp_path / "file.txt"
    afile.write_text("x")
    result = invoke(app, ["--demo", "--audit-save", afile, "-o", tmp_path / "e.jsonl"])
    assert result.exit_code == 2 and "--audit-save needs a directory" in result.output
    result = invoke(app, ["--demo", "--audit-rate", "0", "--audit-save", tmp_path / "d", "-o", tmp_path / "e.jsonl"])
    assert result.exit_code == 2 and "set --audit-rate above 0" in result.output
    assert not (tmp_path / "e.jsonl").exists()
