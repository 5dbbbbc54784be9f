"""Per-user access and key rotation (issue 10, section 2), against real cloud-server processes.

Codes come from a stand-in hasher (fixed random codes per image file) so that exactness can be
checked against a brute-force ranking of known raw codes; Triton's own path is covered by
tests/test_e2e.py. Everything else is real: the server subprocess, its store, the CLI, crypto.
"""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np
import pytest
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Random import get_random_bytes

from dlheir.cli import main
from dlheir.client import access
from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.crypto import (
    BlobAuthenticationError, CodeTransform, OwnerKeys, apply_map, blob_key_id, decrypt_image, encrypt_image,
    generate_user_keypair, open_grant, rekey_map,
)
from dlheir.client.owner import image_files, upload_images
from dlheir.client.user import search_image
from dlheir.codes import hamming, pack_bits
from dlheir.server.testing import CloudServerProcess

BITS = 48
COLLECTION = "photos"


class StandInHasher:
    """Triton's interface (``bits``, ``fingerprint``, ``hash_images``, ``hash_one``) over a table image
    bytes -> raw code. No model fingerprint: its collections are raw-code ones (``--bits``)."""

    fingerprint = None

    def __init__(self, bits: int, table: dict[bytes, np.ndarray]) -> None:
        self.bits, self.table = bits, table

    def hash_images(self, sources):
        codes = np.stack([self.table[s if isinstance(s, bytes) else open(s, "rb").read()] for s in sources])
        return np.zeros((len(codes), self.bits), np.float32), codes

    def hash_one(self, source):
        probs, codes = self.hash_images([source])
        return probs[0], codes[0]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(CloudError) as info:
        call()
    return info.value.code


def brute_force(raw_db: dict[int, np.ndarray], raw_queries: np.ndarray, k: int):
    """Per query: (ids, distances) of the top k by (distance, id) over the raw codes."""
    ids = np.array(sorted(raw_db), dtype=np.int64)
    dist = hamming(raw_queries, np.stack([raw_db[i] for i in ids]))
    out = []
    for row in dist:
        order = np.lexsort((ids, row))[:k]
        out.append((ids[order], row[order]))
    return out


def v1_blob(key: bytes, image: bytes, collection: str, item_id: int, name: str) -> bytes:
    """A version-1 blob exactly as dlheir wrote them before key versions (crypto.py's documented layout)."""
    aad = b"DLHB\x01" + struct.pack(">H", len(collection)) + collection.encode() + struct.pack(">Q", item_id)
    nonce = get_random_bytes(12)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(aad)
    ct, tag = cipher.encrypt_and_digest(struct.pack(">H", len(name)) + name.encode() + image)
    return b"DLHB\x01" + nonce + ct + tag


def v1_grant(keys: OwnerKeys, public_pem: bytes, collection: str, token: str) -> bytes:
    """A version-1 grant exactly as dlheir wrote them before per-user tokens."""
    payload = json.dumps({"format": "dlheir-grant", "version": 1, "collection": collection, "reader_token": token,
                          "image_key": __import__("base64").b64encode(keys.image_key).decode(),
                          "transform_secret": __import__("base64").b64encode(keys.transform_secret).decode(),
                          "server": None, "bits": BITS}).encode()
    session = get_random_bytes(32)
    wrapped = PKCS1_OAEP.new(RSA.import_key(public_pem), hashAlgo=SHA256).encrypt(session)
    header = b"DLHG\x01" + struct.pack(">H", len(wrapped)) + wrapped
    nonce = get_random_bytes(12)
    cipher = AES.new(session, AES.MODE_GCM, nonce=nonce)
    cipher.update(header)
    ct, tag = cipher.encrypt_and_digest(payload)
    return header + nonce + tag + ct


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    d = tmp_path_factory.mktemp("people")
    return {name: generate_user_keypair(d / f"{name}.pem") for name in ("alice", "bob", "carol")}


@pytest.fixture
def world(tmp_path, monkeypatch, capsys, people):
    """A running server, an owner (key file, tokens) in $DLHEIR_HOME, 60 image files with known raw
    codes (some duplicated, so ties at the k-th distance happen), of which the first 40 uploaded."""
    home = tmp_path / "home"
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    server = CloudServerProcess(tmp_path / "cloud").start()
    rng = np.random.default_rng(7)
    images = tmp_path / "images"
    raw: dict[bytes, np.ndarray] = {}
    for i in range(60):
        data = b"\x89PNG fake image %d " % i + rng.bytes(int(rng.integers(50, 400)))
        (images / str(i % 3)).mkdir(parents=True, exist_ok=True)
        (images / str(i % 3) / f"{i:03d}.png").write_bytes(data)
        code = pack_bits(rng.integers(0, 2, (1, BITS), dtype=np.uint8))[0]
        raw[data] = raw[list(raw)[i // 2]] if i % 7 == 3 else code  # duplicates of earlier codes
    assert cli(capsys, "owner", "init", "--collection", COLLECTION)[0] == 0
    assert cli(capsys, "owner", "create-collection", COLLECTION, "--bits", BITS, "--server", server.address,
               "--admin-token-file", server.data_dir / "admin.token")[0] == 0
    tokens = json.loads((home / f"{COLLECTION}.tokens.json").read_text())
    files = image_files(images)
    w = dict(home=home, server=server, files=files, raw=raw, tokens=tokens, hasher=StandInHasher(BITS, raw),
             people=people, data={})
    for rel, path in files:
        w["data"][rel] = path.read_bytes()
    upload(w, files[:40])
    yield w
    w["server"].stop()


def owner_client(w) -> CloudClient:
    return CloudClient(w["server"].address, w["tokens"]["owner_token"])


def upload(w, files) -> None:
    with owner_client(w) as owner:
        report = upload_images(files, OwnerKeys.load(w["home"] / "owner.key"), COLLECTION, owner, w["hasher"],
                               progress=False)
    assert report.uploaded == len(files) and not report.skipped


def raw_db(w, files) -> dict[int, np.ndarray]:
    from dlheir.ids import item_id

    return {item_id(rel): w["raw"][w["data"][rel]] for rel, _ in files}


def grant_for(w, capsys, name: str, *extra, out_name: str | None = None) -> tuple:
    """`dlheir owner grant` for one of the people; returns (opened Grant, grant path)."""
    out = w["home"] / (out_name or f"{name}.grant")
    code, text, err = cli(capsys, "owner", "grant", "--user-pub", w["people"][name][1], "--out", out, *extra)
    assert code == 0, err
    return open_grant(out.read_bytes(), w["people"][name][0].read_bytes()), out


def reader(w, grant) -> CloudClient:
    return CloudClient(w["server"].address, grant.reader_token)


def queries(w, n_random: int = 6) -> np.ndarray:
    """Raw query codes: some stored codes (distance 0 and duplicates) and random ones."""
    stored = [w["raw"][w["data"][rel]] for rel, _ in w["files"][:8]]
    rand = pack_bits(np.random.default_rng(99).integers(0, 2, (n_random, BITS), dtype=np.uint8))
    return np.concatenate([np.stack(stored), rand])


def served(client: CloudClient, transform: CodeTransform, raw_queries: np.ndarray, k: int):
    return client.search(COLLECTION, transform.apply(raw_queries), k)


def assert_same(results, expected) -> None:
    assert len(results) == len(expected)
    for (ids, dist), (want_ids, want_dist) in zip(results, expected):
        assert ids.tolist() == want_ids.tolist() and dist.tolist() == want_dist.tolist()


def restart(w) -> None:
    w["server"].stop()
    w["server"] = CloudServerProcess(w["server"].data_dir, port=w["server"].port).start()


# --- per-user tokens and revocation -----------------------------------------------------------
def test_each_grant_carries_its_own_token_and_revoke_refuses_only_that_user(world, capsys):
    w = world
    alice, _ = grant_for(w, capsys, "alice")
    bob, _ = grant_for(w, capsys, "bob")
    assert (alice.version, alice.user, bob.user) == (2, "alice", "bob")
    assert len({alice.reader_token, bob.reader_token, w["tokens"]["reader_token"], w["tokens"]["owner_token"]}) == 4
    t = CodeTransform(alice.transform_secret, BITS)
    q = queries(w)
    expected = brute_force(raw_db(w, w["files"][:40]), q, 10)
    for g in (alice, bob):
        with reader(w, g) as c:
            assert_same(served(c, t, q, 10), expected)
    code, out, _ = cli(capsys, "owner", "grants", "--json")
    listing = json.loads(out)
    assert code == 0 and [(r["user"], r["revoked"]) for r in listing["readers"]] == [("alice", None), ("bob", None)]
    assert listing["shared_token_active"] and listing["key_id"] == 1

    # a reader token reads; it cannot write or manage readers
    with reader(w, alice) as c:
        assert status_of(lambda: list(c.upload(COLLECTION, [(1, bytes(6), b"x", {})]))) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: c.delete(COLLECTION, [1])) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: c.add_reader(COLLECTION, "mallory")) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: c.revoke_reader(COLLECTION, "bob")) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: c.list_readers(COLLECTION)) == grpc.StatusCode.PERMISSION_DENIED
        assert [i.name for i in c.list_collections()] == [COLLECTION]

    code, out, _ = cli(capsys, "owner", "revoke", "bob")
    assert code == 0 and "revoked" in out
    calls = {
        "search": lambda c: c.search(COLLECTION, np.zeros((1, 6), np.uint8), 1),
        "fetch": lambda c: list(c.fetch(COLLECTION, [1])),
        "contains": lambda c: c.contains(COLLECTION, [1]),
        "stats": lambda c: c.stats(COLLECTION),
        "list": lambda c: c.list_collections(),
    }

    def bob_refused_alice_served():
        with reader(w, bob) as c:
            for what, call in calls.items():
                assert status_of(lambda: call(c)) == grpc.StatusCode.UNAUTHENTICATED, what
        with reader(w, alice) as c:
            assert_same(served(c, t, q, 10), expected)
            assert len(list(c.fetch(COLLECTION, expected[0][0][:3]))) == 3

    bob_refused_alice_served()
    code, out, _ = cli(capsys, "owner", "revoke", "bob")
    assert code == 0 and "already revoked" in out
    code, _, err = cli(capsys, "owner", "revoke", "nobody")
    assert code == 2 and "NOT_FOUND" in err

    restart(w)  # the revocation is durable; per-user tokens come back from the store
    bob_refused_alice_served()
    listing = json.loads(cli(capsys, "owner", "grants", "--json")[1])
    assert [(r["user"], r["revoked"] is None) for r in listing["readers"]] == [("alice", True), ("bob", False)]

    # granting bob again issues a new token; the revoked one stays refused
    bob2, _ = grant_for(w, capsys, "bob", out_name="bob2.grant")
    with reader(w, bob2) as c:
        assert_same(served(c, t, q, 10), expected)
    with reader(w, bob) as c:
        assert status_of(lambda: calls["search"](c)) == grpc.StatusCode.UNAUTHENTICATED
    # re-granting the same label re-issues: alice's first grant stops working at once
    alice2, _ = grant_for(w, capsys, "alice", out_name="alice2.grant")
    with reader(w, alice) as c:
        assert status_of(lambda: calls["search"](c)) == grpc.StatusCode.UNAUTHENTICATED
    with reader(w, alice2) as c:
        assert_same(served(c, t, q, 10), expected)
    # a label kept for another public key is not silently handed over
    code, _, err = cli(capsys, "owner", "grant", "--user-pub", w["people"]["carol"][1], "--user", "alice",
                       "--out", w["home"] / "carol.grant")
    assert code == 2 and "another public key" in err and not (w["home"] / "carol.grant").exists()


def test_shared_token_and_version_1_grants_work_until_revoked(world, capsys):
    w = world
    keys = OwnerKeys.load(w["home"] / "owner.key")
    pub, priv = w["people"]["carol"][1], w["people"]["carol"][0]
    old = open_grant(v1_grant(keys, pub.read_bytes(), COLLECTION, w["tokens"]["reader_token"]), priv.read_bytes())
    assert (old.version, old.user, old.key_id, set(old.image_keys)) == (1, None, 1, {1})
    q = queries(w)
    with reader(w, old) as c:
        assert_same(served(c, CodeTransform(old.transform_secret, BITS), q, 5),
                    brute_force(raw_db(w, w["files"][:40]), q, 5))
    code, out, _ = cli(capsys, "owner", "revoke", "--shared-token")
    assert code == 0 and "shared reader token" in out
    with reader(w, old) as c:
        assert status_of(lambda: c.search(COLLECTION, np.zeros((1, 6), np.uint8), 1)) == grpc.StatusCode.UNAUTHENTICATED
    restart(w)
    with reader(w, old) as c:
        assert status_of(lambda: c.stats(COLLECTION)) == grpc.StatusCode.UNAUTHENTICATED
    assert json.loads(cli(capsys, "owner", "grants", "--json")[1])["shared_token_active"] is False


# --- rotation ---------------------------------------------------------------------------------
def test_rotation_keeps_every_item_and_exact_search_and_ends_old_grants(world, capsys, tmp_path):
    w = world
    alice, _ = grant_for(w, capsys, "alice")
    bob, _ = grant_for(w, capsys, "bob")
    carol, _ = grant_for(w, capsys, "carol")
    assert cli(capsys, "owner", "revoke", "carol")[0] == 0  # revoked before: not re-granted
    # one item as a store from before key versions holds it: a version-1 blob
    legacy_rel, legacy_path = w["files"][5]
    from dlheir.ids import item_id

    legacy_id = item_id(legacy_rel)
    keys1 = OwnerKeys.load(w["home"] / "owner.key")
    t1 = CodeTransform(keys1.transform_secret, BITS)
    code = t1.apply(w["raw"][w["data"][legacy_rel]][None, :])[0].tobytes()
    with owner_client(w) as owner:
        list(owner.upload(COLLECTION, [(legacy_id, code, v1_blob(keys1.image_key, w["data"][legacy_rel], COLLECTION,
                                                                 legacy_id, legacy_path.name), {})], replace=True))
    q = queries(w)
    db40 = raw_db(w, w["files"][:40])
    expected = brute_force(db40, q, 12)
    with reader(w, alice) as c:
        before = served(c, t1, q, 12)
    assert_same(before, expected)

    code, out, err = cli(capsys, "owner", "rotate", "--drop", "bob")
    assert code == 0, err
    assert "key version 1 -> 2" in out and "40 stored codes re-keyed" in out
    new_path = w["home"] / "grants" / COLLECTION / "alice.grant"
    assert f"new grant for 'alice': {new_path}" in out and "(--drop): 'bob'" in out
    assert not (w["home"] / "grants" / COLLECTION / "bob.grant").exists()
    assert not (w["home"] / "grants" / COLLECTION / "carol.grant").exists()
    assert (new_path.stat().st_mode & 0o777) == 0o600
    keys = OwnerKeys.load(w["home"] / "owner.key")
    assert keys.key_ids == [1, 2] and keys.at(1) == keys1 and keys.transform_secret != keys1.transform_secret
    alice_new = open_grant(new_path.read_bytes(), w["people"]["alice"][0].read_bytes())
    assert (alice_new.key_id, sorted(alice_new.image_keys), alice_new.user) == (2, [1, 2], "alice")
    assert alice_new.image_keys[1] == keys1.image_key and alice_new.image_key == keys.image_key

    # every old grant is refused, whatever the call
    for g in (alice, bob, carol):
        with reader(w, g) as c:
            assert status_of(lambda: c.search(COLLECTION, np.zeros((1, 6), np.uint8), 1)) == grpc.StatusCode.UNAUTHENTICATED
            assert status_of(lambda: list(c.fetch(COLLECTION, [legacy_id]))) == grpc.StatusCode.UNAUTHENTICATED
    with CloudClient(w["server"].address, w["tokens"]["reader_token"]) as c:  # the shared token too
        assert status_of(lambda: c.stats(COLLECTION)) == grpc.StatusCode.UNAUTHENTICATED
    t2 = CodeTransform(alice_new.transform_secret, BITS)
    with owner_client(w) as owner:  # and the old transform secret no longer finds the same neighbours
        stale = served(owner, t1, q, 12)
    assert any(ids.tolist() != want.tolist() or d.tolist() != wd.tolist()
               for (ids, d), (want, wd) in zip(stale, expected))

    # the new grant: the same ranking as before the rotation, every item decrypts (old blobs too)
    with reader(w, alice_new) as c:
        assert_same(served(c, t2, q, 12), expected)
        blobs = {i: b for i, b, _ in c.fetch(COLLECTION, sorted(db40))}
    assert len(blobs) == 40 and blob_key_id(blobs[legacy_id]) == 1 and blobs[legacy_id][4] == 1
    by_id = {item_id(rel): w["data"][rel] for rel, _ in w["files"]}
    for i, blob in blobs.items():
        assert decrypt_image(alice_new.image_keys, blob, COLLECTION, i).data == by_id[i]

    # uploads after the rotation use key version 2; the search stays exact over old and new items
    upload(w, w["files"][40:])
    db60 = raw_db(w, w["files"])
    expected60 = brute_force(db60, q, 15)
    new_ids = sorted(set(db60) - set(db40))
    with reader(w, alice_new) as c:
        assert_same(served(c, t2, q, 15), expected60)
        new_blobs = {i: b for i, b, _ in c.fetch(COLLECTION, new_ids)}
    assert {blob_key_id(b) for b in new_blobs.values()} == {2}
    for i, blob in new_blobs.items():
        assert decrypt_image(alice_new.image_keys, blob, COLLECTION, i).data == by_id[i]
        with pytest.raises(BlobAuthenticationError, match="key version 2"):
            decrypt_image(alice.image_keys, blob, COLLECTION, i)  # an old grant's keys do not open new blobs
    # with the user flow's own functions too (trapdoor -> search -> fetch -> decrypt)
    query_rel = w["files"][45][0]
    with reader(w, alice_new) as c:
        hits, _ = search_image(w["data"][query_rel], alice_new, c, w["hasher"], k=5)
    assert hits[0].distance == 0 and all(h.image == by_id[h.id] for h in hits)

    restart(w)  # the re-keyed codes, key id and revocations are durable; the index is rebuilt from them
    with reader(w, alice_new) as c:
        assert_same(served(c, t2, q, 15), expected60)
    with reader(w, alice) as c:
        assert status_of(lambda: c.stats(COLLECTION)) == grpc.StatusCode.UNAUTHENTICATED
    listing = json.loads(cli(capsys, "owner", "grants", "--json")[1])
    assert listing["key_id"] == 2 and not listing["shared_token_active"]
    assert [(r["user"], r["revoked"] is None) for r in listing["readers"]] == [("alice", True), ("bob", False),
                                                                                ("carol", False)]


def test_interrupted_rotation_leaves_a_consistent_state_and_can_be_run_again(world, capsys):
    w = world
    grant_for(w, capsys, "alice")
    q = queries(w)
    expected = brute_force(raw_db(w, w["files"][:40]), q, 10)

    def lost(*_a, **_kw):
        raise CloudError(grpc.StatusCode.UNAVAILABLE, "connection lost")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CloudClient, "rekey_codes", lost)
        code, _, err = cli(capsys, "owner", "rotate")
    assert code == 2 and "UNAVAILABLE" in err
    assert OwnerKeys.load(w["home"] / "owner.key").key_ids == [1, 2]  # the key came first; the server did not move
    alice_old = open_grant((w["home"] / "alice.grant").read_bytes(), w["people"]["alice"][0].read_bytes())
    with reader(w, alice_old) as c:  # nothing changed on the server: the old grant still works, exactly
        assert_same(served(c, CodeTransform(alice_old.transform_secret, BITS), q, 10), expected)
    code, out, err = cli(capsys, "owner", "rotate")
    assert code == 0 and "key version 1 -> 3" in out, err
    g = open_grant((w["home"] / "grants" / COLLECTION / "alice.grant").read_bytes(),
                   w["people"]["alice"][0].read_bytes())
    assert g.key_id == 3 and sorted(g.image_keys) == [1, 2, 3]
    with reader(w, g) as c:
        assert_same(served(c, CodeTransform(g.transform_secret, BITS), q, 10), expected)
    upload(w, w["files"][40:50])  # uploads pick the collection's key version (3), not just the newest
    with reader(w, g) as c:
        assert_same(served(c, CodeTransform(g.transform_secret, BITS), q, 10),
                    brute_force(raw_db(w, w["files"][:50]), q, 10))


def test_rekey_codes_checks_its_input_and_caller(world, capsys):
    w = world
    alice, _ = grant_for(w, capsys, "alice")
    perm, mask = list(range(BITS)), bytes(6)
    with owner_client(w) as owner:
        assert status_of(lambda: owner.rekey_codes(COLLECTION, 1, 2, perm[:-1], mask)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: owner.rekey_codes(COLLECTION, 1, 2, [0] * BITS, mask)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: owner.rekey_codes(COLLECTION, 1, 2, perm, bytes(5))) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: owner.rekey_codes(COLLECTION, 1, 1, perm, mask)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: owner.rekey_codes(COLLECTION, 4, 5, perm, mask)) == grpc.StatusCode.FAILED_PRECONDITION
        assert status_of(lambda: owner.add_reader(COLLECTION, "../x")) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: owner.add_reader(COLLECTION, "alice")) == grpc.StatusCode.ALREADY_EXISTS
    with reader(w, alice) as c:
        assert status_of(lambda: c.rekey_codes(COLLECTION, 1, 2, perm, mask)) == grpc.StatusCode.PERMISSION_DENIED
    with CloudClient(w["server"].address, w["server"].admin_token) as admin:
        assert status_of(lambda: admin.rekey_codes(COLLECTION, 1, 2, perm, mask)) == grpc.StatusCode.PERMISSION_DENIED
    with reader(w, alice) as c:  # nothing was applied: alice still searches exactly
        q = queries(w)
        assert_same(served(c, CodeTransform(alice.transform_secret, BITS), q, 5),
                    brute_force(raw_db(w, w["files"][:40]), q, 5))
    log = (w["server"].data_dir / "server.log").read_text()
    assert alice.reader_token not in log and w["tokens"]["owner_token"] not in log


# --- formats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [12, 48, 64, 256])
def test_rekey_map_turns_codes_under_the_old_transform_into_codes_under_the_new(bits):
    old, new = CodeTransform(get_random_bytes(32), bits), CodeTransform(get_random_bytes(32), bits)
    raw = pack_bits(np.random.default_rng(bits).integers(0, 2, (200, bits), dtype=np.uint8))
    perm, mask = rekey_map(old, new)
    assert sorted(perm.tolist()) == list(range(bits))
    assert np.array_equal(apply_map(old.apply(raw), perm, mask, bits), new.apply(raw))
    assert not np.array_equal(old.apply(raw), new.apply(raw))


def test_key_file_keeps_every_version_and_old_formats_still_open(tmp_path, people):
    keys = OwnerKeys.generate("c")
    keys.save(tmp_path / "v1.key")
    assert json.loads((tmp_path / "v1.key").read_text())["version"] == 1  # one key: still the version-1 format
    rotated = keys.rotated().rotated()
    rotated.save(tmp_path / "v2.key")
    doc = json.loads((tmp_path / "v2.key").read_text())
    assert doc["version"] == 2 and [k["id"] for k in doc["keys"]] == [1, 2, 3]
    loaded = OwnerKeys.load(tmp_path / "v2.key")
    assert loaded == rotated and loaded.at(1) == keys and loaded.at(2).image_keys().keys() == {1, 2}
    with pytest.raises(Exception, match="no key version 7"):
        loaded.at(7)
    # blobs: version 1 (no key id) and version 2 of each key version decrypt from one keyring
    ring = loaded.image_keys()
    old = v1_blob(keys.image_key, b"old bytes", "c", 5, "old.png")
    assert decrypt_image(ring, old, "c", 5) == ("old.png", b"old bytes")
    assert decrypt_image(keys.image_key, old, "c", 5).data == b"old bytes"
    for v in (1, 2, 3):
        blob = encrypt_image(ring[v], b"img %d" % v, "c", 9, key_id=v)
        assert blob_key_id(blob) == v and decrypt_image(ring, blob, "c", 9).data == b"img %d" % v
    with pytest.raises(BlobAuthenticationError, match="authentication failed"):  # the key id is authenticated
        blob = encrypt_image(ring[2], b"x", "c", 9, key_id=2)
        decrypt_image(ring, blob[:5] + struct.pack(">I", 3) + blob[9:], "c", 9)
    # access.default_label: the label a grant uses without --user
    assert access.default_label(people["alice"][1]) == "alice"
