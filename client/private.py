"""Private-ranking mode, client side: sealed code pages, their local cache, local ranking.

In a collection created in private-ranking mode (``dlheir owner create-collection --private``)
the server never holds a usable code: items carry an empty code, and the owner appends the
codes to *code pages* sealed with AES-256-GCM. An authorised client syncs the pages it has not
seen yet, opens them, ranks on its own machine with the server's own exact index
(:class:`dlheir.server.index.BinaryIndex`: the same (distance, id) order, ties included) and
fetches the top results by id. The server learns who syncs (and when, how many pages/bytes)
and which ids are fetched; it sees no code and no distance.

**Sealed page** (format version 2, integers big-endian)::

    offset   size  field
    0        4     magic b"DLHS"
    4        1     version = 2
    5        4     key id: the collection's key version the page key comes from
    9        12    nonce: 96 random bits, fresh for every page
    21       L     ciphertext of the records
    21 + L   16    GCM tag

    associated data = b"DLHS" | version | u32 key id | u16 len(binding) | binding (UTF-8)
                      | u64 page number | 32-byte chain value of the pages before it
    binding         = NAME#UIDHEX (dlheir.client.crypto.collection_binding: the name and the
                      collection's random uid, so a re-created collection shares nothing)
    page key        = HKDF-SHA256(the collection's image key of that key id, 32,
                                  salt=b"dlheir-code-pages-v1", context=b"collection=" + binding)
    chain           = c_0 = SHA-256(b"dlheir-page-chain-start" | binding),
                      c_{i+1} = SHA-256(b"dlheir-page-chain" | c_i | sealed page i)
    records         = u16 bits | u32 n | n x u8 op (1 put, 0 delete) | n x u64 id
                      | n x 16-byte blob digest (SHA-256 of the item's encrypted blob, first 16
                        bytes; zeros for a delete, or a put written without a blob)
                      | n x ceil(bits/8) code bytes (the network's raw codes; zeros for a delete)

The associated data binds a page to its collection (name and uid), its number, the format
version and every page before it: a page moved to another number or collection, altered,
truncated, opened with another key, or taken from another history of the collection (a fork)
raises :class:`PageAuthenticationError`. The page key reaches a user inside the grant.

**What a lying server cannot do unseen.** The client keeps the highest page count and its
chain value it has seen per collection (``*.head`` beside the page cache) and refuses a sync
that announces fewer pages (a rollback), delivers fewer than it announced (withheld pages), or
whose pages chain to another value at that count (a fork). A fetched blob must have the digest
the latest put record of its id names: a deleted item's blob replayed, or an older blob of the
id, does not decrypt as current. What remains: a client's *first* sync cannot tell that the
newest pages were withheld (fork consistency, as with any single untrusted server).

**Append-only.** Pages are numbered 0, 1, 2, ... without a gap; the server stores an append
only under the next number. A delete or replacement is a later page (a delete record, a
"tombstone", or a new put): applying pages in order, the last record of an id wins.

**Local cache.** Synced pages are kept, still sealed, in one file per (server, collection)
under ``$DLHEIR_HOME/page-cache/`` (folder 0700, file 0600); the next sync asks only for the
pages after the last one cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import grpc
import numpy as np
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.Random import get_random_bytes

from dlheir import paths
from dlheir.client.cloud import CloudClient, CloudError, _wrap
from dlheir.contract import PAGE_MAGIC, PAGE_VERSION, code_bytes, validate_bits
from dlheir.errors import UserError
from dlheir.proto import dlheir_cloud_pb2 as pb

PAGE_KEY_SALT = b"dlheir-code-pages-v1"
NONCE_BYTES, TAG_BYTES = 12, 16
PAGE_HEADER_BYTES = len(PAGE_MAGIC) + 1 + 4 + NONCE_BYTES  # 21
OP_DELETE, OP_PUT = 0, 1
MAX_PAGE_RECORDS = 50_000  # records per page written (a 48-bit page of 50k records is ~750 KB)
CACHE_DIR = "page-cache"
CACHE_MAGIC, CACHE_VERSION = b"DLHC", 1


class PageAuthenticationError(UserError):
    """A code page did not open: altered, truncated, moved to another number or collection,
    sealed with a key the grant does not hold, or of an unknown format version."""


DIGEST_BYTES = 16  # of a blob's SHA-256, in a put record
CHAIN_START, CHAIN_STEP = b"dlheir-page-chain-start", b"dlheir-page-chain"


class RollbackError(PageAuthenticationError):
    """The server announced or sent fewer pages than this client has seen, or another history."""


class PageRecords(NamedTuple):
    ops: np.ndarray  # uint8 [n]: OP_PUT or OP_DELETE
    ids: np.ndarray  # int64 [n]
    codes: np.ndarray  # uint8 [n, ceil(bits/8)]
    digests: np.ndarray | None = None  # uint8 [n, 16]: blob digests (None: zeros, no blob bound)


def blob_digest(blob: bytes) -> bytes:
    """What a put record names of its item's encrypted blob."""
    return hashlib.sha256(bytes(blob)).digest()[:DIGEST_BYTES]


def chain_start(binding: str) -> bytes:
    return hashlib.sha256(CHAIN_START + binding.encode("utf-8")).digest()


def next_chain(chain: bytes, sealed: bytes) -> bytes:
    """The chain value after page ``sealed`` (see the module docstring)."""
    return hashlib.sha256(CHAIN_STEP + chain + bytes(sealed)).digest()


def is_private(info: pb.CollectionInfo) -> bool:
    """Whether a collection (as CollectionStats/ListCollections report it) is in private-ranking mode."""
    return info.mode == pb.PRIVATE_RANKING


# --- keys and sealing -----------------------------------------------------------------------
def page_key(image_key: bytes, collection: str) -> bytes:
    """The code-page key of ``collection`` for one version of the owner's image key."""
    if not isinstance(image_key, (bytes, bytearray)) or len(image_key) != 32:
        raise UserError("the image key must be 32 bytes (AES-256)")
    return HKDF(bytes(image_key), 32, salt=PAGE_KEY_SALT, hashmod=SHA256,
                context=b"collection=" + collection.encode("utf-8"))


def _aad(collection: str, page: int, key_id: int, chain: bytes) -> bytes:
    name = collection.encode("utf-8")
    if len(name) > 0xFFFF:
        raise UserError("the collection name is too long")
    if len(chain) != 32:
        raise UserError("a page chain value is 32 bytes")
    return (PAGE_MAGIC + bytes([PAGE_VERSION]) + struct.pack(">I", key_id) + struct.pack(">H", len(name)) + name
            + struct.pack(">Q", page) + bytes(chain))


def encode_records(records: PageRecords, bits: int) -> bytes:
    """The plaintext of a page: ``u16 bits | u32 n | ops | ids | digests | codes``."""
    width = code_bytes(validate_bits(bits))
    ops = np.asarray(records.ops, dtype=np.uint8)
    ids = np.asarray(records.ids, dtype=np.int64)
    codes = np.asarray(records.codes, dtype=np.uint8).reshape(len(ids), width)
    digests = (np.zeros((len(ids), DIGEST_BYTES), np.uint8) if records.digests is None
               else np.asarray(records.digests, dtype=np.uint8).reshape(len(ids), DIGEST_BYTES))
    if len(ops) != len(ids) or (ids < 0).any() or not np.isin(ops, (OP_PUT, OP_DELETE)).all():
        raise UserError("page records: one op (put/delete) per id, ids >= 0")
    return (struct.pack(">HI", bits, len(ids)) + ops.tobytes() + ids.astype(">u8").tobytes()
            + np.ascontiguousarray(digests).tobytes() + np.ascontiguousarray(codes).tobytes())


def decode_records(data: bytes, bits: int) -> PageRecords:
    width = code_bytes(bits)
    if len(data) < 6:
        raise PageAuthenticationError("code page: records header truncated")
    got_bits, n = struct.unpack(">HI", data[:6])
    if got_bits != bits:
        raise PageAuthenticationError(f"code page holds {got_bits}-bit codes; the collection has {bits}-bit codes")
    per = 1 + 8 + DIGEST_BYTES + width
    if len(data) != 6 + n * per:
        raise PageAuthenticationError(f"code page: {len(data)} bytes of records, {6 + n * per} expected")
    buf = memoryview(data)
    ops = np.frombuffer(buf[6:6 + n], np.uint8)
    ids = np.frombuffer(buf[6 + n:6 + 9 * n], ">u8").astype(np.int64)
    end = 6 + 9 * n + DIGEST_BYTES * n
    digests = np.frombuffer(buf[6 + 9 * n:end], np.uint8).reshape(n, DIGEST_BYTES)
    codes = np.frombuffer(buf[end:], np.uint8).reshape(n, width)
    return PageRecords(ops, ids, codes, digests)


def seal_page(key: bytes, collection: str, page: int, plaintext: bytes, key_id: int = 1,
              chain: bytes | None = None) -> bytes:
    """Seal one page's records under the page key ``key`` (fresh random nonce); ``collection``
    is the binding (``NAME#UIDHEX``), ``chain`` the chain value of the pages before it (default:
    the start value, right for page 0)."""
    nonce = get_random_bytes(NONCE_BYTES)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(_aad(collection, page, key_id, chain_start(collection) if chain is None else chain))
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return PAGE_MAGIC + bytes([PAGE_VERSION]) + struct.pack(">I", key_id) + nonce + ciphertext + tag


def page_key_id(sealed: bytes) -> int:
    """The key version named in a sealed page's header (PageAuthenticationError if it is no page)."""
    if len(sealed) < PAGE_HEADER_BYTES + TAG_BYTES or bytes(sealed[:4]) != PAGE_MAGIC:
        raise PageAuthenticationError("not a sealed code page (bad magic or truncated)")
    if sealed[4] != PAGE_VERSION:
        raise PageAuthenticationError(f"code page format version {sealed[4]} (this dlheir reads {PAGE_VERSION})")
    return struct.unpack(">I", bytes(sealed[5:9]))[0]


def open_page(keys: Mapping[int, bytes], collection: str, page: int, sealed: bytes,
              chain: bytes | None = None) -> bytes:
    """The records of a sealed page; ``keys`` maps key id -> page key, ``chain`` is the chain
    value before it (default: the start value). Raises :class:`PageAuthenticationError`, never
    returns garbage."""
    key_id = page_key_id(sealed)
    if key_id not in keys:
        raise PageAuthenticationError(f"code page {page} of {collection!r} is sealed with key version {key_id}, "
                                      f"which this grant does not hold")
    sealed = bytes(sealed)
    cipher = AES.new(keys[key_id], AES.MODE_GCM, nonce=sealed[9:PAGE_HEADER_BYTES], mac_len=TAG_BYTES)
    cipher.update(_aad(collection, page, key_id, chain_start(collection) if chain is None else chain))
    try:
        return cipher.decrypt_and_verify(sealed[PAGE_HEADER_BYTES:-TAG_BYTES], sealed[-TAG_BYTES:])
    except ValueError:
        raise PageAuthenticationError(
            f"code page {page} of {collection!r}: authentication failed (altered or truncated, stored under "
            "another number or collection, from another history of it, or the key is wrong)") from None


def page_keyring(image_keys: bytes | Mapping[int, bytes], collection: str, key_id: int = 1) -> dict[int, bytes]:
    """Key id -> page key, from one image key (of version ``key_id``) or a keyring {id: image key}."""
    ring = image_keys if isinstance(image_keys, Mapping) else {key_id: image_keys}
    return {int(i): page_key(k, collection) for i, k in ring.items()}


def grant_image_keys(grant) -> dict[int, bytes]:
    """Key id -> image key held by a grant (every version it carries)."""
    ring = getattr(grant, "image_keys", None)
    if ring:
        return {int(i): bytes(k) for i, k in ring.items()}
    return {int(getattr(grant, "key_id", 1) or 1): grant.image_key}


# --- the two RPCs -------------------------------------------------------------------------
def append_code_page(cloud: CloudClient, collection: str, page: int, sealed: bytes) -> int:
    """Store page ``page`` (owner token); returns the page count after it."""
    return cloud._call("AppendCodePage",
                       pb.AppendCodePageRequest(collection=collection, page=page, data=sealed)).pages


def sync_code_pages(cloud: CloudClient, collection: str, from_page: int,
                    ) -> tuple[pb.SyncHeader, Iterator[tuple[int, bytes]]]:
    """The collection's header (mode, bits, page count) and an iterator over (page number,
    sealed bytes) of every page from ``from_page`` on, in order (none in server-ranked mode)."""
    stream, first, address = cloud._open_stream("SyncCodePages",
                                                pb.SyncCodePagesRequest(collection=collection, from_page=from_page))
    if first is None:
        first = pb.SyncCodePagesResponse()
    if not first.HasField("header"):
        raise UserError("cloud server: SyncCodePages answered without a header (not a dlheir server of this version?)")

    def pages() -> Iterator[tuple[int, bytes]]:
        try:
            for msg in stream:
                yield msg.page.page, msg.page.data
        except grpc.RpcError as exc:
            raise _wrap(exc, address) from None

    return first.header, pages()


# --- the owner's side ------------------------------------------------------------------------
class PageWriter:
    """Appends sealed pages of put/delete records to a private-ranking collection (owner token).

    ``image_keys``: the collection's image key of version ``key_id``, or its keyring {id: key}
    (needed to check pages sealed under older versions); ``binding``: ``NAME#UIDHEX`` (default
    the name alone, for raw uses without an owner key file). The next page number and the chain
    value are learnt once by syncing (and checking) the collection's pages, then followed; when
    another writer took the number (FAILED_PRECONDITION), they are synced again and the page
    re-sealed under the new number and chain."""

    def __init__(self, cloud: CloudClient, image_keys: bytes | Mapping[int, bytes], collection: str, bits: int,
                 key_id: int = 1, binding: str | None = None) -> None:
        self.cloud, self.collection, self.bits, self.key_id = cloud, collection, validate_bits(bits), int(key_id)
        self.binding = binding or collection
        self.ring = image_keys if isinstance(image_keys, Mapping) else {self.key_id: image_keys}
        self.key = page_key(self.ring[self.key_id], self.binding)
        self.next_page: int | None = None
        self.chain = chain_start(self.binding)
        self.pages_written = 0
        self.bytes_written = 0

    def _refresh(self) -> int:
        follower = LocalIndex(self.cloud, self.collection, self.bits, self.ring, binding=self.binding, rank=False)
        if not follower.sync().private:
            raise UserError(f"collection {self.collection!r} is server-ranked: it has no code pages")
        self.next_page, self.chain = follower.pages, follower.chain
        return self.next_page

    def _append(self, plaintext: bytes) -> int:
        for _ in range(16):
            page = self.next_page if self.next_page is not None else self._refresh()
            sealed = seal_page(self.key, self.binding, page, plaintext, self.key_id, self.chain)
            try:
                self.next_page = append_code_page(self.cloud, self.collection, page, sealed)
            except CloudError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self._refresh()  # another writer took that number (or the mode is wrong: raises)
                continue
            if self.next_page != page + 1:  # another writer appended right after: learn its pages first
                self._refresh()
            else:
                self.chain = next_chain(self.chain, sealed)
            self.pages_written += 1
            self.bytes_written += len(sealed)
            return page
        raise UserError(f"collection {self.collection!r}: could not append a code page (other writers kept taking "
                        "the next page number); try again")

    def write(self, ops: np.ndarray, ids: Iterable[int], codes: np.ndarray,
              digests: np.ndarray | None = None) -> list[int]:
        """Append records (split into pages of at most MAX_PAGE_RECORDS); returns the page numbers."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        ops = np.asarray(ops, dtype=np.uint8)
        codes = np.asarray(codes, dtype=np.uint8).reshape(len(ids), code_bytes(self.bits))
        digests = (np.zeros((len(ids), DIGEST_BYTES), np.uint8) if digests is None
                   else np.asarray(digests, np.uint8).reshape(len(ids), DIGEST_BYTES))
        return [self._append(encode_records(PageRecords(ops[s:s + MAX_PAGE_RECORDS], ids[s:s + MAX_PAGE_RECORDS],
                                                        codes[s:s + MAX_PAGE_RECORDS], digests[s:s + MAX_PAGE_RECORDS]),
                                            self.bits))
                for s in range(0, len(ids), MAX_PAGE_RECORDS)]

    def put(self, ids: Iterable[int], codes: np.ndarray, blobs: Iterable[bytes] | None = None) -> list[int]:
        """Records giving ``ids`` these (raw) codes: new items or replacements; ``blobs``, the
        items' encrypted blobs, bind each record to its blob (:func:`blob_digest`)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        digests = None
        if blobs is not None:
            digests = np.frombuffer(b"".join(blob_digest(b) for b in blobs), np.uint8).reshape(-1, DIGEST_BYTES)
            if len(digests) != len(ids):
                raise UserError("one blob per id")
        return self.write(np.full(len(ids), OP_PUT, np.uint8), ids, codes, digests)

    def delete(self, ids: Iterable[int]) -> list[int]:
        """Tombstones: ``ids`` leave the ranking."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return self.write(np.full(len(ids), OP_DELETE, np.uint8), ids,
                          np.zeros((len(ids), code_bytes(self.bits)), np.uint8))


def delete_items(cloud: CloudClient, image_keys: bytes | Mapping[int, bytes], collection: str, bits: int,
                 ids: Iterable[int], key_id: int = 1, binding: str | None = None) -> int:
    """Delete items of a private-ranking collection: tombstones first (so no client ranks an id
    whose blob is gone), then the blobs. Returns the number of blobs the server deleted."""
    ids = [int(i) for i in ids]
    PageWriter(cloud, image_keys, collection, bits, key_id, binding).delete(ids)
    return cloud.delete(collection, ids)


# --- the local cache of sealed pages ---------------------------------------------------------
def default_cache_path(server: str, collection: str, uid: bytes = b"") -> Path:
    """``$DLHEIR_HOME/page-cache/COLLECTION.<uid>.<hash of the server address>.pages`` (the folder
    is made, 0700, when the first page is cached)."""
    paths.tokens_name(collection)  # a collection name that cannot be a file name stops here
    tag = hashlib.sha256(server.encode("utf-8")).hexdigest()[:16]
    return paths.dlheir_home() / CACHE_DIR / f"{collection}.{bytes(uid).hex() or 'nouid'}.{tag}.pages"


class PageCache:
    """One file of sealed pages, appended in page order: ``DLHC | version`` then per page
    ``u64 page | u32 length | sealed bytes``. Mode 0600; a torn tail (a crash in the middle of an
    append) is cut off at the next load; a lock (flock) keeps two processes from appending at once."""

    HEADER = CACHE_MAGIC + bytes([CACHE_VERSION])

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _open(self) -> int:
        if not self.path.parent.is_dir():
            paths.make_private_dirs(self.path.parent, "the page cache folder")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.fchmod(fd, 0o600)
        return fd

    @classmethod
    def _scan(cls, data: bytes) -> tuple[list[bytes], list[int]]:
        """The pages of the file's valid prefix and the offset where each one ends."""
        if data[:5] != cls.HEADER:
            return [], []
        pages, ends, pos = [], [], 5
        while pos + 12 <= len(data):
            number, length = struct.unpack(">QI", data[pos:pos + 12])
            if number != len(pages) or pos + 12 + length > len(data):
                break  # a torn tail
            pages.append(data[pos + 12:pos + 12 + length])
            pos += 12 + length
            ends.append(pos)
        return pages, ends

    def load(self) -> list[bytes]:
        """The cached sealed pages 0..n-1 (a missing or foreign file counts as empty)."""
        try:
            return self._scan(self.path.read_bytes())[0]
        except FileNotFoundError:
            return []

    def append(self, start: int, pages: list[bytes]) -> None:
        """Write pages ``start``, ``start + 1``, ... right after the first ``start`` cached ones
        (anything beyond them, a torn tail, is dropped), durably, under an exclusive lock."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(fd, "r+b", closefd=False) as f:
                _, ends = self._scan(f.read())
                if len(ends) < start:
                    return  # another process emptied the cache meanwhile: leave it, it is only a cache
                pos = ends[start - 1] if start else len(self.HEADER)
                if not start:
                    f.seek(0)
                    f.write(self.HEADER)
                f.seek(pos)
                f.write(b"".join(struct.pack(">QI", start + i, len(s)) + bytes(s) for i, s in enumerate(pages)))
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)  # releases the lock

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


# --- local ranking ---------------------------------------------------------------------------
@dataclass
class SyncReport:
    private: bool = True  # the collection's mode, as the server reported it
    pages_total: int = 0  # pages applied after this sync
    pages_cached: int = 0  # pages read from the local cache (first sync of this process only)
    pages_fetched: int = 0  # pages received from the server by this sync
    bytes_fetched: int = 0  # their sealed size
    items: int = 0  # items ranked after this sync
    seconds: float = 0.0


class LocalIndex:
    """A private-ranking collection's codes, synced from its sealed pages, ranked locally.

    ``search`` answers exactly what the server's Search would (the same index class): per query
    the ids and distances of the top k by (distance, id). ``bits`` may be left out: the first
    sync learns it (and the mode, ``private``) from the server's header. ``binding``: what pages
    are bound to (``NAME#UIDHEX`` from the grant; default the name). ``rank=False`` only follows
    and checks the pages (page count and chain value, for a writer) without building an index."""

    def __init__(self, cloud: CloudClient, collection: str, bits: int | None, image_keys: bytes | Mapping[int, bytes],
                 cache: Path | str | None = None, key_id: int = 1, binding: str | None = None,
                 rank: bool = True) -> None:
        self.cloud, self.collection = cloud, collection
        self.binding = binding or collection
        self.bits = validate_bits(bits) if bits is not None else None
        self.keys = page_keyring(image_keys, self.binding, key_id)
        self.cache = PageCache(cache) if cache is not None else None
        self.head_path = Path(str(cache) + ".head") if cache is not None else None
        self.rank = rank
        self.private: bool | None = None  # known after the first sync
        self.model_fingerprint, self.image_size = "", 0  # the collection's model, from the sync header
        self.index = None
        self.digests: dict[int, bytes] = {}  # id -> blob digest of its latest put record
        self.pages = 0  # pages applied
        self.chain = chain_start(self.binding)  # the chain value after them
        self.seen = self._load_head()  # (pages, chain value) the highest this client has seen
        self.last_sync: SyncReport | None = None
        self._loaded = False  # the cache is read by the first sync only

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    def _load_head(self) -> tuple[int, bytes]:
        try:
            doc = json.loads(self.head_path.read_text()) if self.head_path is not None else None
            if isinstance(doc, dict) and doc.get("binding") == self.binding:
                return int(doc["pages"]), bytes.fromhex(doc["chain"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0, chain_start(self.binding)

    def _save_head(self) -> None:
        if self.pages <= self.seen[0]:
            return
        self.seen = (self.pages, self.chain)
        if self.head_path is not None:
            from dlheir.client.crypto import replace_private

            paths.make_private_dirs(self.head_path.parent, "the page cache folder")
            replace_private(self.head_path, json.dumps({"binding": self.binding, "pages": self.pages,
                                                        "chain": self.chain.hex()}).encode())

    def _open_all(self, start: int, chain: bytes, sealed_pages: list[bytes]) -> tuple[list[PageRecords], bytes]:
        """Open pages ``start``, ``start + 1``, ... following the chain from ``chain``; a page that
        ends at the highest count seen must end at the chain value seen there (else: a fork)."""
        out = []
        for i, sealed in enumerate(sealed_pages):
            out.append(decode_records(open_page(self.keys, self.binding, start + i, sealed, chain), self.bits))
            chain = next_chain(chain, sealed)
            if start + i + 1 == self.seen[0] and chain != self.seen[1]:
                raise RollbackError(f"collection {self.collection!r}: the server's first {self.seen[0]} pages are not "
                                    "the ones this client saw before (another history of the collection): refusing")
        return out, chain

    def _apply(self, records: list[PageRecords]) -> None:
        """Apply records in page order: per id the last record wins (put: that code, delete: gone)."""
        if not self.rank:
            return
        if self.index is None:
            from dlheir.server.index import BinaryIndex

            self.index = BinaryIndex(self.bits)
        records = [r for r in records if len(r.ids)]
        if not records:
            return
        ops = np.concatenate([r.ops for r in records])
        ids = np.concatenate([r.ids for r in records])
        codes = np.concatenate([r.codes for r in records])
        digests = np.concatenate([r.digests for r in records])
        _, first_from_end = np.unique(ids[::-1], return_index=True)
        last = len(ids) - 1 - first_from_end
        put = last[ops[last] == OP_PUT]
        # every id these records touch leaves the index first (replaced or deleted), atomically
        self.index.add(ids[put], codes[put], replace_ids=ids[last] if len(self.index) else None)
        for i, op, d in zip(ids[last].tolist(), ops[last].tolist(), digests[last]):
            if op == OP_PUT:
                self.digests[i] = d.tobytes()
            else:
                self.digests.pop(i, None)

    def check_blob(self, item_id: int, blob: bytes) -> None:
        """PageAuthenticationError unless ``blob`` is the one the latest put record of ``item_id``
        names (a record written without a blob binds none)."""
        want = self.digests.get(int(item_id))
        if want is None:
            raise PageAuthenticationError(f"item {item_id} of {self.collection!r} is not in the collection's pages "
                                          "(deleted, or never put): the server sent a blob for it anyway")
        if any(want) and blob_digest(blob) != want:
            raise PageAuthenticationError(f"item {item_id} of {self.collection!r}: the server sent a blob other than "
                                          "the one the owner's page names (a replayed or substituted blob)")

    def _reset(self) -> None:
        self.index = None
        self.digests = {}
        self.pages = 0
        self.chain = chain_start(self.binding)
        if self.cache is not None:
            self.cache.reset()

    def _check_header(self, header: pb.SyncHeader) -> None:
        self.private = header.mode == pb.PRIVATE_RANKING
        self.model_fingerprint, self.image_size = header.model_fingerprint, header.image_size
        if self.bits is None:
            self.bits = validate_bits(header.bits)
        elif header.bits != self.bits:
            raise UserError(f"collection {self.collection!r} holds {header.bits}-bit codes, not {self.bits}")

    def sync(self) -> SyncReport:
        """Fetch and apply the pages not seen yet; the first call also applies the cached pages
        (the server is then asked only for the pages after them). One round trip when nothing
        is new. In a server-ranked collection it only learns the mode (``private`` False).
        :class:`RollbackError` when the server announces or sends fewer pages than this client
        has seen, or pages of another history."""
        t0 = time.perf_counter()
        report = SyncReport()
        for attempt in range(2):
            cached = [] if self._loaded or self.cache is None else self.cache.load()
            start = self.pages + len(cached)
            header, stream = sync_code_pages(self.cloud, self.collection, start)
            self._check_header(header)
            if not self.private:
                self._loaded = True
                break
            seen = max(start, self.seen[0])
            if header.pages < seen:
                raise RollbackError(f"collection {self.collection!r}: the server announces {header.pages} code pages, "
                                    f"this client has seen {seen}: pages were withheld or rolled back (refusing)")
            new: list[bytes] = []
            for number, sealed in stream:
                if number != start + len(new):
                    raise PageAuthenticationError(f"code page {number} arrived where page {start + len(new)} "
                                                  "was expected")
                new.append(sealed)
            if start + len(new) != header.pages:
                raise RollbackError(f"collection {self.collection!r}: the server announced {header.pages} code pages "
                                    f"and sent {start + len(new)}: pages were withheld (refusing)")
            try:  # every page authentic before any is applied or cached
                records, chain = self._open_all(self.pages, self.chain, cached + new)
            except RollbackError:
                raise
            except PageAuthenticationError:
                if not cached or attempt:
                    raise
                self._reset()  # a damaged cache (or one under other keys): start again from the server
                self._loaded = True
                continue
            if self.cache is not None and new:
                self.cache.append(start, new)
            self._apply(records)
            self._loaded = True
            self.pages, self.chain = start + len(new), chain
            self._save_head()
            report.pages_cached, report.pages_fetched = len(cached), len(new)
            report.bytes_fetched = sum(len(s) for s in new)
            break
        report.private = bool(self.private)
        report.pages_total, report.items = self.pages, len(self)
        report.seconds = time.perf_counter() - t0
        self.last_sync = report
        return report

    def search(self, codes: np.ndarray, k: int, max_distance: int | None = None,
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids int64, distances int32), the exact top k by (distance, id)."""
        if not self.private:
            raise UserError(f"collection {self.collection!r} is not synced in private-ranking mode (call sync first)")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        codes = np.atleast_2d(np.asarray(codes, dtype=np.uint8))
        if codes.shape[1] != code_bytes(self.bits):
            raise UserError(f"{self.bits}-bit codes are {code_bytes(self.bits)} bytes, got {codes.shape[1]}")
        if self.index is None or not len(self.index):
            return [(np.zeros(0, np.int64), np.zeros(0, np.int32)) for _ in codes]
        return [(ids.astype(np.int64), d.astype(np.int32)) for ids, d in self.index.search(codes, k, max_distance)]


def open_local(cloud: CloudClient, grant, cache: Path | str | None | bool = True) -> LocalIndex | None:
    """For ``grant``'s collection: a synced :class:`LocalIndex` if the grant says private-ranking
    mode, None if it says server-ranked. The owner's signed grant decides the mode, never the
    server: a server that reports another mode is refused with one line (a private query never
    goes to a server-ranked Search). ``cache``: True for the default cache file under
    ``$DLHEIR_HOME/page-cache``, a path, or None/False for none."""
    private = getattr(grant, "private", None)
    if private is False:
        return None  # server-ranked: the server ranks; nothing to sync
    binding = getattr(grant, "binding", None)
    uid = getattr(grant, "uid", b"")
    path = default_cache_path(cloud.address, grant.collection, uid) if cache is True else (cache or None)
    local = LocalIndex(cloud, grant.collection, grant.bits, grant_image_keys(grant), path, binding=binding)
    if not local.sync().private:
        if private:
            raise UserError(f"the server reports collection {grant.collection!r} as server-ranked, but the owner's "
                            "grant says private-ranking mode: refusing to send the query's code to the server (a "
                            "server that lies about the mode)")
        return None
    return local
