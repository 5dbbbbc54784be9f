"""Small defects a new user hit in the first hour (issue 21, item 7), each through the real CLI
where it can be: ``status`` against a gRPC server that is not ours, output piped into a reader
that stops early, ``owner upload`` given one image file, ``server stop`` with nothing running, and
``evaluate`` printing its data line once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from PIL import Image

from dlheir.errors import UserError
from dlheir.procs import free_port


def _env(home: Path) -> dict:
    """The parent's environment less every DLHEIR_ and XDG_ variable, the per-user folders in
    ``home`` and the services on closed ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLHEIR_", "XDG_"))}
    env.update(HOME=str(home), DLHEIR_HOME=str(home / "keys"), DLHEIR_STATE=str(home / "state"),
               DLHEIR_SERVER=f"127.0.0.1:{free_port()}", DLHEIR_TRITON=f"127.0.0.1:{free_port()}")
    return env


def _dlheir(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dlheir", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(home), cwd=home, stdin=subprocess.DEVNULL)


# --- 1. status against a gRPC server that is not the dlheir cloud server -----------------------
@pytest.fixture
def bare_health_server():
    """A gRPC server on a free loopback port with the standard health service only: it answers
    SERVING for the server as a whole, as any gRPC server with health checking does."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_status_says_a_foreign_grpc_server_is_not_a_dlheir_cloud_server(tmp_path, bare_health_server):
    proc = _dlheir(tmp_path, "status", "--server", bare_health_server)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cloud server"))
    assert bare_health_server in line and "not a dlheir cloud server" in line, line
    assert " up " not in line and "DOWN" in line, line
    assert "Traceback" not in proc.stderr


def test_status_still_reports_the_real_cloud_server_up(tmp_path, cloud_server):
    proc = _dlheir(tmp_path, "status", "--server", cloud_server.address, "--json")
    server = json.loads(proc.stdout)["server"]
    assert server["up"] is True and server["detail"] == "serving", server



def test_status_says_tritons_port_is_not_a_dlheir_cloud_server(tmp_path, triton_server):
    """Triton answers a health check SERVING for any service name: the token-less call only our
    server has (UNAUTHENTICATED there, UNIMPLEMENTED at Triton) tells them apart."""
    proc = _dlheir(tmp_path, "status", "--server", triton_server.grpc_url, "--triton", triton_server.grpc_url)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cloud server"))
    assert "not a dlheir cloud server" in line and "DOWN" in line, line


# --- 2. a reader that stops early (| head) -------------------------------------------------------
def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """The reader is gone before the command writes (``| head`` that already has its lines): no
    BrokenPipeError traceback, no "Exception ignored" line, exit 141 (128 + SIGPIPE)."""
    tmp_path.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "dlheir", "status"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    proc.stderr.close()
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert code == 141, (code, err)


def test_head_of_a_pipeline_reads_one_line(tmp_path):
    proc = subprocess.run(f"'{sys.executable}' -m dlheir status | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, env=_env(tmp_path), cwd=tmp_path)
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr, proc


# --- 3. owner upload given one image file --------------------------------------------------------
def test_image_files_accepts_one_image_file(tmp_path):
    from dlheir.client.owner import image_files

    img = tmp_path / "photos" / "cat.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    assert image_files(img) == [("cat.png", img.resolve())]
    assert image_files(img.parent) == [("cat.png", img.resolve())]  # the folder, as before

    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(UserError, match="not an image file"):
        image_files(text)
    with pytest.raises(UserError, match="not found"):
        image_files(tmp_path / "missing")


def test_owner_upload_of_one_file_goes_past_the_file_listing(tmp_path, cloud_server):
    """Through the CLI: with a key and a collection, ``owner upload FILE`` reaches Triton (closed
    here) instead of stopping at "folder not found"."""
    home = tmp_path / "home"
    assert _dlheir(home, "owner", "init").returncode == 0
    made = _dlheir(home, "owner", "create-collection", "c1", "--bits", "64", "--server", cloud_server.address,
                   "--admin-token-file", str(cloud_server.data_dir / "admin.token"))
    assert made.returncode == 0, made.stderr
    img = tmp_path / "one.png"
    Image.new("RGB", (32, 32)).save(img)
    proc = _dlheir(home, "owner", "upload", str(img), "--collection", "c1", "--server", cloud_server.address)
    assert "not found" not in proc.stderr and "folder" not in proc.stderr, proc.stderr
    assert "cannot reach Triton" in proc.stderr, proc.stderr


# --- 4. server stop with nothing running -----------------------------------------------------------
def test_server_stop_with_nothing_running_is_not_an_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    proc = _dlheir(tmp_path / "home", "server", "stop", "--data-dir", str(data))
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert f"no server is running on {data}" in proc.stdout
    assert proc.stderr == ""


def test_server_stop_with_a_stale_pid_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / "server.pid").write_text(str(dead.pid))
    proc = _dlheir(tmp_path / "home", "server", "stop", "--data-dir", str(data))
    assert proc.returncode == 0 and f"no server is running on {data}" in proc.stdout, (proc.stdout, proc.stderr)
    assert not (data / "server.pid").exists()


# --- 5. evaluate prints its data line once --------------------------------------------------------
def test_evaluate_prints_its_data_line_once(tmp_path, digits_small):
    """A checkpoint recording its data folder (an untrained deterministic model: no training)."""
    from dlheir.export.checkpoint import save_checkpoint
    from dlheir.export.data import split_dataset
    from helpers import SMALL_SIZE, margined_model

    _, _, class_names = split_dataset(digits_small)
    ckpt = save_checkpoint(tmp_path / "model.pt", margined_model(num_classes=len(class_names)),
                           {"image_size": SMALL_SIZE, "class_names": class_names, "epoch": 0,
                            "config": {"seed": 0, "data": str(digits_small)}})
    proc = _dlheir(tmp_path / "home", "evaluate", "--checkpoint", str(ckpt), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data_lines = [x for x in proc.stdout.splitlines() if x.startswith("data:")]
    assert data_lines == [f"data: {digits_small} (recorded in the checkpoint; --data to use another)"], proc.stdout

    as_json = _dlheir(tmp_path / "home", "evaluate", "--checkpoint", str(ckpt), "--json", timeout=300)
    assert json.loads(as_json.stdout)["data_source"] == "recorded in the checkpoint"  # stdout is only the JSON
