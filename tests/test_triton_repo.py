"""Triton Inference Server model repositories from a bundle: written, parsed, validated, refused."""

from __future__ import annotations

import json
import py_compile
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facemoe.bundle import Bundle, read_manifest, record_engine, write_manifest
from facemoe.bundle.sections import Artifact
from facemoe.errors import FaceMoEError, OutputError
from facemoe.fileio import sha256_file
from facemoe.preprocess import preprocess_face
from facemoe.triton.config import read_parameters
from facemoe.triton.gpu import write_gpu_repository
from facemoe.triton.onnx_io import read_interface
from facemoe.triton.pbtxt import PbtxtError, format_message, parse
from facemoe.triton.python_models import EmbedderModel, crops_to_inputs
from facemoe.triton.serve import write_serve_repository
from facemoe.triton.validate import check_config, validate_repository

DEMO = Path(__file__).resolve().parents[1] / "src" / "facemoe" / "data" / "demo-bundle"


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "repo"
    write_gpu_repository(DEMO, out)
    return out


def test_gpu_repository_files_configs_and_hashes(gpu_repo: Path) -> None:
    models = validate_repository(gpu_repo)
    assert set(models) == {"facemoe", "facemoe_embedder", "facemoe_preprocess"}
    manifest = json.loads((DEMO / "manifest.json").read_text())
    onnx_copy = gpu_repo / "facemoe_embedder" / "1" / "model.onnx"
    assert sha256_file(onnx_copy) == manifest["artifacts"]["fp32"]["sha256"]
    assert (gpu_repo / "manifest.json").read_bytes() == (DEMO / "manifest.json").read_bytes()
    assert "tritonserver --model-repository" in (gpu_repo / "README.md").read_text()
    embedder = models["facemoe_embedder"]
    assert embedder.message.one("platform") == "onnxruntime_onnx"
    assert embedder.max_batch_size == manifest["model"]["export"]["max_batch"]
    io = read_interface(onnx_copy)
    assert (
        embedder.inputs == {t.name: (t.data_type, t.dims) for t in io.inputs} == {"input": ("TYPE_FP32", [3, 120, 120])}
    )
    assert embedder.outputs == {"embedding": ("TYPE_FP32", [512])}
    params = read_parameters(embedder.message)
    assert params["facemoe_manifest_sha256"] == sha256_file(DEMO / "manifest.json")
    assert params["facemoe_model_sha256"] == manifest["artifacts"]["fp32"]["sha256"]
    groups = embedder.message.messages("instance_group")
    assert [str(g.one("kind")) for g in groups] == ["KIND_GPU"]
    batching = embedder.message.messages("dynamic_batching")[0]
    assert batching.all("preferred_batch_size") == [4, 8, 16, 32]
    assert models["facemoe"].inputs == {"crops": ("TYPE_UINT8", [112, 112, 3])}


def test_written_configs_parse_with_tritons_own_proto(gpu_repo: Path, tmp_path: Path) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    serve = write_serve_repository(DEMO, tmp_path / "serve").root
    for path in [*gpu_repo.glob("*/config.pbtxt"), *serve.glob("*/config.pbtxt")]:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name


def test_existing_output_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match="already exists and is not empty"):
        write_gpu_repository(DEMO, out)
    assert (out / "mine.txt").read_text() == "user data"
    write_gpu_repository(DEMO, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "facemoe_embedder" / "config.pbtxt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging directory left behind


def test_missing_precision_and_bad_batch_sizes_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FaceMoEError, match="has no int8 model"):
        write_gpu_repository(DEMO, tmp_path / "a", precision="int8")
    with pytest.raises(FaceMoEError, match=r"preferred batch size 64 is not in 1\.\.32"):
        write_gpu_repository(DEMO, tmp_path / "b", preferred_batch_sizes=[8, 64])
    assert not list(tmp_path.iterdir())


def _corrupt(repo: Path, model: str, old: str, new: str) -> Path:
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("model", "old", "new", "message"),
    [
        ("facemoe_embedder", "dims: [ 3, 120, 120 ]", "dims: [ 3, 0, 120 ]", "must be integers >= 1 or -1"),
        (
            "facemoe_embedder",
            "preferred_batch_size: [ 4, 8, 16, 32 ]",
            "preferred_batch_size: [ 4, 64 ]",
            "64 is not in",
        ),
        (
            "facemoe",
            'value: "preprocessed"\n    }\n    output_map',
            'value: "missing"\n    }\n    output_map',
            "neither",
        ),
        ("facemoe_embedder", "dims: [ 3, 120, 120 ]", "dims: [ 3, 112, 112 ]", "wants TYPE_FP32 [3, 112, 112]"),
        ("facemoe_embedder", "TYPE_FP32", "TYPE_FLOAT", "not a Triton type"),
        ("facemoe_embedder", "KIND_GPU", "KIND_TPU", "instance_group kind"),
        ("facemoe_embedder", 'name: "facemoe_embedder"', 'name: "other"', "does not match its directory"),
        ("facemoe_embedder", 'platform: "onnxruntime_onnx"', 'platform: "onnx"', "platform 'onnx' is unknown"),
    ],
)
def test_validator_rejects_corrupted_configs(
    gpu_repo: Path, tmp_path: Path, model: str, old: str, new: str, message: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(gpu_repo, repo)
    path = _corrupt(repo, model, old, new)
    with pytest.raises(PbtxtError) as caught:
        validate_repository(repo)
    assert message in str(caught.value)
    owner = repo / "facemoe" / "config.pbtxt" if "wants" in message else path
    assert str(owner) in str(caught.value)


def test_parser_round_trip_and_syntax_errors(gpu_repo: Path) -> None:
    text = (gpu_repo / "facemoe" / "config.pbtxt").read_text()
    assert format_message(parse(text)) == text
    alt = parse(
        'name: "m" input [ { name: "x", dims: [-1, 2] } ] # comment\n'
        'parameters: { key: "k" value: { string_value: "a\\"b" } }'
    )
    assert alt.messages("input")[0].all("dims") == [-1, 2]
    assert read_parameters(alt) == {"k": 'a"b'}
    with pytest.raises(PbtxtError, match="line 2"):
        parse('name: "m"\ninput { name: "x" ')
    with pytest.raises(PbtxtError, match="unexpected character"):
        parse("name: @")


def test_serve_repository_model_files_and_parameters(tmp_path: Path) -> None:
    repo = write_serve_repository(DEMO, tmp_path / "serve", python_path=["src", "/opt/x"], max_batch=16)
    models = validate_repository(repo.root)
    assert repo.models == ["facemoe_preprocess", "facemoe_embedder", "facemoe"]
    for name in ("facemoe_preprocess", "facemoe_embedder"):
        py_compile.compile(str(repo.root / name / "1" / "model.py"), doraise=True)
        assert models[name].message.one("backend") == "python"
        paths = read_parameters(models[name].message)["facemoe_sys_path"].split(":")
        assert paths == [str(Path("src").resolve()), "/opt/x"] and all(Path(p).is_absolute() for p in paths)
    params = read_parameters(models["facemoe_embedder"].message)
    assert params["facemoe_bundle"] == str(DEMO) and Path(params["facemoe_bundle"]).is_absolute()
    assert params["facemoe_manifest_sha256"] == sha256_file(DEMO / "manifest.json")
    assert models["facemoe_embedder"].max_batch_size == 16
    assert models["facemoe_embedder"].inputs == {"input": ("TYPE_FP32", [3, 120, 120])}


def test_served_preprocessing_is_bit_identical_to_the_local_encoder() -> None:
    from facemoe.runtime.backends.select import open_backend
    from facemoe.runtime.face_encoder import FaceEncoder

    rng = np.random.default_rng(7)
    crops = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    bundle = Bundle(DEMO)
    with open_backend(bundle, "onnxruntime") as backend:
        encoder = FaceEncoder(backend, bundle.manifest.preprocessing)
        local = np.stack([encoder.prepare(crop) for crop in crops])
    served = crops_to_inputs(crops, bundle.manifest.preprocessing)
    assert served.dtype == np.float32 and served.shape == (5, 3, 120, 120)
    assert np.array_equal(served, local)
    assert not np.array_equal(served[0], preprocess_face(crops[0], 120, "bilinear"))  # the recipe matters


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _PbUtils:
    """The few calls of Triton's triton_python_backend_utils the models make (it exists only in the server;
    the real server run is the serve tests')."""

    Tensor = _Tensor

    class InferenceResponse:
        def __init__(self, output_tensors: list[_Tensor], error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, np.ndarray], name: str) -> _Tensor:
        return _Tensor(name, request[name])


def test_embedder_batches_requests_and_splits_results(tmp_path: Path) -> None:
    from facemoe.runtime.backends.select import open_backend

    repo = write_serve_repository(DEMO, tmp_path / "serve")
    config = {"max_batch_size": 32, "parameters": {k: {"string_value": v} for k, v in repo.parameters.items()}}
    model = EmbedderModel(config, _PbUtils)
    rng = np.random.default_rng(3)
    requests = [{"input": rng.standard_normal((n, 3, 120, 120)).astype(np.float32)} for n in (1, 3, 2)]
    responses = model.execute(requests)
    with open_backend(DEMO, "onnxruntime") as backend:
        for request, response in zip(requests, responses, strict=True):
            got = response.output_tensors[0].array
            assert got.shape == (len(request["input"]), 512)
            np.testing.assert_allclose(got, backend.embed(request["input"]), atol=1e-5)
    bad = model.execute([{"input": np.zeros((1, 3, 7, 7), np.float32)}])
    assert bad[0].error is not None and not bad[0].output_tensors
    model.finalize()


def _fp16_io_bundle(root: Path) -> Path:
    """The demo bundle plus an "fp16" artifact whose graph inputs and outputs are float16 (Casts around
    the fp32 graph) and a recorded TensorRT engine file, to check types are read from the ONNX."""
    bundle = root / "bundle"
    shutil.copytree(DEMO, bundle)
    model = onnx.load(str(bundle / "model.fp32.onnx"))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["input_f32" if name == "input" else name for name in node.input]
        node.output[:] = ["embedding_f32" if name == "embedding" else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_f32"], to=TensorProto.FLOAT))
    graph.node.append(helper.make_node("Cast", ["embedding_f32"], ["embedding"], to=TensorProto.FLOAT16))
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(bundle / "model.fp16.onnx"))
    manifest = read_manifest(bundle)
    manifest.artifacts["fp16"] = Artifact("fp16", "model.fp16.onnx", sha256_file(bundle / "model.fp16.onnx"), 17)
    write_manifest(bundle, manifest)
    (bundle / "engines").mkdir()
    plan = bundle / "engines" / "model.fp16.plan"
    plan.write_bytes(b"not a real plan: the writer only copies it")
    record_engine(
        bundle,
        {
            "file": "engines/model.fp16.plan",
            "sha256": sha256_file(plan),
            "precision": "fp16",
            "gpu_name": "NVIDIA H200",
            "compute_capability": "9.0",
            "tensorrt_version": "10.13.0",
            "max_batch": 16,
        },
    )
    return bundle


def test_fp16_io_and_tensorrt_engine(tmp_path: Path) -> None:
    bundle = _fp16_io_bundle(tmp_path)
    repo = write_gpu_repository(bundle, tmp_path / "repo", precision="fp16")
    assert repo.engine == "engines/model.fp16.plan" and "built on NVIDIA H200" in repo.warnings[0]
    models = validate_repository(repo.root)
    assert models["facemoe_embedder"].inputs == {"input": ("TYPE_FP16", [3, 120, 120])}
    assert models["facemoe_preprocess"].outputs == {"input": ("TYPE_FP16", [3, 120, 120])}
    assert models["facemoe"].outputs == {"embedding": ("TYPE_FP16", [512])}
    trt = models["facemoe_embedder_trt"]
    assert trt.message.one("platform") == "tensorrt_plan" and trt.max_batch_size == 16
    assert (repo.root / "facemoe_embedder_trt" / "1" / "model.plan").read_bytes() == (
        bundle / "engines" / "model.fp16.plan"
    ).read_bytes()
    assert "facemoe build-engine" in (repo.root / "facemoe_embedder_trt" / "README.md").read_text()
    assert models["facemoe_trt"].max_batch_size == 16
    check_config(repo.root / "facemoe_trt" / "config.pbtxt")
