"""User-facing errors.

Every error a user can cause (bad file, bad option, mismatched engine) is a ``FaceMoEError``: the CLI
prints its message as one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class FaceMoEError(Exception):
    """An error caused by input the user controls; the message is shown as is."""


class CheckpointError(FaceMoEError):
    """A checkpoint file is missing, unreadable, or does not match the model configuration."""


class BundleError(FaceMoEError):
    """A deployment bundle is missing, incomplete, or corrupt."""


class ExportError(FaceMoEError):
    """Export failed a check (graph check, parity gate, ...)."""


class InputError(FaceMoEError):
    """A video, image, gallery or other input file cannot be used."""


class EngineMismatchError(FaceMoEError):
    """A TensorRT engine was built for another GPU, TensorRT version or plugin build."""


class OutputError(FaceMoEError):
    """An output path would overwrite an existing file or an input, or cannot be written."""
