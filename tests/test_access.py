"""Per-user access and key rotation (issue 10, section 2), against real cloud-server processes.

Codes come from a stand-in hasher (fixed random codes per image file) so that exactness can be
checked against a brute-force ranking of known raw codes; Triton's own path is covered by
tests/test_e2e.py. Everything else is real: the server subprocess, its store, the CLI, crypto.
"""

from __future__ import annotations

import base64
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
    BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, apply_map, blob_key_id, decrypt_image,
    encrypt_image, generate_user_keypair, make_grant, open_grant, rekey_map,
)
from dlheir.client.owner import image_files, upload_images
from dlheir.client.user import search_image
from dlheir.codes import hamming, pack_bits
from dlheir.errors import UserError
from dlheir.ids import keyed_path_id
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
    """A version-1 blob exactly as dlheir wrote them before key versions (crypto.py's documented layout);
    ``collection`` is what its associated data binds (a collection's ``binding`` since key format 3)."""
    aad = b"DLHB\x01" + struct.pack(">H", len(collection)) + collection.encode() + struct.pack(">Q", item_id)
    nonce = get_random_bytes(12)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(aad)
    ct, tag = cipher.encrypt_and_digest(struct.pack(">H", len(name)) + name.encode() + image)
    return b"DLHB\x01" + nonce + ct + tag


def legacy_grant(version: int, image_key: bytes, transform_secret: bytes, public_pem: bytes, collection: str,
                 token: str) -> bytes:
    """A grant of format version 1 (before per-user tokens) or 2 (before signatures), exactly as dlheir
    wrote them: unsigned, sealed for the user's RSA key like every grant."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    if version == 1:
        doc = {"image_key": b64(image_key)}
    else:
        doc = {"user": "carol", "key_id": 1, "image_keys": {"1": b64(image_key)}}
    doc = {"format": "dlheir-grant", "version": version, "collection": collection, "reader_token": token, **doc,
           "transform_secret": b64(transform_secret), "server": None, "bits": BITS}
    payload = json.dumps(doc).encode()
    session = get_random_bytes(32)
    wrapped = PKCS1_OAEP.new(RSA.import_key(public_pem), hashAlgo=SHA256).encrypt(session)
    header = b"DLHG" + bytes([version]) + struct.pack(">H", len(wrapped)) + wrapped
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


def upload(w, files, collection: str = COLLECTION, client: CloudClient | None = None) -> None:
    with client or owner_client(w) as owner:
        report = upload_images(files, OwnerKeys.load(w["home"] / "owner.key"), collection, owner, w["hasher"],
                               progress=False)
    assert report.uploaded == len(files) and not report.skipped


def collection_keys(w, collection: str = COLLECTION):
    """The collection's keys (newest version) as the owner's key file holds them."""
    return OwnerKeys.load(w["home"] / "owner.key").for_collection(collection)


def item_ids(w, collection: str = COLLECTION) -> dict[str, int]:
    """Relative path -> the id upload_images gives it in ``collection`` (keyed with its id key)."""
    id_key = collection_keys(w, collection).id_key
    return {rel: keyed_path_id(id_key, rel) for rel, _ in w["files"]}


def item_bytes(w, collection: str = COLLECTION) -> dict[int, bytes]:
    """Item id in ``collection`` -> the image file's bytes."""
    return {i: w["data"][rel] for rel, i in item_ids(w, collection).items()}


def raw_db(w, files, collection: str = COLLECTION) -> dict[int, np.ndarray]:
    ids = item_ids(w, collection)
    return {ids[rel]: w["raw"][w["data"][rel]] for rel, _ in files}


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


def served(client: CloudClient, transform: CodeTransform, raw_queries: np.ndarray, k: int,
           collection: str = COLLECTION):
    return client.search(collection, transform.apply(raw_queries), k)


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
    assert (alice.version, alice.user, bob.user) == (3, "alice", "bob")
    keys = OwnerKeys.load(w["home"] / "owner.key")
    ck = keys.for_collection(COLLECTION)
    for g in (alice, bob):  # signed by the owner, naming the collection's uid and mode (trusted over the server's)
        assert (g.uid, g.mode, g.binding, g.owner_key) == (ck.uid, "server-ranked", ck.binding, keys.public_key)
        assert (g.key_id, g.image_keys, g.transform_secret) == (1, {1: ck.image_key}, ck.transform_secret)
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


def test_shared_token_works_until_revoked_and_version_1_and_2_grants_are_refused(world, capsys):
    w = world
    keys = OwnerKeys.load(w["home"] / "owner.key")
    ck = keys.for_collection(COLLECTION)
    pub, priv = w["people"]["carol"][1], w["people"]["carol"][0]
    # grants of format 1 (shared token) and 2 (unsigned) no longer open, however valid: one line, no keys handed out
    for version in (1, 2):
        legacy = legacy_grant(version, ck.image_key, ck.transform_secret, pub.read_bytes(), COLLECTION,
                              w["tokens"]["reader_token"])
        with pytest.raises(GrantError, match=f"format version {version}") as info:
            open_grant(legacy, priv.read_bytes())
        assert "\n" not in str(info.value) and "ask the owner for a new grant" in str(info.value)
    # the shared reader token, sealed in a grant of today's format, works until it is revoked
    old = open_grant(make_grant(keys, pub.read_bytes(), COLLECTION, w["tokens"]["reader_token"], bits=BITS),
                     priv.read_bytes())
    assert (old.version, old.user, old.key_id, set(old.image_keys)) == (3, None, 1, {1})
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
    keys1 = OwnerKeys.load(w["home"] / "owner.key")
    ck1 = keys1.for_collection(COLLECTION)
    legacy_id = item_ids(w)[legacy_rel]
    t1 = CodeTransform(ck1.transform_secret, BITS)
    code = t1.apply(w["raw"][w["data"][legacy_rel]][None, :])[0].tobytes()
    with owner_client(w) as owner:
        list(owner.upload(COLLECTION, [(legacy_id, code, v1_blob(ck1.image_key, w["data"][legacy_rel], ck1.binding,
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
    ck = keys.for_collection(COLLECTION)
    assert keys.key_ids == [1, 2] and ck.key_id == 2 and (ck.uid, ck.mode) == (ck1.uid, ck1.mode)
    assert (ck.at(1).image_key, ck.at(1).transform_secret) == (ck1.image_key, ck1.transform_secret)
    assert ck.transform_secret != ck1.transform_secret and ck.image_key != ck1.image_key
    alice_new = open_grant(new_path.read_bytes(), w["people"]["alice"][0].read_bytes())
    assert (alice_new.key_id, sorted(alice_new.image_keys), alice_new.user) == (2, [1, 2], "alice")
    assert alice_new.image_keys[1] == ck1.image_key and alice_new.image_key == ck.image_key
    assert alice_new.transform_secret == ck.transform_secret and alice_new.binding == ck1.binding

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
    by_id = item_bytes(w)
    for i, blob in blobs.items():
        assert decrypt_image(alice_new.image_keys, blob, alice_new.binding, i).data == by_id[i]
    with pytest.raises(BlobAuthenticationError, match="authentication failed"):  # bound to name and uid, not the name
        decrypt_image(alice_new.image_keys, blobs[legacy_id], COLLECTION, legacy_id)

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
        assert decrypt_image(alice_new.image_keys, blob, alice_new.binding, i).data == by_id[i]
        with pytest.raises(BlobAuthenticationError, match="key version 2"):
            decrypt_image(alice.image_keys, blob, alice.binding, i)  # an old grant's keys do not open new blobs
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
    upload(w, w["files"][40:50])  # uploads use the collection's key version (3), as the server does
    with reader(w, g) as c:
        assert_same(served(c, CodeTransform(g.transform_secret, BITS), q, 10),
                    brute_force(raw_db(w, w["files"][:50]), q, 10))


def test_two_collections_of_one_key_file_each_rotate_with_their_own_versions(world, capsys):
    """One key file serves any number of collections and rotating one moves only its own key version (the
    key file records each collection's newest); grants, codes, blobs and ids stay each collection's own."""
    w = world
    other = "albums"
    assert cli(capsys, "owner", "create-collection", other, "--bits", BITS, "--server", w["server"].address,
               "--admin-token-file", w["server"].data_dir / "admin.token")[0] == 0
    other_owner = json.loads((w["home"] / f"{other}.tokens.json").read_text())["owner_token"]

    def other_client() -> CloudClient:
        return CloudClient(w["server"].address, other_owner)

    upload(w, w["files"][:30], other, other_client())
    grant_for(w, capsys, "alice")
    grant_for(w, capsys, "alice", "--collection", other, out_name="alice-albums.grant")
    keys1 = OwnerKeys.load(w["home"] / "owner.key")
    p1, a1 = keys1.for_collection(COLLECTION), keys1.for_collection(other)
    assert p1.uid != a1.uid and (p1.key_id, a1.key_id) == (1, 1)
    assert len({p1.image_key, a1.image_key, p1.transform_secret, a1.transform_secret, p1.id_key, a1.id_key}) == 6
    assert not set(item_ids(w).values()) & set(item_ids(w, other).values())  # the same files, other ids

    code, out, err = cli(capsys, "owner", "rotate")  # the key file's default collection, photos
    assert code == 0 and "key version 1 -> 2" in out, err
    for n in (1, 2):  # then albums, twice: a key file rotated for one collection rotates others too
        code, out, err = cli(capsys, "owner", "rotate", "--collection", other)
        assert code == 0 and f"key version {n} -> {n + 1}" in out, err
    doc = json.loads((w["home"] / "owner.key").read_text())
    assert {name: e["key_id"] for name, e in doc["collections"].items()} == {COLLECTION: 2, other: 3}
    keys = OwnerKeys.load(w["home"] / "owner.key")
    pk, ak = keys.for_collection(COLLECTION), keys.for_collection(other)
    assert (pk.uid, ak.uid, pk.key_id, ak.key_id, keys.key_ids) == (p1.uid, a1.uid, 2, 3, [1, 2])
    assert (pk.at(1).image_key, ak.at(1).image_key) == (p1.image_key, a1.image_key)
    assert (pk.id_key, ak.id_key) == (p1.id_key, a1.id_key)  # ids do not move with rotation
    with owner_client(w) as c:
        assert c.stats(COLLECTION).key_id == 2
    with other_client() as c:
        assert c.stats(other).key_id == 3
    assert json.loads(cli(capsys, "owner", "grants", "--json")[1])["key_id"] == 2
    assert json.loads(cli(capsys, "owner", "grants", "--collection", other, "--json")[1])["key_id"] == 3

    alice_priv = w["people"]["alice"][0].read_bytes()
    gp = open_grant((w["home"] / "grants" / COLLECTION / "alice.grant").read_bytes(), alice_priv)
    ga = open_grant((w["home"] / "grants" / other / "alice.grant").read_bytes(), alice_priv)
    assert (gp.collection, gp.key_id, gp.image_keys, gp.transform_secret, gp.binding) == \
           (COLLECTION, 2, pk.image_keys(), pk.transform_secret, pk.binding)
    assert (ga.collection, ga.key_id, ga.image_keys, ga.transform_secret, ga.binding) == \
           (other, 3, ak.image_keys(), ak.transform_secret, ak.binding)
    assert not set(gp.image_keys.values()) & set(ga.image_keys.values())

    # each collection searches exactly with its own grant, before and after uploads made under its own version
    q = queries(w)
    upload(w, w["files"][40:45])
    upload(w, w["files"][30:35], other, other_client())
    for g, files in ((gp, w["files"][:45]), (ga, w["files"][:35])):
        with reader(w, g) as c:
            assert_same(served(c, CodeTransform(g.transform_secret, BITS), q, 12, g.collection),
                        brute_force(raw_db(w, files, g.collection), q, 12))
            ids = sorted(raw_db(w, files, g.collection))
            blobs = {i: b for i, b, _ in c.fetch(g.collection, ids)}
        assert len(blobs) == len(files)
        by_id = item_bytes(w, g.collection)
        new_ids = set(raw_db(w, files[-5:], g.collection))
        assert {blob_key_id(b) for i, b in blobs.items() if i in new_ids} == {g.key_id}
        assert {blob_key_id(b) for i, b in blobs.items() if i not in new_ids} == {1}
        for i, blob in blobs.items():
            assert decrypt_image(g.image_keys, blob, g.binding, i).data == by_id[i]
        # the other collection's keys open none of them
        foreign = ga if g is gp else gp
        for i in (min(set(blobs) - new_ids), min(new_ids)):
            with pytest.raises(BlobAuthenticationError):
                decrypt_image(foreign.image_keys, blobs[i], g.binding, i)


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


def test_key_file_keeps_each_collections_version_and_old_formats_are_refused(tmp_path, people, monkeypatch, capsys):
    keys = OwnerKeys.generate("c").register("c")
    keys.save(tmp_path / "k1.key")
    doc = json.loads((tmp_path / "k1.key").read_text())
    assert (doc["version"], doc["collections"]["c"]["key_id"]) == (3, 1)
    rotated = keys.rotated("c").rotated("c")
    rotated.save(tmp_path / "k3.key")
    doc = json.loads((tmp_path / "k3.key").read_text())
    assert doc["version"] == 3 and doc["collections"]["c"]["key_id"] == 3  # the newest version is what is recorded
    loaded = OwnerKeys.load(tmp_path / "k3.key")
    ck = loaded.for_collection("c")
    first = keys.for_collection("c")
    assert loaded == rotated and ck.key_id == 3 and loaded.key_ids == [1, 2, 3]
    assert (ck.at(1).image_key, ck.at(1).transform_secret) == (first.image_key, first.transform_secret)
    assert ck.at(2).image_keys().keys() == {1, 2} and ck.image_keys().keys() == {1, 2, 3}
    assert len({ck.at(v).image_key for v in (1, 2, 3)} | {ck.at(v).transform_secret for v in (1, 2, 3)}) == 6
    with pytest.raises(UserError, match="not 7"):
        ck.at(7)
    with pytest.raises(UserError, match="no keys for collection 'd'"):
        loaded.rotated("d")
    # blobs: version 1 (no key id) and version 2 of each key version decrypt from one keyring
    ring = ck.image_keys()
    old = v1_blob(first.image_key, b"old bytes", ck.binding, 5, "old.png")
    assert decrypt_image(ring, old, ck.binding, 5) == ("old.png", b"old bytes")
    assert decrypt_image(first.image_key, old, ck.binding, 5).data == b"old bytes"
    for v in (1, 2, 3):
        blob = encrypt_image(ring[v], b"img %d" % v, ck.binding, 9, key_id=v)
        assert blob_key_id(blob) == v and decrypt_image(ring, blob, ck.binding, 9).data == b"img %d" % v
    with pytest.raises(BlobAuthenticationError, match="authentication failed"):  # the key id is authenticated
        blob = encrypt_image(ring[2], b"x", ck.binding, 9, key_id=2)
        decrypt_image(ring, blob[:5] + struct.pack(">I", 3) + blob[9:], ck.binding, 9)

    # key files of format 1 (one key) and 2 (a keyring shared by every collection) are refused, in one line
    # naming the migration: by the API and by every command that reads the key file
    one = {"image_key": base64.b64encode(get_random_bytes(32)).decode(),
           "transform_secret": base64.b64encode(get_random_bytes(32)).decode()}
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    for version, body in ((1, one), (2, {"keys": [{"id": 1, **one}, {"id": 2, **one}]})):
        old_file = tmp_path / f"format{version}.key"
        old_file.write_text(json.dumps({"format": "dlheir-owner-key", "version": version, **body, "collection": "c"}))
        old_file.chmod(0o600)
        with pytest.raises(UserError, match=f"format version {version}") as info:
            OwnerKeys.load(old_file)
        assert "\n" not in str(info.value) and f"dlheir owner migrate-keys --key {old_file}" in str(info.value)
        for argv in (["owner", "fingerprint"], ["owner", "grant", "--user-pub", people["alice"][1], "--collection", "c"]):
            assert main([str(a) for a in (*argv, "--key", old_file)]) == 2
            out, err = capsys.readouterr()
            assert err.count("\n") == 1 and "dlheir owner migrate-keys" in err and "Traceback" not in out + err
    # access.default_label: the label a grant uses without --user
    assert access.default_label(people["alice"][1]) == "alice"
