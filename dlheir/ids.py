"""Item ids, defined once (the ranking order is ``dlheir.contract.rank``).

An item's id is a stable 63-bit integer derived from its path relative to the data
set root (posix form, e.g. ``"3/0042.png"``): re-running an upload gives the same ids,
and ids fit FAISS's signed 64-bit ``idx_t`` without going negative. Uploads use
:func:`content_id` (a hash of the file's bytes) by default, or :func:`item_id` with
``dlheir owner upload --id-from path``; evaluation and the demo use :func:`item_id`.

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
