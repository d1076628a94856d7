"""The typed sections of ``manifest.json`` (docs/BUNDLE.md#manifest).

Every section reads every manifest written so far: key names that older exporters wrote are read as their
current names (``model.source.checkpoint`` as ``path``, ``random_seed`` as ``seed``), and keys this version
does not know are kept in ``extra`` so that rewriting a manifest (recording an engine) never drops them.

The dict-like sections are also read-only ``Mapping``s over their JSON form, so code that still reads
``manifest.model.get("random_weights")`` sees the same normalised values as attribute access.
Torch-free: the runtime loads bundles with numpy and ONNX Runtime only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# ArcFace 112x112 five-point template (left eye, right eye, nose tip, left mouth corner, right mouth
# corner), in pixels of the aligned crop. The public insightface reference values.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
# How the embeddings of a face and of its mirror image are fused (facemoe.preprocess.fuse_flip).
FLIP_FUSIONS = ("pre_norm_vector_add", "norm_add")


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in known}


def _set(pairs: dict[str, Any]) -> dict[str, Any]:
    """The entries that are set: optional fields an older manifest lacked are not written back as null."""
    return {key: value for key, value in pairs.items() if value is not None}


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


class Section(Mapping[str, Any]):
    """A typed section that also reads as its JSON mapping."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


@dataclass(eq=True)
class Preprocessing(Section):
    """Pre-processing of the TinyFace evaluation, which the runtime reproduces (docs/BUNDLE.md#preprocessing)."""

    color: str = "RGB"
    layout: str = "NCHW"
    aligned_size: int = 112
    input_size: int = 120
    interpolation: str = "pil-bicubic"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    scale: float = 1.0 / 255.0
    alignment_template: list[list[float]] = field(default_factory=lambda: [list(p) for p in ARCFACE_TEMPLATE_112])
    # How the flip test fuses f(x) and f(flip x) when the runtime embeds with --flip (FaceEncoder honours it).
    flip_fusion: str = "pre_norm_vector_add"
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = (
        "color",
        "layout",
        "aligned_size",
        "input_size",
        "interpolation",
        "mean",
        "std",
        "scale",
        "alignment_template",
        "flip_fusion",
    )

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KNOWN} | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        default = cls()

        def channels(value: Any) -> list[float]:
            values = value if isinstance(value, (list, tuple)) else [value] * 3
            return [float(v) for v in values]

        template = data.get("alignment_template") or default.alignment_template
        flip_fusion = str(data.get("flip_fusion", default.flip_fusion))
        if flip_fusion not in FLIP_FUSIONS:
            raise ValueError(f"preprocessing.flip_fusion {flip_fusion!r} is not one of {', '.join(FLIP_FUSIONS)}")
        return cls(
            color=str(data.get("color", default.color)),
            layout=str(data.get("layout", default.layout)),
            aligned_size=int(data.get("aligned_size", default.aligned_size)),
            input_size=int(data.get("input_size", default.input_size)),
            interpolation=str(data.get("interpolation", default.interpolation)),
            mean=channels(data.get("mean", default.mean)),
            std=channels(data.get("std", default.std)),
            scale=float(data.get("scale", default.scale)),
            alignment_template=[[float(v) for v in point] for point in template],
            flip_fusion=flip_fusion,
            extra=_extra(data, cls.KNOWN),
        )


def default_preprocessing(input_size: int = 120) -> Preprocessing:
    """The TinyFace evaluation pre-processing for a model taking ``input_size`` pixels."""
    return Preprocessing(input_size=input_size)


@dataclass(eq=True)
class Routing(Section):
    """How the MoE routes tokens in the exported graphs."""

    mode: str = "static"
    k: int | None = None
    num_experts: int | None = None
    gating: str = "onnx"  # "onnx": standard ops; otherwise custom gating nodes (docs/GATING_OP.md)
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("mode", "k", "num_experts", "gating")

    def to_json(self) -> dict[str, Any]:
        return _set({key: getattr(self, key) for key in self.KNOWN}) | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Routing:
        return cls(
            mode=str(data.get("mode", "static")),
            k=_opt_int(data.get("k")),
            num_experts=_opt_int(data.get("num_experts")),
            gating=str(data.get("gating") or "onnx"),
            extra=_extra(data, cls.KNOWN),
        )


@dataclass
class Artifact:
    """One ONNX model in a bundle."""

    precision: str
    file: str
    sha256: str
    opset: int
    external_data: list[str] = field(default_factory=list)
    gating: str = "onnx"
    parity: dict[str, Any] = field(default_factory=dict)  # the export's parity verdict (passed, failures, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("precision", "file", "sha256", "opset", "external_data", "gating", "parity")

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KNOWN} | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(
            precision=data["precision"],
            file=data["file"],
            sha256=data["sha256"],
            opset=int(data["opset"]),
            external_data=list(data.get("external_data", [])),
            gating=data.get("gating", "onnx"),
            parity=dict(data.get("parity", {})),
            extra=_extra(data, cls.KNOWN),
        )


@dataclass(eq=True)
class EngineEntry(Section):
    """One TensorRT engine in the bundle; the engine's sidecar stays authoritative (docs/BUNDLE.md#engines)."""

    file: str
    sidecar: str | None = None
    sha256: str | None = None
    cache_key: str | None = None
    precision: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    tensorrt_version: str | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    built: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = (
        "file",
        "sidecar",
        "sha256",
        "cache_key",
        "precision",
        "gpu_name",
        "compute_capability",
        "tensorrt_version",
        "min_batch",
        "opt_batch",
        "max_batch",
        "built",
    )

    def to_json(self) -> dict[str, Any]:
        return _set({key: getattr(self, key) for key in self.KNOWN}) | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineEntry:
        if isinstance(data, EngineEntry):
            return data
        return cls(
            file=str(data["file"]),
            sidecar=data.get("sidecar"),
            sha256=data.get("sha256"),
            cache_key=data.get("cache_key"),
            precision=data.get("precision"),
            gpu_name=data.get("gpu_name"),
            compute_capability=data.get("compute_capability"),
            tensorrt_version=data.get("tensorrt_version"),
            min_batch=_opt_int(data.get("min_batch")),
            opt_batch=_opt_int(data.get("opt_batch")),
            max_batch=_opt_int(data.get("max_batch")),
            built=data.get("built"),
            extra=_extra(data, cls.KNOWN),
        )


@dataclass(eq=True)
class Calibration(Section):
    """What INT8 ranges were computed from (facemoe.calibration.dataset) and how the graph was quantized."""

    method: str | None = None
    samples: int | None = None
    data_hash: str | None = None  # keys the calibration cache
    quantization: dict[str, Any] | None = None  # the Q/DQ placement report
    extra: dict[str, Any] = field(default_factory=dict)  # sources, degradation, warnings, parameters

    KNOWN = ("method", "samples", "data_hash", "quantization")

    def to_json(self) -> dict[str, Any]:
        # The data summary first, as the exporter has always written it.
        return self.extra | _set({key: getattr(self, key) for key in self.KNOWN})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            method=data.get("method"),
            samples=_opt_int(data.get("samples")),
            data_hash=data.get("data_hash"),
            quantization=data.get("quantization"),
            extra=_extra(data, cls.KNOWN),
        )
