"""The live accuracy audit: a sample of the faces the deployed backend embeds is embedded again by a reference.

The stream only samples and enqueues (a bounded queue, ``put_nowait``): when the background worker falls
behind, samples are dropped and counted, and the stream never waits. Per audited face the worker compares the
embedding (cosine of the raw vectors), the gallery decision (identity or unknown of that one face, deployed
vs reference) and, where the backend exposes it, the expert set each token was routed to per MoE layer.
Results come back to the stream's thread, which writes the events (docs/EVENTS.md, ``accuracy_check`` and
``accuracy_alarm``): the events file has one writer.

The alarm compares the mean cosine of the last ``window`` audited faces with the artifact's own parity gate
(the ``cosine_mean`` its export was held to, recorded in the manifest) unless a threshold is given.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemoe.runtime.gallery import Gallery


class AuditStop(Exception):
    """``--audit-strict``: an accuracy alarm ends the run (``run_ended`` reason ``accuracy_alarm``)."""

    reason = "accuracy_alarm"


@dataclass
class AuditConfig:
    rate: float = 0.02
    min_cosine: float = 0.98
    window: int = 16
    min_faces: int = 3  # audited faces before the window's mean may raise an alarm
    queue_size: int = 64
    report_every: int = 25  # an accuracy_check event every this many audited faces (and one at the end)
    save_dir: Path | None = None
    strict: bool = False
    worst: int = 5  # faces listed (and saved) per alarm
    drain_s: float = 30.0  # at the end of the stream, how long queued samples may still be checked
    seed: int = 0
    match_threshold: float = 0.4
    flip: bool = False


@dataclass
class Sample:
    frame: int
    track: int | None
    tensor: np.ndarray
    aligned: np.ndarray | None
    embedding: np.ndarray


@dataclass
class Checked:
    frame: int
    track: int | None
    cosine: float
    decision_same: bool | None
    routing: list[float] | None
    aligned: np.ndarray | None


@dataclass
class AuditTotals:
    offered: int = 0
    sampled: int = 0
    dropped: int = 0
    unfinished: int = 0
    checked: int = 0
    errors: int = 0
    cosines: list[float] = field(default_factory=list)
    decisions: list[bool] = field(default_factory=list)
    routing: list[list[float]] = field(default_factory=list)
    alarms: int = 0
    worker_seconds: float = 0.0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _agreement(artifact: np.ndarray, reference: np.ndarray, index: int, count: int) -> float:
    """Share of face ``index``'s tokens (rows are batch-major) whose top-k expert set is the same."""
    tokens = len(artifact) // count
    rows = slice(index * tokens, (index + 1) * tokens)
    return float((np.sort(artifact[rows], axis=1) == np.sort(reference[rows], axis=1)).all(axis=1).mean())


class Auditor:
    """Sampling, the worker thread, the running statistics and the events of one audited run."""

    def __init__(
        self,
        reference: Any,
        events: Any,
        config: AuditConfig,
        *,
        artifact: str,
        gallery: Gallery | None = None,
        routing: Any = None,
        layer_names: list[str] | None = None,
    ) -> None:
        self.reference, self.events, self.config = reference, events, config
        self.artifact, self.gallery, self.routing = artifact, gallery, routing
        self.layer_names = layer_names or []
        self.totals = AuditTotals()
        self.window: deque[Checked] = deque(maxlen=config.window)
        self.alarmed = False  # inside an alarm episode: the next alarm needs the window to recover first
        self.saved: list[str] = []
        self.stopped = False  # a strict alarm was raised
        self._finishing = False
        self._rng = random.Random(config.seed)
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=config.queue_size)
        self._done: deque[Checked] = deque()  # results waiting for the stream's thread
        self._lock = threading.Lock()
        self._outstanding = 0  # samples queued or being checked
        self.error: str | None = None  # the reference's first failure, if any
        self._last_report = 0
        self._thread = threading.Thread(target=self._work, name="facemoe-audit", daemon=True)
        self._thread.start()

    def bind(self, events: Any) -> Auditor:
        """Write to ``events`` (made after the reference, so a reference that fails leaves no file)."""
        self.events = events
        return self

    # -- the stream's side ---------------------------------------------------------------------------
    def offer(self, samples: list[tuple[int, int | None, np.ndarray, np.ndarray | None]], raw: np.ndarray) -> None:
        """Faces just embedded (frame, track, model input, aligned crop) and their raw embeddings."""
        for (frame, track, tensor, aligned), embedding in zip(samples, raw, strict=True):
            self.totals.offered += 1
            if self._rng.random() >= self.config.rate:
                continue
            self.totals.sampled += 1
            try:
                with self._lock:
                    self._queue.put_nowait(Sample(frame, track, tensor, aligned, np.array(embedding, np.float32)))
                    self._outstanding += 1
            except queue.Full:
                self.totals.dropped += 1
        self.poll()

    def poll(self) -> None:
        """Take in the worker's results; write checks and alarms (raises ``AuditStop`` when strict)."""
        while self._done:
            item = self._done.popleft()
            self.totals.checked += 1
            self.totals.cosines.append(item.cosine)
            if item.decision_same is not None:
                self.totals.decisions.append(item.decision_same)
            if item.routing is not None:
                self.totals.routing.append(item.routing)
            self.window.append(item)
            self._judge()
        if self.totals.checked - self._last_report >= self.config.report_every:
            self.report(final=False)

    def _judge(self) -> None:
        mean = self.window_mean
        if len(self.window) < min(self.config.min_faces, self.config.window) or mean is None:
            return
        if mean >= self.config.min_cosine:
            self.alarmed = False
            return
        if self.alarmed:
            return
        self.alarmed = True
        self.totals.alarms += 1
        worst = sorted(self.window, key=lambda c: c.cosine)[: self.config.worst]
        saved = self._save(worst)
        self.events.emit(
            "accuracy_alarm",
            reference=self.reference.name,
            artifact=self.artifact,
            window=len(self.window),
            window_cosine_mean=mean,
            min_cosine=self.config.min_cosine,
            faces=self.totals.checked,
            worst=[
                {"frame": c.frame, "track_id": c.track, "cosine": c.cosine, **({"crop": s} if s else {})}
                for c, s in zip(worst, saved, strict=True)
            ],
        )
        if self.config.strict and not self.stopped:
            self.stopped = True
            if self._finishing:  # the stream has ended: the caller reads ``stopped`` for its exit status
                return
            raise AuditStop(
                f"accuracy alarm: mean cosine {mean:.4f} of the last {len(self.window)} audited faces "
                f"< {self.config.min_cosine:g} ({self.artifact} vs {self.reference.name} reference)"
            )

    def _save(self, worst: list[Checked]) -> list[str | None]:
        if self.config.save_dir is None:
            return [None] * len(worst)
        import cv2

        self.config.save_dir.mkdir(parents=True, exist_ok=True)
        paths: list[str | None] = []
        for c in worst:
            if c.aligned is None:
                paths.append(None)
                continue
            path = self.config.save_dir / f"frame{c.frame:06d}-track{c.track}-cos{c.cosine:.4f}.png"
            if not path.exists() and not cv2.imwrite(str(path), c.aligned):
                paths.append(None)
                continue
            paths.append(str(path))
            if str(path) not in self.saved:
                self.saved.append(str(path))
        return paths

    @property
    def window_mean(self) -> float | None:
        return float(np.mean([c.cosine for c in self.window])) if self.window else None

    def summary(self) -> dict[str, Any]:
        t = self.totals
        cos = np.asarray(t.cosines, dtype=np.float64)
        routing = np.asarray(t.routing, dtype=np.float64) if t.routing else None
        per_layer = routing.mean(axis=0) if routing is not None else None
        names = self.layer_names if per_layer is not None and len(self.layer_names) == len(per_layer) else None
        return {
            "faces": t.checked,
            "sampled": t.sampled,
            "dropped": t.dropped,
            "unfinished": t.unfinished,
            "errors": t.errors,
            **({"error": self.error} if self.error else {}),
            "rate": self.config.rate,
            "cosine_mean": float(cos.mean()) if cos.size else None,
            "cosine_min": float(cos.min()) if cos.size else None,
            # 1 - cosine in parts per million: event floats keep 4 decimals, the fp32 / fp16 gaps are smaller.
            "cosine_gap_mean_ppm": float(1e6 * (1 - cos.mean())) if cos.size else None,
            "cosine_gap_max_ppm": float(1e6 * (1 - cos.min())) if cos.size else None,
            "window_cosine_mean": self.window_mean,
            "decision_agreement": float(np.mean(t.decisions)) if t.decisions else None,
            "routing_agreement_mean": float(per_layer.mean()) if per_layer is not None else None,
            "routing_agreement_min": float(routing.min()) if routing is not None else None,
            "routing_agreement_per_layer": (
                dict(zip(names, per_layer.tolist(), strict=True)) if names and per_layer is not None else None
            ),
            "routing_note": None if self.routing is None else (self.routing.unavailable or None),
            "min_cosine": self.config.min_cosine,
            "min_cosine_gap_ppm": 1e6 * (1 - self.config.min_cosine),
            "alarms": t.alarms,
            "reference": self.reference.name,
            "artifact": self.artifact,
            "worker_seconds": t.worker_seconds,
        }

    def report(self, final: bool) -> dict[str, Any]:
        self._last_report = self.totals.checked
        fields = self.summary()
        self.events.emit("accuracy_check", final=final, **fields)
        return fields

    def status(self) -> str:
        """One line for the live display."""
        t = self.totals
        if not t.checked:
            return f"{self.reference.name} reference; {t.sampled} sampled, none checked yet; dropped {t.dropped}"
        mean = float(np.mean(t.cosines))
        agree = f", decisions {100 * np.mean(t.decisions):.0f}% same" if t.decisions else ""
        alarm = f", [bold red]{t.alarms} alarm(s)[/]" if t.alarms else ""
        return (
            f"{t.checked} faces vs {self.reference.name}: cosine mean {mean:.5f} min {min(t.cosines):.5f}"
            f"{agree}; dropped {t.dropped}{alarm}"
        )

    def finish(self) -> dict[str, Any]:
        """Check what is queued (up to ``drain_s``), stop the worker, write the final accuracy_check."""
        self._finishing = True
        deadline = time.monotonic() + self.config.drain_s
        while self._outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
            self.poll()
        # What the worker did not reach is counted, not checked.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.totals.unfinished += 1
                with self._lock:
                    self._outstanding -= 1
        self._queue.put(None)
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.poll()
        # A run that sampled nothing (no faces, or none drawn at a low rate) adds no event.
        return self.report(final=True) if self.totals.sampled else self.summary()

    # -- the worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 8:  # the reference runs what is waiting as one batch
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            start = time.perf_counter()
            try:
                self._done.extend(self._check(batch))
            except Exception as exc:  # a failing reference must not stop the stream; counted and reported
                self.totals.errors += len(batch)
                self.error = self.error or f"{type(exc).__name__}: {exc}"
            self.totals.worker_seconds += time.perf_counter() - start
            with self._lock:
                self._outstanding -= len(batch)

    def _check(self, batch: list[Sample]) -> list[Checked]:
        inputs = np.stack([s.tensor for s in batch]).astype(np.float32)
        reference, ref_routes = self.reference.embed(inputs)
        if self.config.flip:  # the deployed side embedded f(x) + f(flip x)
            from facemoe.preprocess import flip_batch

            reference = reference + self.reference.embed(flip_batch(inputs))[0]
        deployed = np.stack([s.embedding for s in batch])
        cosines = (_unit(deployed) * _unit(np.asarray(reference, dtype=np.float32))).sum(axis=1)
        art_routes = self.routing.routes(inputs) if self.routing is not None else None
        out = []
        for i, s in enumerate(batch):
            same = None
            if self.gallery is not None:
                t = self.config.match_threshold
                same = (
                    self.gallery.match(_unit(deployed[i]), t).identity
                    == self.gallery.match(_unit(reference[i]), t).identity
                )
            routing = None
            if art_routes and len(art_routes) == len(ref_routes):
                routing = [_agreement(a, r, i, len(batch)) for a, r in zip(art_routes, ref_routes, strict=True)]
            out.append(Checked(s.frame, s.track, float(cosines[i]), same, routing, s.aligned))
        return out


__all__ = ["AuditConfig", "AuditStop", "Auditor", "Sample"]
