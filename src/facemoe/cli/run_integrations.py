"""``facemoe-run``'s Prometheus and MQTT options (docs/EVENTS.md#integrations), kept out of run_cmd."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

# How long the end of a run waits for the broker to acknowledge what is still queued (before run_ended),
# and then for run_ended itself.
MQTT_DRAIN_S = 10.0
MQTT_LAST_S = 3.0

MetricsPort = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)."),
]
MetricsHost = Annotated[str, typer.Option(help="Address the metrics server listens on.")]
MqttUrl = Annotated[
    str | None,
    typer.Option("--mqtt", help="Publish every event to mqtt://HOST[:PORT]/PREFIX as PREFIX/<source>/<event>."),
]
MqttUser = Annotated[str | None, typer.Option(help="MQTT user name.")]
MqttPassword = Annotated[
    str | None, typer.Option(envvar="FACEMOE_MQTT_PASSWORD", help="MQTT password (or $FACEMOE_MQTT_PASSWORD).")
]
MqttTls = Annotated[bool, typer.Option("--mqtt-tls", help="Connect to the broker over TLS (as mqtts:// does).")]
MqttCa = Annotated[Path | None, typer.Option(help="CA certificate file for the broker's TLS (implies --mqtt-tls).")]


def source_id(video: str) -> str:
    """The id a source's events, metrics and topics carry: a file's or URL's name stem, ``webcam<N>``."""
    from facemoe.runtime.source_spec import default_id

    return default_id(video)


@contextlib.contextmanager
def integrations(
    *,
    backend: str,
    precision: str,
    metrics_port: int | None,
    metrics_host: str,
    mqtt: str | None,
    mqtt_user: str | None,
    mqtt_password: str | None,
    mqtt_tls: bool,
    mqtt_ca: Path | None,
    say: Callable[[str], None],
) -> Any:
    """Open the metrics server and the MQTT client; yields ``attach(pipeline)``.

    Both are opened before any output file is made, so a port in use or a bad CA file leaves nothing behind.
    On exit the MQTT client waits (bounded) for its last acknowledgements and the summary says what was lost.
    """
    from facemoe.runtime.metrics import RunMetrics

    metrics = sink = None
    with contextlib.ExitStack() as stack:
        if metrics_port is not None:
            metrics = RunMetrics(backend=backend, precision=precision)
            port = metrics.serve(metrics_port, metrics_host)
            stack.callback(metrics.close)
            say(f"metrics: http://{metrics_host}:{port}/metrics")
        if mqtt is not None:
            from facemoe.runtime.mqtt_sink import MqttSink, parse_mqtt_url

            target = parse_mqtt_url(mqtt)
            sink = MqttSink(target, username=mqtt_user, password=mqtt_password, tls=mqtt_tls, ca_file=mqtt_ca)
            say(f"mqtt: {target.host}:{target.port} topics {target.prefix}/<source>/<event>, run events on _run")

            def report_end() -> None:
                done = sink.close(timeout_s=MQTT_LAST_S)
                lost = f"; [yellow]{done['undelivered']} not delivered[/]" if done["undelivered"] else ""
                say(f"mqtt: {done['delivered']} of {done['published'] + done['dropped']} events delivered{lost}")

            stack.callback(report_end)

        def attach(pipeline: Any) -> None:
            if metrics is not None:
                metrics.attach(pipeline)
            if sink is not None:
                pipeline.events.listeners.append(sink)
                pipeline.events.closing.append(lambda: {"mqtt": sink.drain(MQTT_DRAIN_S)})
                sink.start()

        yield attach


def check_mqtt_url(mqtt: str | None) -> None:
    if mqtt is not None:
        from facemoe.runtime.mqtt_sink import parse_mqtt_url

        parse_mqtt_url(mqtt)


__all__ = ["check_mqtt_url", "integrations", "source_id"]
