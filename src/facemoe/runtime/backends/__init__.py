"""Embedding backends behind one interface, and ``auto`` selection."""

from facemoe.runtime.backends.base import Backend, BackendUnavailable
from facemoe.runtime.backends.select import available_backends, open_backend

__all__ = ["Backend", "BackendUnavailable", "available_backends", "open_backend"]
