"""Several sources read at once: each decoded on its own thread, handed to the pipeline in fair rounds.

Every source has a decode thread and a small bounded queue. A file source's thread blocks when its queue is
full (backpressure: nothing is dropped); a live source's own reader keeps only the newest frame and counts the
ones it drops (runtime.video_source), so a camera that falls behind never stalls the others. The pipeline
takes *rounds*: at most one ready frame from each source, so no source starves another
(docs/EVENTS.md#several-sources). Sources are opened in parallel, since a dead stream URL can take seconds
to time out; one that fails to open is reported and the others run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from facemoe.errors import FaceMoEError
from facemoe.runtime.source_spec import SourceSpec
from facemoe.runtime.video_source import Frame, VideoSource

FILE_QUEUE = 4  # frames decoded ahead per file source
LIVE_QUEUE = 1  # a live source's newest frame; older ones are dropped by its reader
IDLE_ROUND_S = 0.05  # with nothing ready, an empty round this often (the batcher's latency bound still runs)


@dataclass
class End:
    """A source has no more frames: ``end_of_stream``, or ``source_error`` with the message."""

    reason: str
    error: str | None = None


@dataclass
class Opened:
    spec: SourceSpec
    source: VideoSource | None
    error: str | None = None


def open_sources(specs: list[SourceSpec], make: Callable[[SourceSpec], VideoSource]) -> list[Opened]:
    """Make and open every source in parallel; each result has its source, or the reason it failed."""
    results: list[Opened] = [Opened(spec, None, "not opened") for spec in specs]

    def work(index: int, spec: SourceSpec) -> None:
        try:
            source = make(spec)
            try:
                source.open()
            except BaseException:
                source.close()
                raise
            results[index] = Opened(spec, source)
        except FaceMoEError as exc:
            results[index] = Opened(spec, None, str(exc))
        except Exception as exc:  # whatever OpenCV raises: reported for this source only
            results[index] = Opened(spec, None, f"{spec.video}: cannot open: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=work, args=(i, spec), name=f"facemoe-open-{i}", daemon=True)
        for i, spec in enumerate(specs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class SourceMux:
    """Decode threads for ``sources`` (id -> opened VideoSource) and the rounds the pipeline consumes."""

    def __init__(self, sources: dict[str, VideoSource]) -> None:
        self.sources = sources
        self._queues: dict[str, queue.Queue[Frame | End]] = {
            sid: queue.Queue(LIVE_QUEUE if src.live else FILE_QUEUE) for sid, src in sources.items()
        }
        self._stopped: dict[str, threading.Event] = {sid: threading.Event() for sid in sources}
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._active = list(sources)  # sources whose frames are still taken, in round-robin order
        self._turn = 0

    def start(self) -> SourceMux:
        for sid, source in self.sources.items():
            thread = threading.Thread(
                target=self._decode, args=(sid, source), name=f"facemoe-decode-{sid}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _put(self, sid: str, item: Frame | End) -> bool:
        while not self._stopped[sid].is_set():
            try:
                self._queues[sid].put(item, timeout=0.1)
            except queue.Full:
                continue
            self._ready.set()
            return True
        return False

    def _decode(self, sid: str, source: VideoSource) -> None:
        try:
            for frame in source:
                if not self._put(sid, frame):
                    return
            self._put(sid, End("end_of_stream"))
        except FaceMoEError as exc:  # a live source lost for good
            self._put(sid, End("source_error", str(exc)))
        except Exception as exc:  # a dying thread must not leave the run waiting for it
            self._put(sid, End("source_error", f"{source.spec}: reading failed: {type(exc).__name__}: {exc}"))

    def rounds(self) -> Iterator[list[tuple[str, Frame | End]]]:
        """Rounds of at most one item per active source (empty when none is ready) until all have ended."""
        while self._active:
            self._ready.clear()
            batch: list[tuple[str, Frame | End]] = []
            count = len(self._active)
            order = [self._active[(self._turn + k) % count] for k in range(count)]
            self._turn = (self._turn + 1) % max(1, count)
            for sid in order:
                try:
                    item = self._queues[sid].get_nowait()
                except queue.Empty:
                    continue
                batch.append((sid, item))
                if isinstance(item, End):
                    self._active.remove(sid)
            if not batch:
                self._ready.wait(IDLE_ROUND_S)
            yield batch

    def stop(self, sid: str) -> None:
        """Take no more frames from ``sid`` (``--max-frames`` reached); its thread and reader stop."""
        if sid in self._active:
            self._active.remove(sid)
        self._stopped[sid].set()
        self.sources[sid].stop()

    def close(self) -> None:
        """Stop every decode thread, then release the captures (never while a thread still reads one)."""
        for sid in self.sources:
            self.stop(sid)
        for thread in self._threads:
            thread.join(timeout=5.0)
        alive = {t.name for t in self._threads if t.is_alive()}
        for sid, source in self.sources.items():
            if f"facemoe-decode-{sid}" not in alive:  # a capture still being read is left to the process exit
                source.close()


__all__ = ["End", "Opened", "SourceMux", "open_sources"]
