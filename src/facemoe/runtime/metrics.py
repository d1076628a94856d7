"""Prometheus metrics of a run, served as text at ``http://HOST:PORT/metrics`` (docs/EVENTS.md#integrations).

The run's counts already live in each stream's ``RunStats`` and its source's ``SourceStats``: a collector
reads them when scraped, so the stream pays nothing per frame for them. Only what has no running total is observed as it
happens: each timed pipeline step (a histogram per stage), each embedding batch's size, and each event.
The registry is the run's own (not prometheus_client's global one), so several runs in one process never
share a series. Every series carries a ``source`` label: the source id, ``_all`` for what the sources share
(embedding batches, the embed stage, the backend, the audit) and ``_run`` for run-level events.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from facemoe.errors import FaceMoEError

# Stage steps take microseconds (a track update) to seconds (a large batch on a CPU).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


ALL = "_all"  # the label of what the sources share: the embedding batches, the backend, the audit
RUN = "_run"  # the label of run-level events (run_started, run_ended, accuracy_*)


class _Totals:
    """Reads the run's running totals at scrape time (a custom collector of the run's registry)."""

    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # no fixed description: series appear once a pipeline is attached

    def collect(self) -> Iterator[Metric]:
        pipeline = self.metrics.pipeline
        if pipeline is None:
            return
        streams = list(pipeline.streams)
        families = {
            name: CounterMetricFamily(f"facemoe_{name}", doc, labels=["source"])
            for name, doc in (
                ("frames", "Frames processed."),
                ("faces", "Faces detected above the detection threshold."),
                ("faces_too_small", "Faces skipped for a small eye distance."),
                ("embeddings", "Faces embedded by the model."),
                ("tracks", "Tracks started."),
                ("dropped_frames", "Frames a live source dropped because the pipeline was behind."),
                ("corrupt_frames", "Frames that could not be decoded."),
                ("reconnects", "Reconnects of a lost stream."),
            )
        }
        skipped = CounterMetricFamily(
            "facemoe_skipped_frames", "Frames skipped (unreadable, too small).", labels=["source", "reason"]
        )
        depth = GaugeMetricFamily(
            "facemoe_embedding_queue_depth", "Faces waiting for an embedding batch.", labels=["source"]
        )
        waiting = Counter(face.source for face in list(pipeline.batcher))
        for stream in streams:
            stats, source, sid = stream.stats, stream.stats.source, stream.id
            for name, value in (
                ("frames", stats.frames),
                ("faces", stats.faces),
                ("faces_too_small", stats.faces_too_small),
                ("embeddings", stats.faces_embedded),
                ("tracks", stats.tracks),
                ("dropped_frames", source.dropped),
                ("corrupt_frames", source.corrupt),
                ("reconnects", source.reconnects),
            ):
                families[name].add_metric([sid], float(value))
            # A copy: the pipeline thread may add a reason while this scrape runs.
            for reason, count in sorted(dict(stats.skipped_frames).items()):
                skipped.add_metric([sid, reason], float(count))
            depth.add_metric([sid], float(waiting.get(sid, 0)))
        depth.add_metric([ALL], float(sum(waiting.values())))
        batches = CounterMetricFamily(
            "facemoe_embedding_batches", "Model calls (embedding batches).", labels=["source"]
        )
        batches.add_metric([ALL], float(pipeline.stats.batches))
        yield from families.values()
        yield skipped
        yield batches
        yield depth
        yield from self._audit(pipeline.audit, ALL)

    @staticmethod
    def _audit(auditor: Any, source: str) -> Iterator[Metric]:
        if auditor is None:
            return
        # list() of a deque runs in C under the GIL: a consistent copy while the stream appends.
        cosines = [checked.cosine for checked in list(auditor.window)]
        totals = auditor.totals
        if cosines:
            gauge = GaugeMetricFamily(
                "facemoe_audit_cosine",
                "Mean cosine, deployed backend vs reference, over the audit's recent window.",
                labels=["source"],
            )
            gauge.add_metric([source], sum(cosines) / len(cosines))
            yield gauge
        for name, doc, value in (
            ("audit_faces", "Faces re-checked by the accuracy audit.", totals.checked),
            ("audit_dropped", "Audit samples dropped because the audit was behind.", totals.dropped),
            ("audit_alarms", "Accuracy alarms raised.", totals.alarms),
        ):
            family = CounterMetricFamily(f"facemoe_{name}", doc, labels=["source"])
            family.add_metric([source], float(value))
            yield family


class RunMetrics:
    """The metrics of a run (every source of it); ``attach`` a pipeline, ``serve`` them, ``close`` at the end."""

    def __init__(self, *, backend: str, precision: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.pipeline: Any = None
        self.stage_seconds = Histogram(
            "facemoe_stage_seconds",
            "Wall time of one timed pipeline step, per source and stage (source _all: shared by the sources).",
            ["source", "stage"],
            registry=self.registry,
            buckets=STAGE_BUCKETS,
        )
        self.batch_size = Histogram(
            "facemoe_embedding_batch_size",
            "Faces per embedding batch (model call), the batches shared by every source.",
            ["source"],
            registry=self.registry,
            buckets=BATCH_BUCKETS,
        )
        self.events = PromCounter(
            "facemoe_events", "Events emitted, per source and event type.", ["source", "event"], registry=self.registry
        )
        Info("facemoe_backend", "Inference backend and model precision.", ["source"], registry=self.registry).labels(
            ALL
        ).info({"backend": backend, "precision": precision})
        self.registry.register(_Totals(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def attach(self, pipeline: Any) -> None:
        """Observe ``pipeline`` (runtime.pipeline.Pipeline): its stage timer, batches, events and streams."""
        self.pipeline = pipeline
        pipeline.timer.observer = self.observe_stage
        pipeline.on_batch = self.batch_size.labels(ALL).observe
        pipeline.events.listeners.append(self.observe_event)

    def observe_stage(self, stage: str, seconds: float, source: str | None = None) -> None:
        self.stage_seconds.labels(source or ALL, stage).observe(seconds)

    def observe_event(self, record: dict[str, Any]) -> None:
        self.events.labels(record.get("source") or RUN, str(record.get("event"))).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` from a background thread; returns the port (useful with port 0)."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise FaceMoEError(
                f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["RunMetrics"]
