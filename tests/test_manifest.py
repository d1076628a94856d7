"""The manifest contract: typed sections read every bundle written so far, one atomic writer, agreed key names."""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from facemoe.bundle import (
    MANIFEST_NAME,
    Bundle,
    EngineEntry,
    Manifest,
    ModelSource,
    Preprocessing,
    read_manifest,
    record_engine,
    write_manifest,
)
from facemoe.errors import BundleError

SRC = Path(__file__).parents[1] / "src" / "facemoe"
DEMO = SRC / "data" / "demo-bundle"
# Manifests written by earlier versions of facemoe-export (tests/data/manifests/README.md says how).
OLD_MANIFESTS = sorted((Path(__file__).parent / "data" / "manifests").glob("*.json"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", [DEMO / MANIFEST_NAME, *OLD_MANIFESTS], ids=lambda p: p.name)
def test_manifests_written_so_far_round_trip_unchanged(path: Path) -> None:
    data = _json(path)
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    assert manifest.model.weights_sha256 and len(manifest.model.weights_sha256) == 64
    assert manifest.model.source.random_weights and manifest.model.source.seed == 0
    assert manifest.preprocessing.flip_fusion == "pre_norm_vector_add"
    assert manifest.model.export is not None and manifest.model.export.max_batch == 32


def test_old_int8_manifest_has_typed_calibration() -> None:
    with_int8 = [p for p in OLD_MANIFESTS if "int8" in _json(p)["artifacts"]]
    assert with_int8, "tests/data/manifests holds a bundle with an int8 artifact"
    manifest = Manifest.from_json(_json(with_int8[0]))
    assert manifest.calibration is not None
    assert manifest.calibration.method == "percentile" and manifest.calibration.samples == 32
    assert len(manifest.calibration.data_hash or "") == 64 and manifest.calibration.quantization


def test_fresh_bundle_round_trips(tiny_bundle: Path) -> None:
    data = _json(tiny_bundle / MANIFEST_NAME)
    manifest = read_manifest(tiny_bundle)
    assert manifest.to_json() == data
    assert set(data) == set(_json(DEMO / MANIFEST_NAME)), "the exporter writes the keys it always wrote"
    assert manifest.model.source == ModelSource(random_weights=True, preset="tiny", seed=0)
    assert manifest.preprocessing == Preprocessing(input_size=manifest.model.config["img_size"])


def test_legacy_key_names_read_as_the_current_ones() -> None:
    source = ModelSource.from_json({"checkpoint": "w.pt", "random_seed": 7, "strength": 0.5})
    assert (source.path, source.seed, source.strength) == ("w.pt", 7, 0.5)
    assert source.to_json() == {"seed": 7, "strength": 0.5, "path": "w.pt"}
    # Readers that still use the mapping form see the same normalised names.
    assert source.get("path") == "w.pt" and source.get("seed") == 7 and "checkpoint" not in source


def test_unknown_keys_survive_a_rewrite(tmp_path: Path) -> None:
    data = _json(DEMO / MANIFEST_NAME)
    data["future_section"] = {"x": 1}
    data["model"]["source"]["origin"] = "hub"
    data["preprocessing"]["gamma"] = 2.2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    record_engine(tmp_path, {"file": "engines/a.engine", "precision": "fp16", "min_batch": 1, "future": True})
    written = _json(tmp_path / MANIFEST_NAME)
    assert written["future_section"] == {"x": 1}
    assert written["model"]["source"]["origin"] == "hub" and written["preprocessing"]["gamma"] == 2.2
    assert written["engines"] == [{"file": "engines/a.engine", "precision": "fp16", "min_batch": 1, "future": True}]


def test_record_engine_replaces_the_same_file_and_updates_the_bundle(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    write_manifest(root, Manifest.from_json(_json(DEMO / MANIFEST_NAME)))
    bundle = Bundle(root)
    bundle.record_engine(EngineEntry("engines/a.engine", precision="fp16", sha256="1" * 64))
    bundle.record_engine({"file": "engines/b.engine", "precision": "int8"})
    bundle.record_engine(EngineEntry("engines/a.engine", precision="fp16", sha256="2" * 64))
    for manifest in (bundle.manifest, Bundle(root).manifest):
        assert [(e.file, e.sha256) for e in manifest.engines] == [
            ("engines/b.engine", None),
            ("engines/a.engine", "2" * 64),
        ]
    assert bundle.manifest.engines[0].get("precision") == "int8"  # the mapping view older readers use


def _record_many(root: str, worker: int) -> None:
    for i in range(10):
        record_engine(root, {"file": f"engines/w{worker}-{i}.engine", "precision": "fp16"})


def test_concurrent_writers_keep_each_others_entries(tmp_path: Path) -> None:
    write_manifest(tmp_path, Manifest.from_json(_json(DEMO / MANIFEST_NAME)))
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    workers = [context.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert len(read_manifest(tmp_path).engines) == 30


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way leaves the previous manifest intact and no temporary file behind."""
    original = (DEMO / MANIFEST_NAME).read_text()
    (tmp_path / MANIFEST_NAME).write_text(original)
    manifest = read_manifest(tmp_path)
    manifest.extra["unserialisable"] = object()  # json.dumps fails after the temporary file was opened
    with pytest.raises(TypeError):
        write_manifest(tmp_path, manifest)
    assert (tmp_path / MANIFEST_NAME).read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_malformed_manifests_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="not a JSON object"):
        read_manifest(tmp_path)
    data = _json(DEMO / MANIFEST_NAME)
    data["preprocessing"]["flip_fusion"] = "max"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="flip_fusion 'max'"):
        read_manifest(tmp_path)


WRITERS = {"write_text", "write_bytes", "write_json_atomic", "dump", "open", "atomic_path", "replace", "copyfile"}


def _names_manifest(node: ast.AST, aliases: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and (sub.id == "MANIFEST_NAME" or sub.id in aliases):
            return True
        if isinstance(sub, ast.Constant) and sub.value == MANIFEST_NAME:
            return True
    return False


def manifest_writes(tree: ast.AST) -> list[int]:
    """Lines of calls that write a file (write_text, JSON writers, open, ...) whose target names manifest.json,
    directly or through a variable assigned from it (``path = root / MANIFEST_NAME``)."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _names_manifest(node.value, set()):
            aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in WRITERS:
            continue
        targets = [func.value] if isinstance(func, ast.Attribute) else []
        if any(_names_manifest(arg, aliases) for arg in [*targets, *node.args]):
            lines.append(node.lineno)
    return lines


def test_only_the_bundle_module_writes_manifest_json() -> None:
    writer = SRC / "bundle" / "manifest.py"
    assert manifest_writes(ast.parse(writer.read_text())), "the check finds the one writer"
    others = []
    for path in sorted(SRC.rglob("*.py")):
        if path != writer:
            others += [f"{path.relative_to(SRC)}:{line}" for line in manifest_writes(ast.parse(path.read_text()))]
    assert others == [], "manifest.json is written only through facemoe.bundle.write_manifest / record_engine"


def test_the_writer_check_sees_raw_writes() -> None:
    raw = """
write_json_atomic(root / MANIFEST_NAME, data)
(root / "manifest.json").write_text(s)
path = root / MANIFEST_NAME
with open(path, "w") as f:
    json.dump(data, f)
print(MANIFEST_NAME)
"""
    assert manifest_writes(ast.parse(raw)) == [2, 3, 5]


def test_fingerprint_is_the_recorded_weights_hash(tmp_path: Path) -> None:
    data = _json(DEMO / MANIFEST_NAME)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert Bundle(tmp_path).weights_fingerprint == data["model"]["weights_sha256"]
    del data["model"]["weights_sha256"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert Bundle(tmp_path).weights_fingerprint == data["artifacts"]["fp32"]["sha256"]
