"""A collection's life against running operations (issue 20): unread streams, streams that
outlive their collection, swapped snapshots, uploads across a rotation, deletes on a really full
disk, syncs cut by DeleteCollection. Every test runs a real server subprocess on loopback."""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.codes import hamming
from dlheir.contract import PAGE_MAGIC, PAGE_VERSION, rank
from dlheir.proto import dlheir_cloud_pb2 as pb
from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc
from dlheir.server import snapshot
from dlheir.server.testing import CloudServerProcess

MiB = 1024 * 1024
BITS = 48
# a client channel whose flow-control window stays small (no BDP probing): a server's send of a
# large message waits for the client to read, as it would over a slow link
SLOW_READER = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.http2.bdp_probe", 0)]


def _collection(server, name="c", private=False) -> tuple[CloudClient, CloudClient]:
    with CloudClient(server.address) as admin:
        owner, reader = admin.create_collection(name, BITS, server.admin_token, private=private)
    return CloudClient(server.address, owner), CloudClient(server.address, reader)


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _log(server: CloudServerProcess) -> str:
    return (server.data_dir / "server.log").read_text()


def _status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CloudError) as info:
        fn()
    return info.value.code, info.value.details


def _unread_fetch(channel: grpc.Channel, token: str, ids) -> grpc.Future:
    """A Fetch stream the test reads only when (and if) it wants: on a SLOW_READER channel the
    server's sends of large blobs wait on flow control."""
    return pb_grpc.CloudStoreStub(channel).Fetch(pb.FetchRequest(collection="c", ids=ids), metadata=_md(token))


def _drain(stream) -> tuple[int, grpc.StatusCode]:
    """Read a server stream to its end: (messages read, final status)."""
    n = 0
    try:
        for _ in stream:
            n += 1
    except grpc.RpcError as exc:
        return n, exc.code()
    return n, grpc.StatusCode.OK


class ControlledUpload:
    """An Upload stream whose batches the test sends one at a time, reading each ack."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.batches: queue.Queue = queue.Queue()
        self.acks = pb_grpc.CloudStoreStub(channel).Upload(iter(self.batches.get, None), metadata=_md(token))

    def send(self, batch: pb.UploadBatch) -> pb.UploadAck:
        self.batches.put(batch)
        return next(self.acks)

    def close(self) -> None:
        self.batches.put(None)


def _batch(ids, key_id: int = 0, collection: str = "c", blob: bytes = b"x") -> pb.UploadBatch:
    return pb.UploadBatch(collection=collection, key_id=key_id,
                          items=[pb.UploadItem(id=i, code=bytes([i % 256] * 6), blob=blob) for i in ids])


# --- 1. a client that stops reading cannot hold the workers ---------------------------------

def test_unread_fetch_streams_cannot_hold_the_workers(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    args = ["--workers", "4", "--stream-write-timeout", "3"]  # streams: at most 3 (one worker kept free)
    with CloudServerProcess(tmp_path / "cloud", extra_args=args) as server:
        owner, reader = _collection(server)
        rng = np.random.default_rng(0)
        list(owner.upload("c", [(i, bytes(6), rng.bytes(4 * MiB), {}) for i in range(8)], batch_size=2))
        alice = CloudClient(server.address, owner.add_reader("c", "alice"))
        channel = grpc.insecure_channel(server.address, options=SLOW_READER)
        try:
            # 8 streams of 32 MiB each that are never read: their sends block on flow control
            streams = [_unread_fetch(channel, reader.token, range(8)) for _ in range(8)]
            time.sleep(1.0)
            t0 = time.perf_counter()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            (ids, _), = alice.search("c", np.zeros((1, 6), np.uint8), 3)
            assert owner.revoke_reader("c", "alice")
            took = time.perf_counter() - t0
            print(f"\n8 unread Fetch streams, 4 workers: Health, Search and RevokeReader answered in {took * 1e3:.0f} ms")
            assert health.status == health_pb2.HealthCheckResponse.SERVING and list(ids) == [0, 1, 2]
            # the streams past the slots were refused at once, the others cancelled once unread for 3 s
            deadline = time.monotonic() + 20
            while _log(server).count("the client stopped reading") < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _log(server).count("the client stopped reading") == 3
            ends = [_drain(s) for s in streams]  # what was buffered, then the status
            codes = [code for _, code in ends]
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5, ends
            assert codes.count(grpc.StatusCode.CANCELLED) == 3 and all(n < 8 for n, _ in ends), ends
            # every worker and slot is free again: a stream that reads is served whole
            assert len(list(reader.fetch("c", range(8)))) == 8
        finally:
            channel.close()


def test_a_fetch_refused_for_want_of_a_stream_slot_waits_for_one(tmp_path):
    """The client retries a Fetch the server refused at once because every stream slot was taken
    (here by an unread stream, cancelled after 2 s): the user's fetch is served, not failed."""
    args = ["--workers", "2", "--stream-write-timeout", "2"]  # one stream slot
    with CloudServerProcess(tmp_path / "cloud", extra_args=args) as server:
        owner, reader = _collection(server)
        rng = np.random.default_rng(6)
        list(owner.upload("c", [(i, bytes(6), rng.bytes(4 * MiB), {}) for i in range(4)], batch_size=2))
        with grpc.insecure_channel(server.address, options=SLOW_READER) as channel:
            hog = _unread_fetch(channel, reader.token, range(4))
            time.sleep(0.5)  # the unread stream holds the only slot
            assert [i for i, _, _ in reader.fetch("c", [2, 3])] == [2, 3]
            hog.cancel()
        log = _log(server)
        assert "all are in use" in log and "the client stopped reading" in log


def test_server_start_passes_the_stream_limits_on(tmp_path):
    """``dlheir server start`` (detached) hands --stream-write-timeout and --max-streams to the
    server it starts: a bad value is refused by name, a good one is in the server's start line."""
    data = tmp_path / "cloud"

    def dlheir(*args):
        return subprocess.run([sys.executable, "-m", "dlheir", "server", *args, "--data-dir", str(data)],
                              capture_output=True, text=True, timeout=120)

    refused = dlheir("start", "--port", "0", "--max-streams", "0")
    assert refused.returncode != 0 and "--max-streams must be at least 1" in refused.stderr, refused.stderr
    started = dlheir("start", "--port", "0", "--max-streams", "2", "--stream-write-timeout", "7")
    try:
        assert started.returncode == 0, started.stderr
        log = (data / "server.log").read_text()
        assert "at most 64 calls and 2 streams at once" in log and "unread ones after 7 s" in log
    finally:
        assert dlheir("stop").returncode == 0


# --- 2. an Upload stream does not outlive its collection ----------------------------------

@pytest.mark.parametrize("recreate", [True, False])
def test_upload_stream_ends_when_its_collection_is_deleted(tmp_path, recreate):
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, _ = _collection(server)
        with grpc.insecure_channel(server.address) as channel:
            upload = ControlledUpload(channel, owner.token)
            assert list(upload.send(_batch([1, 2])).ids) == [1, 2]
            admin = CloudClient(server.address, server.admin_token)
            admin.delete_collection("c", server.admin_token)
            if recreate:
                new_owner, _ = _collection(server)
            with pytest.raises(grpc.RpcError) as info:
                upload.send(_batch([3, 4]))
            upload.close()
            assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED), info.value
        assert "Traceback" not in _log(server) and "FOREIGN KEY" not in _log(server)
        if recreate:  # the new collection holds nothing of the old stream, and agrees with itself
            assert new_owner.contains("c", [1, 2, 3, 4]) == set()
            assert new_owner.stats("c").items == 0
            list(new_owner.upload("c", [(3, bytes([3] * 6), b"y", {})]))
            assert new_owner.search("c", np.full((1, 6), 3, np.uint8), 5)[0][0].tolist() == [3]
    if recreate:
        with CloudServerProcess(tmp_path / "cloud") as server:  # and after a restart
            owner = CloudClient(server.address, new_owner.token)
            assert owner.stats("c").items == 1 and owner.search("c", np.zeros((1, 6), np.uint8), 5)[0][0].tolist() == [3]


def test_delete_collection_ends_running_fetch_streams_with_not_found(tmp_path):
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, reader = _collection(server)
        rng = np.random.default_rng(1)
        list(owner.upload("c", [(i, bytes(6), rng.bytes(2 * MiB), {}) for i in range(30)], batch_size=5))
        with grpc.insecure_channel(server.address, options=SLOW_READER) as ch:
            stream = _unread_fetch(ch, reader.token, range(30))
            next(stream)  # the stream is running (the rest wait on flow control)
            CloudClient(server.address).delete_collection("c", server.admin_token)
            _collection(server)  # re-created under the same name, with items of its own
            read, code = _drain(stream)
        assert code == grpc.StatusCode.NOT_FOUND and 1 + read < 30, (read, code)


# --- 7. a sync cut by DeleteCollection is NOT_FOUND, not a damaged store ---------------------

@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_sync_cut_by_delete_collection_is_not_found(tmp_path):
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, reader = _collection(server, private=True)
        rng = np.random.default_rng(2)
        with grpc.insecure_channel(server.address, options=SLOW_READER + [("grpc.max_send_message_length", 64 * MiB)]) as ch:
            stub = pb_grpc.CloudStoreStub(ch)
            for page in range(30):  # pages the server stores without reading (magic and version checked)
                data = PAGE_MAGIC + bytes([PAGE_VERSION]) + rng.bytes(2 * MiB)
                stub.AppendCodePage(pb.AppendCodePageRequest(collection="c", page=page, data=data),
                                    metadata=_md(owner.token))
            stream = stub.SyncCodePages(pb.SyncCodePagesRequest(collection="c"), metadata=_md(reader.token))
            assert next(stream).header.pages == 30
            next(stream)
            CloudClient(server.address).delete_collection("c", server.admin_token)
            try:
                code, details = sum(1 for _ in stream) and grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
        assert code == grpc.StatusCode.NOT_FOUND, (code, details)
        assert str(server.data_dir) not in details and "store.sqlite3" not in details
        log = _log(server)
        assert "DATA_LOSS" not in log and "damaged" not in log


# --- 3. a snapshot of another collection is not served ---------------------------------------

def test_swapped_or_copied_snapshots_are_rebuilt(tmp_path):
    rng = np.random.default_rng(3)
    stored = {}
    server = CloudServerProcess(tmp_path / "cloud").start()
    try:
        for name, first in (("a", 0), ("b", 10_000)):
            owner, _ = _collection(server, name)
            codes = rng.integers(0, 256, (500, 6), dtype=np.uint8)
            stored[name] = (owner.token, {first + i: codes[i].tobytes() for i in range(500)})
            list(owner.upload(name, [(i, c, b"x", {}) for i, c in stored[name][1].items()], batch_size=250))
    finally:
        server.stop()  # a clean stop writes both snapshots
    a, b = (snapshot.snapshot_path(server.data_dir, n) for n in "ab")
    assert a.exists() and b.exists()

    def searches_are_exact():
        with CloudServerProcess(tmp_path / "cloud") as again:
            for name, (token, items) in stored.items():
                client = CloudClient(again.address, token)
                ids = np.array(sorted(items), dtype=np.int64)
                codes = np.frombuffer(b"".join(items[i] for i in ids.tolist()), np.uint8).reshape(-1, 6)
                for q in codes[:5]:
                    d = hamming(q[None], codes)[0].astype(np.int64)
                    top = rank(d, ids)[:10]
                    got_ids, got_d = client.search(name, q[None], 10)[0]
                    assert (got_ids.tolist(), got_d.tolist()) == (ids[top].tolist(), d[top].tolist()), name
            return _log(again)

    saved_a, saved_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(saved_b)  # swapped
    b.write_bytes(saved_a)
    assert searches_are_exact().count("belongs to another collection") >= 2
    b.write_bytes(a.read_bytes())  # one copied over the other (both now a's, freshly written)
    assert "belongs to another collection" in searches_are_exact()


# --- 5. codes made under an old key are not stored after a rotation --------------------------

def test_upload_batches_of_another_key_version_are_refused(tmp_path):
    with CloudServerProcess(tmp_path / "cloud") as server:
        owner, _ = _collection(server)
        with grpc.insecure_channel(server.address) as channel:
            upload = ControlledUpload(channel, owner.token)
            assert list(upload.send(_batch([1, 2], key_id=1)).ids) == [1, 2]
            # the owner rotates meanwhile (an identity map is enough to move the key version)
            owner.rekey_codes("c", 1, 2, list(range(BITS)), bytes(6))
            with pytest.raises(grpc.RpcError) as info:
                upload.send(_batch([3, 4], key_id=1))
            upload.close()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "key version 2" in info.value.details() and "key version 1" in info.value.details()
        assert owner.contains("c", [1, 2, 3, 4]) == {1, 2}
        # a batch that names no version counts as version 1: refused too; the current version is stored
        code, _ = _status(lambda: list(owner.upload("c", [(3, bytes(6), b"x", {})])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert [list(a.ids) for a in owner.upload("c", [(3, bytes(6), b"x", {})], key_id=2)] == [[3]]


# --- 6. a delete frees room on a really full disk -------------------------------------------

@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_delete_works_on_a_really_full_disk(tiny_disk, tmp_path):
    rng = np.random.default_rng(5)
    log_dir = tmp_path / "logs"  # the server's log is kept off the full disk
    server = CloudServerProcess(tiny_disk / "cloud")
    server.start()
    try:
        owner, reader = _collection(server)
        filler = tiny_disk / "filler"  # made now: a full tmpfs has no room for a new file's entry
        filler.touch()
        acked, i = [], 0
        while True:
            try:
                acked += [x for a in owner.upload("c", [(i + j, bytes(6), rng.bytes(64 * 1024), {}) for j in range(4)],
                                                  batch_size=4) for x in a.ids]
            except CloudError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
            i += 4
        # and fill what is left of the file system to the last block
        with open(filler, "ab", buffering=0) as f:  # unbuffered: the failing write is the last
            try:
                while True:
                    f.write(bytes(4096))
                    f.flush()
            except OSError:
                pass
        assert shutil.disk_usage(tiny_disk).free < 64 * 1024
        gone = acked[: len(acked) // 2]
        assert owner.delete("c", gone) == len(gone)  # refused before: RESOURCE_EXHAUSTED
        assert owner.contains("c", acked) == set(acked) - set(gone)
        # the freed room takes new uploads, and a second delete on the full disk works too
        list(owner.upload("c", [(100_000, bytes(6), rng.bytes(64 * 1024), {})]))
        assert owner.delete("c", acked[len(acked) // 2:][:2]) == 2
        kept = (set(acked) - set(gone) - set(acked[len(acked) // 2:][:2])) | {100_000}
        assert owner.contains("c", list(kept) + gone) == kept
        log_dir.mkdir()
        shutil.copy(server.data_dir / "server.log", log_dir / "server.log")
    finally:
        server.stop()
    filler.unlink()
    for leftover in tiny_disk.glob("cloud/*.log"):
        leftover.write_text("")
    with CloudServerProcess(tiny_disk / "cloud") as server:  # everything survives a restart
        assert CloudClient(server.address, owner.token).contains("c", list(kept) + gone) == kept
    assert "reserve released" in (log_dir / "server.log").read_text()
