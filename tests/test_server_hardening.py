"""The cloud server against hostile clients and broken disks (issue 9, items 1-12).

Every test runs a real server subprocess on loopback. Figures (latency with idle streams open,
RSS growth of the largest allowed Search and Fetch) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.proto import dlheir_cloud_pb2 as pb
from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc
from dlheir.server.service import MAX_RESULTS
from dlheir.procs import free_port
from dlheir.server.testing import CloudServerProcess, proc_status_bytes, self_signed_certificate

MiB = 1024 * 1024


def _status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CloudError) as info:
        fn()
    return info.value.code, info.value.details


def _collection(server, name="c", bits=48) -> tuple[CloudClient, CloudClient]:
    with CloudClient(server.address) as admin:
        owner, reader = admin.create_collection(name, bits, server.admin_token)
    return CloudClient(server.address, owner), CloudClient(server.address, reader)


def _run_server(data_dir: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A server that is expected to refuse to start: its exit code and output."""
    return subprocess.run([sys.executable, "-m", "dlheir.server", "--data-dir", str(data_dir),
                           "--port", str(free_port()), *extra], capture_output=True, text=True, timeout=timeout)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    folder.mkdir(parents=True, exist_ok=True)
    return self_signed_certificate(folder)


def _one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _rss_peak_reset(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns the current RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return proc_status_bytes(pid, "VmRSS")


# --- 1. unauthenticated / idle streams -----------------------------------------------------

def _silent_upload(channel: grpc.Channel, token: str | None, release: threading.Event):
    """Open an Upload stream that sends nothing until ``release`` is set."""
    def requests():
        release.wait()
        return
        yield  # unreachable: makes this a generator

    md = [("authorization", f"Bearer {token}")] if token else None
    return pb_grpc.CloudStoreStub(channel).Upload(requests(), metadata=md)


def test_idle_unauthenticated_streams_cannot_hold_the_workers(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    workers = 2
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--workers", str(workers)]) as server:
        owner, reader = _collection(server)
        list(owner.upload("c", [(1, bytes(6), b"x", {})]))
        release = threading.Event()
        channel = grpc.insecure_channel(server.address)
        try:
            streams = [_silent_upload(channel, token, release) for token in [None, "garbage-token"] * (2 * workers)]
            time.sleep(0.5)  # the streams are open and silent
            health = health_pb2_grpc.HealthStub(channel)
            t0 = time.perf_counter()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            t_health = time.perf_counter() - t0
            t0 = time.perf_counter()
            (ids, _), = reader.search("c", np.zeros((1, 6), np.uint8), 1)
            t_search = time.perf_counter() - t0
            print(f"\n{len(streams)} idle unauthenticated streams open, {workers} workers: "
                  f"Health {t_health * 1e3:.1f} ms, Search {t_search * 1e3:.1f} ms")
            assert status.status == health_pb2.HealthCheckResponse.SERVING and list(ids) == [1]
            # each stream was refused at once, before any message was read
            for stream in streams:
                assert stream.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            release.set()
            channel.close()


def test_idle_authenticated_stream_is_cancelled(tmp_path):
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--stream-idle-timeout", "1"]) as server:
        owner, _ = _collection(server)
        release = threading.Event()
        watchdog = threading.Timer(30, release.set)  # a server that never cancels: the stream ends OK, the test fails
        watchdog.daemon = True
        watchdog.start()
        with grpc.insecure_channel(server.address) as channel:
            stream = _silent_upload(channel, owner.token, release)
            code = stream.code()  # blocks until the server ends the stream
            release.set()
        assert code == grpc.StatusCode.CANCELLED
        # the worker is free again and the server answers
        list(owner.upload("c", [(1, bytes(6), b"x", {})]))
        assert owner.contains("c", [1]) == {1}
        assert "no message for 1 s, stream cancelled" in (server.data_dir / "server.log").read_text()


# --- 2, 3. bounded Search and Fetch ----------------------------------------------------------

def test_search_work_is_bounded_and_the_largest_allowed_search_fits(tmp_path):
    rng = np.random.default_rng(0)
    n = 20_000
    codes = rng.integers(0, 256, (n, 6), dtype=np.uint8)
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, reader = _collection(server)
        list(owner.upload("c", ((i, codes[i], b"", {}) for i in range(n)), batch_size=5000))
        code, msg = _status(lambda: reader.search("c", codes[:1000], 10_000))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_RESULTS) in msg and "1000 queries" in msg
        for nq, k in ((MAX_RESULTS // 10_000, 10_000), (10_000, MAX_RESULTS // 10_000)):
            before = _rss_peak_reset(server.process.pid)
            results = reader.search("c", codes[:nq], k)
            growth = proc_status_bytes(server.process.pid, "VmHWM") - before
            print(f"\nSearch {nq} queries x k={k} on {n} codes: server peak RSS +{growth / MiB:.0f} MiB")
            assert len(results) == nq and all(len(ids) == k for ids, _ in results)
            assert growth <= 256 * MiB
        # exact: the first query's top k equals a brute-force ranking by (distance, id)
        dist = np.unpackbits(codes ^ codes[0], axis=1).sum(1)
        want = np.lexsort((np.arange(n), dist))[:k]
        assert list(results[0][0]) == list(want)


def test_chunked_merge_equals_one_pass(monkeypatch):
    """Searching queries in chunks (to bound memory) gives exactly the one-pass results."""
    from dlheir.server import index as index_mod

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, (3000, 6), dtype=np.uint8)  # tie-heavy
    idx = index_mod.BinaryIndex(48, n_shards=3)
    idx.add(np.arange(3000), codes)
    queries = codes[:37]
    one_pass = idx.search(queries, 25)
    monkeypatch.setattr(index_mod, "MERGE_BUDGET", 1)  # one query per chunk
    chunked = idx.search(queries, 25)
    for (a_ids, a_d), (b_ids, b_d) in zip(one_pass, chunked):
        assert list(a_ids) == list(b_ids) and list(a_d) == list(b_d)


def test_fetch_streams_blobs_one_at_a_time(tmp_path):
    n, size = 20, 16 * MiB
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, reader = _collection(server)
        blobs = {i: bytes([i]) * size for i in range(n)}
        list(owner.upload("c", ((i, bytes(6), blobs[i], {}) for i in range(n)), batch_size=3))
        before = _rss_peak_reset(server.process.pid)
        got = 0
        for item_id, blob, _ in reader.fetch("c", list(range(n))):
            assert blob == blobs[item_id]
            got += 1
        growth = proc_status_bytes(server.process.pid, "VmHWM") - before
        print(f"\nFetch of {n} blobs of {size // MiB} MiB ({n * size // MiB} MiB): server peak RSS "
              f"+{growth / MiB:.0f} MiB")
        assert got == n and growth <= 256 * MiB


# --- 4, 5. data safety at start ---------------------------------------------------------------

def test_second_server_on_the_same_data_dir_is_refused(tmp_path):
    with CloudServerProcess(tmp_path / "cloud") as server:
        line = _one_line_refusal(_run_server(server.data_dir))
        assert f"pid {server.process.pid}" in line and "in use" in line
        # also through the CLI's foreground start
        proc = subprocess.run([sys.executable, "-m", "dlheir.cli", "server", "start", "--foreground",
                               "--data-dir", str(server.data_dir), "--port", str(free_port())],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"pid {server.process.pid}" in proc.stderr


def _filled_store(data_dir: Path, n: int = 2000) -> None:
    with CloudServerProcess(data_dir) as server:
        owner, _ = _collection(server)
        rng = np.random.default_rng(2)
        list(owner.upload("c", ((i, bytes(6), rng.bytes(1024), {}) for i in range(n)), batch_size=500))


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_emptied_or_missing_store_is_refused(tmp_path):
    data = tmp_path / "cloud"
    _filled_store(data, n=10)
    store = data / "store.sqlite3"
    store.write_bytes(b"")
    line = _one_line_refusal(_run_server(data))
    assert str(store) in line and "empty" in line and "move" in line
    store.unlink()
    line = _one_line_refusal(_run_server(data))
    assert str(store) in line and "missing" in line
    # a new data dir still starts (and makes its store)
    with CloudServerProcess(tmp_path / "new") as server:
        assert (server.data_dir / "store.sqlite3").stat().st_size > 0


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_damaged_store_is_refused(tmp_path):
    data = tmp_path / "cloud"
    _filled_store(data)
    store = data / "store.sqlite3"
    size = store.stat().st_size
    with open(store, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(3).bytes(64 * 1024))
    line = _one_line_refusal(_run_server(data))
    assert str(store) in line and ("integrity" in line or "damaged" in line) and "backup" in line


def _damage_table_page(store: Path) -> None:
    """Break one leaf page of the items table (its cell pointers): SQLite's quick_check finds it,
    but rebuilding the index never reads it (the codes come from the covering index)."""
    import sqlite3

    conn = sqlite3.connect(store)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = 'items' AND pagetype = 'leaf' "
                                        "ORDER BY pageno")]
    conn.close()
    with open(store, "r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * page_size + 8)  # past the leaf header: the cell pointer array
        f.write(b"\xff" * 64)


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_damage_only_the_integrity_check_finds_is_refused(tmp_path):
    """quick_check runs beside the index load: a store it finds damaged is still refused, whether
    the index came from a snapshot or was rebuilt, and no snapshot is taken of it."""
    from dlheir.server.snapshot import snapshot_path

    data = tmp_path / "cloud"
    _filled_store(data)
    store, snap = data / "store.sqlite3", snapshot_path(data, "c")
    assert snap.exists()  # written at the clean stop
    _damage_table_page(store)
    for case in ("snapshot", "rebuild"):
        if case == "rebuild":
            snap.unlink()
        line = _one_line_refusal(_run_server(data))
        assert str(store) in line and "integrity check" in line and "backup" in line, (case, line)
        assert not (data / "server.ready").exists()
    assert not snap.exists()  # the index rebuilt from the damaged store was not snapshotted
    # the damage is one the load itself does not notice: without the check the server serves
    with CloudServerProcess(data, extra_args=["--skip-integrity-check"]):
        assert "'c' 2000 items" in (data / "server.log").read_text().split("index ready in")[-1]


def _fill_until_full(owner: CloudClient, start: int = 0, blob: int = 256 * 1024) -> tuple[list[int], str]:
    """Upload batches until the server answers RESOURCE_EXHAUSTED; returns (acked ids, message)."""
    acked: list[int] = []
    rng = np.random.default_rng(4)
    i = start
    while i < start + 10_000:
        try:
            for ack in owner.upload("c", [(i + j, bytes(6), rng.bytes(blob), {}) for j in range(4)], batch_size=4):
                acked += list(ack.ids)
        except CloudError as exc:
            assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return acked, exc.details
        i += 4
    raise AssertionError("the store never filled up")


def _full_store_behaves(server, owner, reader, message: str, acked: list[int]) -> None:
    # the client learns what is wrong, not where the server keeps its files; the log names the file
    assert "full" in message and "server's store" in message and "cannot rollback" not in message
    assert str(server.data_dir) not in message
    assert acked and owner.contains("c", acked) == set(acked)  # nothing acknowledged was lost
    assert len(list(reader.fetch("c", acked[:3]))) == 3  # reads keep working
    assert len(reader.search("c", np.zeros((1, 6), np.uint8), 5)[0][0]) == 5
    log = (server.data_dir / "server.log").read_text()
    assert "RESOURCE_EXHAUSTED" in log and "full" in log and "store.sqlite3" in log


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_store_quota_full_is_resource_exhausted_and_loses_nothing(tmp_path):
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--max-store-mb", "4"]) as server:
        owner, reader = _collection(server)
        acked, message = _fill_until_full(owner)
        _full_store_behaves(server, owner, reader, message, acked)
        assert owner.delete("c", acked[:8]) == 8  # deleting is still possible, and frees room
        more, _ = _fill_until_full(owner, start=100_000)
        assert more
    with CloudServerProcess(tmp_path / "cloud") as server:  # and all of it survives a restart
        owner = CloudClient(server.address, owner.token)
        assert owner.contains("c", acked[8:] + more) == set(acked[8:] + more)


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_real_disk_full_is_resource_exhausted_and_loses_nothing(tiny_disk):
    with CloudServerProcess(tiny_disk / "cloud") as server:
        # the log goes to the full disk too; write it elsewhere is not needed for the checks
        owner, reader = _collection(server)
        acked, message = _fill_until_full(owner, blob=128 * 1024)
        assert "full" in message and "cannot rollback" not in message
        assert owner.contains("c", acked) == set(acked)
        assert len(list(reader.fetch("c", acked[:3]))) == 3
    for leftover in tiny_disk.glob("cloud/*.log"):  # make room for the restart's log line
        leftover.write_text("")
    with CloudServerProcess(tiny_disk / "cloud") as server:
        owner = CloudClient(server.address, owner.token)
        assert owner.contains("c", acked) == set(acked)


# --- 7-11. protocol hygiene ------------------------------------------------------------------

def test_collection_names_cannot_be_probed(cloud_server):
    owner, _ = _collection(cloud_server, "photos")
    _collection(cloud_server, "other")
    for token in ("garbage", owner.token):  # an unknown token, and a token of another collection
        client = CloudClient(cloud_server.address, token)
        code_a, msg_a = _status(lambda: client.stats("other"))
        code_b, msg_b = _status(lambda: client.stats("missing"))
        assert code_a == code_b == grpc.StatusCode.UNAUTHENTICATED
        assert msg_a.replace("other", "X") == msg_b.replace("missing", "X")


def test_names_match_whole_and_echoes_are_clipped(cloud_server):
    admin = CloudClient(cloud_server.address, cloud_server.admin_token)
    admin.create_collection("photos", 48, cloud_server.admin_token)
    code, _ = _status(lambda: admin.create_collection("photos\n", 48, cloud_server.admin_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    huge = "a" * 1_000_000
    code, msg = _status(lambda: admin.create_collection(huge + "!", 48, cloud_server.admin_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(msg) < 400 and "1000001 characters" in msg
    code, msg = _status(lambda: admin.stats(huge))
    assert code == grpc.StatusCode.NOT_FOUND and len(msg) < 400


def test_empty_upload_batch_is_acknowledged(cloud_server):
    owner, _ = _collection(cloud_server)
    with grpc.insecure_channel(cloud_server.address) as channel:
        acks = list(pb_grpc.CloudStoreStub(channel).Upload(
            iter([pb.UploadBatch(collection="c"), pb.UploadBatch(collection="c", items=[pb.UploadItem(id=5, code=bytes(6))]),
                  pb.UploadBatch(collection="c")]),
            metadata=[("authorization", f"Bearer {owner.token}")]))
    assert [(a.batch, list(a.ids), a.total_items) for a in acks] == [(0, [], 0), (1, [5], 1), (2, [], 1)]


def test_bad_tls_certificate_or_key_is_named(tmp_path):
    cert_a, key_a = _self_signed(tmp_path / "a")
    cert_b, key_b = _self_signed(tmp_path / "b")
    line = _one_line_refusal(_run_server(tmp_path / "d1", "--tls-cert", str(cert_a), "--tls-key", str(key_b)))
    assert "not the private key" in line and "port" not in line
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = _one_line_refusal(_run_server(tmp_path / "d2", "--tls-cert", str(garbage), "--tls-key", str(key_a)))
    assert "not a PEM" in line and "port" not in line


# --- 12. logging -------------------------------------------------------------------------------

def test_failed_calls_are_logged_without_tokens(tmp_path):
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--log-level", "INFO"]) as server:
        owner, reader = _collection(server)
        list(owner.upload("c", [(1, bytes(6), b"x", {}), (2, bytes(6), b"y", {})]))
        owner.delete("c", [2])
        _status(lambda: CloudClient(server.address, "secret-garbage-token").stats("c"))
        _status(lambda: reader.delete("c", [1]))
        _status(lambda: owner.search("c", np.zeros((1, 5), np.uint8), 1))
    log = (server.data_dir / "server.log").read_text()
    assert "listening on" in log and "stopped" in log
    assert "collection 'c' created" in log and "1 of 1 id(s) deleted" in log
    assert "CollectionStats -> UNAUTHENTICATED from ipv4:127.0.0.1" in log
    assert "Delete -> PERMISSION_DENIED" in log and "Search -> INVALID_ARGUMENT" in log
    for secret in ("secret-garbage-token", owner.token, reader.token, server.admin_token):
        assert secret not in log


def test_calls_in_progress_are_bounded(tmp_path):
    """Past --max-concurrent-rpcs calls in progress, a new call is refused at once."""
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--max-concurrent-rpcs", "2"]) as server:
        owner, reader = _collection(server)
        release = threading.Event()
        with grpc.insecure_channel(server.address) as channel:
            streams = [_silent_upload(channel, owner.token, release) for _ in range(2)]
            time.sleep(0.5)  # both held open by an authorised, silent client
            code, msg = _status(lambda: reader.search("c", np.zeros((1, 6), np.uint8), 1))
            release.set()
            for stream in streams:
                stream.code()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reader.search("c", np.zeros((1, 6), np.uint8), 1)[0][0].size == 0  # served again once they end
