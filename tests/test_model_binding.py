"""Codes are tied to their model: a collection records the fingerprint of the network that made
its codes, and the cloud server refuses uploads and searches whose codes come from another one.

Real cloud server subprocesses; the end-to-end test at the bottom runs a real Triton, installs a
second network behind it and shows a search through the user path refused, not answered."""

from __future__ import annotations

import json
import sqlite3

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.server.testing import run_cloud_server

A = "1b72c0ffee15a5e1"  # two model fingerprints (16 hex digits, as dlheir.contract.model_fingerprint)
B = "9f3a00d15ea5e000"
BITS, WIDTH = 48, 6


def _codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, WIDTH), dtype=np.uint8)


def _items(codes: np.ndarray) -> list:
    return [(i, c.tobytes(), f"blob-{i}".encode(), {}) for i, c in enumerate(codes)]


def _refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CloudError) as info:
        call()
    return info.value.code, info.value.details


def _collection(server, name: str, fingerprint: str = "", image_size: int = 0, private: bool = False):
    with CloudClient(server.address) as admin:
        owner, reader = admin.create_collection(name, BITS, server.admin_token, private=private,
                                                model_fingerprint=fingerprint, image_size=image_size)
    return CloudClient(server.address, owner), CloudClient(server.address, reader)


def test_collection_with_a_model_refuses_codes_of_another_or_of_none(cloud_server):
    owner, reader = _collection(cloud_server, "photos", A, 64)
    codes = _codes(20)
    with owner, reader:
        for given in (B, ""):
            code, msg = _refused(lambda: list(owner.upload("photos", _items(codes), model_fingerprint=given)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "\n" not in msg
            assert f"collection 'photos' holds codes of model {A} (64 px, 48 bits)" in msg
            assert (f"this request's codes come from model {B}" in msg) if given else ("names no model" in msg)
        assert owner.stats("photos").items == 0  # nothing of a refused upload was stored
        acks = list(owner.upload("photos", _items(codes), model_fingerprint=A))
        assert acks[-1].total_items == 20
        for given in (B, ""):
            code, msg = _refused(lambda: reader.search("photos", codes[:2], k=3, model_fingerprint=given))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and A in msg and "\n" not in msg
            assert (B in msg) if given else ("names no model" in msg)
        results = reader.search("photos", codes[:2], k=3, model_fingerprint=A)
        assert [int(ids[0]) for ids, _ in results] == [0, 1] and [int(d[0]) for _, d in results] == [0, 0]
        info = reader.stats("photos")
        assert (info.model_fingerprint, info.image_size, info.bits, info.items) == (A, 64, BITS, 20)


def test_collection_without_a_model_is_unchecked(cloud_server):
    owner, reader = _collection(cloud_server, "raw")
    codes = _codes(10, seed=1)
    with owner, reader:
        assert list(owner.upload("raw", _items(codes[:5])))[-1].total_items == 5
        assert list(owner.upload("raw", _items(codes)[5:], model_fingerprint=B))[-1].total_items == 10
        for given in ("", A):
            (ids, dist), = reader.search("raw", codes[7:8], k=1, model_fingerprint=given)
            assert (int(ids[0]), int(dist[0])) == (7, 0)
        info = reader.stats("raw")
        assert (info.model_fingerprint, info.image_size) == ("", 0)


def test_fingerprint_survives_a_restart_and_is_listed(tmp_path):
    data = tmp_path / "cloud"
    with run_cloud_server(data) as server:
        owner, _ = _collection(server, "photos", A, 224)
        with owner:
            list(owner.upload("photos", _items(_codes(3)), model_fingerprint=A))
        _collection(server, "raw")
    with run_cloud_server(data) as server, CloudClient(server.address, server.admin_token) as admin:
        listed = {c.name: (c.model_fingerprint, c.image_size, c.items) for c in admin.list_collections()}
        assert listed == {"photos": (A, 224, 3), "raw": ("", 0, 0)}
        with CloudClient(server.address, owner.token) as again:
            code, msg = _refused(lambda: list(again.upload("photos", _items(_codes(1)), model_fingerprint=B)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and A in msg and B in msg


def test_create_collection_refuses_a_malformed_fingerprint(cloud_server):
    with CloudClient(cloud_server.address) as admin:
        for bad in ("XYZ", "1B72C0FFEE15A5E1", "a" * 65, "1b72\n"):
            code, msg = _refused(lambda: admin.create_collection("c", BITS, cloud_server.admin_token,
                                                                 model_fingerprint=bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "fingerprint" in msg
        code, _ = _refused(lambda: admin.create_collection("c", BITS, cloud_server.admin_token, model_fingerprint=A,
                                                           image_size=1 << 20))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert not admin.list_collections(cloud_server.admin_token)


# The store's schema before fingerprints (as committed before this change): a store made with it
# must still open, keep its items, and leave its collections unchecked.
OLD_SCHEMA = """
CREATE TABLE collections (name TEXT PRIMARY KEY, bits INTEGER NOT NULL, owner_token_sha256 TEXT NOT NULL,
                          reader_token_sha256 TEXT NOT NULL);
CREATE TABLE items (collection TEXT NOT NULL REFERENCES collections(name), id INTEGER NOT NULL, code BLOB NOT NULL,
                    blob BLOB NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (collection, id));
CREATE INDEX items_codes ON items (collection, id, code);
"""


def test_a_store_made_before_fingerprints_opens_and_keeps_its_items(tmp_path):
    from dlheir.server.service import token_hash
    from dlheir.server.store import MARKER, STORE_FILE

    data = tmp_path / "cloud"
    data.mkdir()
    codes = _codes(30, seed=2)
    conn = sqlite3.connect(data / STORE_FILE)
    conn.executescript(OLD_SCHEMA)
    conn.execute("INSERT INTO collections VALUES ('old', ?, ?, ?)", (BITS, token_hash("owner-t"), token_hash("reader-t")))
    conn.executemany("INSERT INTO items VALUES ('old', ?, ?, ?, '{}')",
                     [(i, c.tobytes(), f"blob-{i}".encode()) for i, c in enumerate(codes)])
    conn.commit()
    conn.close()
    (data / MARKER).write_text("2026-01-01T00:00:00Z\n")
    with run_cloud_server(data) as server, CloudClient(server.address, "reader-t") as reader:
        info = reader.stats("old")
        assert (info.items, info.bits, info.model_fingerprint, info.image_size) == (30, BITS, "", 0)
        for given in ("", A):  # made before fingerprints: unchecked
            (ids, dist), = reader.search("old", codes[12:13], k=1, model_fingerprint=given)
            assert (int(ids[0]), int(dist[0])) == (12, 0)
        assert list(reader.fetch("old", [4])) == [(4, b"blob-4", {})]
        with CloudClient(server.address, server.admin_token) as admin:  # and new collections record their model
            admin.create_collection("new", BITS, server.admin_token, model_fingerprint=A, image_size=32)
            assert {c.name: c.model_fingerprint for c in admin.list_collections()} == {"old": "", "new": A}
    columns = {r[1] for r in sqlite3.connect(data / STORE_FILE).execute("PRAGMA table_info(collections)")}
    assert {"model_fingerprint", "image_size"} <= columns  # migrated in place


# --- end to end: another model installed behind a running deployment --------------------------
def _cli(capsys, *argv) -> tuple[int, str, str]:
    from dlheir.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_after_another_model_is_installed_is_refused_not_answered(tmp_path, served_model, digits_small, capsys,
                                                                         monkeypatch):
    """Collections made and filled with model A (one server-ranked, one private-ranking); then a
    different network (same architecture, other weights) is exported and installed behind the same
    Triton deployment, which is restarted on the same ports. `dlheir user search` is refused with
    one line naming both fingerprints (by the server, and for the private collection by the
    client), and so is an upload; before the swap the same commands are answered."""
    from helpers import SMALL_SIZE, margined_model
    from dlheir.client.crypto import OwnerKeys, generate_user_keypair, make_grant
    from dlheir.client.owner import create_collection, image_files, model_binding, upload_images
    from dlheir.client.triton import TritonHasher
    from dlheir.contract import ContractError
    from dlheir.export.onnx_export import export_onnx
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import prepare_repository

    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    repo = tmp_path / "model_repository"
    model_a = prepare_repository(repo, served_model["onnx"], "onnx-cpu")
    deployment = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                      state_dir=tmp_path / "triton")
    files = image_files(digits_small)
    query = next(digits_small.glob("1/*.png"))
    # the key file records each collection (uid, mode) before its keys exist
    keys = OwnerKeys.generate().register("photos").register("sealed", "private")
    alice, alice_pub = generate_user_keypair(tmp_path / "alice.pem")
    tokens, grants = {}, {}

    def search(name: str, triton: TritonServer) -> tuple[int, str, str]:
        return _cli(capsys, "user", "search", query, "-k", 5, "--grant", grants[name], "--user-key", alice,
                    "--triton", triton.grpc_url, "--out", tmp_path / f"found-{name}", "--json")

    with run_cloud_server(tmp_path / "cloud") as cloud:
        with TritonServer(repo, **deployment) as triton:
            with TritonHasher(triton.grpc_url) as hasher, CloudClient(cloud.address) as admin:
                assert hasher.fingerprint == model_a.fingerprint
                for name, private in (("photos", False), ("sealed", True)):
                    tokens[name] = create_collection(admin, name, cloud.admin_token, model_binding(hasher), private)
                    with CloudClient(cloud.address, tokens[name][0]) as owner:
                        assert upload_images(files, keys, name, owner, hasher, progress=False).uploaded == len(files)
                    grants[name] = tmp_path / f"{name}.grant"
                    grants[name].write_bytes(make_grant(keys, alice_pub.read_bytes(), name, tokens[name][1],
                                                        cloud.address, hasher.bits))
                    info = {c.name: c for c in admin.list_collections(cloud.admin_token)}[name]
                    assert (info.model_fingerprint, info.image_size) == (model_a.fingerprint, SMALL_SIZE)
            for name in grants:  # model A: answered
                code, out, err = search(name, triton)
                assert code == 0, err
                assert json.loads(out)["results"][0]["distance"] == 0  # the query itself is stored

        # another network, the same architecture with other weights, installed as a new version
        onnx_b = export_onnx(margined_model(seed=1), tmp_path / "b.onnx", SMALL_SIZE)
        model_b = prepare_repository(repo, onnx_b, "onnx-cpu")
        assert model_b.version == model_a.version + 1 and model_b.fingerprint != model_a.fingerprint
        with TritonServer(repo, **deployment) as triton:  # the same deployment, restarted
            for name in grants:
                code, out, err = search(name, triton)
                assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
                assert f"model {model_a.fingerprint} ({SMALL_SIZE} px, 48 bits)" in err
                assert f"come from model {model_b.fingerprint}" in err
            with TritonHasher(triton.grpc_url) as hasher, CloudClient(cloud.address, tokens["photos"][0]) as owner:
                before = owner.stats("photos").items
                with pytest.raises(ContractError, match=f"{model_a.fingerprint}.*{model_b.fingerprint}"):
                    upload_images(files, keys, "photos", owner, hasher, progress=False)
                assert owner.stats("photos").items == before
