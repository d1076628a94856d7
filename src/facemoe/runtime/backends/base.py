"""The backend interface: pre-processed faces in, raw embeddings out.

Every backend has the same life cycle:

* opened with ``Backend.from_bundle(bundle, precision, max_batch, *, device=None, threads=None, ...)``
  (backend-specific options are further keywords) or, for every backend at once,
  ``facemoe.runtime.backends.open_backend``;
* used as a context manager (``with open_backend(...) as backend:``), or closed with ``close()``, which
  releases its sessions, engines, CUDA graphs and device memory; a closed backend refuses to run;
* ``embed`` splits any batch into ``max_batch`` chunks; ``warmup``, ``describe``, ``notes``;
* ``memory_stats()`` reports what the backend can measure (see there), ``reset_peak_memory()`` starts a new
  peak where the backend can; ``use_cuda_graphs()`` switches CUDA-graph replay for later calls.
"""

from __future__ import annotations

import abc
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from facemoe.errors import FaceMoEError

if TYPE_CHECKING:
    from facemoe.bundle import Bundle

HOST_PEAK_KIND = "process peak RSS (whole process, monotonic)"
_B = TypeVar("_B", bound="Backend")


class BackendUnavailable(FaceMoEError):
    """The requested backend cannot run here (library or device missing)."""


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (it never goes down)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class Backend(abc.ABC):
    """Computes FaceMoE embeddings for batches of pre-processed faces.

    ``embed`` takes an (N, 3, S, S) float32 batch (``facemoe.preprocess`` output) of any N >= 0 and
    returns (N, D) float32 raw embeddings; batches above ``max_batch`` are split internally.
    """

    name: str = "backend"
    precision: str = "fp32"
    max_batch: int = 32
    device: str = "cpu"
    # CUDA-graph replay is on (graphs are captured per batch size on first use) ...
    cuda_graphs: bool = False
    # ... or was turned off by a failed capture, with the reason.
    cuda_graph_error: str | None = None
    _closed: bool = False

    @classmethod
    @abc.abstractmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        precision: str = "fp32",
        max_batch: int = 32,
        *,
        device: str | None = None,
        threads: int | None = None,
    ) -> Backend:
        """Open the bundle's ``precision`` artifact for batches of up to ``max_batch`` faces.

        ``device``: ``cpu``, ``cuda`` or ``cuda:N``; None lets the backend choose. ``threads``: CPU
        intra-op threads (None: the library's default; ignored where nothing runs on the CPU). Every
        backend accepts these; backend-specific options are further keywords.
        """

    # One line on why this backend and precision were chosen (set by runtime.backends.select.open_backend).
    selection: str = ""

    @abc.abstractmethod
    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch of at most ``max_batch`` faces."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise FaceMoEError(f"the {self.name} backend was closed")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected an (N, 3, S, S) batch, got shape {batch.shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        chunks = [self._embed_batch(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    @property
    @abc.abstractmethod
    def embedding_size(self) -> int: ...

    @property
    def input_size(self) -> int:
        return 120

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        for size in batch_sizes:
            self.embed(np.zeros((size, 3, self.input_size, self.input_size), dtype=np.float32))

    def use_cuda_graphs(self, enabled: bool) -> bool:
        """Replay CUDA graphs from the next call on (or stop); returns whether they are on.

        Graphs need a CUDA device; a backend that cannot capture them says False.
        """
        self.cuda_graphs = bool(enabled) and self.device.startswith("cuda")
        return self.cuda_graphs

    def reset_peak_memory(self) -> None:  # noqa: B027 - optional hook
        """Start a new peak for ``memory_stats`` where the backend can (the process peak RSS cannot)."""

    def memory_stats(self) -> dict[str, Any]:
        """Memory this backend can report; every key is optional.

        ``peak_device_memory_bytes`` with ``kind`` saying what it measures (PyTorch: the allocator's peak
        since ``reset_peak_memory``; TensorRT: engine + context + IO buffers), ``engine_activation_bytes``
        (TensorRT), ``host_rss_bytes`` and ``peak_host_rss_bytes`` (the whole process; the peak only grows).
        """
        now, peak = rss_bytes(), peak_rss_bytes()
        if now is not None and peak is not None:
            peak = max(peak, now)  # the kernel updates its high-water mark lazily
        return {"host_rss_bytes": now, "peak_host_rss_bytes": peak}

    def notes(self) -> list[str]:
        """Short remarks for reports: options in force, fallbacks taken at run time."""
        return [self.cuda_graph_error] if self.cuda_graph_error else []

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.device}, max batch {self.max_batch})"

    def close(self) -> None:
        """Release sessions, engines and device memory; later calls to ``embed`` fail. Idempotent."""
        self._closed = True

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["HOST_PEAK_KIND", "Backend", "BackendUnavailable", "peak_rss_bytes", "rss_bytes"]
