"""A server that lies (issue 19): a real dlheir server behind a proxy that changes its answers
(tests/lying_proxy.py), or the owner's own moves (delete and re-create). Each test shows the
client refuses with one line, or that the lie gains the server nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlheir.client import access
from dlheir.client.cloud import CloudClient
from dlheir.client.crypto import (
    BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, decrypt_image, generate_user_keypair,
    make_grant, migrate_key_file, open_grant,
)
from dlheir.client.owner import upload_images
from dlheir.client.private import (
    LocalIndex, PageAuthenticationError, PageWriter, RollbackError, encode_records, grant_image_keys, open_local,
    page_key, seal_page, PageRecords, OP_PUT,
)
from dlheir.client.trust import check_owner
from dlheir.client.user import search_image
from dlheir.errors import UserError
from dlheir.ids import content_id, item_id
from dlheir.proto import dlheir_cloud_pb2 as pb
from lying_proxy import LyingProxy

BITS = 48


class StandInHasher:
    """Triton's interface over a table image bytes -> raw code (raw-code collections: no fingerprint)."""

    fingerprint = None
    bits = BITS

    def __init__(self, table: dict[bytes, np.ndarray]) -> None:
        self.table = table

    def hash_images(self, sources):
        codes = np.stack([self.table[s if isinstance(s, bytes) else open(s, "rb").read()] for s in sources])
        return np.zeros((len(codes), BITS), np.float32), codes

    def hash_one(self, source):
        probs, codes = self.hash_images([source])
        return probs[0], codes[0]


class Owner:
    """One owner key file, its collections on a real server, a user with a key pair, images on disk."""

    def __init__(self, server, tmp_path, n: int = 12) -> None:
        self.server, self.tmp = server, tmp_path
        rng = np.random.default_rng(7)
        self.files, self.table = [], {}
        for i in range(n):
            data = rng.bytes(64) + b"image %d" % i
            path = tmp_path / f"img{i:02d}.png"
            path.write_bytes(data)
            self.files.append((path.name, path))
            self.table[data] = rng.integers(0, 256, BITS // 8, dtype=np.uint8)
        self.hasher = StandInHasher(self.table)
        self.key_path = tmp_path / "owner.key"
        OwnerKeys.generate().save(self.key_path)
        self.tokens: dict[str, tuple[str, str]] = {}
        self.user_priv, self.user_pub = generate_user_keypair(tmp_path / "alice.pem")

    @property
    def keys(self) -> OwnerKeys:
        return OwnerKeys.load(self.key_path)

    def create(self, name: str, mode: str = "server-ranked") -> None:
        with CloudClient(self.server.address) as admin:
            self.tokens[name] = admin.create_collection(name, BITS, self.server.admin_token,
                                                        private=mode == "private")
        self.keys.register(name, mode).replace_file(self.key_path)

    def upload(self, name: str, files=None, address: str | None = None, replace: bool = False):
        with CloudClient(address or self.server.address, self.tokens[name][0]) as cloud:
            return upload_images(files or self.files, self.keys, name, cloud, self.hasher, progress=False,
                                 replace=replace)

    def grant(self, name: str, keys: OwnerKeys | None = None, public: bytes | None = None):
        raw = make_grant(keys or self.keys, public or self.user_pub.read_bytes(), name, self.tokens[name][1],
                         bits=BITS)
        return open_grant(raw, self.user_priv.read_bytes())

    def query(self, i: int = 0) -> bytes:
        return self.files[i][1].read_bytes()


@pytest.fixture
def owner(cloud_server, tmp_path):
    return Owner(cloud_server, tmp_path)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


# --- 1. mode downgrade ----------------------------------------------------------------------
def _say_server_ranked(request, replies):
    for r in replies:
        if r.HasField("header"):
            r.header.mode = pb.SERVER_RANKED
    return replies


def _stats_server_ranked(request, replies):
    replies[0].info.mode = pb.SERVER_RANKED
    return replies


def test_a_private_grant_never_falls_back_to_a_server_search(owner):
    owner.create("p", "private")
    owner.upload("p")
    grant = owner.grant("p")
    assert grant.private
    with LyingProxy(owner.server.address, {"SyncCodePages": _say_server_ranked}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            with pytest.raises(UserError) as info:
                open_local(cloud, grant, cache=None)
            assert "server-ranked" in one_line(info.value) and "refusing" in str(info.value)
            with pytest.raises(UserError):  # and the user flow without a local index refuses too
                search_image(owner.query(), grant, cloud, owner.hasher, k=3, local=None)
        assert not [m for m, _ in proxy.seen if m == "Search"]  # the query's code never went out


def test_the_owner_refuses_a_mode_the_key_file_did_not_create(owner):
    owner.create("p", "private")
    owner.create("a")
    with LyingProxy(owner.server.address, {"CollectionStats": _stats_server_ranked}) as proxy:
        with pytest.raises(UserError) as info:  # private told server-ranked: codes would go out transformed
            owner.upload("p", address=proxy.address)
        assert "server-ranked" in one_line(info.value) and "private" in str(info.value)
        assert not [m for m, _ in proxy.seen if m == "AppendCodePage"]

    def stats_private(request, replies):
        replies[0].info.mode = pb.PRIVATE_RANKING
        return replies
    with LyingProxy(owner.server.address, {"CollectionStats": stats_private}) as proxy:
        with pytest.raises(UserError):
            owner.upload("a", address=proxy.address)


def test_a_private_grant_shares_no_secret_with_a_server_ranked_collection(owner):
    owner.create("p", "private")
    owner.create("a")
    p, a = owner.grant("p"), owner.grant("a")
    assert p.transform_secret != a.transform_secret
    assert not set(p.image_keys.values()) & set(a.image_keys.values())
    # the transform the server could learn from "a" (known pairs) says nothing of p's pages or codes
    raw = np.random.default_rng(1).integers(0, 256, (20, BITS // 8), dtype=np.uint8)
    assert not np.array_equal(CodeTransform(p.transform_secret, BITS).apply(raw),
                              CodeTransform(a.transform_secret, BITS).apply(raw))


# --- 2. rollback, withheld pages, forks, replayed blobs -------------------------------------
def _private_with_pages(owner, pages: int = 3):
    owner.create("p", "private")
    third = len(owner.files) // pages
    for s in range(pages):
        owner.upload("p", owner.files[s * third:(s + 1) * third])
    return owner.grant("p")


def test_fewer_pages_than_seen_are_refused(owner, tmp_path):
    grant = _private_with_pages(owner)
    cache = tmp_path / "user.pages"
    with CloudClient(owner.server.address, grant.reader_token) as cloud:
        assert LocalIndex(cloud, "p", BITS, grant_image_keys(grant), cache, binding=grant.binding).sync().pages_total == 3

    def roll_back(request, replies):  # announce 2 pages and send those
        replies[0].header.pages = 2
        return [r for r in replies if not r.HasField("page") or r.page.page < 2]
    with LyingProxy(owner.server.address, {"SyncCodePages": roll_back}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            local = LocalIndex(cloud, "p", BITS, grant_image_keys(grant), cache, binding=grant.binding)
            with pytest.raises(RollbackError) as info:
                local.sync()
            assert "this client has seen 3" in one_line(info.value)
            # the cache gone (a new process, a wiped cache): the head record alone still remembers 3
            cache.unlink()
            with pytest.raises(RollbackError):
                LocalIndex(cloud, "p", BITS, grant_image_keys(grant), cache, binding=grant.binding).sync()


def test_pages_announced_but_withheld_are_refused(owner):
    grant = _private_with_pages(owner)

    def withhold(request, replies):  # the header says 3, the last page never comes
        return [r for r in replies if not r.HasField("page") or r.page.page < 2]
    with LyingProxy(owner.server.address, {"SyncCodePages": withhold}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            with pytest.raises(RollbackError) as info:
                LocalIndex(cloud, "p", BITS, grant_image_keys(grant), None, binding=grant.binding).sync()
            assert "announced 3" in one_line(info.value)


def test_another_history_of_the_pages_is_refused(owner, tmp_path):
    grant = _private_with_pages(owner)
    cache = tmp_path / "user.pages"
    with CloudClient(owner.server.address, grant.reader_token) as cloud:
        LocalIndex(cloud, "p", BITS, grant_image_keys(grant), cache, binding=grant.binding).sync()
    # a page 2 the owner really sealed (say, an append the server answered "taken" and kept) after pages 0-1
    keys = owner.keys.for_collection("p")
    with CloudClient(owner.server.address, grant.reader_token) as cloud:
        follower = LocalIndex(cloud, "p", BITS, keys.image_keys(), None, binding=keys.binding)
        follower.sync()
    first_two = LocalIndex(None, "p", BITS, keys.image_keys(), None, binding=keys.binding)
    chain = first_two.chain
    from dlheir.client.private import next_chain
    pages = []

    def capture(request, replies):
        pages.extend(r.page.data for r in replies if r.HasField("page"))
        return replies
    with LyingProxy(owner.server.address, {"SyncCodePages": capture}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            LocalIndex(cloud, "p", BITS, grant_image_keys(grant), None, binding=grant.binding).sync()
    for sealed in pages[:2]:
        chain = next_chain(chain, sealed)
    other = seal_page(page_key(keys.image_key, keys.binding), keys.binding, 2,
                      encode_records(PageRecords(np.array([OP_PUT], np.uint8), np.array([99]),
                                                 np.zeros((1, BITS // 8), np.uint8)), BITS), keys.key_id, chain)

    def fork(request, replies):
        for r in replies:
            if r.HasField("page") and r.page.page == 2:
                r.page.data = other
        return replies
    with LyingProxy(owner.server.address, {"SyncCodePages": fork}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            fresh = tmp_path / "fresh.pages"  # a fresh client accepts the fork (fork consistency: said in the README)
            assert LocalIndex(cloud, "p", BITS, grant_image_keys(grant), fresh, binding=grant.binding).sync().pages_total == 3
            cache.unlink()  # the client that saw the real page 2 refuses, from its head record alone
            with pytest.raises(RollbackError) as info:
                LocalIndex(cloud, "p", BITS, grant_image_keys(grant), cache, binding=grant.binding).sync()
            assert "another history" in one_line(info.value)


def test_a_replayed_or_deleted_items_blob_does_not_decrypt_as_current(owner, tmp_path):
    owner.create("p", "private")
    owner.upload("p")
    grant = owner.grant("p")
    keys = owner.keys.for_collection("p")
    with CloudClient(owner.server.address, grant.reader_token) as cloud:
        local = open_local(cloud, grant, cache=None)
        ids = sorted(local.digests)
        old = {i: b for i, b, _ in cloud.fetch("p", ids[:2])}
    # the owner replaces item ids[0] with another image (same id), and deletes ids[1]
    data = b"a new image for the same id"
    owner.table[data] = owner.table[owner.query(0)]
    (tmp_path / "new.png").write_bytes(data)
    with CloudClient(owner.server.address, owner.tokens["p"][0]) as cloud:
        upload_images([("new.png", tmp_path / "new.png")], owner.keys, "p", cloud, owner.hasher, progress=False,
                      ids=[ids[0]], replace=True)
        PageWriter(cloud, keys.image_keys(), "p", BITS, keys.key_id, keys.binding).delete([ids[1]])

    def replay(request, replies):  # the server serves the old blobs (it kept a copy)
        for r in replies:
            if r.id in old:
                r.blob = old[r.id]
        return replies
    with LyingProxy(owner.server.address, {"Fetch": replay}) as proxy:
        with CloudClient(proxy.address, grant.reader_token) as cloud:
            local = open_local(cloud, grant, cache=None)
            assert ids[1] not in local.digests  # the tombstone holds: the deleted id is never ranked
            with pytest.raises(PageAuthenticationError) as info:
                local.check_blob(ids[0], old[ids[0]])
            assert "replayed" in one_line(info.value)
            with pytest.raises(PageAuthenticationError):
                local.check_blob(ids[1], old[ids[1]])
            with pytest.raises(PageAuthenticationError):  # the user flow refuses the replayed top hit
                search_image(data, grant, cloud, owner.hasher, k=1, local=local)


# --- 3. a re-created collection --------------------------------------------------------------
def test_nothing_of_a_deleted_collection_authenticates_in_its_re_creation(owner, tmp_path):
    owner.create("p", "private")
    owner.upload("p")
    old_grant = owner.grant("p")
    with CloudClient(owner.server.address, old_grant.reader_token) as cloud:
        old_local = open_local(cloud, old_grant)  # default cache, under the old uid
        old_blobs = {i: b for i, b, _ in cloud.fetch("p", sorted(old_local.digests))}
    with CloudClient(owner.server.address) as admin:
        admin.delete_collection("p", owner.server.admin_token)
    owner.create("p", "private")
    owner.upload("p", owner.files[:3])
    owner.upload("p", owner.files[3:5])  # page 1: past what the old grant's cache holds
    new_grant = owner.grant("p")
    assert new_grant.uid != old_grant.uid
    with CloudClient(owner.server.address, owner.tokens["p"][1]) as cloud:
        with pytest.raises(PageAuthenticationError) as info:  # the old grant opens none of the new pages
            open_local(cloud, old_grant)
        one_line(info.value)
        local = open_local(cloud, new_grant)  # the new grant: a cache of its own, only the new items
        assert len(local) == 5 and local.pages == 2
    for i, blob in old_blobs.items():  # an old blob replayed into the new collection does not open
        with pytest.raises(BlobAuthenticationError):
            decrypt_image(new_grant.image_keys, blob, new_grant.binding, i)


# --- 4. keyed item ids ----------------------------------------------------------------------
def test_item_ids_are_keyed_the_server_cannot_confirm_a_guess(owner):
    owner.create("a")
    owner.create("b")
    owner.upload("a")
    owner.upload("b")
    with CloudClient(owner.server.address, owner.tokens["a"][0]) as cloud:
        stored = cloud.contains("a", [content_id(p.read_bytes()) for _, p in owner.files]
                                + [item_id(rel) for rel, _ in owner.files])
        assert stored == set()  # what the server could compute from a copy of an image, or its path
    # the same images in two collections of one owner are not linkable by id
    a_ids = {int(i) for i in _ids(owner, "a")}
    b_ids = {int(i) for i in _ids(owner, "b")}
    assert len(a_ids) == len(owner.files) and not a_ids & b_ids
    assert owner.upload("a").already_present == len(owner.files)  # the owner still finds its own


def _ids(owner, name):
    with CloudClient(owner.server.address, owner.tokens[name][1]) as cloud:
        return cloud.search(name, np.zeros((1, BITS // 8), np.uint8), len(owner.files))[0][0]


# --- 5. keys per collection, rotation of several ----------------------------------------------
def test_a_grant_for_one_collection_opens_nothing_of_another(owner):
    owner.create("a", "private")
    owner.create("b", "private")
    owner.upload("a")
    owner.upload("b")
    ga, gb = owner.grant("a"), owner.grant("b")
    with CloudClient(owner.server.address, gb.reader_token) as cloud:
        b_blob = next(iter(cloud.fetch("b", sorted(open_local(cloud, gb, cache=None).digests)[:1])))
        with pytest.raises(PageAuthenticationError):  # a's keys on b's pages, even under b's binding
            LocalIndex(cloud, "b", BITS, grant_image_keys(ga), None, binding=gb.binding).sync()
    with pytest.raises(BlobAuthenticationError):
        decrypt_image(ga.image_keys, b_blob[1], gb.binding, b_blob[0])
    assert decrypt_image(gb.image_keys, b_blob[1], gb.binding, b_blob[0]).data in owner.table


def test_every_collection_of_one_key_file_rotates(owner, tmp_path, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    for name in ("a", "b", "c"):
        owner.create(name)
        owner.upload(name)
    before = {n: owner.keys.for_collection(n).transform_secret for n in "abc"}
    for name in ("a", "b", "c", "a"):
        with CloudClient(owner.server.address, owner.tokens[name][0]) as cloud:
            report = access.rotate(owner.key_path, name, cloud)
        assert report.to_key == report.from_key + 1
    keys = owner.keys
    assert [keys.for_collection(n).key_id for n in "abc"] == [3, 2, 2]
    assert all(keys.for_collection(n).transform_secret != before[n] for n in "abc")
    # after the rotations each collection still searches exactly with its own new keys
    for name in "abc":
        with CloudClient(owner.server.address, owner.tokens[name][0]) as cloud:
            reader = cloud.add_reader(name, "alice", replace=True)
        g = open_grant(make_grant(keys, owner.user_pub.read_bytes(), name, reader, bits=BITS),
                       owner.user_priv.read_bytes())
        with CloudClient(owner.server.address, reader) as cloud:
            hits, _ = search_image(owner.query(3), g, cloud, owner.hasher, k=1)
        assert hits[0].distance == 0 and hits[0].image == owner.query(3)


# --- 6. signed grants, old formats ----------------------------------------------------------
def test_grants_are_signed_and_only_a_trusted_owners_are_accepted(owner, tmp_path, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    owner.create("a")
    real = owner.grant("a")
    assert "first use" in check_owner(real) and check_owner(real) is None  # pinned, then simply trusted
    mallory = OwnerKeys.generate().register("a")  # anyone with alice's public key can make a grant...
    forged = open_grant(make_grant(mallory, owner.user_pub.read_bytes(), "a", "mallory-token", bits=BITS),
                        owner.user_priv.read_bytes())
    with pytest.raises(GrantError) as info:  # ...which names its own key, one alice does not trust
        check_owner(forged)
    assert "trust-owner" in one_line(info.value)
    # a payload altered after signing (here: the mode) fails the signature
    raw = bytearray(make_grant(owner.keys, owner.user_pub.read_bytes(), "a", "t"))
    bob_priv, bob_pub = generate_user_keypair(tmp_path / "bob.pem")
    with pytest.raises(GrantError) as info:  # alice re-sealing her signed grant for bob does not pass as the owner's
        _reseal_for(raw, owner.user_priv.read_bytes(), bob_pub.read_bytes(), bob_priv.read_bytes())
    assert "another user" in one_line(info.value)


def _reseal_for(grant: bytes, holder_priv: bytes, to_pub: bytes, to_priv: bytes):
    """Open ``grant`` with the holder's key and seal the same signed payload for another key."""
    import struct

    from Crypto.Cipher import AES, PKCS1_OAEP
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import RSA
    from Crypto.Random import get_random_bytes

    (w,) = struct.unpack(">H", grant[5:7])
    key = PKCS1_OAEP.new(RSA.import_key(holder_priv), hashAlgo=SHA256).decrypt(bytes(grant[7:7 + w]))
    body = 7 + w
    cipher = AES.new(key, AES.MODE_GCM, nonce=bytes(grant[body:body + 12]))
    cipher.update(bytes(grant[:body]))
    payload = cipher.decrypt_and_verify(bytes(grant[body + 28:]), bytes(grant[body + 12:body + 28]))
    new_key = get_random_bytes(32)
    wrapped = PKCS1_OAEP.new(RSA.import_key(to_pub), hashAlgo=SHA256).encrypt(new_key)
    header = bytes(grant[:5]) + struct.pack(">H", len(wrapped)) + wrapped
    nonce = get_random_bytes(12)
    c = AES.new(new_key, AES.MODE_GCM, nonce=nonce)
    c.update(header)
    ct, tag = c.encrypt_and_digest(payload)
    return open_grant(header + nonce + tag + ct, to_priv)


def test_altered_signed_payloads_fail(owner):
    owner.create("a")
    doc_fields = []
    real = owner.grant("a")
    mallory = OwnerKeys.generate().register("a")
    # a grant signed by mallory but claiming the real owner's public key does not verify
    raw = make_grant(mallory, owner.user_pub.read_bytes(), "a", "t")
    priv = owner.user_priv.read_bytes()
    import struct

    from Crypto.Cipher import AES, PKCS1_OAEP
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import RSA
    (w,) = struct.unpack(">H", raw[5:7])
    key = PKCS1_OAEP.new(RSA.import_key(priv), hashAlgo=SHA256).decrypt(raw[7:7 + w])
    body = 7 + w
    c = AES.new(key, AES.MODE_GCM, nonce=raw[body:body + 12])
    c.update(raw[:body])
    doc = json.loads(c.decrypt_and_verify(raw[body + 28:], raw[body + 12:body + 28]))
    doc["owner_key"] = __import__("base64").b64encode(owner.keys.public_key).decode()
    c = AES.new(key, AES.MODE_GCM, nonce=raw[body:body + 12])
    c.update(raw[:body])
    ct, tag = c.encrypt_and_digest(json.dumps(doc).encode())
    with pytest.raises(GrantError) as info:
        open_grant(raw[:body] + raw[body:body + 12] + tag + ct, priv)
    assert "signature" in one_line(info.value)
    doc_fields.append(real.mode)
    assert doc_fields == ["server-ranked"]


def test_old_key_files_and_grants_get_one_line_and_a_migration(tmp_path):
    import base64
    import os

    old = tmp_path / "owner.key"
    fd = os.open(old, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"format": "dlheir-owner-key", "version": 1, "image_key": base64.b64encode(os.urandom(32)).decode(),
                             "transform_secret": base64.b64encode(os.urandom(32)).decode()}).encode())
    os.close(fd)
    with pytest.raises(UserError) as info:
        OwnerKeys.load(old)
    assert "migrate-keys" in one_line(info.value)
    keys, backup = migrate_key_file(old)
    assert backup.is_file() and (backup.stat().st_mode & 0o777) == 0o600
    assert OwnerKeys.load(old).fingerprint == keys.fingerprint and keys.collections == {}
    with pytest.raises(GrantError) as info:
        open_grant(b"DLHG\x02" + bytes(400), b"unused")
    assert "format version 2" in one_line(info.value)


def test_cli_trusts_a_fingerprint_and_refuses_a_foreign_grant_in_one_line(owner, tmp_path, monkeypatch, capsys):
    from dlheir.cli import main

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    owner.create("a")
    assert main(["owner", "fingerprint", "--key", str(owner.key_path)]) == 0
    fp = capsys.readouterr().out.strip()
    assert fp == owner.keys.fingerprint and len(fp.split(":")) == 8
    assert main(["user", "trust-owner", fp]) == 0
    assert fp in capsys.readouterr().out
    forged = tmp_path / "forged.grant"
    forged.write_bytes(make_grant(OwnerKeys.generate().register("a"), owner.user_pub.read_bytes(), "a", "t",
                                  server=owner.server.address))
    query = owner.files[0][1]
    code = main(["user", "search", str(query), "--grant", str(forged), "--user-key", str(owner.user_priv)])
    out, err = capsys.readouterr()
    assert code != 0 and "Traceback" not in out + err
    assert "do not trust" in err and len(err.strip().splitlines()) == 1
    assert main(["user", "trust-owner", "not-a-fingerprint"]) != 0
    assert "not an owner fingerprint" in capsys.readouterr().err
