"""Keys and encryption for data owners and query users (pycryptodome; nothing hand-rolled).

Four pieces, each with a versioned, documented format:

1. **Owner key file** (KeyGen, ``dlheir owner init``), format version 3: UTF-8 JSON, created
   with mode 0600 by ``os.open(O_CREAT | O_EXCL, 0o600)`` (never overwritten by ``init``, never
   briefly readable by others; rewritten atomically when a collection is created or rotated)::

       {"format": "dlheir-owner-key", "version": 3,
        "master_secret": "<base64 of 32 random bytes>",   # every collection's keys come from it
        "signing_key": "<base64 of a 32-byte Ed25519 seed>",  # signs grants
        "collection": "photos",                            # optional default collection name
        "collections": {"photos": {"uid": "<32 hex>", "mode": "server-ranked" | "private",
                                   "key_id": 2}}}          # newest key version

   A collection's keys, per key version v (HKDF-SHA256 from the master secret, salt
   ``b"dlheir-collection-keys-v3"``, context ``b"uid=<uid hex>;purpose=P;version=v"``): the
   image key (P = image), the transform secret (P = transform); and one id key without a
   version (``b"uid=<uid hex>;purpose=item-ids"``, :func:`dlheir.ids.keyed_content_id`). The
   uid is 16 random bytes made when the collection is created (``create-collection``): a
   collection deleted and re-created under the same name gets new keys, and nothing of the old
   one authenticates in it. Blobs and pages are bound to ``NAME#UIDHEX``
   (:func:`collection_binding`). Files of format 1 and 2 (one image key and transform secret
   for every collection) are refused with the one-line fix ``dlheir owner migrate-keys``
   (:func:`migrate_key_file`). ``OwnerKeys.load`` refuses a file that group/others can access,
   or that is malformed. Every secret file (owner key, user private key, tokens files) is read
   through :func:`read_secret`, which refuses it when group or others have any access to it.

2. **Encrypted image blob** (EncImg / Dec), AES-256-GCM, all integers big-endian; version 2
   (written) carries the owner's key version, so blobs stored before a rotation keep
   decrypting with the older image key that grants carry::

       offset    size  field
       0         4     magic b"DLHB"
       4         1     version = 2
       5         4     key id: the image key version (u32, >= 1)
       9         12    nonce: 96 random bits, fresh for every blob
       21        L     ciphertext of the payload (L = payload length)
       21 + L    16    GCM tag

       payload         = u16 len(name) | name (UTF-8) | image bytes (the original file, verbatim)
       associated data = b"DLHB" | version | u32 key id | u16 len(collection) | collection (UTF-8) | u64 item id

   A blob is 39 + len(name) + len(image) bytes. Version 1 (read, no longer written) has no
   key id field (key version 1): magic, version = 1, nonce at 5, ciphertext at 17, tag, and
   associated data without the key id; 35 + len(name) + len(image) bytes.
   :func:`decrypt_image` takes one key or a keyring {key id: key}. The collection and the item id are bound as
   associated data (length-prefixed, so no two (collection, id) pairs encode alike): a blob
   that was altered, truncated, stored under another id or collection, or opened with
   another key raises :class:`BlobAuthenticationError`; it never decrypts to garbage. The
   original file name travels inside the ciphertext, so the server never sees it.

3. **Code transform** (:class:`CodeTransform`): a keyed permutation of the N bit positions
   followed by an XOR with a keyed N-bit mask. For any codes a, b:
   ``hamming(T(a), T(b)) == hamming(a, b)``, so the server's exact search is unchanged while
   it never holds the network's raw codes. Per code length N: ``k = HKDF-SHA256(secret,
   salt=b"dlheir-code-transform-v1", context=b"bits=N")`` (32 bytes); the keyed PRG is the
   AES-256-CTR keystream under k (nonce 8 zero bytes, counter from 0): its first 8N bytes
   are N big-endian u64 words w_0..w_{N-1} driving a Fisher-Yates shuffle of range(N)
   (for i = N-1 .. 1: swap perm[i], perm[w_i mod (i+1)]; bias below 2^-55), the next N
   bytes give the mask (mask_j = byte_j & 1). ``apply``: out_bit[j] = in_bit[perm[j]] XOR
   mask[j], repacked MSB-first with zero padding (``dlheir.codes``).

4. **Grant** (key delivery, ``dlheir owner grant``): a JSON payload (version 3) ::

       {"format": "dlheir-grant", "version": 3, "collection": ..., "uid": <32 hex>,
        "mode": "server-ranked" | "private",   # the client trusts this, never the server's word
        "user": <label>|null, "reader_token": ...,   # this user's own token (the server keeps its SHA-256)
        "key_id": <int>,                # the key version the collection's codes are under
        "image_keys": {"1": <base64>, ..., "<key_id>": <base64>},   # this collection's, every version up to key_id
        "transform_secret": <base64>,   # this collection's, of version key_id
        "server": str|null, "bits": int|null,
        "recipient": <SHA-256 hex of the user's RSA public key, DER>,
        "owner_key": <base64 of the owner's raw Ed25519 public key>,
        "signature": <base64 Ed25519 (RFC 8032) signature by owner_key over
                      b"dlheir-grant-v3\\x00" + the JSON of every other field, keys sorted, no spaces>}

   Grants of versions 1 and 2 (unsigned, keys shared by the key file's collections) are refused
   with one line. Which owner keys a user accepts is :mod:`dlheir.client.trust`'s job.

   encrypted with a fresh AES-256-GCM key, which is wrapped with RSA-OAEP (SHA-256, MGF1
   SHA-256) for the user's RSA public key. Binary layout::

       offset      size  field
       0           4     magic b"DLHG"
       4           1     version = 3
       5           2     W = length of the wrapped key (384 for RSA-3072)
       7           W     RSA-OAEP(SHA-256) wrapped 32-byte session key
       7 + W       12    GCM nonce
       19 + W      16    GCM tag
       35 + W      ...   GCM ciphertext of the JSON payload
       associated data = bytes 0 .. 7 + W (the header including the wrapped key; the version
                         byte too, so a grant cannot be passed off as another version)

   Only the matching private key opens it; any other key, or any altered byte, raises
   :class:`GrantError`. ``make_grant`` refuses a private key given as the user's public key
   (it would otherwise seal for its public half, and the private key could travel on);
   :func:`read_public_key_file` / :func:`read_private_key_file` refuse the wrong half of a
   pair by file, before anything else is done with it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC, RSA
from Crypto.Random import get_random_bytes
from Crypto.Signature import eddsa

from dlheir.codes import pack_bits, unpack_bits
from dlheir.contract import code_bytes, validate_bits
from dlheir.paths import fsync_path
from dlheir.errors import UserError

KEY_FORMAT, KEY_VERSION = "dlheir-owner-key", 3  # versions 1 and 2 are refused with the migration to run
MAX_KEY_ID = 2**32 - 1
KEY_BYTES = 32  # AES-256 image key and transform secret

BLOB_MAGIC, BLOB_VERSION = b"DLHB", 2  # written; version 1 blobs (no key id: key version 1) are still read
NONCE_BYTES, TAG_BYTES = 12, 16
BLOB_HEADER_BYTES = len(BLOB_MAGIC) + 1 + 4 + NONCE_BYTES  # 21: magic, version, u32 key id, nonce
BLOB_OVERHEAD = BLOB_HEADER_BYTES + 2 + TAG_BYTES  # 39 + len(name) + len(image) = blob size
BLOB_V1_HEADER_BYTES = len(BLOB_MAGIC) + 1 + NONCE_BYTES  # 17
BLOB_V1_OVERHEAD = BLOB_V1_HEADER_BYTES + 2 + TAG_BYTES  # 35

TRANSFORM_SALT = b"dlheir-code-transform-v1"

GRANT_MAGIC, GRANT_VERSION = b"DLHG", 3  # versions 1 and 2 (unsigned, keys per key file) are refused
GRANT_SIGNATURE_CONTEXT = b"dlheir-grant-v3\x00"
GRANT_FORMAT = "dlheir-grant"
RSA_BITS = 3072
MIN_RSA_BITS = 2048
PRIVATE_KEY_PROTECTION = "PBKDF2WithHMAC-SHA256AndAES256-CBC"


class BlobAuthenticationError(UserError):
    """A blob did not decrypt: altered, truncated, swapped to another id/collection, wrong key,
    or an unknown format version."""


class GrantError(UserError):
    """A grant cannot be opened: another user's grant, wrong private key or passphrase, or altered."""


# --- files ---------------------------------------------------------------------------------
def _write_new(path: Path | str, data: bytes, mode: int, what: str) -> Path:
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UserError(f"{path} already exists; refusing to overwrite {what}") from None
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        if mode == 0o600:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written key left behind
        raise
    return path


def write_private(path: Path | str, data: bytes, what: str = "a key") -> Path:
    """Create ``path`` with mode 0600 atomically (O_CREAT|O_EXCL); never overwrite (UserError)."""
    return _write_new(path, data, 0o600, what)


def replace_private(path: Path | str, data: bytes) -> Path:
    """Write ``path`` with mode 0600, replacing an existing file atomically and durably: the bytes
    go to a 0600 temporary file in the same folder, fsynced, renamed over ``path``, and the folder
    fsynced. Readers see the old file or the whole new one, never a partial or group/world-readable one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself is durable: a crash after this keeps the new file
    return path


def _read(path: Path | str, what: str, hint: str = "") -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}{hint}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def check_private_mode(path: Path | str) -> None:
    """UserError (one line naming the file and the fix) if group or others have any access to
    ``path``: read, write or execute."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise UserError(f"{path} is accessible by group or others (mode {mode:04o}), refusing to use a secret "
                        f"file others can read or change; fix with: chmod 600 {path}")


def read_secret(path: Path | str, what: str, hint: str = "") -> bytes:
    """Read a secret file (owner key, user private key, tokens): missing -> UserError naming
    ``what`` (plus ``hint``); group/others access -> UserError with the ``chmod 600`` fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}{hint}")
    check_private_mode(path)
    return _read(path, what, hint)


def _pem_kind(data: bytes) -> str | None:
    """'private', 'public' or None (not recognisably either) from the PEM/OpenSSH armour."""
    head = bytes(data[:4096])
    if b"PRIVATE KEY-----" in head:  # PKCS#1, PKCS#8 (plain or encrypted), OpenSSH
        return "private"
    if b"PUBLIC KEY-----" in head or head.startswith((b"ssh-rsa ", b"ssh-ed25519 ")):
        return "public"
    return None


def read_public_key_file(path: Path | str) -> bytes:
    """The bytes of a user's public key file; a private key given instead is refused
    (UserError) and goes no further."""
    path = Path(path)
    data = _read(path, "user public key", " (the .pub.pem file from 'dlheir user keygen')")
    kind = _pem_kind(data)
    if kind is None:  # no armour (DER): ask the parser
        try:
            kind = "private" if RSA.import_key(data).has_private() else "public"
        except (ValueError, IndexError, TypeError):
            pass  # not a key at all: make_grant says so
    if kind == "private":
        raise UserError(f"{path} is a private key, not a public one: give the user's public key (the .pub.pem "
                        "file from 'dlheir user keygen'); a private key never leaves its owner")
    return data


def read_private_key_file(path: Path | str) -> bytes:
    """The bytes of the user's private key file: a public key given instead, or a file that group
    or others can access, is refused (UserError)."""
    path = Path(path)
    hint = " (create one with 'dlheir user keygen')"
    if not path.is_file():
        raise UserError(f"private key not found: {path}{hint}")
    data = _read(path, "private key", hint)
    if _pem_kind(data) == "public":
        raise UserError(f"{path} is a public key: give your private key (the file 'dlheir user keygen' "
                        "wrote next to it, e.g. user.pem)")
    check_private_mode(path)
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not valid base64") from None


def _check_key(key: bytes, what: str = "image key") -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise UserError(f"the {what} must be {KEY_BYTES} bytes (AES-256)")
    return bytes(key)


# --- KeyGen: the owner's keys ---------------------------------------------------------------
MODES = ("server-ranked", "private")
UID_BYTES = 16
COLLECTION_KEYS_SALT = b"dlheir-collection-keys-v3"
MIGRATE_HINT = "see the README, 'Key format 3 and migrating to it'"


def fingerprint(public_key: bytes) -> str:
    """A short printable form of an owner's Ed25519 public key (SHA-256, first 16 bytes, hex in
    groups of 4), for the owner to give users out of band and users to compare."""
    h = SHA256.new(bytes(public_key)).hexdigest()[:32]
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class CollectionEntry:
    """What the owner's key file records about one collection: its unique id (random, made when
    the collection was created: a collection re-created under the same name gets a new one, so
    none of the old one's blobs, pages or grants open in it), its mode and its newest key version."""

    uid: bytes
    mode: str = "server-ranked"
    key_id: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.uid, bytes) or len(self.uid) != UID_BYTES:
            raise UserError(f"a collection uid is {UID_BYTES} bytes")
        if self.mode not in MODES:
            raise UserError(f"a collection's mode is one of {', '.join(MODES)}, not {self.mode!r}")
        if not isinstance(self.key_id, int) or not 1 <= self.key_id <= MAX_KEY_ID:
            raise UserError("key ids are integers from 1 to 2^32-1")


@dataclass(frozen=True)
class CollectionKeys:
    """One collection's keys at key version ``key_id`` (never printed in a repr), all derived
    from the owner's master secret and the collection's uid (HKDF-SHA256, see the module
    docstring): nothing of one collection opens another, and a version's keys do not give the
    next one's."""

    name: str
    uid: bytes
    mode: str
    key_id: int
    master: bytes = field(repr=False)
    newest: int = 0  # the newest version the key file holds (0: key_id)

    def _derive(self, purpose: str, version: int | None = None) -> bytes:
        context = b"uid=" + self.uid.hex().encode() + b";purpose=" + purpose.encode()
        if version is not None:
            context += b";version=%d" % version
        return HKDF(self.master, KEY_BYTES, salt=COLLECTION_KEYS_SALT, hashmod=SHA256, context=context)

    @property
    def binding(self) -> str:
        """What blobs and pages are bound to (associated data, page key): the name and the uid."""
        return collection_binding(self.name, self.uid)

    @property
    def private(self) -> bool:
        return self.mode == "private"

    @property
    def image_key(self) -> bytes:
        return self._derive("image", self.key_id)

    @property
    def transform_secret(self) -> bytes:
        return self._derive("transform", self.key_id)

    @property
    def id_key(self) -> bytes:
        """The key item ids are computed with (:func:`dlheir.ids.keyed_content_id`); one per
        collection, unchanged by rotation (ids stay the owner's to recompute)."""
        return self._derive("item-ids")

    def image_keys(self) -> dict[int, bytes]:
        """Key id -> image key for every version up to ``key_id`` (what grants carry)."""
        return {v: self._derive("image", v) for v in range(1, self.key_id + 1)}

    def at(self, key_id: int) -> "CollectionKeys":
        """The keys of version ``key_id`` (1 .. the newest the key file holds)."""
        newest = self.newest or self.key_id
        if not isinstance(key_id, int) or not 1 <= key_id <= newest:
            raise UserError(f"collection {self.name!r} has key versions 1 to {newest} in this key file, not "
                            f"{key_id}: the server names a version the owner never made (a server that lies, or "
                            "another key file)")
        return CollectionKeys(self.name, self.uid, self.mode, key_id, self.master, newest)


def collection_binding(name: str, uid: bytes) -> str:
    """``NAME#UIDHEX``: the string blobs' and pages' associated data and page keys are bound to."""
    return f"{name}#{bytes(uid).hex()}"


@dataclass(frozen=True)
class OwnerKeys:
    """The owner's key file, format version 3: a master secret every collection's keys are
    derived from, an Ed25519 signing key grants are signed with, and per collection its uid,
    mode and newest key version (:class:`CollectionEntry`). ``collection`` is a default
    collection name (optional)."""

    master_secret: bytes = field(repr=False)
    signing_seed: bytes = field(repr=False)
    collection: str | None = None
    collections: Mapping[str, CollectionEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_key(self.master_secret, "master secret")
        _check_key(self.signing_seed, "signing key")
        if self.master_secret == self.signing_seed:
            raise UserError("the master secret and the signing key must be separate keys")

    @classmethod
    def generate(cls, collection: str | None = None) -> "OwnerKeys":
        """A fresh master secret and signing key from the OS CSPRNG; no collection yet."""
        return cls(get_random_bytes(KEY_BYTES), get_random_bytes(KEY_BYTES), collection)

    # collections
    def register(self, name: str, mode: str = "server-ranked") -> "OwnerKeys":
        """These keys with a new entry for ``name`` (a fresh random uid, key version 1), replacing
        any entry of that name: what creating (or re-creating) a collection records."""
        if not isinstance(name, str) or not name:
            raise UserError("a collection needs a name")
        entry = CollectionEntry(get_random_bytes(UID_BYTES), mode, 1)
        return replace(self, collections={**self.collections, name: entry})

    def for_collection(self, name: str, key_file: Path | str | None = None) -> CollectionKeys:
        """``name``'s keys at its newest version; UserError (one line) if the key file does not know it."""
        entry = self.collections.get(name)
        if entry is None:
            where = f"the owner key file {key_file}" if key_file else "this owner key file"
            known = ", ".join(sorted(self.collections)) or "none"
            raise UserError(f"{where} has no keys for collection {name!r} (it holds: {known}): a collection's keys "
                            "are made when 'dlheir owner create-collection' creates it with this key file; a collection "
                            f"created with another key file, or before key format 3, must be re-created ({MIGRATE_HINT})")
        return CollectionKeys(name, entry.uid, entry.mode, entry.key_id, self.master_secret)

    def rotated(self, name: str) -> "OwnerKeys":
        """These keys with ``name``'s key version moved to the next one."""
        entry = self.collections.get(name)
        if entry is None:
            self.for_collection(name)  # raises the one-line error
        return replace(self, collections={**self.collections, name: replace(entry, key_id=entry.key_id + 1)})

    @property
    def key_ids(self) -> list[int]:
        """Key versions of the default collection (empty if there is none)."""
        entry = self.collections.get(self.collection or "")
        return list(range(1, entry.key_id + 1)) if entry else []

    # signing
    @property
    def signing_key(self):
        return ECC.construct(curve="Ed25519", seed=self.signing_seed)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key users pin."""
        return self.signing_key.public_key().export_key(format="raw")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return eddsa.new(self.signing_key, "rfc8032").sign(message)

    # the file
    def to_json(self) -> bytes:
        doc = {"format": KEY_FORMAT, "version": KEY_VERSION, "master_secret": _b64(self.master_secret),
               "signing_key": _b64(self.signing_seed),
               "collections": {n: {"uid": e.uid.hex(), "mode": e.mode, "key_id": e.key_id}
                               for n, e in sorted(self.collections.items())}}
        if self.collection is not None:
            doc["collection"] = self.collection
        return (json.dumps(doc, indent=2) + "\n").encode()

    def save(self, path: Path | str) -> Path:
        """Write the key file: mode 0600, created atomically, refusing to overwrite (UserError)."""
        return write_private(path, self.to_json(), "a key")

    def replace_file(self, path: Path | str) -> Path:
        """Rewrite an existing key file atomically and durably (0600): a new collection or a rotation."""
        return replace_private(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> "OwnerKeys":
        """Read a key file; a missing, group/world-accessible or malformed file raises UserError,
        and one of an older format a one-line message naming the migration."""
        path = Path(path)
        raw = read_secret(path, "owner key file", " (create one with 'dlheir owner init')")
        try:
            doc = json.loads(raw.decode("utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
                raise ValueError("not a dlheir owner key file")
            version = doc.get("version")
            if type(version) is int and version in (1, 2):
                raise UserError(f"{path} is an owner key file of format version {version} (one image key and transform "
                                "secret shared by every collection, grants unsigned, item ids a server can confirm): "
                                f"convert it with 'dlheir owner migrate-keys --key {path}' ({MIGRATE_HINT})")
            if version != KEY_VERSION:
                raise ValueError(f"unsupported version {version!r} (this dlheir reads {KEY_VERSION})")
            entries = doc.get("collections", {})
            if not isinstance(entries, dict):
                raise ValueError("collections must be an object")
            collections = {}
            for name, e in entries.items():
                if not isinstance(e, dict) or not isinstance(e.get("uid"), str):
                    raise ValueError(f"collection {name!r}: uid missing")
                collections[name] = CollectionEntry(bytes.fromhex(e["uid"]), e.get("mode"), e.get("key_id"))
            collection = doc.get("collection")
            if collection is not None and not isinstance(collection, str):
                raise ValueError("collection must be a string")
            return cls(_unb64(doc.get("master_secret"), "master_secret"), _unb64(doc.get("signing_key"), "signing_key"),
                       collection, collections)
        except (ValueError, UserError) as exc:  # includes JSON and UTF-8 decoding errors
            if isinstance(exc, UserError) and "migrate-keys" in str(exc):
                raise
            raise UserError(f"{path}: malformed owner key file: {exc}") from None


def migrate_key_file(path: Path | str) -> tuple[OwnerKeys, Path]:
    """Convert an owner key file of format 1 or 2 to format 3: the old file is kept beside it
    (``PATH.vN.bak``, 0600) and PATH gets a new master secret and signing key, no collection.
    Collections made with the old file keep their old keys: they must be re-created and their
    images uploaded again (the new keys cannot open what the old ones sealed, by design)."""
    path = Path(path)
    raw = read_secret(path, "owner key file", " (create one with 'dlheir owner init')")
    try:
        doc = json.loads(raw.decode("utf-8"))
        version = doc.get("version") if isinstance(doc, dict) and doc.get("format") == KEY_FORMAT else None
    except ValueError:
        version = None
    if version == KEY_VERSION:
        raise UserError(f"{path} is already of key format {KEY_VERSION}: nothing to migrate")
    if version not in (1, 2):
        raise UserError(f"{path} is not a dlheir owner key file of format 1 or 2")
    backup = path.with_name(f"{path.name}.v{version}.bak")
    write_private(backup, raw, "a key backup")
    keys = OwnerKeys.generate(doc.get("collection") if isinstance(doc.get("collection"), str) else None)
    keys.replace_file(path)
    return keys, backup


# --- EncImg / Dec -------------------------------------------------------------------------
class DecryptedImage(NamedTuple):
    name: str  # the original file name (empty if none was given)
    data: bytes  # the original file's bytes, verbatim


def _blob_aad(collection: str, item_id: int, version: int = BLOB_VERSION, key_id: int = 1) -> bytes:
    if not isinstance(collection, str):
        raise UserError("the collection name must be a string")
    name = collection.encode("utf-8")
    if len(name) > 0xFFFF:
        raise UserError("the collection name is too long")
    if not isinstance(item_id, (int, np.integer)) or not 0 <= int(item_id) < 2**64:
        raise UserError(f"item id must be an integer in [0, 2^64), got {item_id!r}")
    head = BLOB_MAGIC + bytes([version]) + (struct.pack(">I", key_id) if version >= 2 else b"")
    return head + struct.pack(">H", len(name)) + name + struct.pack(">Q", int(item_id))


def encrypt_image(key: bytes, plaintext: bytes, collection: str, item_id: int, name: str = "",
                  key_id: int = 1) -> bytes:
    """EncImg: AES-256-GCM under ``key`` (the owner's image key of version ``key_id``, recorded
    in the blob's header) with a fresh random 96-bit nonce; the original file name (optional)
    is encrypted with the bytes; (version, key id, collection, item id) are associated data."""
    key = _check_key(key)
    if not isinstance(key_id, (int, np.integer)) or not 1 <= int(key_id) <= MAX_KEY_ID:
        raise UserError(f"key id must be an integer from 1 to 2^32-1, got {key_id!r}")
    raw_name = name.encode("utf-8", errors="surrogateescape")  # POSIX names need not be UTF-8
    if len(raw_name) > 0xFFFF:
        raise UserError(f"file name too long to store ({len(raw_name)} bytes)")
    aad = _blob_aad(collection, item_id, BLOB_VERSION, int(key_id))
    nonce = get_random_bytes(NONCE_BYTES)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(struct.pack(">H", len(raw_name)) + raw_name + bytes(plaintext))
    return BLOB_MAGIC + bytes([BLOB_VERSION]) + struct.pack(">I", int(key_id)) + nonce + ciphertext + tag


def blob_key_id(blob: bytes) -> int | None:
    """The key version a blob was encrypted with (version 1 blobs: 1), or None if it is no blob."""
    blob = bytes(blob[:BLOB_HEADER_BYTES])
    if blob[:4] != BLOB_MAGIC or len(blob) < 5:
        return None
    if blob[4] == 1:
        return 1
    return struct.unpack(">I", blob[5:9])[0] if blob[4] == 2 and len(blob) >= 9 else None


def decrypt_image(key: bytes | Mapping[int, bytes], blob: bytes, collection: str, item_id: int) -> DecryptedImage:
    """Dec: ``(name, data)`` with ``data`` byte-identical to the encrypted file, or
    :class:`BlobAuthenticationError` (never garbage). ``key`` is one image key, or a keyring
    {key id: image key} (a grant's ``image_keys``) from which the blob's key version is taken."""
    where = f"item {item_id} of collection {collection!r}"
    blob = bytes(blob)
    if blob[:4] != BLOB_MAGIC:
        raise BlobAuthenticationError(f"{where}: not a dlheir encrypted blob (bad magic)")
    version = blob[4] if len(blob) > 4 else None
    if version not in (1, 2):
        if version is None:
            raise BlobAuthenticationError(f"{where}: truncated blob ({len(blob)} bytes)")
        raise BlobAuthenticationError(f"{where}: unsupported blob version {version} (this dlheir reads 1 and 2)")
    header, overhead = (BLOB_V1_HEADER_BYTES, BLOB_V1_OVERHEAD) if version == 1 else (BLOB_HEADER_BYTES, BLOB_OVERHEAD)
    if len(blob) < overhead:
        raise BlobAuthenticationError(f"{where}: truncated blob ({len(blob)} bytes, at least {overhead} expected)")
    key_id = blob_key_id(blob)
    if isinstance(key, Mapping):
        if key_id not in key:
            raise BlobAuthenticationError(f"{where}: encrypted with key version {key_id}, which this grant does "
                                          f"not hold (it holds {', '.join(map(str, sorted(key))) or 'none'})")
        key = key[key_id]
    key = _check_key(key)
    aad = _blob_aad(collection, item_id, version, key_id)
    nonce, ciphertext, tag = blob[header - NONCE_BYTES:header], blob[header:-TAG_BYTES], blob[-TAG_BYTES:]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(aad)
    try:
        payload = cipher.decrypt_and_verify(ciphertext, tag)
    except ValueError:
        raise BlobAuthenticationError(
            f"{where}: authentication failed (the blob was altered or truncated, is stored under another "
            "id or collection, or the key is wrong)") from None
    (n,) = struct.unpack(">H", payload[:2])
    return DecryptedImage(payload[2:2 + n].decode("utf-8", errors="surrogateescape"), payload[2 + n:])


# --- the keyed, Hamming-preserving code transform ----------------------------------------
class CodeTransform:
    """Keyed bit permutation then XOR mask on N-bit codes: ``d(T(a), T(b)) == d(a, b)``.

    ``secret`` is the owner's transform secret; one transform is derived per code length
    (HKDF-SHA256 with context ``bits=N``, AES-CTR keystream as the PRG; see the module
    docstring), so the same secret serves any N. Codes are ``uint8 [B, ceil(N/8)]`` in the
    ``dlheir.codes`` format; padding bits must be zero on input and stay zero on output.
    """

    def __init__(self, secret: bytes, bits: int) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise UserError("the transform secret must be at least 16 bytes")
        self.bits = validate_bits(bits)
        key = HKDF(bytes(secret), 32, salt=TRANSFORM_SALT, hashmod=SHA256, context=f"bits={self.bits}".encode())
        n = self.bits
        stream = AES.new(key, AES.MODE_CTR, nonce=b"\x00" * 8, initial_value=0).encrypt(b"\x00" * (9 * n))
        words = [int.from_bytes(stream[8 * i:8 * i + 8], "big") for i in range(n)]
        perm = list(range(n))
        for i in range(n - 1, 0, -1):  # keyed Fisher-Yates
            j = words[i] % (i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        self.perm = np.array(perm, dtype=np.intp)
        self.inverse = np.argsort(self.perm)
        self.mask = np.frombuffer(stream[8 * n:9 * n], dtype=np.uint8) & 1
        for a in (self.perm, self.inverse, self.mask):
            a.setflags(write=False)

    def _bits_of(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype != np.uint8:
            raise UserError(f"codes must be uint8 packed bytes, got {codes.dtype}")
        codes = np.atleast_2d(codes)
        width = code_bytes(self.bits)
        if codes.ndim != 2 or codes.shape[1] != width:
            raise UserError(f"{self.bits}-bit codes are [B, {width}] bytes, got shape {codes.shape}")
        if self.bits % 8 and (codes[:, -1] & (0xFF >> (self.bits % 8))).any():
            raise UserError(f"{self.bits}-bit codes must have zero padding bits")
        return unpack_bits(codes, self.bits)

    def apply(self, codes: np.ndarray) -> np.ndarray:
        """Raw codes [B, L] (or one code [L]) -> transformed codes uint8 [B, L]."""
        return pack_bits(self._bits_of(codes)[:, self.perm] ^ self.mask)

    def invert(self, codes: np.ndarray) -> np.ndarray:
        """Transformed codes [B, L] (or one [L]) -> the raw codes uint8 [B, L]."""
        return pack_bits((self._bits_of(codes) ^ self.mask)[:, self.inverse])


def rekey_map(old: CodeTransform, new: CodeTransform) -> tuple[np.ndarray, np.ndarray]:
    """T_new o T_old^-1 as (perm, mask bits): a code stored under ``old`` becomes the same raw
    code under ``new`` by ``out_bit[j] = in_bit[perm[j]] XOR mask[j]`` (the form of
    :meth:`CodeTransform.apply`). It is what the owner sends the server at rotation."""
    if old.bits != new.bits:
        raise UserError(f"cannot map {old.bits}-bit codes to {new.bits}-bit codes")
    perm = old.inverse[new.perm]
    return perm.astype(np.intp), (old.mask[perm] ^ new.mask).astype(np.uint8)


def apply_map(codes: np.ndarray, perm: np.ndarray, mask: np.ndarray, bits: int) -> np.ndarray:
    """``out_bit[j] = in_bit[perm[j]] XOR mask[j]`` on packed codes [B, L] (what the server does)."""
    return pack_bits(unpack_bits(np.atleast_2d(np.asarray(codes, np.uint8)), bits)[:, perm] ^ mask)


# --- user keys and grants ------------------------------------------------------------------
def public_key_path(private_path: Path | str) -> Path:
    """Where ``user keygen`` puts the public key: ``user.pem`` -> ``user.pub.pem``."""
    private_path = Path(private_path)
    return private_path.with_name(private_path.stem + ".pub.pem")


def generate_user_keypair(private_path: Path | str, passphrase: str | None = None) -> tuple[Path, Path]:
    """RSA-3072 pair: private key PEM (PKCS#8, mode 0600, encrypted with PBKDF2-SHA256 +
    AES-256-CBC if a passphrase is given) and the public key next to it (``*.pub.pem``).
    Refuses to overwrite either file. Returns (private path, public path)."""
    private_path = Path(private_path)
    public_path = public_key_path(private_path)
    if passphrase is not None and not passphrase:
        raise UserError("the passphrase is empty")
    for p in (private_path, public_path):
        if p.exists():
            raise UserError(f"{p} already exists; refusing to overwrite a key")
    key = RSA.generate(RSA_BITS)
    pem = key.export_key("PEM", pkcs=8, passphrase=passphrase,
                         protection=PRIVATE_KEY_PROTECTION if passphrase else None)
    write_private(private_path, pem)
    try:
        _write_new(public_path, key.public_key().export_key("PEM") + b"\n", 0o644, "a key")
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


@dataclass(frozen=True)
class Grant:
    """What a user receives from the owner (the keys are never printed in a repr).

    ``image_key``/``transform_secret`` are those of key version ``key_id`` (the collection's
    current one when the grant was made); ``image_keys`` holds every version up to it, so blobs
    uploaded before a rotation still decrypt. ``uid`` and ``mode`` are the collection's as the
    owner recorded them (the client trusts these, never the server's word); ``owner_key`` is the
    Ed25519 public key that signed the grant (see :mod:`dlheir.client.trust`)."""

    collection: str
    reader_token: str = field(repr=False)
    image_key: bytes = field(repr=False)
    transform_secret: bytes = field(repr=False)
    server: str | None = None
    bits: int | None = None
    key_id: int = 1
    image_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    user: str | None = None
    version: int = GRANT_VERSION
    uid: bytes = b""
    mode: str = "server-ranked"
    owner_key: bytes = b""

    def __post_init__(self) -> None:
        if not self.image_keys:
            object.__setattr__(self, "image_keys", {self.key_id: self.image_key})

    @property
    def binding(self) -> str:
        return collection_binding(self.collection, self.uid)

    @property
    def private(self) -> bool:
        return self.mode == "private"

    @property
    def owner_fingerprint(self) -> str:
        return fingerprint(self.owner_key)


def _import_public(pem: bytes):
    try:
        key = RSA.import_key(pem)
    except (ValueError, IndexError, TypeError):
        raise UserError("not an RSA public key (expected the user's user.pub.pem)") from None
    if key.has_private():
        raise UserError("that is a private key, not a public one: a grant is made for the user's public key "
                        "(user.pub.pem); a private key never leaves its owner")
    if key.size_in_bits() < MIN_RSA_BITS:
        raise UserError(f"the user's RSA key has {key.size_in_bits()} bits; at least {MIN_RSA_BITS} are required")
    return key.public_key()


def _recipient(public_rsa) -> str:
    """The SHA-256 of the user's RSA public key (DER): the signed payload names its recipient, so
    a user cannot pass a grant on re-sealed for someone else as the owner's."""
    return SHA256.new(public_rsa.export_key("DER")).hexdigest()


def _signed_message(payload: dict) -> bytes:
    return GRANT_SIGNATURE_CONTEXT + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def make_grant(owner_keys: OwnerKeys, user_public_pem: bytes, collection: str, reader_token: str,
               server: str | None = None, bits: int | None = None, user: str | None = None,
               key_id: int | None = None) -> bytes:
    """Seal ``collection``'s keys (of version ``key_id``, default its newest, and every older
    image key), uid, mode, name and reader token (and, for convenience, the server address and
    code length) for the holder of ``user_public_pem``'s private key, signed with the owner's
    Ed25519 key. ``user`` is the token's label."""
    if not isinstance(collection, str) or not collection:
        raise UserError("a grant needs the collection name")
    if not isinstance(reader_token, str) or not reader_token:
        raise UserError("a grant needs the collection's reader token")
    if bits is not None:
        bits = validate_bits(bits)
    keys = owner_keys.for_collection(collection)
    keys = keys.at(keys.key_id if key_id is None else int(key_id))
    public = _import_public(user_public_pem)
    payload = {"format": GRANT_FORMAT, "version": GRANT_VERSION, "collection": collection, "uid": keys.uid.hex(),
               "mode": keys.mode, "user": user, "reader_token": reader_token, "key_id": keys.key_id,
               "image_keys": {str(i): _b64(k) for i, k in keys.image_keys().items()},
               "transform_secret": _b64(keys.transform_secret), "server": server, "bits": bits,
               "recipient": _recipient(public), "owner_key": _b64(owner_keys.public_key)}
    payload["signature"] = _b64(owner_keys.sign(_signed_message(payload)))
    session_key = get_random_bytes(KEY_BYTES)
    wrapped = PKCS1_OAEP.new(public, hashAlgo=SHA256).encrypt(session_key)
    header = GRANT_MAGIC + bytes([GRANT_VERSION]) + struct.pack(">H", len(wrapped)) + wrapped
    nonce = get_random_bytes(NONCE_BYTES)
    cipher = AES.new(session_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(header)
    ciphertext, tag = cipher.encrypt_and_digest(json.dumps(payload).encode())
    return header + nonce + tag + ciphertext


def _import_private(pem: bytes, passphrase: str | None):
    try:
        key = RSA.import_key(pem, passphrase=passphrase)
    except ValueError as exc:
        text = str(exc).lower()
        if "passphrase is required" in text or (passphrase is None and b"ENCRYPTED" in bytes(pem)):
            raise GrantError("the private key is passphrase-protected: give its passphrase "
                             "(--passphrase-env VAR)") from None
        if "incorrect passphrase" in text:
            raise GrantError("wrong passphrase for the private key") from None
        raise GrantError("cannot read the private key (not an RSA private key PEM)") from None
    except (IndexError, TypeError):
        raise GrantError("cannot read the private key (not an RSA private key PEM)") from None
    if not key.has_private():
        raise GrantError("that is a public key; open the grant with your private key (user.pem)")
    return key


def open_grant(grant_bytes: bytes, user_private_pem: bytes, passphrase: str | None = None) -> Grant:
    """Open a grant with the user's private key and check the owner's signature over it;
    :class:`GrantError` (one line) for anything else. Whether the signing owner key is one the
    user trusts is :func:`dlheir.client.trust.check_owner`'s question."""
    data = bytes(grant_bytes)
    if len(data) < 7 or data[:4] != GRANT_MAGIC:
        raise GrantError("not a dlheir grant file (bad magic or truncated)")
    version = data[4]
    if version in (1, 2):
        raise GrantError(f"this grant is of format version {version}: not signed by the owner, and its keys are shared "
                         "by every collection of the owner's key file; ask the owner for a new grant ('dlheir owner "
                         "grant' after 'dlheir owner migrate-keys')")
    if version != GRANT_VERSION:
        raise GrantError(f"unsupported grant version {version} (this dlheir reads {GRANT_VERSION})")
    (w,) = struct.unpack(">H", data[5:7])
    body = 7 + w
    if len(data) < body + NONCE_BYTES + TAG_BYTES:
        raise GrantError("truncated grant file")
    header, wrapped = data[:body], data[7:body]
    nonce, tag, ciphertext = (data[body:body + NONCE_BYTES], data[body + NONCE_BYTES:body + NONCE_BYTES + TAG_BYTES],
                              data[body + NONCE_BYTES + TAG_BYTES:])
    private = _import_private(user_private_pem, passphrase)
    try:
        session_key = PKCS1_OAEP.new(private, hashAlgo=SHA256).decrypt(wrapped)
    except (ValueError, TypeError):
        raise GrantError("this grant was not made for this private key (another user's grant, or its "
                         "wrapped key was altered)") from None
    cipher = AES.new(session_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(header)
    try:
        doc = json.loads(cipher.decrypt_and_verify(ciphertext, tag))
    except ValueError:
        raise GrantError("the grant was altered (authentication failed)") from None
    try:
        if not isinstance(doc, dict) or doc.get("format") != GRANT_FORMAT or doc.get("version") != version:
            raise ValueError("unknown payload format")
        signature = _unb64(doc.pop("signature", None), "signature")
        owner_key = _unb64(doc.get("owner_key"), "owner_key")
    except (ValueError, KeyError, TypeError) as exc:
        raise GrantError(f"malformed grant payload: {exc}") from None
    try:
        eddsa.new(eddsa.import_public_key(owner_key), "rfc8032").verify(_signed_message(doc), signature)
    except ValueError:
        raise GrantError("the grant's owner signature does not verify: it was not made by the owner key it names "
                         "(a forged or altered grant)") from None
    if doc.get("recipient") != _recipient(private.public_key()):
        raise GrantError("this grant was signed by its owner for another user's key, and re-sealed for yours: "
                         "ask the owner for a grant of your own")
    try:
        key_id = doc["key_id"]
        if not isinstance(key_id, int) or not isinstance(doc["image_keys"], dict):
            raise ValueError("key_id must be an integer and image_keys an object")
        if doc.get("mode") not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        image_keys = {int(i): _unb64(k, f"image key {i}") for i, k in doc["image_keys"].items()}
        uid = bytes.fromhex(doc["uid"])
        if len(uid) != UID_BYTES:
            raise ValueError("uid must be 16 bytes")
        user = doc.get("user")
        grant = Grant(str(doc["collection"]), str(doc["reader_token"]), image_keys[key_id],
                      _unb64(doc["transform_secret"], "transform_secret"), doc.get("server"), doc.get("bits"),
                      key_id, image_keys, None if user is None else str(user), GRANT_VERSION, uid, doc["mode"],
                      owner_key)
        for key in grant.image_keys.values():
            _check_key(key)
        _check_key(grant.transform_secret, "transform secret")
    except (ValueError, KeyError, TypeError, UserError) as exc:
        raise GrantError(f"malformed grant payload: {exc}") from None
    return grant
