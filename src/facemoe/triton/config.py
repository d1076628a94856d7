"""Typed Triton Inference Server model configurations, written as ``config.pbtxt``.

"Triton" here is NVIDIA's Triton Inference Server, not OpenAI's Triton kernel language (that one is
``facemoe.gating.triton``). The dataclasses cover the part of Triton's ``ModelConfig`` message our model
repositories use (docs/SCALE_OUT.md#model-configurations); ``facemoe.triton.validate`` checks any file
against what the server would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from facemoe.triton.pbtxt import Enum, Message, format_message

# Triton's DataType enum (TYPE_INVALID excluded: the server refuses it).
DATA_TYPES = (
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_UINT16",
    "TYPE_UINT32",
    "TYPE_UINT64",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
    "TYPE_BF16",
)
# numpy dtype name -> Triton data type, for tensors read from an ONNX model or a numpy array.
NUMPY_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")


@dataclass
class Tensor:
    """A model input or output; ``dims`` exclude the batch dimension when ``max_batch_size`` > 0."""

    name: str
    data_type: str
    dims: list[int]

    def to_message(self) -> Message:
        msg = Message().add("name", self.name).add("data_type", Enum(self.data_type))
        return msg.add_list("dims", list(self.dims))


@dataclass
class DynamicBatching:
    """Server-side batching of separate requests: sizes it prefers to form, and how long a request may wait."""

    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0

    def to_message(self) -> Message:
        msg = Message()
        if self.preferred_batch_size:
            msg.add_list("preferred_batch_size", list(self.preferred_batch_size))
        return msg.add("max_queue_delay_microseconds", int(self.max_queue_delay_microseconds))


@dataclass
class InstanceGroup:
    """``count`` copies of the model on each device of ``kind`` (all GPUs for KIND_GPU unless ``gpus``)."""

    kind: str = "KIND_CPU"
    count: int = 1
    gpus: list[int] = field(default_factory=list)

    def to_message(self) -> Message:
        msg = Message().add("count", int(self.count)).add("kind", Enum(self.kind))
        if self.gpus:
            msg.add_list("gpus", list(self.gpus))
        return msg


@dataclass
class EnsembleStep:
    """One model run of an ensemble: ``input_map``/``output_map`` map the model's tensor names (keys) to
    the ensemble's tensor names (values)."""

    model_name: str
    input_map: dict[str, str]
    output_map: dict[str, str]
    model_version: int = -1  # the latest version

    def to_message(self) -> Message:
        msg = Message().add("model_name", self.model_name).add("model_version", int(self.model_version))
        for key, value in self.input_map.items():
            msg.add("input_map", Message().add("key", key).add("value", value))
        for key, value in self.output_map.items():
            msg.add("output_map", Message().add("key", key).add("value", value))
        return msg


@dataclass
class ModelConfig:
    """One model's ``config.pbtxt``. Exactly one of ``platform`` / ``backend`` is usually set."""

    name: str
    platform: str = ""
    backend: str = ""
    max_batch_size: int = 0
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    dynamic_batching: DynamicBatching | None = None
    instance_groups: list[InstanceGroup] = field(default_factory=list)
    ensemble_steps: list[EnsembleStep] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str = ""

    def to_message(self) -> Message:
        msg = Message().add("name", self.name)
        if self.platform:
            msg.add("platform", self.platform)
        if self.backend:
            msg.add("backend", self.backend)
        msg.add("max_batch_size", int(self.max_batch_size))
        if self.default_model_filename:
            msg.add("default_model_filename", self.default_model_filename)
        for tensor in self.inputs:
            msg.add("input", tensor.to_message())
        for tensor in self.outputs:
            msg.add("output", tensor.to_message())
        if self.dynamic_batching is not None:
            msg.add("dynamic_batching", self.dynamic_batching.to_message())
        for group in self.instance_groups:
            msg.add("instance_group", group.to_message())
        if self.ensemble_steps:
            scheduling = Message()
            for step in self.ensemble_steps:
                scheduling.add("step", step.to_message())
            msg.add("ensemble_scheduling", scheduling)
        for key, value in self.parameters.items():
            msg.add("parameters", Message().add("key", key).add("value", Message().add("string_value", value)))
        return msg

    def to_pbtxt(self) -> str:
        return format_message(self.to_message())


def read_parameters(msg: Message) -> dict[str, str]:
    """The ``parameters`` map of a parsed configuration as key -> string value."""
    out: dict[str, str] = {}
    for entry in msg.messages("parameters"):
        value = entry.one("value")
        if isinstance(value, Message):
            out[str(entry.one("key", ""))] = str(value.one("string_value", ""))
    return out


__all__ = [
    "DATA_TYPES",
    "INSTANCE_KINDS",
    "NUMPY_TYPES",
    "DynamicBatching",
    "EnsembleStep",
    "InstanceGroup",
    "ModelConfig",
    "Tensor",
    "read_parameters",
]
