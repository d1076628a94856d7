"""``facemoe-run``'s checks before any work starts: option values, the video spec, output paths, parity.

Everything here runs before a video is opened or a model loaded, so a refused run has read nothing heavy
and written nothing (docs/EVENTS.md, "Outputs").
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from facemoe.bundle import Bundle
from facemoe.errors import BundleError, FaceMoEError, InputError, OutputError
from facemoe.fileio import check_output

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_finite(**values: float | None) -> None:
    """NaN passes every range comparison, so typer's ranges let it through: refuse it by name."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise FaceMoEError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def check_video_spec(video: str) -> None:
    """Refuse URLs of schemes OpenCV's FFmpeg reader is not used for here, quoting the URL as given."""
    from facemoe.runtime.video_source import STREAM_SCHEMES

    match = URL.match(video.strip())
    if match is None or video.strip().lower().startswith(STREAM_SCHEMES):
        return
    scheme = match.group(1)
    supported = ", ".join(s.removesuffix("://") for s in STREAM_SCHEMES)
    hint = "; pass the path without file://" if scheme.lower() == "file" else ""
    raise InputError(f"{video}: unsupported URL scheme {scheme!r} (streams: {supported}){hint}")


def _local_inputs(videos: list[str], gallery: Path | None, detector: Path | None, bundle: Path | None) -> list[str]:
    inputs = [str(p) for p in (gallery, detector) if p is not None]
    for video in videos:
        if not video.strip().isdigit() and URL.match(video.strip()) is None:
            inputs.append(video)
    if bundle is not None and bundle.is_dir():
        inputs += [str(p) for p in bundle.iterdir() if p.is_file()]
    return inputs


def plan_outputs(
    *,
    videos: list[str],
    out: str | None,
    save_video: Path | None,
    gallery: Path | None,
    detector: Path | None,
    bundle: Path | None,
    overwrite: bool,
) -> str:
    """Check the events file and annotated video paths; return the events path (a default one without --out).

    Outputs never equal an input (video, gallery, detector, the bundle's files) nor each other, and an
    existing file is only replaced with ``--overwrite``. Without ``--out`` the events go to a new
    ``events-<date>-<time>.jsonl`` in the current directory.
    """
    from facemoe.runtime.annotate import _FOURCC_BY_SUFFIX
    from facemoe.runtime.events import default_events_path

    inputs = _local_inputs(videos, gallery, detector, bundle)
    if save_video is not None:
        if save_video.suffix.lower() not in _FOURCC_BY_SUFFIX:
            raise InputError(f"{save_video}: unsupported video extension; use one of {', '.join(_FOURCC_BY_SUFFIX)}")
        check_output(save_video, overwrite=overwrite, inputs=tuple(inputs))
    if out == "-":
        return out
    events = Path(out) if out is not None else default_events_path(Path.cwd())
    if save_video is not None and events.expanduser().resolve() == save_video.expanduser().resolve():
        raise OutputError(f"{events}: --out and --save-video name the same file; choose two paths")
    try:
        check_output(events, overwrite=overwrite, inputs=tuple(inputs))
    except OutputError as exc:
        if out is None:
            raise OutputError(f"{exc} (the default events file); pass --out FILE or --out -") from None
        raise
    return str(events)


def check_parity(bundle: Bundle, precision: str, allow: bool) -> str | None:
    """Refuse an artifact whose export parity check failed, unless allowed; the warning to show if allowed."""
    if precision not in bundle.precisions:
        return None  # the backend reports a missing artifact itself
    reason = bundle.parity_failure(precision)
    if reason is None:
        return None
    if not allow:
        raise BundleError(
            f"{bundle.root}: the {precision} model failed its parity check at export ({reason}); "
            "its identities may be wrong: pass --allow-failed-parity to run it anyway"
        )
    return f"the {precision} model failed its parity check at export ({reason})"


__all__ = ["check_finite", "check_parity", "check_video_spec", "plan_outputs"]
