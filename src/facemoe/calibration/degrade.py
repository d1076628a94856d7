"""Low-resolution degradations that make clean aligned crops look like surveillance probes.

INT8 ranges calibrated on sharp, high-resolution faces miss what low-resolution probes do to the
activations (flat regions, block artefacts, noise), and FaceMoE's deployment target is exactly those
probes. The chain follows how such a probe is made: the optics blur the face, the sensor samples it at
8-32 px, sensor noise is added, the frame is JPEG-compressed, and finally the detector's alignment
upsamples the tiny crop back to 112 x 112.

Every draw comes from a seeded ``numpy.random.Generator`` and the same number of values is drawn per image
whether or not a step is applied, so changing one probability does not reshuffle the other steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

_UPSAMPLERS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


@dataclass(frozen=True)
class DegradeConfig:
    """Probabilities and parameter ranges (inclusive) of each degradation step."""

    downsample_p: float = 0.9
    min_size: int = 8
    max_size: int = 32
    blur_p: float = 0.4
    blur_sigma: tuple[float, float] = (0.4, 1.5)
    noise_p: float = 0.3
    noise_sigma: tuple[float, float] = (1.0, 8.0)  # grey levels
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (20, 90)

    def __post_init__(self) -> None:
        for name in ("downsample_p", "blur_p", "noise_p", "jpeg_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {value}")
        if not 2 <= self.min_size <= self.max_size:
            raise ValueError(f"need 2 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        for name in ("blur_sigma", "noise_sigma", "jpeg_quality"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be an increasing positive range, not {(low, high)}")
        if self.jpeg_quality[1] > 100:
            raise ValueError(f"jpeg_quality must be at most 100, not {self.jpeg_quality}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def degrade_face(
    face: np.ndarray, rng: np.random.Generator, config: DegradeConfig | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade one HxWx3 uint8 crop; returns the crop (same size) and the parameters that were applied."""
    config = config or DegradeConfig()
    if face.dtype != np.uint8 or face.ndim != 3:
        raise ValueError(f"expected an HxWxC uint8 image, got {face.dtype} {face.shape}")
    height, width = face.shape[:2]
    # Fixed draw order and count per image (see module docstring).
    apply = rng.random(4)
    size = int(rng.integers(config.min_size, config.max_size + 1))
    sigma_blur = float(rng.uniform(*config.blur_sigma))
    sigma_noise = float(rng.uniform(*config.noise_sigma))
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    upsampler = str(rng.choice(sorted(_UPSAMPLERS)))
    noise_seed = int(rng.integers(0, 2**31 - 1))

    record: dict[str, Any] = {"blur_sigma": None, "size": None, "noise_sigma": None, "jpeg_quality": None}
    out = face
    if apply[0] < config.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma_blur, sigmaY=sigma_blur, borderType=cv2.BORDER_REFLECT)
        record["blur_sigma"] = round(sigma_blur, 4)
    small = apply[1] < config.downsample_p and size < min(height, width)
    if small:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
        record["size"] = size
    if apply[2] < config.noise_p:
        noise = np.random.default_rng(noise_seed).normal(0.0, sigma_noise, out.shape)
        out = np.clip(np.rint(out.astype(np.float64) + noise), 0, 255).astype(np.uint8)
        record["noise_sigma"] = round(sigma_noise, 4)
    if apply[3] < config.jpeg_p:
        ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
            out = decoded if decoded is not None else out
            record["jpeg_quality"] = quality
    if small:
        out = cv2.resize(out, (width, height), interpolation=_UPSAMPLERS[upsampler])
        record["upsample"] = upsampler
    return np.ascontiguousarray(out), record


def degrade_faces(
    faces: list[np.ndarray], seed: int, config: DegradeConfig | None = None
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Degrade a list of crops with ``default_rng(seed)``; returns them and a summary for the manifest."""
    config = config or DegradeConfig()
    rng = np.random.default_rng(seed)
    out, records = [], []
    for face in faces:
        degraded, record = degrade_face(face, rng, config)
        out.append(degraded)
        records.append(record)
    return out, summarize(records, seed, config)


def summarize(records: list[dict[str, Any]], seed: int, config: DegradeConfig) -> dict[str, Any]:
    sizes = [r["size"] for r in records if r["size"] is not None]
    total = max(len(records), 1)
    return {
        "seed": seed,
        "config": config.to_dict(),
        "images": len(records),
        "applied": {
            "downsample": len(sizes) / total,
            "blur": sum(r["blur_sigma"] is not None for r in records) / total,
            "noise": sum(r["noise_sigma"] is not None for r in records) / total,
            "jpeg": sum(r["jpeg_quality"] is not None for r in records) / total,
        },
        "size_px": {"min": min(sizes), "mean": float(np.mean(sizes)), "max": max(sizes)} if sizes else None,
    }


__all__ = ["DegradeConfig", "degrade_face", "degrade_faces", "summarize"]
