"""Shared fixtures: a small real image set, a deterministic model, real servers on loopback.

Fixtures only: the plain helpers they use (and tests import) are in tests/helpers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import SMALL_SIZE, make_digit_folder, margined_model

@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """The launcher's state and the exports go to a temporary folder, never the user's."""
    old = os.environ.get("DLHEIR_STATE")
    os.environ["DLHEIR_STATE"] = str(tmp_path_factory.mktemp("dlheir_state"))
    yield Path(os.environ["DLHEIR_STATE"])
    if old is None:
        os.environ.pop("DLHEIR_STATE", None)
    else:
        os.environ["DLHEIR_STATE"] = old


ENGINES_ENV = "DLHEIR_TEST_ENGINES"  # "1": every test cloud server runs on PostgreSQL + Ceph RGW


@pytest.fixture(scope="session", autouse=True)
def _engines_mode():
    """With $DLHEIR_TEST_ENGINES=1 (``make test-engines``), start PostgreSQL and Ceph RGW once and
    make every CloudServerProcess use them (dlheir.server.testing.engines_for: a database and a
    bucket per data dir); tests of the embedded store's own file are skipped (marker embedded_store)."""
    if os.environ.get(ENGINES_ENV) != "1":
        yield None
        return
    from engines import PostgresEngine, S3Engine

    from dlheir.server.testing import TEST_PG_ENV, TEST_S3_ENV

    with PostgresEngine() as pg, S3Engine() as s3:
        saved = {k: os.environ.get(k) for k in (TEST_PG_ENV, TEST_S3_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update({TEST_PG_ENV: pg.dsn.rsplit("/", 1)[0], TEST_S3_ENV: s3.endpoint,
                           "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
        try:
            yield pg, s3
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    if os.environ.get(ENGINES_ENV) == "1":
        skip = pytest.mark.skip(reason="tests the embedded SQLite store's own file (not used with --store)")
        for item in items:
            if "embedded_store" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    return make_digit_folder(tmp_path_factory.mktemp("digits_small"))


@pytest.fixture(scope="session")
def served_model(tmp_path_factory, digits_small):
    """A checkpoint, its ONNX graph, a model repository generated for it (backend onnx-cpu), and the paths."""
    from dlheir.export.checkpoint import save_checkpoint
    from dlheir.export.data import split_dataset
    from dlheir.export.onnx_export import export_onnx
    from dlheir.triton.repository import prepare_repository

    work = tmp_path_factory.mktemp("served_model")
    _, _, class_names = split_dataset(digits_small)
    model = margined_model(num_classes=len(class_names))
    ckpt = save_checkpoint(work / "model.pt", model, {"image_size": SMALL_SIZE, "class_names": class_names,
                                                       "epoch": 0, "config": {"seed": 0}})
    onnx_path = export_onnx(model, work / "model.onnx", SMALL_SIZE)
    served = prepare_repository(work / "model_repository", onnx_path, "onnx-cpu")
    return {"checkpoint": ckpt, "onnx": onnx_path, "repo": served.path, "served": served, "model": model,
            "work": work}


@pytest.fixture(scope="session")
def triton_server(served_model):
    """A real tritonserver on free loopback ports, stopped at the end of the session."""
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer

    server = TritonServer(served_model["repo"], grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port(), state_dir=served_model["work"] / "triton")
    with server:
        yield server


@pytest.fixture
def cloud_server(tmp_path):
    """A real cloud server subprocess on a free loopback port with an empty data dir."""
    from dlheir.server.testing import run_cloud_server

    with run_cloud_server(tmp_path / "cloud") as server:
        yield server


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs) that fills up: needs root and mount; skipped otherwise."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the --max-store-mb test covers SQLITE_FULL")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def client_setup(tmp_path, monkeypatch, triton_server, cloud_server, digits_small):
    """A clean key folder whose config file names the test's servers (nothing else configured), the
    working folder a fresh one, and a copy of the digit images: {"home", "images", "cloud", "triton"}."""
    import shutil

    from dlheir import config

    for var in [*config.ENV.values(), config.CONFIG_ENV]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    (home / "config.toml").write_text(
        f'server = "{cloud_server.address}"\ntriton = "{triton_server.grpc_url}"\n'
        f'admin_token_file = "{cloud_server.data_dir / "admin.token"}"\n')
    images = shutil.copytree(digits_small, tmp_path / "images")
    return {"home": home, "images": images, "cloud": cloud_server, "triton": triton_server}
