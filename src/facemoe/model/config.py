"""FaceMoE configuration: the official constructor keywords, presets, and validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from facemoe.errors import FaceMoEError

# Keywords the official training scripts pass that have no effect on the model (docs/ARCHITECTURE.md).
_IGNORED_OFFICIAL_KEYS = {
    "dropout",
    "fp16",
    "num_features",
    "reso",
    "seed",
    "recipe",
    "official_repo",
    "torch_version",
    "min_margin_2nd_3rd_logit",
    "routing_note",
    "use_checkpoint",
    "drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "qk_scale",
    "norm_layer",
    "num_classes",
    "use_moe",
    "preset",
}


@dataclass(frozen=True)
class FaceMoEConfig:
    """Hyper-parameters of the FaceMoE Swin backbone (official keyword names)."""

    img_size: int = 120
    patch_size: int = 6
    in_chans: int = 3
    embed_dim: int = 384
    depths: tuple[int, ...] = (2, 18, 2)
    num_heads: tuple[int, ...] = (8, 16, 16)
    window_size: int = 5
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = True
    patch_norm: bool = True
    num_experts: int = 3
    k: int = 2
    embedding_size: int = 512
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if len(self.depths) != len(self.num_heads):
            problems.append(f"depths {list(self.depths)} and num_heads {list(self.num_heads)} differ in length")
        if not 1 <= self.k <= self.num_experts:
            problems.append(f"k={self.k} must be between 1 and num_experts={self.num_experts}")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dim(i) % heads:
                problems.append(f"stage {i} dim {self.stage_dim(i)} is not divisible by {heads} heads")
        for i in range(len(self.depths)):
            side = self.stage_resolution(i)
            win = min(self.window_size, side)
            if side % win:
                problems.append(f"stage {i} grid {side} is not a multiple of window {win}")
        if problems:
            raise FaceMoEError("invalid FaceMoE config: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        return self.grid // 2**stage

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    @property
    def final_tokens(self) -> int:
        return self.stage_resolution(self.num_stages - 1) ** 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["depths"] = list(self.depths)
        data["num_heads"] = list(self.num_heads)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceMoEConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(data) - known - _IGNORED_OFFICIAL_KEYS
        if unknown:
            raise FaceMoEError(f"unknown FaceMoE config keys: {', '.join(sorted(unknown))}")
        if data.get("use_moe") is False:
            raise FaceMoEError("config has use_moe=False: only the mixture-of-experts FaceMoE is supported")
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def replace(self, **changes: Any) -> FaceMoEConfig:
        data = self.to_dict()
        data.update(changes)
        return FaceMoEConfig.from_dict(data)


PRESETS: dict[str, FaceMoEConfig] = {
    # The released 120x120 model (docs/ARCHITECTURE.md): 463,981,776 parameters.
    "full": FaceMoEConfig(),
    # The golden-data config: same key layout as "full" with layers.1 holding 2 blocks; 2.9M parameters.
    "tiny": FaceMoEConfig(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 4)),
}
# "small" is an alias of "tiny", the name the test and demo commands also accept.
PRESETS["small"] = PRESETS["tiny"]


def resolve_config(config: str | dict[str, Any] | FaceMoEConfig) -> FaceMoEConfig:
    """Preset name, dict of official keywords, or config object -> ``FaceMoEConfig``."""
    if isinstance(config, FaceMoEConfig):
        return config
    if isinstance(config, str):
        try:
            return PRESETS[config]
        except KeyError:
            raise FaceMoEError(
                f"unknown preset {config!r}; choose one of {', '.join(sorted(PRESETS))} or pass a dict"
            ) from None
    if isinstance(config, dict):
        return FaceMoEConfig.from_dict(config)
    raise TypeError(f"config must be a preset name, dict or FaceMoEConfig, not {type(config).__name__}")
