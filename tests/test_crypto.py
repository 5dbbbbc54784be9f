"""Keys, EncImg/Dec blobs, the Hamming-preserving code transform, grants, and their CLI commands."""

import base64
import json
import os
import stat
import struct

import numpy as np
import pytest
from Crypto.Cipher import AES
from Crypto.PublicKey import RSA

from dlheir.contract import ContractError
from dlheir.cli import main
from dlheir.client.crypto import (
    BLOB_OVERHEAD, BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, decrypt_image, encrypt_image,
    generate_user_keypair, make_grant, open_grant,
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
def test_owner_keys_are_two_separate_256_bit_keys():
    keys = OwnerKeys.generate()
    assert len(keys.image_key) == 32 and len(keys.transform_secret) == 32
    assert keys.image_key != keys.transform_secret
    assert OwnerKeys.generate().image_key != keys.image_key
    assert repr(keys.image_key) not in repr(keys) and repr(keys.transform_secret) not in repr(keys)
    with pytest.raises(UserError, match="32 bytes"):
        OwnerKeys(b"short", keys.transform_secret)
    with pytest.raises(UserError, match="separate"):
        OwnerKeys(keys.image_key, keys.image_key)


def test_owner_key_file_is_0600_even_with_open_umask_and_never_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    keys = OwnerKeys.generate("photos")
    old = os.umask(0)
    try:
        keys.save(path)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "dlheir-owner-key" and doc["version"] == 1 and doc["collection"] == "photos"
    assert base64.b64decode(doc["image_key"]) == keys.image_key
    assert OwnerKeys.load(path) == keys
    before = path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        OwnerKeys.generate().save(path)
    assert path.read_bytes() == before
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(UserError, match="accessible by group or others"):
            OwnerKeys.load(path)


@pytest.mark.parametrize("content, message", [
    (b"not json", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b"[1, 2]", "not a dlheir owner key"),
    (b'{"format": "something-else", "version": 1}', "not a dlheir owner key"),
    (b'{"format": "dlheir-owner-key", "version": 3}', "unsupported version 3"),
    (b'{"format": "dlheir-owner-key", "version": 2}', "keys must be a non-empty list"),
    (b'{"format": "dlheir-owner-key", "version": 2, "keys": [{"id": 1, "image_key": "AAAA"}]}', "transform_secret"),
    (b'{"format": "dlheir-owner-key", "version": 1, "image_key": "%%%", "transform_secret": "AA=="}', "base64"),
    (b'{"format": "dlheir-owner-key", "version": 1, "transform_secret": "AA=="}', "image_key"),
    (b'{"format": "dlheir-owner-key", "version": 1, "image_key": "AAAA", "transform_secret": "AAAA"}', "32 bytes"),
])
def test_malformed_owner_key_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(UserError, match=message):
        OwnerKeys.load(path)


def test_missing_owner_key_file(tmp_path):
    with pytest.raises(UserError, match="owner key file not found"):
        OwnerKeys.load(tmp_path / "nope.key")


# --- EncImg / Dec ------------------------------------------------------------------------
def test_blob_layout_is_the_documented_one():
    key = OwnerKeys.generate().image_key
    image = os.urandom(3000)
    blob = encrypt_image(key, image, "photos", 0x0102030405060708, name="cat.jpg", key_id=3)
    assert blob[:4] == b"DLHB" and blob[4] == 2 and blob[5:9] == b"\x00\x00\x00\x03"
    assert len(blob) == BLOB_OVERHEAD + len("cat.jpg") + len(image) == 39 + 7 + 3000
    # decrypt by hand from the README's byte layout (version 2), with pycryptodome directly
    aad = b"DLHB\x02" + struct.pack(">I", 3) + struct.pack(">H", 6) + b"photos" + bytes.fromhex("0102030405060708")
    cipher = AES.new(key, AES.MODE_GCM, nonce=blob[9:21])
    cipher.update(aad)
    payload = cipher.decrypt_and_verify(blob[21:-16], blob[-16:])
    assert payload == struct.pack(">H", 7) + b"cat.jpg" + image


def test_blob_round_trip_is_byte_identical_and_hides_name_and_content():
    key = OwnerKeys.generate().image_key
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
    keys = OwnerKeys.generate()
    blob = encrypt_image(keys.image_key, os.urandom(200), "col", 42, name="a.png")
    cases = {
        "swapped id": (keys.image_key, blob, "col", 43),
        "other collection": (keys.image_key, blob, "cox", 42),
        "collection prefix": (keys.image_key, blob, "co", 42),
        "wrong key": (OwnerKeys.generate().image_key, blob, "col", 42),
        "transform secret as key": (keys.transform_secret, blob, "col", 42),
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
    key = OwnerKeys.generate().image_key
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
    keys = OwnerKeys.generate()
    grant = make_grant(keys, alice_pub.read_bytes(), "col", "reader-token-123", server="127.0.0.1:1", bits=48)
    g = open_grant(grant, alice_priv.read_bytes())
    assert (g.collection, g.reader_token, g.image_key, g.transform_secret, g.server, g.bits) == \
        ("col", "reader-token-123", keys.image_key, keys.transform_secret, "127.0.0.1:1", 48)
    assert "reader-token-123" not in repr(g)
    bare = open_grant(make_grant(keys, alice_pub.read_bytes(), "col", "t"), alice_priv.read_bytes())
    assert (bare.server, bare.bits) == (None, None)
    for secret in (keys.image_key, keys.transform_secret, base64.b64encode(keys.image_key), b"reader-token-123"):
        assert secret not in grant
    assert make_grant(keys, alice_pub.read_bytes(), "col", "t")[7:391] != make_grant(
        keys, alice_pub.read_bytes(), "col", "t")[7:391]  # fresh session key and OAEP randomness
    with pytest.raises(GrantError, match="not made for this private key"):
        open_grant(grant, bob_priv.read_bytes())
    with pytest.raises(GrantError, match="public key"):
        open_grant(grant, alice_pub.read_bytes())


def test_any_altered_or_truncated_grant_is_rejected(users):
    (alice_priv, alice_pub), _ = users
    private = alice_priv.read_bytes()
    grant = make_grant(OwnerKeys.generate(), alice_pub.read_bytes(), "col", "t", bits=24)
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
    with pytest.raises(GrantError, match="altered"):  # the version byte is authenticated: no downgrade
        open_grant(grant[:4] + b"\x01" + grant[5:], private)
    with pytest.raises(GrantError, match="altered"):
        open_grant(grant[:-1] + bytes([grant[-1] ^ 1]), private)


def test_grant_with_passphrase_protected_key(carol):
    priv, pub = carol
    grant = make_grant(OwnerKeys.generate(), pub.read_bytes(), "col", "t")
    assert open_grant(grant, priv.read_bytes(), passphrase="correct horse").collection == "col"
    with pytest.raises(GrantError, match="passphrase-protected"):
        open_grant(grant, priv.read_bytes())
    with pytest.raises(GrantError, match="wrong passphrase"):
        open_grant(grant, priv.read_bytes(), passphrase="wrong")


def test_make_grant_checks_its_inputs(users):
    (_, alice_pub), _ = users
    keys = OwnerKeys.generate()
    with pytest.raises(UserError, match="not an RSA public key"):
        make_grant(keys, b"-----BEGIN PUBLIC KEY-----\ngarbage\n", "col", "t")
    with pytest.raises(UserError, match="at least 2048"):
        make_grant(keys, RSA.generate(1024).public_key().export_key(), "col", "t")
    with pytest.raises(ContractError, match="bits"):
        make_grant(keys, alice_pub.read_bytes(), "col", "t", bits=13)
    with pytest.raises(UserError, match="reader token"):
        make_grant(keys, alice_pub.read_bytes(), "col", "")


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
    assert OwnerKeys.load(key).collection == "photos"
    code, _, err = run_cli(capsys, "owner", "init", "--out", key)
    assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1

    grant = tmp_path / "g.bin"
    tok = tmp_path / "reader.token"  # the offline reader token comes from a file, never argv (ps shows argv)
    tok.write_text("tok\n")
    os.chmod(tok, 0o600)
    code, out, _ = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", alice_pub, "--reader-token-file", tok,
                           "--server", "127.0.0.1:5", "--bits", 48, "--out", grant)
    assert code == 0 and str(grant) in out
    g = open_grant(grant.read_bytes(), alice_priv.read_bytes())
    assert (g.collection, g.reader_token, g.server, g.bits) == ("photos", "tok", "127.0.0.1:5", 48)
    assert g.image_key == OwnerKeys.load(key).image_key
    code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", alice_pub, "--reader-token-file", tok,
                           "--out", grant)
    assert code == 2 and "refusing to overwrite" in err

    bare = tmp_path / "bare.key"
    OwnerKeys.generate().save(bare)
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
    }
    for message, args in failures.items():
        if "--user-pub" not in args:
            args = [*args, "--user-pub", alice_pub]
        code, _, err = run_cli(capsys, "owner", "grant", *args, "--out", tmp_path / "never.bin")
        assert code == 2 and message in err and err.startswith("dlheir: error:"), (message, err)
    assert not (tmp_path / "never.bin").exists()


def test_user_keygen_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLHEIR_TEST_PASS", "s3cret")
    code, out, _ = run_cli(capsys, "user", "keygen", "--out", tmp_path / "u.pem", "--passphrase-env", "DLHEIR_TEST_PASS")
    assert code == 0 and str(tmp_path / "u.pem") in out and str(tmp_path / "u.pub.pem") in out
    assert mode_of(tmp_path / "u.pem") == 0o600
    grant = make_grant(OwnerKeys.generate(), (tmp_path / "u.pub.pem").read_bytes(), "c", "t")
    assert open_grant(grant, (tmp_path / "u.pem").read_bytes(), passphrase="s3cret").collection == "c"
    code, _, err = run_cli(capsys, "user", "keygen", "--out", tmp_path / "u.pem")
    assert code == 2 and "refusing to overwrite" in err
    monkeypatch.delenv("DLHEIR_TEST_PASS")
    code, _, err = run_cli(capsys, "user", "keygen", "--out", tmp_path / "v.pem", "--passphrase-env", "DLHEIR_TEST_PASS")
    assert code == 2 and "DLHEIR_TEST_PASS is not set" in err and not (tmp_path / "v.pem").exists()
