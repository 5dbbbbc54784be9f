"""The server's Prometheus endpoint (--metrics-port) and JSON logs (--log-format json).

Each test runs a real server subprocess on loopback, makes known calls, scrapes
http://127.0.0.1:PORT/metrics with urllib and parses it with prometheus-client's parser.
"""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.server.app import read_ready
from dlheir.server.testing import CloudServerProcess

pytestmark = pytest.mark.slow

N_ITEMS = 5
CODE_BYTES = 6  # 48 bits


def _scrape(port: int, tls_ca=None) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} of one scrape (https with ``tls_ca``)."""
    import ssl

    scheme, context = ("https", ssl.create_default_context(cafile=str(tls_ca))) if tls_ca else ("http", None)
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=10, context=context) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == want for k, want in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def _calls(server: CloudServerProcess) -> tuple[str, str]:
    """Create a collection, upload N_ITEMS, search once, and make one call with a bad token.
    Returns (owner token, reader token)."""
    with CloudClient(server.address) as admin:
        owner_token, reader_token = admin.create_collection("pics", 48, server.admin_token)
    codes = np.random.default_rng(0).integers(0, 256, (N_ITEMS, CODE_BYTES), dtype=np.uint8)
    with CloudClient(server.address, owner_token) as owner:
        list(owner.upload("pics", [(i, codes[i].tobytes(), b"blob", {}) for i in range(N_ITEMS)]))
    with CloudClient(server.address, reader_token) as reader:
        (ids, _), = reader.search("pics", codes[:1], 3)
        assert ids[0] == 0
    with CloudClient(server.address, "not-a-token-at-all-xyz") as bad:
        with pytest.raises(CloudError) as info:
            bad.stats("pics")
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    return owner_token, reader_token


def test_metrics_reflect_the_calls(tmp_path):
    with CloudServerProcess(tmp_path / "d", extra_args=["--metrics-port", "0"]) as server:
        ready = read_ready(server.data_dir / "server.ready")
        port = ready["metrics_port"]
        assert isinstance(port, int) and port > 0 and port != server.port
        assert _listening_ports(server.process.pid) == {server.port, port}

        before = _scrape(port)  # nothing of ours yet (the launcher's health checks, if any, only)
        for method in ("CreateCollection", "Upload", "Search", "CollectionStats"):
            assert _value(before, "dlheir_requests_total", method=method) == 0
        assert _value(before, "dlheir_streams_active") == 0
        # exported from the start, at 0 (rate() and alerts need the series)
        assert sorted(ls["kind"] for ls, _ in before["dlheir_store_errors_total"]) == [
            "corrupt", "full", "gone", "unavailable"]

        _calls(server)
        after = _scrape(port)

        total = "dlheir_requests_total"
        assert _value(after, total, method="CreateCollection", code="OK") == 1
        assert _value(after, total, method="Upload", code="OK") == 1
        assert _value(after, total, method="Search", code="OK") == 1
        assert _value(after, total, method="CollectionStats", code="UNAUTHENTICATED") == 1
        assert _value(after, total, method="CollectionStats", code="OK") == 0
        ours = {"CreateCollection", "Upload", "Search", "CollectionStats"}
        assert sum(v for ls, v in after[total] if ls["method"] in ours) == 4
        # every call counted is timed once, refusals included
        assert _value(after, "dlheir_request_seconds_count", method="Search") == 1
        assert _value(after, "dlheir_request_seconds_count", method="CollectionStats") == 1
        assert _value(after, "dlheir_request_seconds_bucket", method="Search", le="+Inf") == 1
        assert 0 < _value(after, "dlheir_request_seconds_sum", method="Search") < 10
        les = sorted(float(ls["le"]) for ls, _ in after["dlheir_request_seconds_bucket"] if ls["method"] == "Search")
        assert les[0] == 0.0005 and les[-2] == 10.0 and les[-1] == float("inf")

        assert _value(after, "dlheir_collection_items", collection="pics") == N_ITEMS
        assert _value(after, "dlheir_index_info", collection="pics", kind="flat") == 1
        assert _value(after, "dlheir_index_bytes", collection="pics") >= N_ITEMS * CODE_BYTES
        assert _value(after, "dlheir_streams_active") == 0
        assert sum(v for _, v in after["dlheir_store_errors_total"]) == 0
        assert _value(after, "process_resident_memory_bytes") > 0
        assert _value(after, "process_open_fds") > 0

        # a deleted collection leaves the gauges
        with CloudClient(server.address) as admin:
            admin.delete_collection("pics", server.admin_token)
        gone = _scrape(port)
        assert not [ls for ls, _ in gone.get("dlheir_collection_items", []) if ls.get("collection") == "pics"]
        assert _value(gone, total, method="DeleteCollection", code="OK") == 1


def test_metrics_off_by_default(tmp_path):
    with CloudServerProcess(tmp_path / "d") as server:
        ready = read_ready(server.data_dir / "server.ready")
        assert "metrics_port" not in ready
        assert "Prometheus metrics on" not in (server.data_dir / "server.log").read_text()
        assert _listening_ports(server.process.pid) == {server.port}  # the gRPC port only


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (Linux: its socket fds matched against /proc/net/tcp*)."""
    import os
    from pathlib import Path

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_json_logs(tmp_path):
    with CloudServerProcess(tmp_path / "d", extra_args=["--log-format", "json", "--log-level", "DEBUG"]) as server:
        owner_token, reader_token = _calls(server)
        admin_token = server.admin_token
    lines = (server.data_dir / "server.log").read_text().splitlines()
    assert len(lines) >= 3  # starting, index ready, listening, ... stopped
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert record["time"].endswith("Z") and record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    messages = [r["message"] for r in records]
    assert any("listening on" in m for m in messages) and messages[-1] == "stopped"
    refused = [r for r in records if r["level"] == "WARNING" and "UNAUTHENTICATED" in r["message"]]
    assert len(refused) == 1 and refused[0]["logger"] == "dlheir.server.calls"
    text = "\n".join(lines)
    for secret in (admin_token, owner_token, reader_token, "not-a-token-at-all-xyz"):
        assert secret not in text


@pytest.mark.embedded_store  # fills the SQLite store's own file up to its quota
def test_store_full_is_counted(tmp_path):
    with CloudServerProcess(tmp_path / "d", extra_args=["--metrics-port", "0", "--max-store-mb", "2"]) as server:
        port = read_ready(server.data_dir / "server.ready")["metrics_port"]
        with CloudClient(server.address) as admin:
            owner_token, _ = admin.create_collection("c", 48, server.admin_token)
        with CloudClient(server.address, owner_token) as owner:
            with pytest.raises(CloudError) as info:
                list(owner.upload("c", [(1, bytes(CODE_BYTES), bytes(3 * 1024 * 1024), {})]))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        samples = _scrape(port)
        assert _value(samples, "dlheir_store_errors_total", kind="full") == 1
        assert _value(samples, "dlheir_store_errors_total", kind="corrupt") == 0
        assert _value(samples, "dlheir_requests_total", method="Upload", code="RESOURCE_EXHAUSTED") == 1
        assert _value(samples, "dlheir_collection_items", collection="c") == 0


def test_metrics_over_tls_with_the_servers_certificate(tmp_path):
    import shutil

    from dlheir.server.testing import self_signed_certificate

    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    cert, key = self_signed_certificate(tmp_path)
    with CloudServerProcess(tmp_path / "d", extra_args=["--metrics-port", "0"], tls_cert=cert, tls_key=key) as server:
        port = read_ready(server.data_dir / "server.ready")["metrics_port"]
        with pytest.raises(Exception):  # no plain-HTTP answer from a TLS server's metrics port
            _scrape(port)
        assert "dlheir_streams_active" in _scrape(port, tls_ca=cert)


def test_bad_metrics_port_is_refused_in_json(tmp_path):
    import socket
    import subprocess
    import sys

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for port, says in ((70000, "--metrics-port must be from 0 to 65535"),
                           (busy.getsockname()[1], "--metrics-port: cannot bind")):
            proc = subprocess.run([sys.executable, "-m", "dlheir.server", "--data-dir", str(tmp_path / "d"),
                                   "--port", "0", "--metrics-port", str(port), "--log-format", "json"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2, proc.stderr
            records = [json.loads(line) for line in proc.stderr.strip().splitlines()]  # every line JSON
            # a bad value is refused before anything starts; a busy port (bound, like the gRPC port, once the
            # store is open) after the start's records
            assert len(records) == 1 or port != 70000, records
            assert records[-1]["level"] == "ERROR" and says in records[-1]["message"], records
    finally:
        busy.close()
