"""The ``model`` section of ``manifest.json``: the weights, where they came from, how they were exported.

Older spellings are read as the current names (``source.checkpoint`` as ``path``, ``random_seed`` as
``seed``; docs/BUNDLE.md#model), so every reader of the source sees one set of names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from facemoe.bundle.sections import Section, _extra, _opt_int, _set


@dataclass(eq=True)
class ModelSource(Section):
    """Where the exported weights came from: a checkpoint file, or seeded random weights (tests, demo)."""

    path: str | None = None  # the checkpoint file; older manifests wrote it as "checkpoint"
    sha256: str | None = None  # of the checkpoint file
    k: int | None = None  # experts per token the checkpoint was loaded with
    random_weights: bool | None = None
    preset: str | None = None
    seed: int | None = None  # older manifests wrote it as "random_seed"
    strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("path", "checkpoint", "sha256", "k", "random_weights", "preset", "seed", "random_seed", "strength")

    def to_json(self) -> dict[str, Any]:
        return (
            _set(
                {
                    "random_weights": self.random_weights,
                    "preset": self.preset,
                    "seed": self.seed,
                    "strength": self.strength,
                    "path": self.path,
                    "sha256": self.sha256,
                    "k": self.k,
                }
            )
            | self.extra
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ModelSource:
        data = data or {}
        seed = data.get("seed", data.get("random_seed"))
        strength = data.get("strength")
        random_weights = data.get("random_weights")
        return cls(
            path=data.get("path") or data.get("checkpoint"),
            sha256=data.get("sha256"),
            k=_opt_int(data.get("k")),
            random_weights=None if random_weights is None else bool(random_weights),
            preset=data.get("preset"),
            seed=_opt_int(seed),
            strength=None if strength is None else float(strength),
            extra=_extra(data, cls.KNOWN),
        )


@dataclass(eq=True)
class ExportInfo(Section):
    """How the bundle was exported: batch limit, the fp32 export report, parity inputs, timings."""

    max_batch: int | None = None
    fp32: dict[str, Any] | None = None  # op counts, verification by batch, fp16 conversion report
    parity_inputs: dict[str, Any] | None = None  # how `facemoe parity` gets the same inputs again
    parity_noise_floor: dict[str, Any] | None = None
    timings_s: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = ("max_batch", "fp32", "parity_inputs", "parity_noise_floor", "timings_s")

    def to_json(self) -> dict[str, Any]:
        return _set({key: getattr(self, key) for key in self.KNOWN}) | self.extra

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportInfo:
        return cls(
            max_batch=_opt_int(data.get("max_batch")),
            fp32=data.get("fp32"),
            parity_inputs=data.get("parity_inputs"),
            parity_noise_floor=data.get("parity_noise_floor"),
            timings_s=data.get("timings_s"),
            extra=_extra(data, cls.KNOWN),
        )


@dataclass(eq=True)
class ModelSection(Section):
    """The exported model: architecture, config, the weights' fingerprint and where they came from."""

    config: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    num_experts: int | None = None
    k: int | None = None
    parameters: int | None = None
    # sha256 over the state dict (facemoe.model.fingerprint): identifies the weights; galleries key on it.
    weights_sha256: str | None = None
    random_weights: bool = False
    source: ModelSource = field(default_factory=ModelSource)
    export: ExportInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN = (
        "architecture",
        "config",
        "num_experts",
        "k",
        "parameters",
        "weights_sha256",
        "random_weights",
        "source",
        "export",
    )

    def to_json(self) -> dict[str, Any]:
        return (
            _set(
                {
                    "architecture": self.architecture,
                    "config": self.config,
                    "num_experts": self.num_experts,
                    "k": self.k,
                    "parameters": self.parameters,
                    "weights_sha256": self.weights_sha256,
                    "random_weights": self.random_weights,
                    "source": self.source.to_json(),
                    "export": self.export.to_json() if self.export is not None else None,
                }
            )
            | self.extra
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSection:
        export = data.get("export")
        return cls(
            config=dict(data.get("config") or {}),
            architecture=data.get("architecture"),
            num_experts=_opt_int(data.get("num_experts")),
            k=_opt_int(data.get("k")),
            parameters=_opt_int(data.get("parameters")),
            weights_sha256=data.get("weights_sha256") or None,
            random_weights=bool(data.get("random_weights", False)),
            source=ModelSource.from_json(data.get("source")),
            export=ExportInfo.from_json(export) if isinstance(export, Mapping) else None,
            extra=_extra(data, cls.KNOWN),
        )
