"""Item ids, defined once (the ranking order is ``dlheir.contract.rank``).

An item's id is a stable 63-bit integer derived from its path relative to the data
set root (posix form, e.g. ``"3/0042.png"``): re-running an upload gives the same ids,
and ids fit FAISS's signed 64-bit ``idx_t`` without going negative. Uploads use
:func:`content_id` (a hash of the file's bytes) by default, or :func:`item_id` with
``dlheir owner upload --id-from path``; evaluation and the demo use :func:`item_id`.

**Keyed ids (what uploads use).** An owner key file of format version 3 gives every collection
its own 32-byte *id key* (derived from the owner's master secret and the collection's unique
id, ``dlheir.client.crypto``); uploads name items with :func:`keyed_content_id` /
:func:`keyed_path_id`, the same hashes keyed with it (BLAKE2b in keyed mode, a MAC). The owner
still gets the same id for the same file (duplicates and resumed uploads work), while the
server, which lacks the key, can neither confirm that it holds an image it has a copy of nor
link one image across collections or owners. The unkeyed :func:`item_id` names items where
there is no server (evaluation, the offline demo split).

Ranking everywhere (offline evaluation, the cloud server, the demo) is by
(Hamming distance ascending, id ascending): ties are broken by the smaller id, so the
served and offline rankings are the same list.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePath


def item_id(relative_path: str | PurePath) -> int:
    """Stable id of a file from its path relative to the data set root."""
    key = PurePath(relative_path).as_posix().encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


ID_RULES = ("content", "path")  # how `owner upload` names items (--id-from)


def content_id(data: bytes) -> int:
    """Stable id of an image from its bytes (the default upload rule): the same file gives the
    same id wherever it sits, so a copy uploaded again is found as already stored, and an edited
    file is a new item. Keyed apart from :func:`item_id` (``person``), so the two rules never give
    the same id to a path and a content by design. 63 bits, like :func:`item_id`."""
    return int.from_bytes(hashlib.blake2b(bytes(data), digest_size=8, person=b"dlheir-content").digest(), "big") >> 1


ID_KEY_BYTES = 32


def _check_id_key(id_key: bytes) -> bytes:
    if not isinstance(id_key, (bytes, bytearray)) or len(id_key) != ID_KEY_BYTES:
        raise ValueError(f"an id key is {ID_KEY_BYTES} bytes")
    return bytes(id_key)


def keyed_content_id(id_key: bytes, data: bytes) -> int:
    """:func:`content_id` keyed with a collection's id key: only the key's holder can compute it."""
    return int.from_bytes(hashlib.blake2b(bytes(data), digest_size=8, key=_check_id_key(id_key),
                                          person=b"dlheir-content").digest(), "big") >> 1


def keyed_path_id(id_key: bytes, relative_path: str | PurePath) -> int:
    """:func:`item_id` keyed with a collection's id key."""
    key = PurePath(relative_path).as_posix().encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=_check_id_key(id_key)).digest(), "big") >> 1
