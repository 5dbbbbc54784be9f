"""Keys and encryption for owners and users (pycryptodome; nothing hand-rolled).

Owner key file (``dlheir owner init``), JSON, mode 0600::

    {"format": "dlheir-owner-key", "version": 1,
     "image_key": <base64, 32 bytes>, "transform_secret": <base64, 32 bytes>}

Encrypted image blob (EncImg / Dec), AES-256-GCM::

    offset  size  field
    0       4     magic b"DLHB"
    4       1     version (1)
    5       12    nonce (fresh random per blob)
    17      16    GCM tag
    33      ...   ciphertext of: u16 big-endian name length, UTF-8 file name, image bytes

    associated data = b"dlheir-blob-v1" | u16 len(collection) | collection | u64 item id

so a blob altered, moved to another id or collection, or opened with another key fails
authentication instead of decrypting to garbage. The file name travels inside the
ciphertext: the server never sees it.

Grant (``dlheir owner grant``): a JSON payload (collection, reader token, image key,
transform secret, optional server and bits) sealed for one user's RSA key::

    b"DLHG" | version (1) | u16 len(wrapped) | RSA-OAEP(SHA-256)(session key) | nonce(12) | tag(16) | AES-GCM ciphertext
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import RSA
from Crypto.Random import get_random_bytes

from dlheir.codes import pack_bits, unpack_bits
from dlheir.errors import UserError

BLOB_MAGIC, BLOB_VERSION = b"DLHB", 1
GRANT_MAGIC, GRANT_VERSION = b"DLHG", 1
KEY_FORMAT, KEY_VERSION = "dlheir-owner-key", 1
RSA_BITS = 3072


class BlobAuthenticationError(UserError):
    """A blob failed to decrypt: altered, swapped to another id/collection, or wrong key."""


class GrantError(UserError):
    """A grant cannot be opened with this private key, or was altered."""


def write_private(path: Path | str, data: bytes) -> Path:
    """Create ``path`` with mode 0600; never overwrite."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass(frozen=True)
class OwnerKeys:
    image_key: bytes
    transform_secret: bytes

    @classmethod
    def generate(cls) -> "OwnerKeys":
        return cls(get_random_bytes(32), get_random_bytes(32))

    def save(self, path: Path | str) -> Path:
        doc = {"format": KEY_FORMAT, "version": KEY_VERSION,
               "image_key": base64.b64encode(self.image_key).decode(),
               "transform_secret": base64.b64encode(self.transform_secret).decode()}
        return write_private(path, (json.dumps(doc, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path | str) -> "OwnerKeys":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"owner key file not found: {path} (create one with 'dlheir owner init')")
        if path.stat().st_mode & 0o077:
            raise UserError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != KEY_FORMAT or doc.get("version") != KEY_VERSION:
                raise ValueError("not a dlheir owner key (version 1)")
            keys = cls(base64.b64decode(doc["image_key"]), base64.b64decode(doc["transform_secret"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: malformed owner key file: {exc}") from None
        if len(keys.image_key) != 32 or len(keys.transform_secret) != 32:
            raise UserError(f"{path}: keys must be 32 bytes each")
        return keys


# --- EncImg / Dec ------------------------------------------------------------------------
def _blob_aad(collection: str, item_id: int) -> bytes:
    name = collection.encode()
    return b"dlheir-blob-v1" + struct.pack(">H", len(name)) + name + struct.pack(">Q", item_id)


def encrypt_image(key: bytes, image: bytes, collection: str, item_id: int, name: str = "") -> bytes:
    """EncImg: AES-256-GCM with a fresh 96-bit nonce; (collection, id) bound as associated data."""
    nonce = get_random_bytes(12)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(_blob_aad(collection, item_id))
    raw_name = name.encode()[:65535]
    ciphertext, tag = cipher.encrypt_and_digest(struct.pack(">H", len(raw_name)) + raw_name + image)
    return BLOB_MAGIC + bytes([BLOB_VERSION]) + nonce + tag + ciphertext


def decrypt_image(key: bytes, blob: bytes, collection: str, item_id: int) -> tuple[str, bytes]:
    """Dec: returns (file name, original image bytes) or raises BlobAuthenticationError."""
    if len(blob) < 33 + 2 or blob[:4] != BLOB_MAGIC:
        raise BlobAuthenticationError(f"item {item_id}: not a dlheir encrypted blob (bad header or truncated)")
    if blob[4] != BLOB_VERSION:
        raise BlobAuthenticationError(f"item {item_id}: unsupported blob version {blob[4]}")
    nonce, tag, ciphertext = blob[5:17], blob[17:33], blob[33:]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(_blob_aad(collection, item_id))
    try:
        plain = cipher.decrypt_and_verify(ciphertext, tag)
    except ValueError:
        raise BlobAuthenticationError(
            f"item {item_id} of {collection!r}: authentication failed (blob altered, stored under another id "
            "or collection, or wrong key)") from None
    (n,) = struct.unpack(">H", plain[:2])
    return plain[2:2 + n].decode(errors="replace"), plain[2 + n:]


# --- the keyed, Hamming-preserving code transform ----------------------------------------
class CodeTransform:
    """A keyed bit permutation then XOR mask: d(T(a), T(b)) == d(a, b) for all codes.

    Derived from the owner's transform secret with HKDF-SHA256 (one derivation per code
    length), so the same secret serves any N. Padding bits stay zero.
    """

    def __init__(self, secret: bytes, bits: int) -> None:
        self.bits = bits
        material = HKDF(secret, 32, salt=b"dlheir-code-transform-v1", hashmod=SHA256, context=f"bits={bits}".encode())
        # keyed PRG: AES-CTR keystream under the derived key
        stream = AES.new(material, AES.MODE_CTR, nonce=b"\x00" * 8).encrypt(b"\x00" * (8 * bits + bits))
        words = np.frombuffer(stream[: 8 * bits], dtype=">u8")
        perm = np.arange(bits)
        for i in range(bits - 1, 0, -1):  # Fisher-Yates, keyed
            j = int(words[i] % np.uint64(i + 1))
            perm[i], perm[j] = perm[j], perm[i]
        self.perm = perm
        self.inverse = np.argsort(perm)
        self.mask = (np.frombuffer(stream[8 * bits:], dtype=np.uint8) & 1).astype(np.uint8)

    def apply(self, codes: np.ndarray) -> np.ndarray:
        bits = unpack_bits(np.atleast_2d(codes), self.bits)
        return pack_bits(bits[:, self.perm] ^ self.mask)

    def invert(self, codes: np.ndarray) -> np.ndarray:
        bits = unpack_bits(np.atleast_2d(codes), self.bits) ^ self.mask
        return pack_bits(bits[:, self.inverse])


# --- user keys and grants ------------------------------------------------------------------
def generate_user_keypair(private_path: Path | str, passphrase: str | None = None) -> tuple[Path, Path]:
    """RSA-3072; private key PEM mode 0600 (PKCS#8, encrypted if a passphrase is given)."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.stem + ".pub.pem")
    if public_path.exists():
        raise UserError(f"{public_path} already exists; refusing to overwrite a key")
    key = RSA.generate(RSA_BITS)
    pem = key.export_key("PEM", pkcs=8, passphrase=passphrase,
                         protection="PBKDF2WithHMAC-SHA256AndAES256-CBC" if passphrase else None)
    write_private(private_path, pem)
    public_path.write_bytes(key.public_key().export_key("PEM"))
    return private_path, public_path


@dataclass(frozen=True)
class Grant:
    collection: str
    reader_token: str
    image_key: bytes
    transform_secret: bytes
    server: str | None = None
    bits: int | None = None


def make_grant(keys: OwnerKeys, user_public_pem: bytes, collection: str, reader_token: str,
               server: str | None = None, bits: int | None = None) -> bytes:
    try:
        public = RSA.import_key(user_public_pem)
    except (ValueError, IndexError, TypeError) as exc:
        raise UserError(f"not an RSA public key: {exc}") from None
    payload = json.dumps({"collection": collection, "reader_token": reader_token,
                          "image_key": base64.b64encode(keys.image_key).decode(),
                          "transform_secret": base64.b64encode(keys.transform_secret).decode(),
                          "server": server, "bits": bits}).encode()
    session_key = get_random_bytes(32)
    wrapped = PKCS1_OAEP.new(public, hashAlgo=SHA256).encrypt(session_key)
    nonce = get_random_bytes(12)
    cipher = AES.new(session_key, AES.MODE_GCM, nonce=nonce)
    header = GRANT_MAGIC + bytes([GRANT_VERSION]) + struct.pack(">H", len(wrapped)) + wrapped
    cipher.update(header)
    ciphertext, tag = cipher.encrypt_and_digest(payload)
    return header + nonce + tag + ciphertext


def open_grant(grant: bytes, user_private_pem: bytes, passphrase: str | None = None) -> Grant:
    if grant[:4] != GRANT_MAGIC or len(grant) < 7:
        raise GrantError("not a dlheir grant file")
    if grant[4] != GRANT_VERSION:
        raise GrantError(f"unsupported grant version {grant[4]}")
    try:
        private = RSA.import_key(user_private_pem, passphrase=passphrase)
    except (ValueError, IndexError, TypeError):
        raise GrantError("cannot read the user private key (wrong passphrase or not an RSA key)") from None
    (n,) = struct.unpack(">H", grant[5:7])
    header, rest = grant[: 7 + n], grant[7 + n:]
    try:
        session_key = PKCS1_OAEP.new(private, hashAlgo=SHA256).decrypt(header[7:])
        cipher = AES.new(session_key, AES.MODE_GCM, nonce=rest[:12])
        cipher.update(header)
        doc = json.loads(cipher.decrypt_and_verify(rest[28:], rest[12:28]))
    except (ValueError, TypeError):
        raise GrantError("this grant was not made for this private key, or it was altered") from None
    return Grant(doc["collection"], doc["reader_token"], base64.b64decode(doc["image_key"]),
                 base64.b64decode(doc["transform_secret"]), doc.get("server"), doc.get("bits"))
