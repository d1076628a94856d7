"""Check Triton Inference Server model configurations the way the server does when it loads them.

Covers what our repositories use (docs/SCALE_OUT.md#model-configurations): the model name matches its
directory, the platform/backend is one Triton knows and agree with each other, ``max_batch_size`` >= 0,
tensors have names, known data types and dims >= 1 (or -1), ``dynamic_batching`` preferred sizes within
``max_batch_size``, instance-group kinds, a version directory holding the model file, and every ensemble
step mapping to models and tensors that exist with matching types. Every problem names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from facemoe.triton.config import DATA_TYPES, INSTANCE_KINDS
from facemoe.triton.pbtxt import Message, PbtxtError, parse

PLATFORMS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": "",
}
BACKENDS = ("onnxruntime", "tensorrt", "pytorch", "tensorflow", "openvino", "python", "fil", "dali")
# The file each backend loads from a version directory when default_model_filename is not set.
DEFAULT_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py", "pytorch": "model.pt"}
MODEL_FIELDS = {
    "name", "platform", "backend", "runtime", "version_policy", "max_batch_size", "input", "output",
    "batch_input", "batch_output", "optimization", "dynamic_batching", "sequence_batching",
    "ensemble_scheduling", "instance_group", "default_model_filename", "cc_model_filenames", "metric_tags",
    "parameters", "model_warmup", "model_operations", "model_transaction_policy", "model_repository_agents",
    "response_cache",
}  # fmt: skip
TENSOR_FIELDS = {
    "name", "data_type", "format", "dims", "reshape", "is_shape_tensor", "allow_ragged_batch", "optional",
    "label_filename", "is_non_linear_format_io",
}  # fmt: skip


@dataclass
class LoadedConfig:
    """A parsed ``config.pbtxt`` with the facts the cross-model checks need."""

    path: Path
    message: Message
    name: str
    max_batch_size: int
    inputs: dict[str, tuple[str, list[int]]]
    outputs: dict[str, tuple[str, list[int]]]


def _tensors(msg: Message, kind: str, problems: list[str]) -> dict[str, tuple[str, list[int]]]:
    tensors: dict[str, tuple[str, list[int]]] = {}
    for tensor in msg.messages(kind):
        name = str(tensor.one("name", ""))
        unknown = sorted(set(tensor.fields) - TENSOR_FIELDS)
        if unknown:
            problems.append(f"{kind} {name or '?'}: unknown field {unknown[0]}")
        if not name:
            problems.append(f"an {kind} has no name")
            continue
        if name in tensors:
            problems.append(f"{kind} {name} is declared twice")
        data_type = str(tensor.one("data_type", ""))
        if data_type not in DATA_TYPES:
            problems.append(f"{kind} {name}: data_type {data_type or '(none)'} is not a Triton type")
        dims = [d for d in tensor.all("dims")]
        if not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1) for d in dims):
            problems.append(f"{kind} {name}: dims {dims} must be integers >= 1 or -1 (variable)")
        tensors[name] = (data_type, [int(d) for d in dims if isinstance(d, int)])
    if len(msg.all(kind)) != len(msg.messages(kind)):
        problems.append(f"{kind} must be a message")
    return tensors


def _check_backend(msg: Message, problems: list[str]) -> str:
    """The backend that will run the model ('' for an ensemble)."""
    platform = str(msg.one("platform", ""))
    backend = str(msg.one("backend", ""))
    if platform and platform not in PLATFORMS:
        problems.append(f"platform {platform!r} is unknown (known: {', '.join(PLATFORMS)})")
    if backend and backend not in BACKENDS:
        problems.append(f"backend {backend!r} is unknown (known: {', '.join(BACKENDS)})")
    if not platform and not backend:
        problems.append("neither platform nor backend is set")
    if platform in PLATFORMS and backend and PLATFORMS[platform] != backend:
        problems.append(f"platform {platform} does not run on backend {backend}")
    if (platform == "ensemble") != bool(msg.messages("ensemble_scheduling")):
        problems.append(
            "an ensemble needs ensemble_scheduling"
            if platform == "ensemble"
            else "ensemble_scheduling is only for platform ensemble"
        )
    return backend or PLATFORMS.get(platform, "")


def _check_batching(msg: Message, max_batch: int, problems: list[str]) -> None:
    for batching in msg.messages("dynamic_batching"):
        if max_batch <= 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        for size in batching.all("preferred_batch_size"):
            if not isinstance(size, int) or size < 1 or size > max_batch:
                problems.append(
                    f"dynamic_batching preferred_batch_size {size} is not in 1..max_batch_size ({max_batch})"
                )
        delay = batching.one("max_queue_delay_microseconds", 0)
        if not isinstance(delay, int) or delay < 0:
            problems.append(f"dynamic_batching max_queue_delay_microseconds {delay} must be an integer >= 0")
    for group in msg.messages("instance_group"):
        kind = str(group.one("kind", "KIND_AUTO"))
        if kind not in INSTANCE_KINDS:
            problems.append(f"instance_group kind {kind} is not one of {', '.join(INSTANCE_KINDS)}")
        count = group.one("count", 1)
        if not isinstance(count, int) or count < 1:
            problems.append(f"instance_group count {count} must be >= 1")
        if kind == "KIND_CPU" and group.all("gpus"):
            problems.append("instance_group KIND_CPU cannot list gpus")


def check_config(path: str | Path, directory_name: str | None = None) -> LoadedConfig:
    """Parse and check one ``config.pbtxt``; ``PbtxtError`` lists every problem, prefixed by the file."""
    path = Path(path)
    try:
        msg = parse(path.read_text(encoding="utf-8"))
    except PbtxtError as exc:
        raise PbtxtError(f"{path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PbtxtError(f"{path}: cannot read: {exc}") from None
    problems: list[str] = []
    unknown = sorted(set(msg.fields) - MODEL_FIELDS)
    if unknown:
        problems.append(f"unknown field {unknown[0]}")
    dir_name = directory_name if directory_name is not None else path.parent.name
    name = str(msg.one("name", dir_name))
    if name != dir_name:
        problems.append(f"name {name!r} does not match its directory {dir_name!r}")
    max_batch = msg.one("max_batch_size", 0)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 0:
        problems.append(f"max_batch_size {max_batch} must be an integer >= 0")
        max_batch = 0
    _check_backend(msg, problems)
    inputs = _tensors(msg, "input", problems)
    outputs = _tensors(msg, "output", problems)
    if not inputs or not outputs:
        problems.append("a model needs at least one input and one output")
    _check_batching(msg, max_batch, problems)
    for entry in msg.messages("parameters"):
        if not entry.one("key") or not isinstance(entry.one("value"), Message):
            problems.append("a parameters entry needs a key and a value { string_value: ... }")
    if problems:
        raise PbtxtError(f"{path}: " + "; ".join(problems))
    return LoadedConfig(path, msg, name, max_batch, inputs, outputs)


def _check_versions(config: LoadedConfig, problems: list[str]) -> None:
    root = config.path.parent
    versions = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
    if not versions:
        problems.append(f"{root}: no version directory (e.g. {root}/1)")
        return
    msg = config.message
    backend = str(msg.one("backend", "")) or PLATFORMS.get(str(msg.one("platform", "")), "")
    filename = str(msg.one("default_model_filename", "")) or DEFAULT_FILES.get(backend, "")
    latest = max(versions, key=lambda p: int(p.name))
    if filename and not (latest / filename).exists():
        problems.append(f"{config.path}: version {latest.name} has no {filename}")


def _compatible(a: tuple[str, list[int]], b: tuple[str, list[int]]) -> bool:
    """Same data type and dims, where -1 (a variable size) matches any size."""
    same_rank = len(a[1]) == len(b[1])
    return a[0] == b[0] and same_rank and all(x == y or -1 in (x, y) for x, y in zip(a[1], b[1], strict=False))


def _check_ensemble(config: LoadedConfig, models: dict[str, LoadedConfig], problems: list[str]) -> None:
    where = str(config.path)
    available = dict(config.inputs)  # ensemble tensor name -> (type, dims)
    produced: dict[str, str] = {}
    steps = [s for sched in config.message.messages("ensemble_scheduling") for s in sched.messages("step")]
    if not steps:
        problems.append(f"{where}: ensemble_scheduling has no step")
    pending: list[tuple[str, str, str]] = []  # (model, model input, ensemble tensor)
    for step in steps:
        model_name = str(step.one("model_name", ""))
        model = models.get(model_name)
        if model is None:
            problems.append(f"{where}: step model {model_name!r} is not in the repository")
        elif model.max_batch_size < config.max_batch_size:
            problems.append(
                f"{where}: max_batch_size {config.max_batch_size} exceeds step model {model_name}'s "
                f"({model.max_batch_size})"
            )
        for entry in step.messages("input_map"):
            key, value = str(entry.one("key", "")), str(entry.one("value", ""))
            if model is not None and key not in model.inputs:
                problems.append(f"{where}: step {model_name} input_map key {key!r} is not an input of {model_name}")
            pending.append((model_name, key, value))
        for entry in step.messages("output_map"):
            key, value = str(entry.one("key", "")), str(entry.one("value", ""))
            if model is not None and key not in model.outputs:
                problems.append(f"{where}: step {model_name} output_map key {key!r} is not an output of {model_name}")
                continue
            if value in produced or value in config.inputs:
                problems.append(f"{where}: ensemble tensor {value!r} is produced twice")
            produced[value] = model_name
            if model is not None:
                available[value] = model.outputs[key]
    for model_name, key, value in pending:
        if value not in available:
            problems.append(
                f"{where}: step {model_name} input_map maps {key!r} to {value!r}, "
                "which is neither an ensemble input nor a step output"
            )
        elif model_name in models and key in models[model_name].inputs:
            want, got = models[model_name].inputs[key], available[value]
            if not _compatible(want, got):
                problems.append(
                    f"{where}: {value!r} is {got[0]} {got[1]} but {model_name} input {key} wants {want[0]} {want[1]}"
                )
    for name, spec in config.outputs.items():
        if name not in available or name in config.inputs:
            problems.append(f"{where}: ensemble output {name!r} is produced by no step")
        elif not _compatible(available[name], spec):
            problems.append(f"{where}: ensemble output {name!r} is {available[name]} but declared {spec}")


def validate_repository(root: str | Path) -> dict[str, LoadedConfig]:
    """Check every model of a Triton model repository; ``PbtxtError`` lists every problem found."""
    root = Path(root)
    models: dict[str, LoadedConfig] = {}
    problems: list[str] = []
    for config_path in sorted(root.glob("*/config.pbtxt")):
        try:
            models[config_path.parent.name] = check_config(config_path)
        except PbtxtError as exc:
            problems.append(str(exc))
    if not models and not problems:
        problems.append(f"{root}: no model directory with a config.pbtxt")
    for config in models.values():
        _check_versions(config, problems)
        if str(config.message.one("platform", "")) == "ensemble":
            _check_ensemble(config, models, problems)
    if problems:
        raise PbtxtError(" | ".join(problems))
    return models


__all__ = ["BACKENDS", "PLATFORMS", "LoadedConfig", "check_config", "validate_repository"]
