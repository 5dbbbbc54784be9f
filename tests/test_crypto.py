import os
import stat

import numpy as np
import pytest

from dlheir.cli import main
from dlheir.client.crypto import (
    BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, decrypt_image, encrypt_image,
    generate_user_keypair, make_grant, open_grant,
)
from dlheir.codes import hamming, pack_bits
from dlheir.errors import UserError


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    return generate_user_keypair(d / "alice.pem"), generate_user_keypair(d / "bob.pem")


def test_owner_key_file_is_private_and_not_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    keys = OwnerKeys.generate()
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert OwnerKeys.load(path) == keys
    with pytest.raises(UserError, match="refusing to overwrite"):
        OwnerKeys.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="readable by others"):
        OwnerKeys.load(path)


def test_blob_round_trip_and_tamper_detection():
    keys = OwnerKeys.generate()
    image = os.urandom(5000)
    blob = encrypt_image(keys.image_key, image, "col", 42, name="cat.jpg")
    assert decrypt_image(keys.image_key, blob, "col", 42) == ("cat.jpg", image)
    assert encrypt_image(keys.image_key, image, "col", 42)[5:17] != blob[5:17]  # fresh nonce
    assert image not in blob
    altered = bytearray(blob)
    altered[100] ^= 1
    cases = [
        (keys.image_key, bytes(altered), "col", 42),  # altered
        (keys.image_key, blob, "col", 43),  # swapped to another id
        (keys.image_key, blob, "other", 42),  # another collection
        (OwnerKeys.generate().image_key, blob, "col", 42),  # wrong key
        (keys.image_key, blob[:20], "col", 42),  # truncated
        (keys.image_key, blob[:4] + b"\x09" + blob[5:], "col", 42),  # unknown version
    ]
    for args in cases:
        with pytest.raises(BlobAuthenticationError):
            decrypt_image(*args)


@pytest.mark.parametrize("bits", [12, 24, 32, 48, 64])
def test_code_transform_preserves_hamming_distances(bits):
    rng = np.random.default_rng(bits)
    codes = pack_bits(rng.integers(0, 2, (40, bits), dtype=np.uint8))
    secret = os.urandom(32)
    t = CodeTransform(secret, bits)
    out = t.apply(codes)
    np.testing.assert_array_equal(hamming(out, out), hamming(codes, codes))
    np.testing.assert_array_equal(t.invert(out), codes)
    assert (out != codes).any()
    if bits % 8:
        assert (out[:, -1] & (0xFF >> (bits % 8)) == 0).all()  # padding stays zero
    other = CodeTransform(os.urandom(32), bits).apply(codes)
    assert (other != out).any()
    np.testing.assert_array_equal(CodeTransform(secret, bits).apply(codes), out)  # deterministic


def test_grant_opens_only_for_its_user(users):
    (alice_priv, alice_pub), (bob_priv, _) = users
    keys = OwnerKeys.generate()
    grant = make_grant(keys, alice_pub.read_bytes(), "col", "reader-token", "127.0.0.1:1", 48)
    g = open_grant(grant, alice_priv.read_bytes())
    assert (g.collection, g.reader_token, g.image_key, g.transform_secret, g.bits) == \
        ("col", "reader-token", keys.image_key, keys.transform_secret, 48)
    with pytest.raises(GrantError):
        open_grant(grant, bob_priv.read_bytes())
    tampered = bytearray(grant)
    tampered[-3] ^= 1
    with pytest.raises(GrantError):
        open_grant(bytes(tampered), alice_priv.read_bytes())
    assert stat.S_IMODE(alice_priv.stat().st_mode) == 0o600


def test_key_commands(tmp_path, capsys, users):
    (_, alice_pub), _ = users
    assert main(["owner", "init", "--out", str(tmp_path / "o.key")]) == 0
    assert main(["owner", "init", "--out", str(tmp_path / "o.key")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["owner", "grant", "--key", str(tmp_path / "o.key"), "--user-pub", str(alice_pub),
                 "--collection", "c", "--reader-token", "t", "--out", str(tmp_path / "g.bin")]) == 0
    assert (tmp_path / "g.bin").read_bytes()[:4] == b"DLHG"
    assert main(["owner", "grant", "--key", str(tmp_path / "missing.key"), "--user-pub", str(alice_pub),
                 "--collection", "c", "--reader-token", "t", "--out", str(tmp_path / "g2.bin")]) == 2
    err = capsys.readouterr().err
    assert "owner key file not found" in err and "Traceback" not in err
