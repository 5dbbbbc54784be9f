"""Start and stop the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel.

The wheel carries the binary (``pytriton/tritonserver/bin/tritonserver``), the python
backend and one backend stub per Python version, and no other backend: the onnx-gpu and
tensorrt backends need NVIDIA's Triton container (:func:`missing_backend`). We never write into
site-packages: a backend directory the launcher owns (``STATE/triton/backends``, STATE being
``dlheir.paths.state_dir()``) links to those files. The python-backend models import
``dlheir`` and onnxruntime from this interpreter's environment through PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import dlheir
from dlheir import paths
from dlheir.errors import UserError
from dlheir.procs import stop_process
from dlheir.triton.repository import BACKENDS, check_repository

CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"  # the README's GPU deployment


def launcher_state() -> Path:
    """The launcher's folder: pid file, logs, backend links (``state_dir()/triton``)."""
    return paths.state_dir() / "triton"


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise UserError("nvidia-pytriton is not installed (it ships the tritonserver binary)") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def available_backends() -> list[str]:
    """The Triton backends the wheel's tritonserver has (only ``python`` in nvidia-pytriton 0.7)."""
    return sorted(p.name for p in (pytriton_root() / "backends").iterdir() if p.is_dir())


def missing_backend(backend: str) -> str | None:
    """None if this host's tritonserver can serve ``backend``, else one line saying what it needs."""
    needed = BACKENDS[backend].triton_backend
    have = available_backends()
    if needed in have:
        return None
    return (f"the tritonserver of nvidia-pytriton has only the {', '.join(have)} backend; --backend {backend} needs "
            f"Triton's {needed} backend and a GPU: run NVIDIA's Triton container ({CONTAINER}) on the generated "
            "repository (README, 'GPU deployment')")


def prepare_backends(state_dir: Path | None = None) -> Path:
    """Create ``<state_dir>/backends/python`` with links to the wheel's backend and stub."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise UserError(f"nvidia-pytriton has no python backend stub for Python {version}")
    backend_dir = Path(state_dir if state_dir is not None else launcher_state()).resolve() / "backends"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").glob("*.so"), *(root / "backends" / "python").glob("*.py"), stub]:
        link = python_dir / src.name
        if link.is_symlink() or link.exists():
            if link.resolve() == src.resolve():
                continue
            link.unlink()
        link.symlink_to(src)
    return backend_dir


def _python_path() -> str:
    core_parent = str(Path(dlheir.__file__).resolve().parent.parent)
    paths = [core_parent, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


@dataclass
class TritonServer:
    """A tritonserver process serving a generated model repository (``prepare_repository``).

    Loads ``models``, by default exactly those of the backend the repository was generated
    for (read from its ensemble). Use as a context manager (tests, the demo) or call
    start/stop. ``log_path`` keeps Triton's own output; its error lines are shown when startup
    or a model load fails. ``state_dir`` (default ``launcher_state()``) holds the backend links
    and the log.
    """

    model_repository: Path | str
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    state_dir: Path | str | None = None
    models: tuple[str, ...] | None = None
    startup_timeout: float = 180.0
    log_path: Path | None = None
    tls_cert: Path | str | None = None  # with tls_key: gRPC over TLS only (HTTP, which has no TLS, is off)
    tls_key: Path | str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backend_dir: Path) -> list[str]:
        cmd = [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0",
        ]
        if self.tls_cert or self.tls_key:
            if not (self.tls_cert and self.tls_key and Path(self.tls_cert).is_file() and Path(self.tls_key).is_file()):
                raise UserError("Triton TLS needs both --tls-cert and --tls-key, existing PEM files")
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.tls_cert).resolve()}",
                    f"--grpc-server-key={Path(self.tls_key).resolve()}", "--allow-http=false"]
        return cmd

    def start(self, detach: bool = False) -> "TritonServer":
        served = check_repository(self.model_repository)
        if self.models is None:
            self.models = served.models
        problem = missing_backend(served.backend) if served.network in self.models else None
        if problem:
            raise UserError(problem)
        state = Path(self.state_dir if self.state_dir is not None else launcher_state())
        self.state_dir = state
        backend_dir = prepare_backends(state)
        state.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = state / f"tritonserver-{self.grpc_port}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = _python_path()
        # the backend stub finds its Python environment through PATH, as pytriton does it
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(backend_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=detach,
        )
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _error_lines(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        errors = [l for l in lines if l.startswith("E") or "error" in l.lower() or "failed" in l.lower()]
        return "\n".join((errors or lines)[-8:])

    def wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.startup_timeout
        client = (grpcclient.InferenceServerClient(self.grpc_url, ssl=True, root_certificates=str(self.tls_cert))
                  if self.tls_cert else grpcclient.InferenceServerClient(self.grpc_url))
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise UserError(f"tritonserver exited with code {self.process.returncode}:\n{self._error_lines()}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models):
                        return
                except Exception:
                    pass
                time.sleep(0.3)
        finally:
            client.close()
        raise UserError(f"tritonserver not ready after {self.startup_timeout:.0f}s:\n{self._error_lines()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout)  # SIGINT: tritonserver's clean stop

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
