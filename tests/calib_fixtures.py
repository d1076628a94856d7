"""Small real-face material for calibration tests (see tests/data/calib/README.md for sources and licences).

``make_aligned_face_folder`` writes a folder tree that looks like what users point the exporter at: nested
folders, jpg/png/bmp, a few grey, 4-channel, 16-bit and non-112 crops, and a stray non-image file.
``scene_with`` pastes crops into a larger background (a scene the detector must find faces in), and
``carphone_frames`` reads the shipped clip with one real face.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DATA_DIR = Path(__file__).parent / "data" / "calib"
CARPHONE = Path(__file__).parents[1] / "src" / "facemoe" / "data" / "carphone_pristine.mp4"
# LFW faces [0, CALIBRATION_LFW) go into calibration folders; the rest are held out for parity checks.
CALIBRATION_LFW = 50


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def lfw_faces() -> list[np.ndarray]:
    """The 100 LFW faces of scikit-image's ``lfw_subset`` (25x25 grey), as 112x112 BGR crops."""
    grey = np.load(DATA_DIR / "lfw_faces_25x25.npy")
    return [cv2.resize(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR), (112, 112), interpolation=cv2.INTER_CUBIC) for f in grey]


def real_faces() -> list[np.ndarray]:
    """Two full-resolution colour crops (ArcFace-aligned) followed by the 100 upscaled LFW faces."""
    return [_read(DATA_DIR / "Tom_Hanks_54745.png"), _read(DATA_DIR / "astronaut_aligned_112.png"), *lfw_faces()]


def held_out_faces() -> list[np.ndarray]:
    """Faces never written by ``make_aligned_face_folder``."""
    return lfw_faces()[CALIBRATION_LFW:]


def _jitter(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small photometric and geometric change so repeated faces are not identical files."""
    out = face[:, ::-1] if rng.random() < 0.5 else face
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    out = np.clip(out.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    shift = rng.integers(-3, 4, size=2).astype(np.float32)
    matrix = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], dtype=np.float32)
    return cv2.warpAffine(out, matrix, (112, 112), borderMode=cv2.BORDER_REFLECT)


def make_aligned_face_folder(root: str | Path, count: int = 40, seed: int = 0, odd_files: bool = True) -> Path:
    """Write ``count`` aligned crops (Tom Hanks, astronaut, LFW[:50], jittered) under ``root``; returns it."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pool = real_faces()[: 2 + CALIBRATION_LFW]
    folders = [root / "set_a", root / "set_b" / "deeper", root]
    suffixes = [".png", ".jpg", ".bmp"]
    for i in range(count):
        face = pool[i % len(pool)] if i < len(pool) else _jitter(pool[i % len(pool)], rng)
        folder = folders[i % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"face_{i:03d}{suffixes[i % len(suffixes)]}"
        image: np.ndarray = face
        if odd_files and i % 10 == 3:
            image = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
        elif odd_files and i % 10 == 5:
            path = path.with_suffix(".png")
            image = cv2.cvtColor(face, cv2.COLOR_BGR2BGRA)
        elif odd_files and i % 10 == 7:
            image = cv2.resize(face, (150, 150), interpolation=cv2.INTER_CUBIC)
        elif odd_files and i % 10 == 9:
            path = path.with_suffix(".png")
            image = face.astype(np.uint16) * 257
        assert cv2.imwrite(str(path), image), path
    if odd_files:
        (root / "notes.txt").write_text("not an image; must be ignored\n")
    return root


def write_face_video(path: str | Path, faces: list[np.ndarray], frames: int = 20, size: int = 160) -> Path:
    """A short MJPG video, one face per frame centred on a grey background."""
    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (size, size))
    assert writer.isOpened(), "OpenCV cannot write MJPG video"
    offset = (size - 112) // 2
    for i in range(frames):
        frame = np.full((size, size, 3), 128, dtype=np.uint8)
        frame[offset : offset + 112, offset : offset + 112] = faces[i % len(faces)]
        writer.write(frame)
    writer.release()
    return path


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour background (no face-like structure: the detector finds nothing in it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 200, (height // 20 + 1, width // 20 + 1, 3)).astype(np.uint8)
    return cv2.GaussianBlur(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 3)


def scene_with(faces: list[tuple[np.ndarray, int, int]], width: int, height: int, seed: int = 0) -> np.ndarray:
    """A scene: each (crop, x, y) pasted at (x, y) into a ``width`` x ``height`` background."""
    frame = background(width, height, seed)
    for face, x, y in faces:
        frame[y : y + face.shape[0], x : x + face.shape[1]] = face
    return frame


def carphone_frames(step: int = 1) -> list[np.ndarray]:
    """Every ``step``-th frame of the shipped 176x144 carphone clip (one real face throughout)."""
    capture = cv2.VideoCapture(str(CARPHONE))
    frames, index = [], 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(frame)
        index += 1
    capture.release()
    assert frames, CARPHONE
    return frames
