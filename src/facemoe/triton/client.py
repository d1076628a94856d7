"""A small Triton Inference Server client: gRPC or HTTP by URL scheme, time-outs, bounded retries.

``tritonclient`` (the ``serve`` extra) is imported only when a client is made. Transport failures (server
down, connection reset, deadline passed) are retried with exponential back-off, a few times at most; a
request the server refuses (bad shape, unknown model) is not. Every failure ends in one line naming the URL
(docs/SCALE_OUT.md#getting-the-server).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from facemoe.errors import FaceMoEError
from facemoe.extras import DIST, MissingExtra

SCHEMES = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
SERVE_HINT = f"pip install '{DIST}[serve]'"
# Status codes of a server that is down, restarting or overloaded: worth another try.
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "502", "503", "504")
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


class TritonError(FaceMoEError):
    """The Triton server is unreachable, refused a request, or serves something else."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``grpc://HOST:PORT`` or ``http://HOST:PORT`` (default ports 8001 / 8000)."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TritonError(f"--triton-url {url!r}: use grpc://HOST:PORT or http://HOST:PORT")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise TritonError(f"--triton-url {url!r}: {exc}") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise TritonError(f"--triton-url {url!r}: use grpc://HOST:PORT or http://HOST:PORT")
    return Endpoint(scheme, parts.hostname, port)


def import_tritonclient(scheme: str, command: str = "--backend triton") -> Any:
    """``tritonclient.grpc`` or ``tritonclient.http``, or one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(f"tritonclient.{scheme}")
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "tritonclient"
        detail = "" if missing else f" (tritonclient.{scheme} failed to import: {exc})"
        raise MissingExtra(f"{command} needs tritonclient: {SERVE_HINT}{detail}") from None


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    text = str(status() if callable(status) else status or "")
    return text.replace("StatusCode.", "")


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None)
    text = text() if callable(text) else text
    return " ".join(str(text or exc or type(exc).__name__).split())


def transient(exc: BaseException) -> bool:
    """A failure another try may cure: no connection, a dropped one, a deadline passed."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    status = _status(exc)
    if status in TRANSIENT:
        return True
    text = _message(exc).lower()
    return not status and any(word in text for word in ("connect", "timed out", "timeout", "unavailable"))


class TritonClient:
    """One connection to a server; ``timeout`` seconds per call, ``retries`` further tries on transport errors."""

    def __init__(self, url: str, *, timeout: float = 10.0, retries: int = 3, backoff: float = 0.2) -> None:
        self.endpoint = parse_url(url)
        self.url = self.endpoint.url
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.module = import_tritonclient(self.endpoint.scheme)
        if self.endpoint.scheme == "grpc":
            self.client = self.module.InferenceServerClient(self.endpoint.address)
        else:
            self.client = self.module.InferenceServerClient(
                self.endpoint.address, connection_timeout=self.timeout, network_timeout=self.timeout
            )

    def _timeout_kw(self) -> dict[str, float]:
        return {"client_timeout": self.timeout} if self.endpoint.scheme == "grpc" else {}

    def call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` with back-off retries on transport errors; one-line errors."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                if not transient(exc):
                    raise TritonError(f"{self.url}: {what} failed: {_message(exc)}") from None
                if attempt == self.retries:
                    tries = f"{attempt + 1} tries" if attempt else "1 try"
                    raise TritonError(
                        f"triton server at {self.url} is not reachable ({what}: {_message(exc)}; {tries})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def server_ready(self) -> None:
        """Raise the 'not reachable' error unless the server answers and says it is ready."""
        ready = self.call("health check", self.client.is_server_ready, **self._timeout_kw())
        if not ready:
            raise TritonError(f"triton server at {self.url} is not reachable (it answers but is not ready)")

    def model_ready(self, model: str) -> None:
        if not self.call(f"model {model} readiness", self.client.is_model_ready, model, **self._timeout_kw()):
            raise TritonError(f"model {model} not ready on {self.url}{self._served_hint()}")

    def _served_hint(self) -> str:
        try:
            index = self.client.get_model_repository_index(**({"as_json": True} if self._grpc else {}))
        except Exception:
            return ""
        rows = index.get("models", []) if isinstance(index, dict) else index
        ready = [str(r.get("name")) for r in rows if str(r.get("state", "")).upper() == "READY"]
        return f" (ready there: {', '.join(ready)})" if ready else " (no model is ready there)"

    @property
    def _grpc(self) -> bool:
        return self.endpoint.scheme == "grpc"

    def config(self, model: str) -> dict[str, Any]:
        """The model's configuration as JSON (the same keys for gRPC and HTTP)."""
        if self._grpc:
            answer = self.call(
                f"{model} config", self.client.get_model_config, model, as_json=True, **self._timeout_kw()
            )
            return dict(answer.get("config", answer))
        return dict(self.call(f"{model} config", self.client.get_model_config, model))

    def metadata(self, model: str) -> dict[str, Any]:
        if self._grpc:
            return dict(
                self.call(
                    f"{model} metadata", self.client.get_model_metadata, model, as_json=True, **self._timeout_kw()
                )
            )
        return dict(self.call(f"{model} metadata", self.client.get_model_metadata, model))

    def infer(self, model: str, input_name: str, batch: np.ndarray, datatype: str, output_name: str) -> np.ndarray:
        """One request: ``batch`` as ``input_name`` in, ``output_name`` out."""
        tensor = self.module.InferInput(input_name, list(batch.shape), datatype)
        if self._grpc:
            tensor.set_data_from_numpy(batch)
        else:
            tensor.set_data_from_numpy(batch, binary_data=True)
        outputs = [self.module.InferRequestedOutput(output_name, **({} if self._grpc else {"binary_data": True}))]
        result = self.call(
            f"{model} inference", self.client.infer, model, [tensor], outputs=outputs, **self._timeout_kw()
        )
        array = result.as_numpy(output_name)
        if array is None:
            raise TritonError(f"{self.url}: {model} returned no {output_name!r} output")
        return np.asarray(array)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # closing a dead connection is not an error worth a line
                close()


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """A model configuration's ``parameters`` (JSON form) as plain strings."""
    raw = config.get("parameters") or {}
    return {str(k): str((v or {}).get("string_value", "")) for k, v in raw.items()}


__all__ = [
    "NUMPY_TYPES",
    "SERVE_HINT",
    "Endpoint",
    "TritonClient",
    "TritonError",
    "import_tritonclient",
    "parameters",
    "parse_url",
    "transient",
]
