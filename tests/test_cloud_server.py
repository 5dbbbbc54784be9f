import filecmp
import threading
import time

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.procs import free_port
from dlheir.server.testing import CloudServerProcess, self_signed_certificate


def _random_codes(rng, n, bits, distinct=None):
    codes = rng.integers(0, 256, (n, (bits + 7) // 8), dtype=np.uint8)
    if bits % 8:
        codes[:, -1] &= (0xFF << (8 - bits % 8)) & 0xFF
    if distinct:
        codes = codes[rng.integers(0, distinct, n)]
    return codes


def _owner(server, name="c", bits=48):
    admin = CloudClient(server.address)
    owner, reader = admin.create_collection(name, bits, server.admin_token)
    admin.close()
    return CloudClient(server.address, owner), CloudClient(server.address, reader)


def test_stubs_are_current(tmp_path):
    from dlheir.proto import generate

    for path in generate.generate(tmp_path):
        committed = generate.HERE / path.name
        assert filecmp.cmp(path, committed, shallow=False), f"{committed.name} is stale: run python -m dlheir.proto.generate"


def test_round_trip(cloud_server):
    owner, reader = _owner(cloud_server)
    items = [(i, bytes([i] * 6), f"blob-{i}".encode() * 10, {"n": str(i)}) for i in range(50)]
    acks = list(owner.upload("c", items, batch_size=16))
    assert [len(a.ids) for a in acks] == [16, 16, 16, 2] and acks[-1].total_items == 50
    (ids, dist), = reader.search("c", np.array([[7] * 6], np.uint8), k=3)
    assert ids[0] == 7 and dist[0] == 0
    fetched = list(reader.fetch("c", [3, 9]))
    assert fetched == [(3, items[3][2], {"n": "3"}), (9, items[9][2], {"n": "9"})]
    assert owner.delete("c", [7, 8]) == 2
    (ids, _), = reader.search("c", np.array([[7] * 6], np.uint8), k=50)
    assert 7 not in ids and 8 not in ids and len(ids) == 48
    assert list(reader.fetch("c", [7])) == []
    assert owner.stats("c").items == 48
    assert owner.contains("c", [1, 7, 9]) == {1, 9}
    assert [c.name for c in reader.list_collections()] == ["c"]


@pytest.mark.parametrize("bits,distinct", [(12, None), (48, None), (64, None), (48, 4), (12, 3)])
def test_search_equals_brute_force(cloud_server, bits, distinct):
    rng = np.random.default_rng(bits + (distinct or 0))
    codes = _random_codes(rng, 3000, bits, distinct)
    ids = rng.choice(2**62, size=len(codes), replace=False)
    owner, _ = _owner(cloud_server, bits=bits)
    list(owner.upload("c", [(int(i), c.tobytes(), b"x", {}) for i, c in zip(ids, codes)], batch_size=700))
    queries = np.concatenate([_random_codes(rng, 5, bits), codes[:3]])
    for k in (1, 20, 100):
        results = owner.search("c", queries, k)
        brute = hamming(queries, codes)
        for q, (got_ids, got_d) in enumerate(results):
            order = rank(brute[q], ids)[:k]
            np.testing.assert_array_equal(got_ids, ids[order])
            np.testing.assert_array_equal(got_d, brute[q][order])
    (got_ids, got_d), = owner.search("c", queries[:1], 100, max_distance=int(brute[0].min()) + 1)
    assert (got_d <= brute[0].min() + 1).all() and len(got_ids) == min(100, (brute[0] <= brute[0].min() + 1).sum())


def test_kill_9_during_upload_loses_no_acknowledged_item(tmp_path):
    server = CloudServerProcess(tmp_path / "cloud").start()
    owner, _ = _owner(server)
    rng = np.random.default_rng(0)
    blobs = {i: rng.bytes(2048) for i in range(20000)}
    acked: list[int] = []
    errors: list[Exception] = []

    def upload():
        try:
            for ack in owner.upload("c", ((i, bytes(6), blobs[i], {}) for i in blobs), batch_size=100):
                acked.extend(ack.ids)
        except CloudError as exc:
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # kill -9 in the middle of the stream
    thread.join(30)
    assert acked and len(acked) < len(blobs) and errors, "the kill should interrupt the upload"
    server = CloudServerProcess(tmp_path / "cloud").start()
    try:
        owner = CloudClient(server.address, owner.token)
        stored = owner.stats("c").items
        assert stored >= len(acked)
        assert stored % 100 == 0  # whole batches only, never part of one
        present = owner.contains("c", list(blobs))
        assert set(acked) <= present
        got = dict((i, b) for i, b, _ in owner.fetch("c", sorted(present)))
        assert set(got) == present and all(got[i] == blobs[i] for i in present)
        (ids, _), = owner.search("c", np.zeros((1, 6), np.uint8), k=len(present))
        assert set(ids.tolist()) == present  # every stored item has its code in the index
    finally:
        server.stop()


def _status(fn):
    with pytest.raises(CloudError) as info:
        fn()
    return info.value.code, info.value.details


def test_bad_inputs_get_precise_statuses(cloud_server):
    owner, reader = _owner(cloud_server)
    code, msg = _status(lambda: list(owner.upload("c", [(1, b"\x00" * 5, b"x", {})])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "code is 6 bytes" in msg and "5 bytes" in msg
    code, msg = _status(lambda: owner.search("nope", np.zeros((1, 6), np.uint8), 5))
    assert code == grpc.StatusCode.UNAUTHENTICATED  # a collection token cannot probe other names
    admin = CloudClient(cloud_server.address, cloud_server.admin_token)
    code, msg = _status(lambda: admin.stats("nope"))
    assert code == grpc.StatusCode.NOT_FOUND  # the admin may know every name
    for k in (0, 10**6):
        code, msg = _status(lambda: owner.search("c", np.zeros((1, 6), np.uint8), k))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "k must be" in msg
    code, msg = _status(lambda: list(owner.upload("c", [(2, bytes(6), b"x" * (33 * 1024 * 1024), {})])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg
    code, msg = _status(lambda: list(owner.upload("c", [(3, bytes(6), b"x" * (70 * 1024 * 1024), {})])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    list(owner.upload("c", [(10, bytes(6), b"a", {})]))
    code, msg = _status(lambda: list(owner.upload("c", [(10, bytes(6), b"b", {})])))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    list(owner.upload("c", [(10, bytes([1] * 6), b"b", {})], replace=True))
    assert [b for _, b, _ in owner.fetch("c", [10])] == [b"b"]
    # a bad item rejects its batch and keeps every batch acknowledged before it
    items = [(100 + i, bytes(6), b"ok", {}) for i in range(10)] + [(200, bytes(5), b"bad", {})]
    acks = []
    code, _ = _status(lambda: acks.extend(owner.upload("c", items, batch_size=5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert owner.contains("c", [100 + i for i in range(10)] + [200]) == {100 + i for i in range(10)}


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_tokens_are_enforced(cloud_server):
    owner, reader = _owner(cloud_server)
    list(owner.upload("c", [(1, bytes(6), b"x", {})]))
    code, _ = _status(lambda: list(reader.upload("c", [(2, bytes(6), b"x", {})])))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _status(lambda: reader.delete("c", [1]))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert len(reader.search("c", np.zeros((1, 6), np.uint8), 1)[0][0]) == 1
    stranger = CloudClient(cloud_server.address, "not-a-token")
    code, _ = _status(lambda: stranger.search("c", np.zeros((1, 6), np.uint8), 1))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    anonymous = CloudClient(cloud_server.address)
    code, _ = _status(lambda: anonymous.search("c", np.zeros((1, 6), np.uint8), 1))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _status(lambda: owner.create_collection("d", 48, owner.token))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # a second collection's owner token opens nothing of the first
    other, _ = _owner(cloud_server, "d")
    code, _ = _status(lambda: list(other.fetch("c", [1])))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    import sqlite3

    rows = sqlite3.connect(cloud_server.data_dir / "store.sqlite3").execute("SELECT * FROM collections").fetchall()
    assert owner.token not in repr(rows)  # stored only as hashes


def test_health_and_reflection(cloud_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cloud_server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="dlheir.cloud.v1.CloudStore"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        # Health/Watch is a stream that would hold a worker: it needs a token
        with pytest.raises(grpc.RpcError) as info:
            next(health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest()))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # reflection is a stream: it needs a token like every call but Health/Check
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              metadata=[("authorization", f"Bearer {cloud_server.admin_token}")])
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "dlheir.cloud.v1.CloudStore" in names


def test_refuses_public_address_without_tls(tmp_path, capsys):
    from dlheir.cli import main

    code = main(["server", "start", "--foreground", "--data-dir", str(tmp_path), "--host", "0.0.0.0",
                 "--port", str(free_port())])
    assert code == 2 and "without TLS" in capsys.readouterr().err


def test_collections_admin_and_not_found(cloud_server):
    admin = CloudClient(cloud_server.address, cloud_server.admin_token)
    owner_a, _ = admin.create_collection("a", 12, cloud_server.admin_token)
    admin.create_collection("b", 64, cloud_server.admin_token)
    code, _ = _status(lambda: admin.create_collection("a", 48, cloud_server.admin_token))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    for bits in (0, 7, 13, 512):
        code, msg = _status(lambda: admin.create_collection(f"x{bits}", bits, cloud_server.admin_token))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and str(bits) in msg
    code, _ = _status(lambda: admin.create_collection("bad name/..", 48, cloud_server.admin_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _status(lambda: admin.create_collection("z", 48, "not-the-admin-token"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert sorted((c.name, c.bits) for c in admin.list_collections()) == [("a", 12), ("b", 64)]
    owner = CloudClient(cloud_server.address, owner_a)
    assert [c.name for c in owner.list_collections()] == ["a"]
    for call in (lambda: owner.stats("nope"), lambda: list(owner.fetch("nope", [1])),
                 lambda: owner.delete("nope", [1]), lambda: list(owner.upload("nope", [(1, bytes(2), b"x", {})]))):
        code, msg = _status(call)  # the same answer as for a collection that exists but is not its own
        assert code == grpc.StatusCode.UNAUTHENTICATED and "nope" in msg
    # 12-bit codes: 2 bytes, the last 4 bits are padding and must be zero (uploads and queries)
    code, msg = _status(lambda: list(owner.upload("a", [(1, b"\x00\x01", b"x", {})])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "padding" in msg
    code, msg = _status(lambda: owner.search("a", np.array([[0, 1]], np.uint8), 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "padding" in msg
    code, msg = _status(lambda: owner.search("a", np.zeros((1, 6), np.uint8), 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "code is 2 bytes" in msg and "6 bytes" in msg
    code, msg = _status(lambda: list(owner.upload("a", [(-5, bytes(2), b"x", {})])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "-5" in msg
    code, msg = _status(lambda: list(owner.upload("a", [(1, bytes(2), b"x", {}), (1, bytes(2), b"y", {})])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in msg
    code, msg = _status(lambda: list(owner.upload("a", [(1, bytes(2), b"x", {"k": "v" * 70_000})])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg
    assert owner.stats("a").items == 0


def test_replace_delete_and_restart_keep_index_and_store_in_step(tmp_path):
    rng = np.random.default_rng(5)
    codes = _random_codes(rng, 400, 48)
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, reader = _owner(server)
        list(owner.upload("c", [(i, codes[i].tobytes(), bytes([i % 256]) * 100, {"i": str(i)}) for i in range(400)],
                          batch_size=64))
        new = _random_codes(rng, 10, 48)
        list(owner.upload("c", [(i, new[i].tobytes(), b"new", {}) for i in range(10)], replace=True))
        codes[:10] = new
        assert owner.delete("c", list(range(390, 400)) + [10**12]) == 10
        ids = np.arange(390)
        before = owner.search("c", codes[:20], 25)
    with CloudServerProcess(tmp_path / "cloud", port=server.port) as server:  # rebuilt from SQLite
        reader = CloudClient(server.address, reader.token)
        after = reader.search("c", codes[:20], 25)
        brute = hamming(codes[:20], codes[:390])
        for q, ((i1, d1), (i2, d2)) in enumerate(zip(before, after)):
            order = rank(brute[q], ids)[:25]
            np.testing.assert_array_equal(i1, ids[order])
            np.testing.assert_array_equal(i2, ids[order])
            np.testing.assert_array_equal(d2, brute[q][order])
        assert reader.stats("c").items == 390
        assert [b for _, b, _ in reader.fetch("c", [3, 395, 20])] == [b"new", bytes([20]) * 100]


def test_search_never_sees_half_a_batch(cloud_server):
    """Every batch uploads 50 items with one shared code; concurrent searches for that code
    must always see a multiple of 50 of them."""
    owner, reader = _owner(cloud_server)
    code = np.array([[1, 2, 3, 4, 5, 6]], np.uint8)
    n_batches, seen, stop = 40, [], threading.Event()

    def search():
        while not stop.is_set():
            (ids, dist), = reader.search("c", code, k=n_batches * 50, max_distance=0)
            seen.append(len(ids))

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        acks = list(owner.upload("c", ((i, code[0].tobytes(), b"x", {}) for i in range(n_batches * 50)), batch_size=50))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(acks) == n_batches and seen
    assert all(n % 50 == 0 for n in seen), sorted(set(seen))
    (ids, _), = reader.search("c", code, k=n_batches * 50)
    assert len(ids) == n_batches * 50


def _self_signed(tmp_path):
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    return self_signed_certificate(tmp_path)


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    with CloudServerProcess(tmp_path / "cloud", tls_cert=cert, tls_key=key) as server:
        with CloudClient(server.address, tls_ca=str(cert)) as admin:
            owner, _ = admin.create_collection("c", 48, server.admin_token)
        with CloudClient(server.address, owner, tls_ca=str(cert)) as client:
            list(client.upload("c", [(1, bytes(6), b"secret", {})]))
            assert list(client.fetch("c", [1])) == [(1, b"secret", {})]
        plain = CloudClient(server.address, owner)
        code, _ = _status(lambda: plain.stats("c"))
        assert code == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot talk to a TLS server
        plain.close()


def _dlheir(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dlheir", *args], capture_output=True, text=True, timeout=180, env=env)


def test_cli_start_stop_in_background(tmp_path):
    import os

    data, port = tmp_path / "cloud", free_port()
    env = {k: v for k, v in os.environ.items() if k != "DLHEIR_ADMIN_TOKEN"}
    r = _dlheir("server", "start", "--data-dir", str(data), "--port", str(port), env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert f"127.0.0.1:{port}" in r.stdout and "admin.token" in r.stdout
        assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
        pid = int((data / "server.pid").read_text())
        admin = CloudClient(f"127.0.0.1:{port}")
        admin.create_collection("c", 48, (data / "admin.token").read_text().strip())
        admin.close()
        again = _dlheir("server", "start", "--data-dir", str(data), "--port", str(free_port()), env=env)
        assert again.returncode != 0 and "already running" in again.stderr
        busy = _dlheir("server", "start", "--data-dir", str(tmp_path / "other"), "--port", str(port), env=env)
        assert busy.returncode != 0 and "in use" in busy.stderr
    finally:
        r = _dlheir("server", "stop", "--data-dir", str(data))
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert not (data / "server.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    r = _dlheir("server", "stop", "--data-dir", str(data))  # stopping a stopped server is not an error
    assert r.returncode == 0 and f"no server is running on {data}" in r.stdout, (r.stdout, r.stderr)
