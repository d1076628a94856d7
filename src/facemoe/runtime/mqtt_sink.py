"""Every event published as JSON to an MQTT broker, ``PREFIX/<source>/<event>``, QoS 1 (docs/EVENTS.md#integrations).

``<source>`` is the event's ``source`` id; run-level events (``source`` null) go to ``PREFIX/_run/<event>``.

paho-mqtt runs the network loop in its own thread and reconnects with back-off. A publish only puts the
message in paho's out-queue (it is written by that thread), so the stream never waits for the broker; while
the broker is unreachable the queue holds up to ``buffer`` messages, which go out once it is back (QoS 1:
at least once, a message sent but not acknowledged before the connection dropped is sent again). When the
queue is full a new event is not queued and is counted as dropped. The events file keeps every event
whatever the broker does. At the end ``drain`` waits a bounded time for the acknowledgements and says how many
events never reached the broker.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from facemoe.errors import FaceMoEError


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    prefix: str
    tls: bool


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://HOST[:PORT]/PREFIX`` (1883) or ``mqtts://...`` (TLS, 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise FaceMoEError(f"--mqtt {url}: expected mqtt://HOST[:PORT]/PREFIX (or mqtts:// for TLS)")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise FaceMoEError(f"--mqtt {url}: the port is not a number from 1 to 65535") from None
    prefix = parts.path.strip("/") or "facemoe"
    if "+" in prefix or "#" in url:  # urlsplit reads "#..." as a fragment
        raise FaceMoEError(f"--mqtt {url}: the topic prefix may not contain the wildcards + or #")
    return MqttTarget(parts.hostname, port, prefix, parts.scheme == "mqtts")


RUN_TOPIC = "_run"  # the topic level of run-level events (run_started, run_ended, accuracy_*)


def topic_part(text: str) -> str:
    """A source id as one topic level: no separators or wildcards."""
    return "".join("_" if c in "/+#" or ord(c) < 32 else c for c in text) or "source"


class MqttSink:
    """Publishes event records (an ``EventWriter`` listener) to ``PREFIX/<source>/<event>``."""

    def __init__(
        self,
        target: MqttTarget,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: Path | None = None,
        buffer: int = 10000,
        reconnect_s: tuple[int, int] = (1, 30),
    ) -> None:
        self.target = target
        self.published = 0  # accepted into the out-queue
        self.dropped = 0  # refused: the queue was full (the broker away too long)
        self.delivered = 0  # acknowledged by the broker (PUBACK)
        self.disconnects = 0
        self._lock = threading.Lock()
        self._unacked: set[int] = set()
        self._early: set[int] = set()
        self._connected = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"facemoe-{uuid.uuid4().hex[:12]}", clean_session=True
        )
        client.max_queued_messages_set(buffer)
        client.reconnect_delay_set(*reconnect_s)
        if username is not None:
            client.username_pw_set(username, password)
        if tls or target.tls or ca_file is not None:
            if ca_file is not None and not Path(ca_file).is_file():
                raise FaceMoEError(f"{ca_file}: no such CA certificate file (--mqtt-ca)")
            try:
                client.tls_set(ca_certs=str(ca_file) if ca_file is not None else None, cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise FaceMoEError(f"{ca_file}: cannot use as a CA certificate file: {exc}") from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    # -- paho's network thread -------------------------------------------------------------------------
    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        if self._connected.is_set():
            self.disconnects += 1
        self._connected.clear()

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self.delivered += 1
            else:  # acknowledged before publish() returned to the stream
                self._early.add(mid)

    # -- the stream's thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background: an unreachable broker is retried, the run starts at once."""
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def __call__(self, record: dict[str, Any]) -> None:
        source = record.get("source")
        topic = f"{self.target.prefix}/{topic_part(source) if source is not None else RUN_TOPIC}/{record.get('event')}"
        payload = json.dumps(record, ensure_ascii=False, allow_nan=False)
        # Not under our lock: paho calls on_publish while holding its own, and publish() takes that one.
        info = self.client.publish(topic, payload, qos=1)
        with self._lock:
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self.dropped += 1
                return
            self.published += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.delivered += 1
            else:
                self._unacked.add(info.mid)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def undelivered(self) -> int:
        """Events not acknowledged by the broker (queued, in flight, or dropped)."""
        with self._lock:
            return len(self._unacked) + self.dropped

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Wait up to ``timeout_s`` for the queued events' acknowledgements; the counts for run_ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    break
            time.sleep(0.02)
        return self.report()

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "published": self.published,
                "delivered": self.delivered,
                "undelivered": len(self._unacked) + self.dropped,
                "dropped": self.dropped,
                "disconnects": self.disconnects,
            }

    def close(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Wait (bounded) for what is in flight, then disconnect and stop the network thread."""
        report = self.drain(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        return report


__all__ = ["MqttSink", "MqttTarget", "parse_mqtt_url", "topic_part"]
