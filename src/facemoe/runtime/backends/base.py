"""The backend interface: pre-processed faces in, raw embeddings out."""

from __future__ import annotations

import abc

import numpy as np

from facemoe.errors import FaceMoEError


class BackendUnavailable(FaceMoEError):
    """The requested backend cannot run here (library or device missing)."""


class Backend(abc.ABC):
    """Computes FaceMoE embeddings for batches of pre-processed faces.

    ``embed`` takes an (N, 3, S, S) float32 batch (``facemoe.preprocess`` output) of any N >= 0 and
    returns (N, D) float32 raw embeddings; batches above ``max_batch`` are split internally.
    """

    name: str = "backend"
    precision: str = "fp32"
    max_batch: int = 32
    device: str = "cpu"
    # One line on why this backend and precision were chosen (set by runtime.backends.select.open_backend).
    selection: str = ""

    @abc.abstractmethod
    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch of at most ``max_batch`` faces."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
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

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.device}, max batch {self.max_batch})"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""
