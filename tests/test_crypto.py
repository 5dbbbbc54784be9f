"""Keys, EncImg/Dec blobs, the Hamming-preserving code transform, grants, and their CLI commands."""

import base64
import hashlib
import json
import os
import re
import stat
import struct

import numpy as np
import pytest
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import eddsa

from dlheir.contract import ContractError
from dlheir.cli import main
from dlheir.client.crypto import (
    BLOB_OVERHEAD, BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, decrypt_image, encrypt_image,
    fingerprint, generate_user_keypair, make_grant, open_grant,
)
from dlheir.codes import hamming, pack_bits, unpack_bits
from dlheir.errors import UserError

BIT_LENGTHS = [12, 24, 32, 48, 64]


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    return generate_user_keypair(d / "alice.pem"), generate_user_keypair(d / "bob.pem")


@pytest.fixture(scope="module")
def carol(tmp_path_factory):
    """A passphrase-protected key pair."""
    return generate_user_keypair(tmp_path_factory.mktemp("carol") / "carol.pem", passphrase="correct horse")


# --- KeyGen ------------------------------------------------------------------------------
B64_A, B64_B = base64.b64encode(b"a" * 32).decode(), base64.b64encode(b"b" * 32).decode()
UID_HEX = "00112233445566778899aabbccddeeff"


def v3(**fields):
    """A format-3 key file's bytes with valid secrets, updated with ``fields``."""
    doc = {"format": "dlheir-owner-key", "version": 3, "master_secret": B64_A, "signing_key": B64_B, **fields}
    return json.dumps(doc).encode()


def test_owner_keys_are_two_separate_256_bit_keys():
    keys = OwnerKeys.generate()
    assert len(keys.master_secret) == 32 and len(keys.signing_seed) == 32
    assert keys.master_secret != keys.signing_seed
    assert OwnerKeys.generate().master_secret != keys.master_secret
    assert OwnerKeys.generate().signing_seed != keys.signing_seed
    assert repr(keys.master_secret) not in repr(keys) and repr(keys.signing_seed) not in repr(keys)
    assert keys.collections == {} and keys.collection is None  # no collection, so no collection keys, yet
    ck = keys.register("photos").for_collection("photos")
    # a collection's image key and transform secret are two separate 256-bit keys, never printed
    assert len(ck.image_key) == 32 and len(ck.transform_secret) == 32 and len(ck.id_key) == 32
    assert len({ck.image_key, ck.transform_secret, ck.id_key, keys.master_secret, keys.signing_seed}) == 5
    for secret in (ck.image_key, ck.transform_secret, ck.id_key, keys.master_secret):
        assert repr(secret) not in repr(ck)
    with pytest.raises(UserError, match="32 bytes"):
        OwnerKeys(b"short", keys.signing_seed)
    with pytest.raises(UserError, match="32 bytes"):
        OwnerKeys(keys.master_secret, b"short")
    with pytest.raises(UserError, match="separate"):
        OwnerKeys(keys.master_secret, keys.master_secret)


def test_owner_key_file_is_0600_even_with_open_umask_and_never_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    keys = OwnerKeys.generate("photos").register("photos", mode="private").register("other")
    old = os.umask(0)
    try:
        keys.save(path)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "dlheir-owner-key" and doc["version"] == 3 and doc["collection"] == "photos"
    assert base64.b64decode(doc["master_secret"]) == keys.master_secret
    assert base64.b64decode(doc["signing_key"]) == keys.signing_seed
    assert doc["collections"] == {
        "photos": {"uid": keys.collections["photos"].uid.hex(), "mode": "private", "key_id": 1},
        "other": {"uid": keys.collections["other"].uid.hex(), "mode": "server-ranked", "key_id": 1}}
    assert OwnerKeys.load(path) == keys
    before = path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        OwnerKeys.generate().save(path)
    assert path.read_bytes() == before
    # replace_file (a collection created or rotated) rewrites it, still 0600 whatever the umask
    rotated = keys.rotated("other")
    old = os.umask(0)
    try:
        rotated.replace_file(path)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600 and OwnerKeys.load(path) == rotated
    assert [p.name for p in tmp_path.iterdir()] == ["owner.key"]  # no temporary file left behind
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(UserError, match="accessible by group or others"):
            OwnerKeys.load(path)


@pytest.mark.parametrize("content, message", [
    (b"not json", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b"[1, 2]", "not a dlheir owner key"),
    (b'{"format": "something-else", "version": 3}', "not a dlheir owner key"),
    (b'{"format": "dlheir-owner-key", "version": 4}', "unsupported version 4"),
    (b'{"format": "dlheir-owner-key", "version": 3}', "master_secret"),
    (v3(signing_key=None), "signing_key"),
    (v3(master_secret="%%%"), "base64"),
    (v3(master_secret="AAAA"), "32 bytes"),
    (v3(signing_key=B64_A), "separate"),
    (v3(collections=[]), "collections must be an object"),
    (v3(collections={"c": {}}), "uid missing"),
    (v3(collections={"c": {"uid": "0011", "mode": "private", "key_id": 1}}), "16 bytes"),
    (v3(collections={"c": {"uid": UID_HEX, "mode": "public", "key_id": 1}}), "mode"),
    (v3(collections={"c": {"uid": UID_HEX, "mode": "private", "key_id": 0}}), "key ids"),
    (v3(collection=5), "collection must be a string"),
])
def test_malformed_owner_key_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(UserError, match=message) as info:
        OwnerKeys.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version, content", [
    (1, b'{"format": "dlheir-owner-key", "version": 1, "image_key": "AAAA", "transform_secret": "AAAA"}'),
    (2, b'{"format": "dlheir-owner-key", "version": 2, "keys": [{"id": 1, "image_key": "AAAA"}]}'),
])
def test_owner_key_file_of_format_1_or_2_is_refused_naming_the_migration(tmp_path, version, content):
    """Formats 1 and 2 (keys shared by every collection) no longer load, well-formed or not: one
    line naming the file, its version and ``dlheir owner migrate-keys``."""
    path = tmp_path / "old.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(UserError) as info:
        OwnerKeys.load(path)
    message = str(info.value)
    assert "\n" not in message and f"format version {version}" in message and str(path) in message
    assert f"dlheir owner migrate-keys --key {path}" in message


def test_missing_owner_key_file(tmp_path):
    with pytest.raises(UserError, match="owner key file not found"):
        OwnerKeys.load(tmp_path / "nope.key")


def test_key_file_format_3_registers_rotates_and_round_trips(tmp_path):
    path = tmp_path / "owner.key"
    keys = OwnerKeys.generate()
    keys.save(path)
    assert OwnerKeys.load(path) == keys and OwnerKeys.load(path).collections == {}
    one = keys.register("photos", mode="private")
    assert keys.collections == {}  # register returns new keys; the old object is unchanged
    entry = one.collections["photos"]
    assert (len(entry.uid), entry.mode, entry.key_id) == (16, "private", 1)
    two = one.register("cats")
    assert two.collections["cats"].mode == "server-ranked" and two.collections["photos"] == entry
    two.replace_file(path)
    loaded = OwnerKeys.load(path)
    assert loaded == two
    for name in ("photos", "cats"):  # every derived key survives the round trip
        a, b = loaded.for_collection(name), two.for_collection(name)
        assert (a.image_key, a.transform_secret, a.id_key, a.binding, a.mode, a.key_id) == \
            (b.image_key, b.transform_secret, b.id_key, b.binding, b.mode, b.key_id)
    ck = loaded.for_collection("photos")
    assert ck.private and ck.mode == "private" and not loaded.for_collection("cats").private
    assert ck.binding == "photos#" + entry.uid.hex() and ck.key_id == 1 and set(ck.image_keys()) == {1}

    # rotation moves one collection's version; the other's keys do not move
    r = loaded.rotated("photos").rotated("photos").rotated("cats")
    assert loaded.collections["photos"].key_id == 1  # rotated returns new keys too
    assert (r.collections["photos"].key_id, r.collections["cats"].key_id) == (3, 2)
    assert r.collections["photos"].uid == entry.uid and r.collections["photos"].mode == "private"
    r.replace_file(path)
    r = OwnerKeys.load(path)
    assert (r.collections["photos"].key_id, r.collections["cats"].key_id) == (3, 2)
    new = r.for_collection("photos")
    assert new.key_id == 3 and new.image_key != ck.image_key and new.transform_secret != ck.transform_secret
    assert new.id_key == ck.id_key and new.binding == ck.binding  # ids and binding survive rotation
    assert new.at(1).image_key == ck.image_key and new.at(1).transform_secret == ck.transform_secret
    assert new.image_keys() == {1: ck.image_key, 2: new.at(2).image_key, 3: new.image_key}
    assert new.at(1).at(3).image_key == new.image_key  # an older version still knows the newest one
    for bad in (0, 4, "1"):
        with pytest.raises(UserError, match="key versions 1 to 3"):
            new.at(bad)

    # re-registering a name (a collection deleted and re-created) gives it a new uid and new keys
    again = r.register("photos", mode="private").for_collection("photos")
    assert again.key_id == 1 and again.binding != new.binding
    assert not {again.image_key, again.transform_secret, again.id_key} & {ck.image_key, ck.transform_secret, ck.id_key}

    with pytest.raises(UserError, match="mode"):
        keys.register("x", mode="public")
    with pytest.raises(UserError, match="name"):
        keys.register("")


def test_unknown_collection_is_a_one_line_error(tmp_path):
    keys = OwnerKeys.generate().register("photos").register("cats")
    for call in (lambda: keys.for_collection("dogs"), lambda: keys.rotated("dogs"),
                 lambda: OwnerKeys.generate().for_collection("dogs")):
        with pytest.raises(UserError, match="no keys for collection 'dogs'") as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "create-collection" in message
    with pytest.raises(UserError, match=r"it holds: cats, photos\)"):
        keys.for_collection("dogs")
    with pytest.raises(UserError, match=r"it holds: none\)"):
        OwnerKeys.generate().for_collection("dogs")
    with pytest.raises(UserError, match=f"the owner key file {tmp_path / 'o.key'} has no keys"):
        keys.for_collection("dogs", tmp_path / "o.key")


def test_collection_keys_are_derived_per_collection_and_version():
    keys = OwnerKeys.generate().register("a").register("b")
    a, b = keys.for_collection("a"), keys.for_collection("b")
    # two collections of one key file share no key
    assert not {a.image_key, a.transform_secret, a.id_key} & {b.image_key, b.transform_secret, b.id_key}
    assert a.binding != b.binding
    # versions differ: no version's image key or transform secret is another's; the id key is one per collection
    r = keys.rotated("a").rotated("a").for_collection("a")
    versions = [r.at(v) for v in (1, 2, 3)]
    assert len({v.image_key for v in versions}) == 3 and len({v.transform_secret for v in versions}) == 3
    assert {v.id_key for v in versions} == {a.id_key}
    assert not {v.image_key for v in versions} & {v.transform_secret for v in versions}
    assert versions[0].image_key == a.image_key
    # the same collection under another master secret (another key file) shares nothing either
    other = OwnerKeys(os.urandom(32), keys.signing_seed, None, keys.collections).for_collection("a")
    assert other.binding == a.binding and not {other.image_key, other.transform_secret, other.id_key} & {
        a.image_key, a.transform_secret, a.id_key}
    # deterministic, and the documented HKDF-SHA256 derivation
    assert keys.for_collection("a").image_key == a.image_key
    uid = keys.collections["a"].uid.hex().encode()
    for purpose, version, value in (("image", 2, r.at(2).image_key), ("transform", 3, r.at(3).transform_secret),
                                    ("item-ids", None, a.id_key)):
        context = b"uid=" + uid + b";purpose=" + purpose.encode() + (b";version=%d" % version if version else b"")
        assert HKDF(keys.master_secret, 32, salt=b"dlheir-collection-keys-v3", hashmod=SHA256,
                    context=context) == value


def test_fingerprint_format():
    keys = OwnerKeys.generate()
    fp = keys.fingerprint
    assert re.fullmatch(r"[0-9a-f]{4}(:[0-9a-f]{4}){7}", fp)
    assert fp == fingerprint(keys.public_key)
    digest = hashlib.sha256(keys.public_key).hexdigest()[:32]
    assert fp.replace(":", "") == digest
    assert len(keys.public_key) == 32  # the raw Ed25519 public key
    assert keys.register("x").fingerprint == fp  # collections do not change the signing key
    assert OwnerKeys(os.urandom(32), keys.signing_seed).fingerprint == fp  # it is the signing key's alone
    assert OwnerKeys.generate().fingerprint != fp
    assert keys.signing_seed.hex() not in fp and keys.public_key.hex()[:32] != digest


# --- EncImg / Dec ------------------------------------------------------------------------
def collection_keys(name="col", mode="server-ranked"):
    """A fresh key file's keys for one registered collection."""
    return OwnerKeys.generate().register(name, mode).for_collection(name)


def test_blob_layout_is_the_documented_one():
    ck = collection_keys("photos")
    key, binding = ck.image_key, ck.binding  # upload_images binds blobs to NAME#UIDHEX
    assert len(binding) == 6 + 1 + 32
    image = os.urandom(3000)
    blob = encrypt_image(key, image, binding, 0x0102030405060708, name="cat.jpg", key_id=3)
    assert blob[:4] == b"DLHB" and blob[4] == 2 and blob[5:9] == b"\x00\x00\x00\x03"
    assert len(blob) == BLOB_OVERHEAD + len("cat.jpg") + len(image) == 39 + 7 + 3000
    # decrypt by hand from the README's byte layout (version 2), with pycryptodome directly
    aad = (b"DLHB\x02" + struct.pack(">I", 3) + struct.pack(">H", 39) + binding.encode()
           + bytes.fromhex("0102030405060708"))
    cipher = AES.new(key, AES.MODE_GCM, nonce=blob[9:21])
    cipher.update(aad)
    payload = cipher.decrypt_and_verify(blob[21:-16], blob[-16:])
    assert payload == struct.pack(">H", 7) + b"cat.jpg" + image


def test_blob_round_trip_is_byte_identical_and_hides_name_and_content():
    key = collection_keys().image_key
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)
    blob = encrypt_image(key, image, "col", 42, name="holiday-photo-ünïcode.png")
    name, data = decrypt_image(key, blob, "col", 42)
    assert data == image and name == "holiday-photo-ünïcode.png"
    assert decrypt_image(key, encrypt_image(key, b"", "col", 1), "col", 1) == ("", b"")
    assert image[:64] not in blob and b"holiday" not in blob
    nonces = {encrypt_image(key, image, "col", 42)[9:21] for _ in range(20)}
    assert len(nonces) == 20  # fresh random nonce per blob
    odd = "name-\udcff.jpg"  # a POSIX file name that is not valid UTF-8
    assert decrypt_image(key, encrypt_image(key, b"x", "col", 3, name=odd), "col", 3).name == odd


def test_every_altered_swapped_truncated_or_foreign_blob_is_rejected():
    owner = OwnerKeys.generate().register("col").register("cox")
    keys = owner.for_collection("col")
    blob = encrypt_image(keys.image_key, os.urandom(200), "col", 42, name="a.png")
    recreated = owner.register("col").for_collection("col")  # the same name re-created: a new uid and keys
    bound = encrypt_image(keys.image_key, b"img", keys.binding, 42)
    assert decrypt_image(keys.image_key, bound, keys.binding, 42).data == b"img"
    cases = {
        "swapped id": (keys.image_key, blob, "col", 43),
        "other collection": (keys.image_key, blob, "cox", 42),
        "collection prefix": (keys.image_key, blob, "co", 42),
        "wrong key": (collection_keys().image_key, blob, "col", 42),
        "transform secret as key": (keys.transform_secret, blob, "col", 42),
        "id key as key": (keys.id_key, blob, "col", 42),
        "another collection's key": (owner.for_collection("cox").image_key, blob, "col", 42),
        "next version's key": (owner.rotated("col").for_collection("col").image_key, blob, "col", 42),
        "re-created collection's key": (recreated.image_key, blob, "col", 42),
        "bound blob, re-created binding": (keys.image_key, bound, recreated.binding, 42),
        "bound blob, bare name": (keys.image_key, bound, "col", 42),
        "empty": (keys.image_key, b"", "col", 42),
        "bad magic": (keys.image_key, b"XXXX" + blob[4:], "col", 42),
    }
    for i in range(len(blob)):  # every single byte, header, nonce, ciphertext and tag alike
        altered = bytearray(blob)
        altered[i] ^= 0x01
        cases[f"byte {i} altered"] = (keys.image_key, bytes(altered), "col", 42)
    for n in (1, 5, 17, 21, 38, 39, len(blob) - 16, len(blob) - 1):
        cases[f"truncated to {n}"] = (keys.image_key, blob[:n], "col", 42)
    cases["extended"] = (keys.image_key, blob + b"\x00", "col", 42)
    for what, args in cases.items():
        with pytest.raises(BlobAuthenticationError):
            decrypt_image(*args)
            pytest.fail(f"{what} was accepted")
    with pytest.raises(BlobAuthenticationError, match="authentication failed"):
        decrypt_image(keys.image_key, blob, "col", 43)
    with pytest.raises(BlobAuthenticationError, match="unsupported blob version 9"):
        decrypt_image(keys.image_key, blob[:4] + b"\x09" + blob[5:], "col", 42)
    with pytest.raises(BlobAuthenticationError, match="truncated"):
        decrypt_image(keys.image_key, blob[:20], "col", 42)
    assert issubclass(BlobAuthenticationError, UserError)


def test_blob_rejects_bad_key_or_id():
    key = collection_keys().image_key
    with pytest.raises(UserError, match="32 bytes"):
        encrypt_image(key[:16], b"x", "col", 1)
    with pytest.raises(UserError, match="item id"):
        encrypt_image(key, b"x", "col", -1)
    with pytest.raises(UserError, match="item id"):
        encrypt_image(key, b"x", "col", 2**64)


# --- the code transform --------------------------------------------------------------------
def random_codes(bits, n, seed):
    return pack_bits(np.random.default_rng(seed).integers(0, 2, (n, bits), dtype=np.uint8))


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_code_transform_preserves_all_hamming_distances(bits):
    codes = random_codes(bits, 64, bits)
    codes[1] = codes[0]  # a duplicate (distance 0)
    codes[2] = codes[0] ^ pack_bits(np.ones((1, bits), np.uint8))[0]  # the complement (distance N)
    t = CodeTransform(os.urandom(32), bits)
    out = t.apply(codes)
    assert out.shape == codes.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(hamming(out, out), hamming(codes, codes))
    queries = random_codes(bits, 5, bits + 1)
    np.testing.assert_array_equal(hamming(t.apply(queries), out), hamming(queries, codes))
    np.testing.assert_array_equal(t.invert(out), codes)  # invert . apply = identity
    np.testing.assert_array_equal(t.apply(t.invert(codes)), codes)
    assert (out != codes).any()
    if bits % 8:  # padding bits stay zero
        assert not (out[:, -1] & (0xFF >> (bits % 8))).any()


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_code_transform_is_a_keyed_permutation_then_mask(bits):
    secret = os.urandom(32)
    t = CodeTransform(secret, bits)
    assert sorted(t.perm.tolist()) == list(range(bits))
    zero = np.zeros((1, (bits + 7) // 8), np.uint8)
    np.testing.assert_array_equal(unpack_bits(t.apply(zero), bits)[0], t.mask)  # T(0) = mask
    eye = pack_bits(np.eye(bits, dtype=np.uint8))
    moved = unpack_bits(t.apply(eye), bits) ^ t.mask  # T(e_i) ^ mask = e_{inverse[i]}
    np.testing.assert_array_equal(moved.argmax(axis=1), t.inverse)
    np.testing.assert_array_equal(CodeTransform(secret, bits).apply(eye), t.apply(eye))  # deterministic
    other = CodeTransform(os.urandom(32), bits)
    assert (other.perm != t.perm).any() and (other.mask != t.mask).any()
    assert (other.apply(eye) != t.apply(eye)).any()
    assert t.perm.tolist() != list(range(bits)) and 0 < t.mask.sum() < bits


def test_code_transform_same_secret_serves_every_length_and_checks_input():
    secret = os.urandom(32)
    t48, t64 = CodeTransform(secret, 48), CodeTransform(secret, 64)
    assert t48.perm.tolist() != t64.perm[:48].tolist()  # derived per length, not truncated
    one = random_codes(48, 1, 0)
    np.testing.assert_array_equal(t48.apply(one[0]), t48.apply(one))  # one code [L] -> [1, L]
    with pytest.raises(UserError, match="shape"):
        t48.apply(random_codes(64, 2, 0))
    with pytest.raises(UserError, match="uint8"):
        t48.apply(one.astype(np.int64))
    with pytest.raises(UserError, match="zero padding"):
        CodeTransform(secret, 12).apply(np.array([[0xFF, 0xFF]], np.uint8))
    for bits in (0, 13, 512):
        with pytest.raises(ContractError, match="bits"):
            CodeTransform(secret, bits)
    with pytest.raises(UserError, match="secret"):
        CodeTransform(b"short", 48)


# --- key delivery ------------------------------------------------------------------------------
def test_user_keypair_files(users, carol, tmp_path):
    (alice_priv, alice_pub), _ = users
    assert alice_pub.name == "alice.pub.pem" and alice_pub.parent == alice_priv.parent
    assert mode_of(alice_priv) == 0o600 and not mode_of(alice_pub) & 0o022
    private = RSA.import_key(alice_priv.read_bytes())
    assert private.has_private() and private.size_in_bits() == 3072
    assert not RSA.import_key(alice_pub.read_bytes()).has_private()
    assert b"ENCRYPTED PRIVATE KEY" in carol[0].read_bytes()
    assert b"ENCRYPTED" not in alice_priv.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        generate_user_keypair(alice_priv)
    (tmp_path / "x.pub.pem").write_text("someone's")
    with pytest.raises(UserError, match="refusing to overwrite"):
        generate_user_keypair(tmp_path / "x.pem")
    assert not (tmp_path / "x.pem").exists()
    with pytest.raises(UserError, match="empty"):
        generate_user_keypair(tmp_path / "y.pem", passphrase="")


def test_grant_opens_only_with_its_users_private_key(users):
    (alice_priv, alice_pub), (bob_priv, _) = users
    keys = OwnerKeys.generate().register("col").register("other", mode="private")
    ck = keys.for_collection("col")
    grant = make_grant(keys, alice_pub.read_bytes(), "col", "reader-token-123", server="127.0.0.1:1", bits=48)
    assert grant[:5] == b"DLHG\x03"
    g = open_grant(grant, alice_priv.read_bytes())
    assert (g.collection, g.reader_token, g.image_key, g.transform_secret, g.server, g.bits) == \
        ("col", "reader-token-123", ck.image_key, ck.transform_secret, "127.0.0.1:1", 48)
    assert (g.uid, g.mode, g.private, g.binding, g.key_id, g.image_keys) == \
        (keys.collections["col"].uid, "server-ranked", False, ck.binding, 1, {1: ck.image_key})
    assert g.owner_key == keys.public_key and g.owner_fingerprint == keys.fingerprint and g.version == 3
    assert "reader-token-123" not in repr(g)
    for secret in (ck.image_key, ck.transform_secret):
        assert repr(secret) not in repr(g)
    # the grant carries this collection's keys only: never the id key, another collection's keys or the master secret
    o = open_grant(make_grant(keys, alice_pub.read_bytes(), "other", "t", user="alice"), alice_priv.read_bytes())
    other = keys.for_collection("other")
    assert (o.image_key, o.transform_secret, o.mode, o.private, o.binding, o.user) == \
        (other.image_key, other.transform_secret, "private", True, other.binding, "alice")
    assert not {o.image_key, o.transform_secret} & {g.image_key, g.transform_secret}
    payload = unseal(grant, alice_priv)
    assert sorted(payload) == ["bits", "collection", "format", "image_keys", "key_id", "mode", "owner_key",
                               "reader_token", "recipient", "server", "signature", "transform_secret", "uid", "user",
                               "version"]
    for secret in (ck.id_key, keys.master_secret, keys.signing_seed):
        assert base64.b64encode(secret).decode() not in json.dumps(payload)
    bare = open_grant(make_grant(keys, alice_pub.read_bytes(), "col", "t"), alice_priv.read_bytes())
    assert (bare.server, bare.bits) == (None, None)
    for secret in (ck.image_key, ck.transform_secret, base64.b64encode(ck.image_key), b"reader-token-123"):
        assert secret not in grant
    assert make_grant(keys, alice_pub.read_bytes(), "col", "t")[7:391] != make_grant(
        keys, alice_pub.read_bytes(), "col", "t")[7:391]  # fresh session key and OAEP randomness
    with pytest.raises(GrantError, match="not made for this private key"):
        open_grant(grant, bob_priv.read_bytes())
    with pytest.raises(GrantError, match="public key"):
        open_grant(grant, alice_pub.read_bytes())


def test_grant_carries_every_image_key_up_to_its_version(users):
    (alice_priv, alice_pub), _ = users
    keys = OwnerKeys.generate().register("col").rotated("col").rotated("col")
    ck = keys.for_collection("col")
    g = open_grant(make_grant(keys, alice_pub.read_bytes(), "col", "t"), alice_priv.read_bytes())
    assert (g.key_id, g.image_key, g.transform_secret, g.image_keys) == (3, ck.image_key, ck.transform_secret,
                                                                         ck.image_keys())
    old = open_grant(make_grant(keys, alice_pub.read_bytes(), "col", "t", key_id=2), alice_priv.read_bytes())
    assert (old.key_id, old.transform_secret, sorted(old.image_keys)) == (2, ck.at(2).transform_secret, [1, 2])
    with pytest.raises(UserError, match="key versions 1 to 3"):
        make_grant(keys, alice_pub.read_bytes(), "col", "t", key_id=4)


def unseal(grant, private_path):
    """The JSON payload of a grant, opened by hand from the documented layout (no signature check)."""
    private = RSA.import_key(private_path.read_bytes())
    (w,) = struct.unpack(">H", grant[5:7])
    session = PKCS1_OAEP.new(private, hashAlgo=SHA256).decrypt(grant[7:7 + w])
    cipher = AES.new(session, AES.MODE_GCM, nonce=grant[7 + w:19 + w])
    cipher.update(grant[:7 + w])
    return json.loads(cipher.decrypt_and_verify(grant[35 + w:], grant[19 + w:35 + w]))


def seal(payload, public_path, version=3):
    """A grant sealed by hand (documented layout) for ``public_path``'s key: what anyone holding a
    user's public key can make, with whatever payload they like."""
    public = RSA.import_key(public_path.read_bytes())
    session = os.urandom(32)
    wrapped = PKCS1_OAEP.new(public, hashAlgo=SHA256).encrypt(session)
    header = b"DLHG" + bytes([version]) + struct.pack(">H", len(wrapped)) + wrapped
    nonce = os.urandom(12)
    cipher = AES.new(session, AES.MODE_GCM, nonce=nonce)
    cipher.update(header)
    ciphertext, tag = cipher.encrypt_and_digest(json.dumps(payload).encode())
    return header + nonce + tag + ciphertext


def signed(payload, seed):
    """``payload`` signed as the documented grant signature, with the Ed25519 key of ``seed``."""
    body = {k: v for k, v in payload.items() if k != "signature"}
    key = ECC.construct(curve="Ed25519", seed=seed)
    body["owner_key"] = base64.b64encode(key.public_key().export_key(format="raw")).decode()
    message = b"dlheir-grant-v3\x00" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["signature"] = base64.b64encode(eddsa.new(key, "rfc8032").sign(message)).decode()
    return body


def test_grant_signature_covers_every_field(users):
    (alice_priv, alice_pub), (bob_priv, bob_pub) = users
    keys = OwnerKeys.generate().register("col").register("priv", mode="private")
    grant = make_grant(keys, alice_pub.read_bytes(), "priv", "t", server="127.0.0.1:1", bits=48, user="alice")
    payload = unseal(grant, alice_priv)
    # the signature is the documented one, by the owner key the grant names
    body = {k: v for k, v in payload.items() if k != "signature"}
    assert base64.b64decode(payload["owner_key"]) == keys.public_key
    eddsa.new(eddsa.import_public_key(keys.public_key), "rfc8032").verify(
        b"dlheir-grant-v3\x00" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode(),
        base64.b64decode(payload["signature"]))
    assert open_grant(seal(payload, alice_pub), alice_priv.read_bytes()).mode == "private"  # re-sealed as is: opens

    other = keys.register("other").for_collection("other")
    changes = {
        "mode": "server-ranked",  # a private collection passed off as server-ranked
        "server": "evil.example:443",
        "collection": "other",
        "uid": other.uid.hex(),
        "reader_token": "t2",
        "user": "mallory",
        "bits": 64,
        "key_id": 2,
        "image_keys": {"1": base64.b64encode(other.image_key).decode()},
        "transform_secret": base64.b64encode(other.transform_secret).decode(),
        "recipient": "00" * 32,
    }
    for name, value in changes.items():  # any altered payload field, GCM sound, fails the signature
        altered = {**payload, name: value}
        with pytest.raises(GrantError, match="signature does not verify") as info:
            open_grant(seal(altered, alice_pub), alice_priv.read_bytes())
        assert "\n" not in str(info.value), name
    altered = {**payload, "extra": 1}
    with pytest.raises(GrantError, match="signature does not verify"):
        open_grant(seal(altered, alice_pub), alice_priv.read_bytes())
    altered = {k: v for k, v in payload.items() if k != "server"}
    with pytest.raises(GrantError, match="signature does not verify"):
        open_grant(seal(altered, alice_pub), alice_priv.read_bytes())
    sig = bytearray(base64.b64decode(payload["signature"]))
    sig[0] ^= 1
    with pytest.raises(GrantError, match="signature does not verify"):
        open_grant(seal({**payload, "signature": base64.b64encode(bytes(sig)).decode()}, alice_pub),
                   alice_priv.read_bytes())
    # the owner key swapped for another's, the signature kept: fails; re-signed by that other key: opens,
    # naming the other key (whether the user trusts it is dlheir.client.trust's question)
    stranger = OwnerKeys.generate()
    with pytest.raises(GrantError, match="signature does not verify"):
        open_grant(seal({**payload, "owner_key": base64.b64encode(stranger.public_key).decode()}, alice_pub),
                   alice_priv.read_bytes())
    forged = open_grant(seal(signed({**payload, "server": "evil.example:443"}, stranger.signing_seed), alice_pub),
                        alice_priv.read_bytes())
    assert forged.owner_key == stranger.public_key and forged.owner_fingerprint != keys.fingerprint
    # a grant signed for alice, re-sealed by her for bob: refused, it names its recipient
    with pytest.raises(GrantError, match="another user's key"):
        open_grant(seal(payload, bob_pub), bob_priv.read_bytes())
    for missing in ("signature", "owner_key"):
        with pytest.raises(GrantError, match="malformed grant payload"):
            open_grant(seal({k: v for k, v in payload.items() if k != missing}, alice_pub), alice_priv.read_bytes())
    # a payload signed properly but naming an unknown mode is malformed
    with pytest.raises(GrantError, match="mode"):
        open_grant(seal(signed({**payload, "mode": "public"}, keys.signing_seed), alice_pub), alice_priv.read_bytes())


def test_any_altered_or_truncated_grant_is_rejected(users):
    (alice_priv, alice_pub), _ = users
    private = alice_priv.read_bytes()
    grant = make_grant(OwnerKeys.generate().register("col"), alice_pub.read_bytes(), "col", "t", bits=24)
    # one byte in each region: magic, version, length, wrapped key, nonce, tag, ciphertext
    for i in (0, 4, 6, 7, 200, 390, 391, 402, 403, 418, 419, len(grant) - 1):
        altered = bytearray(grant)
        altered[i] ^= 0x01
        with pytest.raises(GrantError):
            open_grant(bytes(altered), private)
    for n in (0, 6, 100, 391, 420, len(grant) - 1):
        with pytest.raises(GrantError):
            open_grant(grant[:n], private)
    with pytest.raises(GrantError, match="unsupported grant version 9"):
        open_grant(grant[:4] + b"\x09" + grant[5:], private)
    with pytest.raises(GrantError, match="altered"):
        open_grant(grant[:-1] + bytes([grant[-1] ^ 1]), private)
    # the version byte is authenticated (it is in the associated data): a payload sealed as another version does
    # not open as this one
    sealed_as_4 = seal(unseal(grant, alice_priv), alice_pub, version=4)
    with pytest.raises(GrantError, match="altered"):
        open_grant(sealed_as_4[:4] + b"\x03" + sealed_as_4[5:], private)


@pytest.mark.parametrize("version", [1, 2])
def test_grant_of_version_1_or_2_is_refused_with_one_line(users, version):
    """Unsigned grants of versions 1 and 2 (keys shared by every collection) no longer open, even a
    well-formed one: one line saying to ask the owner for a new grant."""
    (alice_priv, alice_pub), _ = users
    keys = OwnerKeys.generate().register("col")
    ck = keys.for_collection("col")
    payload = {"format": "dlheir-grant", "version": version, "collection": "col", "reader_token": "t",
               "image_key": base64.b64encode(ck.image_key).decode(), "key_id": 1,
               "image_keys": {"1": base64.b64encode(ck.image_key).decode()},
               "transform_secret": base64.b64encode(ck.transform_secret).decode(), "server": None, "bits": None}
    old = seal(payload, alice_pub, version=version)
    assert old[:5] == b"DLHG" + bytes([version])
    with pytest.raises(GrantError) as info:
        open_grant(old, alice_priv.read_bytes())
    message = str(info.value)
    assert "\n" not in message and f"format version {version}" in message and "new grant" in message
    # the version byte of a version 3 grant set to 1 or 2: refused the same way, before anything is opened
    grant = make_grant(keys, alice_pub.read_bytes(), "col", "t")
    with pytest.raises(GrantError, match=f"format version {version}"):
        open_grant(grant[:4] + bytes([version]) + grant[5:], alice_priv.read_bytes())


def test_grant_with_passphrase_protected_key(carol):
    priv, pub = carol
    grant = make_grant(OwnerKeys.generate().register("col"), pub.read_bytes(), "col", "t")
    assert open_grant(grant, priv.read_bytes(), passphrase="correct horse").collection == "col"
    with pytest.raises(GrantError, match="passphrase-protected"):
        open_grant(grant, priv.read_bytes())
    with pytest.raises(GrantError, match="wrong passphrase"):
        open_grant(grant, priv.read_bytes(), passphrase="wrong")


def test_make_grant_checks_its_inputs(users):
    (_, alice_pub), _ = users
    keys = OwnerKeys.generate().register("col")
    with pytest.raises(UserError, match="not an RSA public key"):
        make_grant(keys, b"-----BEGIN PUBLIC KEY-----\ngarbage\n", "col", "t")
    with pytest.raises(UserError, match="at least 2048"):
        make_grant(keys, RSA.generate(1024).public_key().export_key(), "col", "t")
    with pytest.raises(ContractError, match="bits"):
        make_grant(keys, alice_pub.read_bytes(), "col", "t", bits=13)
    with pytest.raises(UserError, match="reader token"):
        make_grant(keys, alice_pub.read_bytes(), "col", "")
    with pytest.raises(UserError, match="collection name"):
        make_grant(keys, alice_pub.read_bytes(), "", "t")
    with pytest.raises(UserError, match="no keys for collection 'unknown'") as info:  # registered collections only
        make_grant(keys, alice_pub.read_bytes(), "unknown", "t")
    assert "\n" not in str(info.value)


# --- CLI ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Default key places (dlheir.paths) inside the test's folder, never the real ~/.config."""
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "dlheir-home"))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_owner_init_and_grant_commands(tmp_path, capsys, users):
    (alice_priv, alice_pub), _ = users
    key = tmp_path / "o.key"
    code, out, _ = run_cli(capsys, "owner", "init", "--out", key, "--collection", "photos")
    assert code == 0 and str(key) in out and mode_of(key) == 0o600
    loaded = OwnerKeys.load(key)
    assert loaded.collection == "photos" and loaded.collections == {}  # a default name; no collection keys yet
    assert f"fingerprint: {loaded.fingerprint}" in out and f"dlheir user trust-owner {loaded.fingerprint}" in out
    code, out, _ = run_cli(capsys, "owner", "fingerprint", "--key", key)
    assert code == 0 and out == loaded.fingerprint + "\n"
    code, out, _ = run_cli(capsys, "owner", "fingerprint", "--key", key, "--json")
    assert code == 0 and json.loads(out) == {"fingerprint": loaded.fingerprint}
    code, _, err = run_cli(capsys, "owner", "init", "--out", key)
    assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1

    grant = tmp_path / "g.bin"
    tok = tmp_path / "reader.token"  # the offline reader token comes from a file, never argv (ps shows argv)
    tok.write_text("tok\n")
    os.chmod(tok, 0o600)
    # the collection is not registered in the key file yet (create-collection does that): no keys, no grant
    code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", alice_pub, "--reader-token-file", tok,
                           "--out", grant)
    assert code == 2 and "no keys for collection 'photos'" in err and err.count("\n") == 1 and not grant.exists()
    loaded.register("photos", mode="private").replace_file(key)
    code, out, _ = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", alice_pub, "--reader-token-file", tok,
                           "--server", "127.0.0.1:5", "--bits", 48, "--out", grant)
    assert code == 0 and str(grant) in out
    g = open_grant(grant.read_bytes(), alice_priv.read_bytes())
    assert (g.collection, g.reader_token, g.server, g.bits) == ("photos", "tok", "127.0.0.1:5", 48)
    ck = OwnerKeys.load(key).for_collection("photos")
    assert (g.image_key, g.transform_secret, g.uid, g.mode, g.binding) == \
        (ck.image_key, ck.transform_secret, ck.uid, "private", ck.binding)
    assert g.owner_fingerprint == loaded.fingerprint
    code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", alice_pub, "--reader-token-file", tok,
                           "--out", grant)
    assert code == 2 and "refusing to overwrite" in err

    bare = tmp_path / "bare.key"
    OwnerKeys.generate().register("photos").register("c").save(bare)  # no default collection name
    tokens = tmp_path / "photos.tokens.json"
    tokens.write_text(json.dumps({"owner_token": "own", "reader_token": "rd", "server": "127.0.0.1:1", "bits": 24}))
    os.chmod(tokens, 0o600)  # a tokens file others can read is refused (tests/test_key_hygiene.py)
    # without --reader-token-file the server issues the user's own token (tests/test_access.py): no server, no grant
    code, _, err = run_cli(capsys, "owner", "grant", "--key", bare, "--user-pub", alice_pub, "--collection", "photos",
                           "--tokens", tokens, "--out", tmp_path / "g2.bin")
    assert code == 2 and "cannot reach the dlheir cloud server at 127.0.0.1:1" in err and err.count("\n") == 1
    assert not (tmp_path / "g2.bin").exists()

    loose = tmp_path / "loose.key"
    OwnerKeys.generate().save(loose)
    os.chmod(loose, 0o644)
    bad_pub = tmp_path / "bad.pub.pem"
    bad_pub.write_text("hello")
    failures = {
        "owner key file not found": ["--key", tmp_path / "missing.key", "--collection", "c", "--reader-token-file", tok],
        "accessible by group or others": ["--key", loose, "--collection", "c", "--reader-token-file", tok],
        "give --collection": ["--key", bare, "--reader-token-file", tok],
        "not an RSA public key": ["--key", bare, "--collection", "c", "--reader-token-file", tok, "--user-pub", bad_pub],
        "bits must be": ["--key", bare, "--collection", "c", "--reader-token-file", tok, "--bits", 13],
        "user public key not found": ["--key", bare, "--collection", "c", "--reader-token-file", tok,
                                      "--user-pub", tmp_path / "nobody.pub.pem"],
        "tokens file not found": ["--key", bare, "--collection", "zzz"],
        "has no keys for collection 'zzz'": ["--key", bare, "--collection", "zzz", "--reader-token-file", tok],
    }
    for message, args in failures.items():
        if "--user-pub" not in args:
            args = [*args, "--user-pub", alice_pub]
        code, _, err = run_cli(capsys, "owner", "grant", *args, "--out", tmp_path / "never.bin")
        assert code == 2 and message in err and err.startswith("dlheir: error:") and err.count("\n") == 1, \
            (message, err)
    assert not (tmp_path / "never.bin").exists()


def test_user_keygen_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLHEIR_TEST_PASS", "s3cret")
    code, out, _ = run_cli(capsys, "user", "keygen", "--out", tmp_path / "u.pem", "--passphrase-env", "DLHEIR_TEST_PASS")
    assert code == 0 and str(tmp_path / "u.pem") in out and str(tmp_path / "u.pub.pem") in out
    assert mode_of(tmp_path / "u.pem") == 0o600
    grant = make_grant(OwnerKeys.generate().register("c"), (tmp_path / "u.pub.pem").read_bytes(), "c", "t")
    assert open_grant(grant, (tmp_path / "u.pem").read_bytes(), passphrase="s3cret").collection == "c"
    code, _, err = run_cli(capsys, "user", "keygen", "--out", tmp_path / "u.pem")
    assert code == 2 and "refusing to overwrite" in err
    monkeypatch.delenv("DLHEIR_TEST_PASS")
    code, _, err = run_cli(capsys, "user", "keygen", "--out", tmp_path / "v.pem", "--passphrase-env", "DLHEIR_TEST_PASS")
    assert code == 2 and "DLHEIR_TEST_PASS is not set" in err and not (tmp_path / "v.pem").exists()
