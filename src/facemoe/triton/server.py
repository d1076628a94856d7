"""A real Triton Inference Server process on a model repository: found, started, waited for, stopped.

The server is a system ``tritonserver`` on ``PATH`` when there is one, else the one the ``nvidia-pytriton``
wheel carries (installed ``--no-deps``: only its binary, libraries and Python-backend stubs are used, never
PyTriton's Python API) (docs/SCALE_OUT.md#getting-the-server). What the wheel's server needs, learnt the
hard way:

* its Python-backend stub embeds ``libpython``: the stub for this interpreter's version is linked into a
  private backend directory, and ``LD_LIBRARY_PATH`` points at this interpreter's own ``libpython``
  (else the system's is taken);
* the stub's compiled bindings read numpy 1 array structures: under numpy 2 its tensors arrive as the
  first element repeated and leave empty. The stub therefore gets a numpy below 2 first on its path
  (:func:`stub_site`), while the rest of the environment keeps numpy 2;
* it ignores SIGINT when started in the background; SIGTERM stops it (in about 4 s), SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from facemoe.errors import FaceMoEError
from facemoe.userdirs import cache_dir

PYTRITON_HINT = "pip install --no-deps nvidia-pytriton==0.7.0"
STUB_SITE_ENV = "FACEMOE_TRITON_STUB_SITE"
STUB_NUMPY = ("numpy>=1.23,<2", "ml_dtypes>=0.5,<0.6")
LOG_TAIL_LINES = 6


class ServerError(FaceMoEError):
    """The Triton server is missing, cannot start, or died."""


@dataclass(frozen=True)
class ServerInstall:
    """Where a ``tritonserver`` and what it needs live."""

    binary: Path
    origin: str
    # The wheel's backends and stubs (None for a system server, which brings its own backend directory).
    backends: Path | None = None
    stub: Path | None = None
    libs: tuple[Path, ...] = ()


def _pytriton_root() -> Path | None:
    """The installed ``pytriton`` package directory, found without importing it (its import needs numpy<2)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_server() -> ServerInstall:
    """A system ``tritonserver`` on PATH, else the nvidia-pytriton wheel's; a one-line error naming both."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerInstall(Path(on_path), f"{on_path} (PATH)")
    root = _pytriton_root()
    if root is None:
        raise ServerError(
            f"no Triton Inference Server here: none on PATH and nvidia-pytriton is not installed ({PYTRITON_HINT})"
        )
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise ServerError(f"{binary}: missing from the nvidia-pytriton install; reinstall it ({PYTRITON_HINT})")
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version} (it has {', '.join(have)})")
    return ServerInstall(
        binary, f"nvidia-pytriton ({root})", dist / "backends", stub, (root.parent / "nvidia_pytriton.libs",)
    )


def stub_site() -> Path:
    """Where the stub's numpy<2 lives: ``$FACEMOE_TRITON_STUB_SITE``, else the cache's ``triton-stub-site/pyX.Y``."""
    if os.environ.get(STUB_SITE_ENV):
        return Path(os.environ[STUB_SITE_ENV]).expanduser()
    return cache_dir("triton-stub-site", f"py{sys.version_info.major}.{sys.version_info.minor}")


def stub_site_command(site: Path | None = None) -> str:
    """The one command that fills :func:`stub_site` (the interpreter's own pip, no dependencies pulled)."""
    specs = " ".join(f"'{spec}'" for spec in STUB_NUMPY)
    return f"{Path(sys.executable).name} -m pip install --no-deps --target {site or stub_site()} {specs}"


def _numpy_major(directory: Path) -> int | None:
    for meta in directory.glob("numpy-*.dist-info"):
        with contextlib.suppress(ValueError, IndexError):
            return int(meta.name.split("-")[1].split(".")[0])
    return None


def stub_python_path(site: Path | None = None) -> list[str]:
    """Directories first on the stub's ``sys.path``: the numpy<2 site when this environment's numpy is 2+."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return []
    site = site or stub_site()
    if _numpy_major(site) != 1:
        raise ServerError(
            f"Triton's Python-backend stub needs numpy<2 (its bindings read numpy 1 arrays; this environment has "
            f"numpy {numpy.__version__}) and {site} has none: {stub_site_command(site)}"
        )
    return [str(site.resolve())]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last meaningful lines of a server log on one line (errors first when there are any)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    useful = [line.strip() for line in text if line.strip() and not set(line.strip()) <= set("+-|")]
    errors = [line for line in useful if line.startswith("E") or "error" in line.lower()]
    picked = (errors or useful)[-lines:]
    return " | ".join(picked)[-600:] or "(empty log)"


class TritonServer:
    """``tritonserver --model-repository REPO`` on ``host``; ports 0 are chosen free. A context manager."""

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        install: ServerInstall | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 120.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = host
        bind = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
        self.http_port = http_port or free_port(bind)
        self.grpc_port = grpc_port or free_port(bind)
        self.metrics_port = metrics_port or free_port(bind)
        self.install = install or find_server()
        self.ready_timeout = ready_timeout
        self.extra_args = extra_args
        self._workdir = Path(tempfile.mkdtemp(prefix="facemoe-triton-"))
        self.log_path = Path(log_path) if log_path is not None else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        for name, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            if _port_taken(bind, port):
                raise ServerError(f"{host}:{port} ({name}) is already in use; choose another --{name}-port")

    @property
    def local_host(self) -> str:
        """The address clients on this machine use (a server on 0.0.0.0 listens on 127.0.0.1 too)."""
        return "127.0.0.1" if self.host == "0.0.0.0" else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self.local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.local_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local_host}:{self.metrics_port}/metrics"

    def _backend_directory(self) -> Path | None:
        """The wheel's backends with the stub for this Python beside ``libtriton_python.so`` (links, no copy)."""
        install = self.install
        if install.backends is None or install.stub is None:
            return None
        root = self._workdir / "backends"
        python = root / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in (install.backends / "python").iterdir():
            (python / item.name).symlink_to(item)
        (python / "triton_python_backend_stub").symlink_to(install.stub)
        return root

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        dirs = [str(libdir)] if libdir else []
        dirs += [str(p) for p in self.install.libs]
        if env.get("LD_LIBRARY_PATH"):
            dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
        return env

    def command(self) -> list[str]:
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
        ]
        backends = self._backend_directory()
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        return cmd + list(self.extra_args)

    def start(self) -> TritonServer:
        """Start the server and wait until every model is ready; a one-line error with the log tail if not."""
        if self.process is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches the caller, which then stops the server.
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready: {log_tail(self.log_path)} "
                    f"(log: {self.log_path})"
                )
            if self.ready():
                return
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver not ready after {self.ready_timeout:g} s: {log_tail(self.log_path)} (log: {self.log_path})"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code. Idempotent."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            code = process.returncode
        if self.log_path.parent != self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        else:  # keep the log, drop the links
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        return code

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


__all__ = [
    "STUB_SITE_ENV",
    "ServerError",
    "ServerInstall",
    "TritonServer",
    "find_server",
    "free_port",
    "log_tail",
    "stub_python_path",
    "stub_site",
    "stub_site_command",
]
