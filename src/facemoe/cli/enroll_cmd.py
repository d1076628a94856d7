"""``facemoe enroll``: build a recognition gallery from a folder of labelled face images.

Layout: ``DIR/<name>/*.jpg|png|...``, one person per sub-folder, one face per image. Each person's template
is the norm-weighted mean of their faces' raw embeddings (the same fusion the runtime uses for tracks).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
import typer
from rich.markup import escape

from facemoe.bundle import Bundle
from facemoe.cli.common import OverwriteOption, console, user_errors
from facemoe.cli.options import OneLineErrors, Precision, RuntimeBackend
from facemoe.errors import FaceMoEError, InputError
from facemoe.fileio import check_output
from facemoe.imagefile import read_image
from facemoe.preprocess import l2_normalize
from facemoe.runtime.alignment import ALIGNED_SIZE
from facemoe.runtime.backends import open_backend
from facemoe.runtime.detection import RetinaFaceDetector
from facemoe.runtime.face_encoder import FaceEncoder
from facemoe.runtime.gallery import GALLERY_FORMAT, GALLERY_VERSION, Gallery, model_fingerprint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

app = typer.Typer(add_completion=False, help=__doc__)


@dataclass
class EnrollReport:
    used: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def find_images(root: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """``{name: [image paths]}`` from ``root/<name>/``, and the stray files directly in ``root``."""
    if not root.exists():
        raise InputError(f"{root}: no such directory")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected DIR/<name>/*.jpg)")
    people: dict[str, list[Path]] = {}
    stray: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            people[entry.name] = sorted(
                p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            stray.append(entry)
    return people, stray


def build_gallery(
    root: Path,
    detector: RetinaFaceDetector | None,
    encoder: FaceEncoder,
    *,
    aligned: bool = False,
    largest: bool = False,
    detect_threshold: float = 0.5,
    min_eye_distance: float = 8.0,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[str], np.ndarray, list[int], EnrollReport]:
    """Embed every usable face under ``root``; returns names, unit templates (N, D), face counts, report."""
    if detector is None and not aligned:
        raise ValueError("a detector is needed unless the images are aligned crops")
    report = EnrollReport()

    def warning(message: str) -> None:
        report.warnings.append(message)
        if warn is not None:
            warn(message)

    people, stray = find_images(root)
    for path in stray:
        warning(f"{path}: ignored, images must be in {root}/<name>/")
    if not people:
        raise InputError(f"{root}: no person folders found (expected {root}/<name>/*.jpg)")

    names: list[str] = []
    templates: list[np.ndarray] = []
    counts: list[int] = []
    for name, paths in people.items():
        if not paths:
            warning(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)}), {name} not enrolled")
            continue
        tensors = []
        used = []
        for path in paths:
            try:
                image = read_image(path)
            except InputError as exc:
                warning(f"{exc}, skipped")
                continue
            if aligned:
                if image.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
                    warning(f"{path}: {image.shape[1]}x{image.shape[0]} is not an aligned 112x112 crop, resized")
                    image = cv2.resize(image, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
                crop = image
            else:
                assert detector is not None
                faces = [d for d in detector.detect(image) if d.score >= detect_threshold]
                if not faces:
                    warning(f"{path}: no face found, skipped")
                    continue
                if len(faces) > 1 and not largest:
                    warning(f"{path}: {len(faces)} faces found, skipped (one face per image, or pass --largest)")
                    continue
                face = max(faces, key=lambda d: d.area)
                if face.eye_distance < min_eye_distance:
                    warning(f"{path}: face too small ({face.eye_distance:.1f} px between the eyes), skipped")
                    continue
                crop = encoder.align(image, face.landmarks)
            tensors.append(encoder.prepare(crop))
            used.append(path.name)
        if not tensors:
            warning(f"{root / name}: no usable face, {name} not enrolled")
            continue
        raw = encoder.embed(tensors)
        templates.append(l2_normalize(raw.astype(np.float64).sum(axis=0)).astype(np.float32))
        names.append(name)
        counts.append(len(tensors))
        report.used[name] = used
    if not names:
        raise InputError(f"{root}: no face could be enrolled (see the warnings above)")
    return names, np.stack(templates), counts, report


@app.command(cls=OneLineErrors)
@user_errors
def enroll(
    images: Annotated[Path, typer.Option(help="Folder with one sub-folder of face images per person.")],
    bundle: Annotated[Path, typer.Option(help="Bundle directory (the same model facemoe-run will use).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Gallery file to write (.npz).")] = Path("gallery.npz"),
    backend: Annotated[RuntimeBackend, typer.Option(help="Inference backend.")] = RuntimeBackend.auto,
    precision: Annotated[Precision | None, typer.Option(help="Artifact precision (default: as facemoe-run).")] = None,
    detector: Annotated[Path | None, typer.Option(help="Your own RetinaFace-style detector ONNX.")] = None,
    aligned: Annotated[
        bool, typer.Option("--aligned", help="Images are already ArcFace-aligned 112x112 crops: no detection.")
    ] = False,
    largest: Annotated[
        bool, typer.Option("--largest", help="Use the largest face of images that show several.")
    ] = False,
    flip: Annotated[bool, typer.Option(help="Add the mirrored face to each template (flip test).")] = True,
    det_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum detection score.")] = 0.5,
    min_eye_distance: Annotated[
        float, typer.Option(min=0.0, help="Skip faces with a smaller eye distance (px).")
    ] = 8.0,
    overwrite: bool = OverwriteOption,
) -> None:
    """Enrol DIR/<name>/*.jpg|png into a gallery for facemoe-run --gallery."""
    check_output(out, overwrite=overwrite, inputs=(detector,))
    if detector is not None and not detector.is_file():
        raise FaceMoEError(f"{detector}: detector ONNX not found (--detector)")
    find_images(images)  # fail on a bad folder before loading any model
    loaded = Bundle(bundle)
    if precision is not None and precision.value not in loaded.precisions:
        raise FaceMoEError(f"{bundle}: has no {precision.value} artifact (it has: {', '.join(loaded.precisions)})")
    engine = open_backend(loaded, backend.value, precision.value if precision is not None else None)
    face_detector = None if aligned else RetinaFaceDetector(detector, score_threshold=det_threshold)
    encoder = FaceEncoder(engine, loaded.manifest.preprocessing, flip=flip)
    names, templates, counts, report = build_gallery(
        images,
        face_detector,
        encoder,
        aligned=aligned,
        largest=largest,
        detect_threshold=det_threshold,
        min_eye_distance=min_eye_distance,
        warn=lambda msg: console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True),
    )
    meta = {
        "format": GALLERY_FORMAT,
        "version": GALLERY_VERSION,
        "model_fingerprint": model_fingerprint(loaded),
        "embedding_size": int(templates.shape[1]),
        "bundle": str(bundle),
        "backend": engine.describe(),
        "random_weights": bool(loaded.manifest.model.get("random_weights")),
        "flip": flip,
        "aligned_input": aligned,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": report.used,
    }
    Gallery(names, templates, counts, meta).save(out)
    console.print(
        f"[green]enrolled[/] {len(names)} identities from {sum(counts)} faces -> {escape(str(out))}"
        + (f" ({len(report.warnings)} warnings)" if report.warnings else ""),
        highlight=False,
    )
    if meta["random_weights"]:
        console.print("[yellow]note:[/] the bundle has random weights: matches will be meaningless", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
