"""Item ids, defined once (the ranking order is ``dlheir.contract.rank``).

An item's id is a stable 63-bit integer derived from its path relative to the data
set root (posix form, e.g. ``"3/0042.png"``): re-running an upload gives the same ids,
and ids fit FAISS's signed 64-bit ``idx_t`` without going negative.

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
