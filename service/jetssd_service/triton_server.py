"""Launch and supervise the real Triton Inference Server (2.51, from the ``nvidia-pytriton`` wheel) without Docker.

What this does, following ``docs``/the Triton-without-Docker notes (the wheel's binary works as is, but its python
backend needs help):

* **Backend directory.** The wheel ships ``libtriton_python.so`` and ``triton_python_backend_utils.py`` without the
  stub the backend looks for beside them; the stub for this interpreter's major.minor lives under
  ``python_backend_stubs/``. :func:`prepare_backend_directory` copies the three into ``<work_dir>/backends/python``.
* **Environment.** The copies lose their ``$ORIGIN`` RPATH, so ``LD_LIBRARY_PATH`` gets the wheel's
  ``nvidia_pytriton.libs`` and the interpreter's ``LIBDIR`` (the stub then embeds the same libpython as this
  interpreter); this environment's ``bin`` goes first on ``PATH`` so the stub finds this environment's
  ``python3`` and with it numpy < 2, onnxruntime and ``jetssd`` (the models' code).
* **CPU flags.** No pinned / CUDA memory pools, no GPU metrics. Python-backend shared memory: a 32 MiB region per
  model instance, growing by 16 MiB (a batch of 16 dense images is 23.5 MB), under a prefix unique to this server
  so its regions can be found and cleaned up.
* **Models.** ``--model-control-mode=explicit`` and ``--load-model`` for every model of the repository that has a
  config.pbtxt (or the ones asked for): the repository API (load/unload) stays available, which the watchdog uses.
* **Start / stop.** Ports are checked before the start (a clear "port in use" error), readiness is
  ``GET /v2/health/ready`` with a timeout; any failure raises :class:`TritonStartError` with the tail of the
  server log (a file). :meth:`TritonServer.stop` sends SIGINT, waits, then SIGKILLs the process group, kills
  stubs left behind and removes this server's ``/dev/shm`` regions (a crashed stub leaks its region).
* **Watchdog.** A python stub that dies (OOM killer, a segfault in a native library) leaves its model READY while
  every request fails with ``Stub process '<model>_0' is not healthy``; Triton does not restart it. A thread
  compares, every ``watchdog_interval`` seconds, the live stub processes of each python model with the count it
  had when the server became ready, and reloads a model that lost one through ``POST
  /v2/repository/models/<model>/load`` (about 1.5 s; the ensemble keeps working afterwards).

Use::

    with TritonServer(Path("model_repository"), http_port=8000) as server:   # starts, waits until ready
        ...  # tritonclient.http.InferenceServerClient(server.http_url)

or ``jetssd-service triton`` (:mod:`jetssd_service.triton_cli`) in the foreground.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from jetssd_service.settings import Settings

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
"""Triton's default python-backend region prefix; ours extends it with a per-server tag."""
SHM_DEFAULT_BYTES = 32 * 1024 * 1024
"""Python-backend region per model instance: a batch of 16 dense images (23.5 MB) plus outputs fits."""
SHM_GROWTH_BYTES = 16 * 1024 * 1024
STUB_NAME = "triton_python_backend_stub"
RELOAD_PARAMETER = "jetssd_reload"
"""Config parameter the watchdog changes to force a reload (the models ignore it)."""
CPU_FLAGS = ("--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0", "--allow-gpu-metrics=false")
"""Flags for a machine without a GPU (the CUDA 'errors' Triton still logs at start are harmless)."""


class TritonStartError(RuntimeError):
    """The server did not become ready; the message carries the reason and the tail of its log."""


# ------------------------------------------------------------------------------------------ installation


@dataclass(frozen=True)
class TritonInstallation:
    """Where the pieces of the ``nvidia-pytriton`` wheel are."""

    tritonserver: Path
    """The server binary (``pytriton/tritonserver/bin/tritonserver``)."""
    python_backend: Path
    """``pytriton/tritonserver/backends/python`` (libtriton_python.so, triton_python_backend_utils.py)."""
    stubs: Path
    """``pytriton/tritonserver/python_backend_stubs`` (one ``<major>.<minor>/triton_python_backend_stub`` each)."""
    caches: Path
    libs: Path
    """``nvidia_pytriton.libs`` beside the package (libtritonserver, libcudart, …)."""

    @classmethod
    def from_wheel(cls) -> TritonInstallation:
        """Locate the installed wheel without importing pytriton. FileNotFoundError when it is missing."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the nvidia-pytriton wheel is not installed "
                                    "(pip install 'nvidia-pytriton==0.7.0'); it ships the tritonserver binary")
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        install = cls(tritonserver=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                      stubs=root / "python_backend_stubs", caches=root / "caches",
                      libs=package.parent / "nvidia_pytriton.libs")
        for path in (install.tritonserver, install.python_backend, install.stubs, install.libs):
            if not path.exists():
                raise FileNotFoundError(f"incomplete nvidia-pytriton installation: {path} is missing")
        return install

    def stub(self, version: tuple[int, int] | None = None) -> Path:
        """The python-backend stub built for ``version`` (default: this interpreter's major.minor)."""
        major, minor = version or sys.version_info[:2]
        path = self.stubs / f"{major}.{minor}" / STUB_NAME
        if not path.is_file():
            available = sorted(p.name for p in self.stubs.iterdir() if (p / STUB_NAME).is_file())
            raise FileNotFoundError(f"no python-backend stub for Python {major}.{minor} in {self.stubs} "
                                    f"(available: {available})")
        return path


def prepare_backend_directory(work_dir: Path, install: TritonInstallation,
                              python_version: tuple[int, int] | None = None) -> Path:
    """Copy the python backend and the stub matching the interpreter into ``work_dir/backends/python``.

    Returns ``work_dir/backends`` (the ``--backend-directory``). Files already up to date are not copied again.
    """
    target = work_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [install.python_backend / "libtriton_python.so",
               install.python_backend / "triton_python_backend_utils.py", install.stub(python_version)]
    for src in sources:
        dst = target / src.name
        st = src.stat()
        if dst.is_file() and dst.stat().st_size == st.st_size and dst.stat().st_mtime == st.st_mtime:
            continue
        tmp = dst.with_name(f".{dst.name}.partial")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return target.parent


def server_environment(install: TritonInstallation, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``LD_LIBRARY_PATH`` = interpreter LIBDIR + the wheel's libs (+ the old value),
    ``PATH`` = this environment's bin first (the stub finds its Python there)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    env["PATH"] = os.pathsep.join([str(Path(sys.exec_prefix) / "bin"), env.get("PATH", os.defpath)])
    env.pop("PYTHONHOME", None)
    return env


def repository_models(repository: Path) -> list[str]:
    """Models of a Triton repository: the directories holding a ``config.pbtxt``, sorted."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository}")
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for tests and ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails now (SO_REUSEADDR, as the server does, so TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM the server when the launching thread dies (no orphaned tritonserver)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class StubProcess:
    """A python-backend stub: ``pid`` and the model it serves (from its command line)."""

    pid: int
    model: str
    instance: str


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` that are not zombies (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ...
        if len(fields) >= 2 and fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _stub_of(pid: int) -> StubProcess | None:
    """Parse a stub's command line: ``stub <repo>/<model>/<version>/model.py <shm region> ... <instance> ...``."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if not args or not args[0].endswith(STUB_NAME) or len(args) < 2:
        return None
    model_py = Path(args[1])
    model = model_py.parent.parent.name if model_py.suffix == ".py" else model_py.parent.name
    instance = next((a for a in args[2:] if a.startswith(f"{model}_")), "")
    return StubProcess(pid, model, instance)


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The live python-backend stubs started by the server ``server_pid``."""
    stubs = (_stub_of(pid) for pid in _children(server_pid))
    return [s for s in stubs if s is not None]


def shm_regions(prefix: str) -> list[Path]:
    """This server's python-backend shared-memory regions in /dev/shm."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------- server


@dataclass
class WatchdogEvent:
    """One recovery by the watchdog."""

    model: str
    reason: str
    ok: bool
    seconds: float
    message: str = ""


@dataclass
class TritonServer:
    """A ``tritonserver`` process on a model repository, with a health watchdog.

    Args:
        repository: the Triton model repository.
        host: address the three endpoints bind (127.0.0.1; ``0.0.0.0`` for all interfaces).
        http_port, grpc_port, metrics_port: ports (0 = pick a free one at construction).
        models: models to load (default: every directory of the repository with a config.pbtxt).
        work_dir: where the backend copy and the log go (default: a temporary directory removed by :meth:`close`).
        log_file: the server's stdout + stderr (default ``work_dir/tritonserver.log``; appended across restarts).
        startup_timeout: seconds to wait for ``/v2/health/ready``.
        exit_timeout: Triton's own grace period after SIGINT (``--exit-timeout-secs``): it waits up to this long
            for in-flight requests, but also for idle keep-alive HTTP connections of clients and for a model
            instance whose stub died (its unload never finishes), so keep it short; inferences take milliseconds.
            The process is SIGKILLed if it still runs 10 s later.
        watchdog_interval: seconds between stub checks (None: no watchdog).
        extra_args: more tritonserver flags.

    The server gets ``PR_SET_PDEATHSIG``: it is terminated when the *thread* that started it exits, so start it
    from a thread that lives as long as the server (the main thread, not a short-lived worker).
    """

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: Sequence[str] | None = None
    work_dir: Path | None = None
    log_file: Path | None = None
    startup_timeout: float = 120.0
    exit_timeout: int = 5
    watchdog_interval: float | None = 2.0
    extra_args: Sequence[str] = ()
    recoveries: list[WatchdogEvent] = field(default_factory=list, init=False)
    """What the watchdog did (newest last)."""

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        bind = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        self.http_port = self.http_port or free_port(bind)
        self.grpc_port = self.grpc_port or free_port(bind)
        self.metrics_port = self.metrics_port or free_port(bind)
        self._own_work_dir = self.work_dir is None
        self._install: TritonInstallation | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None
        self._shm_prefix = f"{SHM_PREFIX}jetssd{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._expected_stubs: dict[str, int] = {}
        self._known_stubs: set[int] = set()
        self._suspects: set[str] = set()
        self._watchdog: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> TritonServer:
        """A server on the ports and repository of :class:`jetssd_service.settings.Settings` (``JETSSD_*``).

        ``JETSSD_TRITON_HOST`` is where clients reach the server; when it is not an IP address (a host name in a
        container network) the server binds all interfaces.
        """
        if settings is None:
            from jetssd_service.settings import Settings

            settings = Settings()
        try:
            ipaddress.ip_address(settings.triton_host)
            host = settings.triton_host
        except ValueError:
            host = "0.0.0.0"
        values: dict[str, Any] = {"repository": settings.model_repository, "host": host,
                                  "http_port": settings.triton_http_port, "grpc_port": settings.triton_grpc_port,
                                  "metrics_port": settings.triton_metrics_port}
        values.update(kwargs)
        return cls(**values)

    # ------------------------------------------------------------------------------------------ addresses

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient.http's URL form)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint, ``http://host:port/metrics``."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def shm_prefix(self) -> str:
        """Name prefix of this server's python-backend regions in /dev/shm."""
        return self._shm_prefix

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------------------------------------- start

    def command(self, backend_directory: Path, models: Sequence[str]) -> list[str]:
        """The tritonserver command line."""
        assert self._install is not None
        cmd = [
            str(self._install.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory}",
            f"--cache-directory={self._install.caches}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            *CPU_FLAGS,
            "--disable-auto-complete-config",  # the configs are complete; saves a stub start per model
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout}",
            *self.extra_args,
        ]
        return cmd

    def start(self) -> None:
        """Start the server and wait until ``/v2/health/ready``; then start the watchdog.

        Raises:
            TritonStartError: a port is taken, the process exited, or it was not ready in time (the message
                carries the tail of the log; the process is stopped).
            FileNotFoundError: the wheel, the stub or the repository is missing.
        """
        with self._lock:
            if self.running:
                return
            self._install = self._install or TritonInstallation.from_wheel()
            models = list(self.models) if self.models is not None else repository_models(self.repository)
            if not models:
                raise TritonStartError(f"{self.repository}: no model with a config.pbtxt "
                                       "(run `jetssd triton-repo --repository DIR` first)")
            taken = [f"{name} {port}" for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port),
                                                         ("metrics", self.metrics_port))
                     if port_in_use(self.host, port)]
            if taken:
                raise TritonStartError(f"cannot start Triton on {self.host}: port(s) already in use: "
                                       f"{', '.join(taken)} (another server running? set JETSSD_TRITON_*_PORT)")
            if self.work_dir is None:
                self.work_dir = Path(tempfile.mkdtemp(prefix="jetssd-triton-"))
            self.work_dir.mkdir(parents=True, exist_ok=True)
            backends = prepare_backend_directory(self.work_dir, self._install)
            if self.log_file is None:
                self.log_file = self.work_dir / "tritonserver.log"
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self.log_file.open("ab")
            self._log_handle.write(f"\n=== jetssd: starting tritonserver at {time.ctime()} ===\n".encode())
            self._log_handle.flush()
            cmd = self.command(backends, models)
            log.info("starting %s", " ".join(cmd))
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                          stderr=subprocess.STDOUT, env=server_environment(self._install),
                                          cwd=self.work_dir, start_new_session=True, preexec_fn=_set_pdeathsig)
            try:
                self._wait_ready()
            except BaseException:
                self._terminate()
                raise
            self._expected_stubs = {}
            self._suspects = set()
            self._known_stubs = {s.pid for s in stub_processes(self._proc.pid)}
            log.info("Triton ready: http %s grpc %s metrics %s (%d models)", self.http_url, self.grpc_url,
                     self.metrics_url, len(models))
            if self.watchdog_interval:
                self._stop_event.clear()
                self._watchdog = threading.Thread(target=self._watch, name="triton-watchdog", daemon=True)
                self._watchdog.start()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        assert self.log_file is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        with httpx.Client(timeout=1.0) as client:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    raise TritonStartError(f"tritonserver exited with code {rc} before it was ready; "
                                           f"log {self.log_file}:\n{_tail(self.log_file)}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TritonStartError(f"tritonserver not ready after {self.startup_timeout:.0f} s; "
                                           f"log {self.log_file}:\n{_tail(self.log_file)}")
                time.sleep(0.1)

    def is_ready(self, timeout: float = 1.0) -> bool:
        """``GET /v2/health/ready`` answers 200."""
        try:
            return httpx.get(f"http://{self.http_url}/v2/health/ready", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    # ----------------------------------------------------------------------------------------------- stop

    def stop(self) -> int | None:
        """Stop the server: SIGINT, wait (``exit_timeout`` + 10 s at most), SIGKILL; then end leftover stubs and
        remove this server's /dev/shm regions. Returns the exit code (None when it was not running). Idempotent."""
        with self._lock:
            self._stop_event.set()
            watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout=30)
        with self._lock:
            return self._terminate()

    def _terminate(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        stubs = {s.pid for s in stub_processes(proc.pid)} | self._known_stubs
        rc = proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit %d s after SIGINT; killing it", self.exit_timeout + 10)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        # The stubs watch their parent and exit with it; one that does not (or a hung one) is killed.
        deadline = time.monotonic() + 5.0
        while any(_alive(pid) for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in stubs:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything else of its session
        # Regions of stubs that crashed (Triton never frees them) or outlived the server.
        for attempt in range(2):
            if attempt:
                time.sleep(0.2)  # a stub that was just exiting
            for region in shm_regions(self._shm_prefix):
                with contextlib.suppress(OSError):
                    region.unlink()
        if self._log_handle is not None:
            self._log_handle.write(f"=== jetssd: tritonserver exited with code {rc} ===\n".encode())
            self._log_handle.close()
            self._log_handle = None
        self._proc = None
        self._known_stubs = set()
        log.info("Triton stopped (exit code %s)", rc)
        return rc

    def close(self) -> None:
        """:meth:`stop`, then remove the temporary work directory (when this object made it)."""
        self.stop()
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
            self.log_file = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the server process to exit (None: still running after ``timeout``)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- watchdog

    def stubs(self) -> list[StubProcess]:
        """The live python-backend stubs of this server."""
        proc = self._proc
        return stub_processes(proc.pid) if proc is not None else []

    def _count_stubs(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for stub in self.stubs():
            counts[stub.model] = counts.get(stub.model, 0) + 1
        return counts

    def _get(self, path: str, timeout: float = 5.0) -> Any:
        response = httpx.get(f"http://{self.http_url}/v2/{path}", timeout=timeout)
        response.raise_for_status()
        return response.json()

    def expected_stubs(self, model: str) -> int:
        """Stub processes a python-backend model runs (its instance count; 0 for other models)."""
        config = self._get(f"models/{model}/config")
        if config.get("backend") != "python":
            return 0
        return sum(int(g.get("count", 1)) for g in config.get("instance_group") or [{"count": 1}])

    def unhealthy_models(self) -> list[str]:
        """READY python models with fewer live stub processes than instances (an explicitly unloaded model is
        not READY and is left alone)."""
        counts = self._count_stubs()
        index = httpx.post(f"http://{self.http_url}/v2/repository/index", json={"ready": True}, timeout=5.0)
        index.raise_for_status()
        ready = sorted({str(m["name"]) for m in index.json()})
        unhealthy = []
        for model in ready:
            if model not in self._expected_stubs:
                self._expected_stubs[model] = self.expected_stubs(model)
            if counts.get(model, 0) < self._expected_stubs[model]:
                self._expected_stubs[model] = self.expected_stubs(model)  # the config may have changed
                if counts.get(model, 0) < self._expected_stubs[model]:
                    unhealthy.append(model)
        return unhealthy

    def reload_model(self, model: str, timeout: float = 60.0) -> None:
        """``POST /v2/repository/models/<model>/load`` (explicit mode; replaces the model's instances).

        Raises RuntimeError with the server's message when the load fails.
        """
        # A load of a loaded model whose files and config did not change is a no-op (even with the same config
        # passed along). A config that differs in one parameter, a reload counter the model ignores, makes Triton
        # build new instances (new stubs) and retire the old ones.
        base = f"http://{self.http_url}/v2"
        got = httpx.get(f"{base}/models/{model}/config", timeout=timeout)
        if got.status_code != 200:
            raise RuntimeError(f"reading the config of {model} failed: [{got.status_code}] {got.text}")
        config = got.json()
        params = config.get("parameters") or {}
        params[RELOAD_PARAMETER] = {"string_value": uuid.uuid4().hex}
        config["parameters"] = params
        response = httpx.post(f"{base}/repository/models/{model}/load", timeout=timeout,
                              json={"parameters": {"config": json.dumps(config)}})
        if response.status_code != 200:
            raise RuntimeError(f"reloading {model} failed: [{response.status_code}] {response.text}")

    def check_once(self, confirm: bool = True) -> list[WatchdogEvent]:
        """One watchdog round: reload every model that lost a stub. Returns what it did.

        With ``confirm`` a model is reloaded only when it was also found short of stubs in the previous round
        (rides over a stub that is being replaced during a reload someone else started).
        """
        events = []
        suspects = set(self.unhealthy_models())
        confirmed = suspects & self._suspects if confirm else suspects
        self._suspects = suspects - confirmed
        for model in sorted(confirmed):
            if self._stop_event.is_set() or not self.running:
                break
            log.warning("Triton model %s lost its python stub process; reloading it", model)
            t0 = time.monotonic()
            try:
                self.reload_model(model)
                event = WatchdogEvent(model, "stub process died", True, time.monotonic() - t0)
            except (httpx.HTTPError, RuntimeError) as exc:  # retried when seen twice again
                event = WatchdogEvent(model, "stub process died", False, time.monotonic() - t0, str(exc))
                log.error("could not reload %s: %s", model, exc)
            with self._lock:
                self.recoveries.append(event)
                if self._proc is not None:
                    self._known_stubs |= {s.pid for s in self.stubs()}
            events.append(event)
        return events

    def _watch(self) -> None:
        interval = float(self.watchdog_interval or 1.0)
        while not self._stop_event.wait(interval):
            if not self.running:
                log.error("tritonserver exited unexpectedly; log %s:\n%s", self.log_file,
                          _tail(self.log_file) if self.log_file else "")
                return
            try:
                self.check_once()
            except Exception:  # the watchdog must not die of a transient error
                log.exception("Triton watchdog round failed")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


@contextlib.contextmanager
def running_server(repository: Path, **kwargs: Any) -> Iterator[TritonServer]:
    """``with running_server(repo) as server:`` — start, yield, stop and clean up."""
    server = TritonServer(repository, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()
