"""The cloud server announces readiness with a ready file (not a log line): written atomically once
its port is bound and health answers SERVING, naming its pid and port, removed at a clean stop.
Launchers (``dlheir server start``, ``CloudServerProcess``) wait on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dlheir.server.app import READY_FILE
from dlheir.server.cli import wait_ready
from dlheir.server.testing import CloudServerProcess


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DLHEIR_ADMIN_TOKEN"}


def test_ready_file_names_the_bound_port_and_goes_at_a_clean_stop(tmp_path):
    ready = tmp_path / "elsewhere" / "cloud.ready"  # --ready-file: another place than DATA_DIR/server.ready
    proc = subprocess.Popen([sys.executable, "-m", "dlheir.server", "--data-dir", str(tmp_path / "other"),
                             "--port", "0", "--ready-file", str(ready)], env=_env(), stderr=subprocess.DEVNULL)
    try:
        info = wait_ready(ready, proc)
        assert info["pid"] == proc.pid and _health(info["address"]) == health_pb2.HealthCheckResponse.SERVING
        assert not (tmp_path / "other" / READY_FILE).exists()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C is a clean stop too
        assert proc.wait(30) == 0
    assert not ready.exists()

    with CloudServerProcess(tmp_path / "cloud") as server:  # port 0: the server picks one
        info = json.loads((server.data_dir / READY_FILE).read_text())
        assert info["pid"] == server.process.pid and info["port"] == server.port > 0
        assert info["address"] == f"127.0.0.1:{server.port}" and info["tls"] is False
        assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        assert not list(server.data_dir.glob(".*.tmp"))  # written via a temporary file and renamed
    assert server.process.returncode == 0
    assert not (server.data_dir / READY_FILE).exists()


def test_a_stale_ready_file_is_not_taken_for_a_new_server(tmp_path):
    server = CloudServerProcess(tmp_path / "cloud").start()
    old_pid = server.process.pid
    server.kill()  # SIGKILL: no chance to remove its ready file
    stale = json.loads((server.data_dir / READY_FILE).read_text())
    assert stale["pid"] == old_pid
    with CloudServerProcess(tmp_path / "cloud") as again:  # waits for a file naming *its* pid
        info = json.loads((again.data_dir / READY_FILE).read_text())
        assert info["pid"] == again.process.pid != old_pid
        assert _health(again.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_server_that_cannot_start_leaves_the_running_ones_ready_file(tmp_path):
    with CloudServerProcess(tmp_path / "cloud") as server:
        before = (server.data_dir / READY_FILE).read_text()
        second = CloudServerProcess(server.data_dir)  # same data dir: refused (locked), exits 2
        with pytest.raises(Exception, match="exited with code 2"):
            second.start()
        assert (server.data_dir / READY_FILE).read_text() == before


def _dlheir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", *args], capture_output=True, text=True, timeout=180,
                          env=_env())


def test_server_start_in_the_background_waits_on_the_ready_file(tmp_path):
    data = tmp_path / "cloud"
    r = _dlheir("server", "start", "--data-dir", str(data), "--port", "0")  # port 0: read from the ready file
    try:
        assert r.returncode == 0, r.stderr
        info = json.loads((data / READY_FILE).read_text())
        assert info["pid"] == int((data / "server.pid").read_text()) and info["port"] > 0
        assert f"listening on 127.0.0.1:{info['port']}" in r.stdout
        assert _health(info["address"]) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop = _dlheir("server", "stop", "--data-dir", str(data))
    assert stop.returncode == 0, stop.stderr
    assert not (data / READY_FILE).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)
