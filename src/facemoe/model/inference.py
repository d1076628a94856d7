"""Running FaceMoE for inference in PyTorch: the fp16 policies, block compilation, and the reference model
rebuilt from a bundle (checked against the manifest's ``weights_sha256``).

These are properties of the model, shared by the PyTorch backend, ``facemoe bench`` and ``facemoe parity``.

fp16 means fp16 GEMMs in an fp32 network (``apply_fp16``): the layers that hold the FLOPs run on half
weights and inputs, while the residual stream, LayerNorms, attention softmax, the MoE routers and the head
stay fp32 (docs/PRECISION.md: the whole network in fp16 lost cosine 0.9994 on random weights; routers choose
and weight experts by raw logits, so every rounding in their input can flip a near-tied token).
``apply_full_fp16`` runs the whole network in fp16 (faster, see docs/BENCHMARKS.md).

``compile_blocks`` runs each Swin block through TorchInductor (regional compilation: the 22 blocks come in
five variants, stage x shifted window, so compiled code is shared; measured 25-30 s per batch size on an
H200); it fuses the LayerNorms, GELUs, casts, rolls and window copies that eager mode runs as separate
memory-bound kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facemoe.errors import BundleError, FaceMoEError
from facemoe.fileio import sha256_file
from facemoe.model.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from facemoe.bundle import Bundle
    from facemoe.model.swin import FaceMoE


class ReferenceUnavailable(FaceMoEError):
    """The bundle's source checkpoint (or random-weight seed) is not here to rebuild the model from."""


def _inputs_to_half(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # .half() on a tensor that already is fp16 returns it unchanged (no kernel).
    return tuple(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _output_to_float(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
    return out.float()


def apply_fp16(model: FaceMoE) -> FaceMoE:
    """fp16 GEMMs, fp32 everything else; in place.

    Half weights and inputs for the layers that hold the FLOPs (patch embedding, qkv and output projections,
    expert MLPs, patch merging); their results return to fp32, except the first expert layer's, which stays
    fp16 through the GELU into the second. The residual stream, every LayerNorm, attention scores and
    softmax, the routers and the head stay fp32. Measured on the full model with random weights (CPU):
    the whole network in fp16 with fp32 LayerNorm/router/head flipped the top-2 expert set of 1-3.5% of
    tokens per layer (embedding cosine down to 0.987), because an fp16 residual stream perturbs every
    router input and a flipped token moves the output by its raw gate logit.
    """
    from facemoe.model.moe import Expert
    from facemoe.model.swin import PatchEmbed, PatchMerging, WindowAttention

    def half_gemm(layer: torch.nn.Module, back_to_float: bool = True) -> None:
        layer.half()
        layer.register_forward_pre_hook(_inputs_to_half)
        if back_to_float:
            layer.register_forward_hook(_output_to_float)

    for module in model.modules():
        if isinstance(module, WindowAttention):
            half_gemm(module.qkv)
            half_gemm(module.proj)
        elif isinstance(module, Expert):
            half_gemm(module.fc1, back_to_float=False)
            half_gemm(module.fc2)
        elif isinstance(module, PatchMerging):
            half_gemm(module.reduction)
        elif isinstance(module, PatchEmbed):
            half_gemm(module.proj)
    return model


def apply_full_fp16(model: FaceMoE) -> FaceMoE:
    """The whole network in fp16 (fp32 in and out); in place."""
    model.half()
    model.register_forward_pre_hook(_inputs_to_half)
    model.register_forward_hook(_output_to_float)
    return model


def compile_blocks(model: FaceMoE, *, recompile_limit: int = 64) -> int:
    """Compile every Swin block in place with TorchInductor; returns how many.

    Identical blocks share one compiled graph per input shape. Shapes are static (``dynamic=False``): every
    batch size gets kernels specialised to it, as a CUDA graph per batch size wants anyway. The limit of
    recompilations per code object is raised because each stage's width, shifted/unshifted windows and every
    batch size are a separate entry, and hitting the default limit silently falls back to eager mode.
    """
    from facemoe.model.swin import SwinMoEBlock

    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), recompile_limit))
    blocks = [m for m in model.modules() if isinstance(m, SwinMoEBlock)]
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def _recorded_checkpoint(bundle: Bundle, recorded: str | Path) -> Path:
    path = Path(recorded)
    if not path.is_file() and (bundle.root / path).is_file():
        path = bundle.root / path
    if not path.is_file():
        raise ReferenceUnavailable(
            f"FaceMoE is rebuilt in PyTorch from its checkpoint, and {path} (recorded in {bundle.root}/manifest.json "
            "as model.source.path) is not here; pass the checkpoint explicitly (checkpoint=... / --checkpoint)"
        )
    return path


def load_reference_model(bundle: Bundle, checkpoint: str | Path | None = None) -> FaceMoE:
    """The bundle's FaceMoE in PyTorch fp32 (eval mode), rebuilt from its source checkpoint or recorded
    random-weight seed, and checked against the manifest's ``weights_sha256``.

    The ONNX files are not turned back into a module: their weights are fused and renamed by the export,
    and the checkpoint is the honest source. ``checkpoint`` overrides the recorded one (which is then also
    checked against its recorded file sha256). Raises ``ReferenceUnavailable`` when there is nothing to
    rebuild from and ``BundleError`` when the weights are not the bundle's.
    """
    from facemoe.model import build_model, load_checkpoint
    from facemoe.model.config import FaceMoEConfig

    section = bundle.manifest.model
    try:
        config = FaceMoEConfig.from_dict(dict(section["config"]))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{bundle.root}: manifest has no model.config to rebuild the PyTorch model from") from exc
    source = dict(section.get("source") or {})
    recorded = checkpoint or source.get("path") or source.get("checkpoint")
    seed = source.get("seed", source.get("random_seed"))
    if recorded:
        path = _recorded_checkpoint(bundle, recorded)
        if checkpoint is None and source.get("sha256") and sha256_file(path) != source["sha256"]:
            raise BundleError(f"{path}: checkpoint differs from the one the bundle was exported from (sha256)")
        model = load_checkpoint(path, config=config, k=config.k)
    elif section.get("random_weights") and seed is not None:
        from facemoe.model.random_weights import randomize

        model = randomize(build_model(config), seed=int(seed), strength=float(source.get("strength", 1.0)))
    else:
        raise ReferenceUnavailable(
            f"FaceMoE is rebuilt in PyTorch from its checkpoint, and {bundle.root}/manifest.json records none "
            "(model.source.path is empty); pass the checkpoint explicitly (checkpoint=... / --checkpoint)"
        )
    expected = section.get("weights_sha256")
    if expected and model_fingerprint(model) != expected:
        raise BundleError(
            f"{bundle.root}: the PyTorch weights do not match the bundle's (weights_sha256); the checkpoint "
            "is not the one this bundle was exported from"
        )
    return model.eval()


@torch.no_grad()
def run_reference(model: FaceMoE, inputs: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch fp32 reference in ``sparse`` routing: embeddings and per-layer top-k indices."""
    embeddings: list[np.ndarray] = []
    with model.using_routing("sparse"), model.recording_routing() as record:
        model.eval()
        for start in range(0, len(inputs), batch_size):
            embeddings.append(model(torch.from_numpy(inputs[start : start + batch_size]).float()).numpy())
    routes = [[idx.numpy() for idx in calls] for calls in record.values()]
    return np.concatenate(embeddings), [np.concatenate(r) for r in routes]


__all__ = [
    "ReferenceUnavailable",
    "apply_fp16",
    "apply_full_fp16",
    "compile_blocks",
    "load_reference_model",
    "model_fingerprint",
    "run_reference",
]
