"""The query user's flow: TrapGen through Triton, transform, search, fetch, Dec."""

from __future__ import annotations

import logging

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dlheir.client.cloud import CloudClient, check_model
from dlheir.client.crypto import CodeTransform, Grant, decrypt_image, replace_private
from dlheir.client.triton import TritonHasher
from dlheir.errors import UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dlheir.client.private import LocalIndex


@dataclass
class Hit:
    rank: int
    id: int
    distance: int
    name: str
    image: bytes


@dataclass
class QueryTimings:
    trapdoor_s: float
    search_s: float
    fetch_decrypt_s: float
    sync_s: float = 0.0  # private-ranking mode: syncing new code pages (search_s is then the local ranking)

    @property
    def total_s(self) -> float:
        return self.trapdoor_s + self.sync_s + self.search_s + self.fetch_decrypt_s


def trapdoor(hasher: TritonHasher, transform: CodeTransform, query) -> bytes:
    """TrapGen: the query's code from Triton, under the owner's transform."""
    _, code = hasher.hash_one(query)
    return transform.apply(code)[0].tobytes()


def _check_search(grant: Grant, hasher: TritonHasher, local: "LocalIndex | None") -> None:
    """Before a query is hashed: a private grant never goes to the server's Search, private mode
    checks the model here (the server sees no code), and the grant's code length is the model's."""
    if local is None and getattr(grant, "private", False):
        raise UserError(f"the owner's grant says collection {grant.collection!r} is in private-ranking mode: the "
                        "query is ranked on this machine, never sent to the server's Search")
    if local is not None:
        check_model(grant.collection, local, hasher.fingerprint)
    if grant.bits is not None and grant.bits != hasher.bits:
        raise UserError(f"the grant is for {grant.bits}-bit codes; the Triton model makes {hasher.bits}")


def search_image(query, grant: Grant, cloud: CloudClient, hasher: TritonHasher, k: int = 20,
                 fetch: int | None = None, local: "LocalIndex | None" = None) -> tuple[list[Hit], QueryTimings]:
    """Top-k for one query image; the first ``fetch`` hits (default all k) are fetched and decrypted.

    ``local`` (from :func:`dlheir.client.private.open_local`, for a collection in private-ranking
    mode): sync its new code pages and rank on this machine; the query's code never leaves it.
    Otherwise the server ranks the transformed code. Codes of a model other than the collection's
    are refused: by the server, or (private mode) here, before the query is hashed."""
    _check_search(grant, hasher, local)
    import numpy as np

    transform = CodeTransform(grant.transform_secret, hasher.bits)
    t0 = time.perf_counter()
    # private mode ranks the raw code against the pages' raw codes (same distances as transformed ones)
    code = (trapdoor(hasher, transform, query) if local is None
            else np.asarray(hasher.hash_one(query)[1], np.uint8).reshape(-1).tobytes())
    t1 = time.perf_counter()
    sync_s = 0.0
    if local is None:
        (ids, dists), = cloud.search(grant.collection, np.frombuffer(code, np.uint8)[None, :], k,
                                     model_fingerprint=hasher.fingerprint or "")
    else:
        sync_s = local.sync().seconds
        (ids, dists), = local.search(np.frombuffer(code, np.uint8)[None, :], k)
    t2 = time.perf_counter()
    wanted = ids[: k if fetch is None else fetch]
    if local is not None:  # ask in id order: the server then learns which ids, not their rank order
        wanted = sorted(int(i) for i in wanted)
    blobs = {i: b for i, b, _ in cloud.fetch(grant.collection, wanted)}
    binding = getattr(grant, "binding", grant.collection)
    hits = []
    for rank, (i, d) in enumerate(zip(ids, dists), start=1):
        name, image = ("", b"")
        if int(i) in blobs:
            if local is not None:  # the blob the owner's latest page names, not a replayed one
                local.check_blob(int(i), blobs[int(i)])
            name, image = decrypt_image(grant.image_keys, blobs[int(i)], binding, int(i))
        hits.append(Hit(rank, int(i), int(d), name, image))
    t3 = time.perf_counter()
    _log_search(grant.collection, 1, local is not None, t1 - t0, t2 - t1, len(blobs), t3 - t2, [hits])
    return hits, QueryTimings(t1 - t0, t2 - t1 - sync_s, t3 - t2, sync_s)


def search_images(queries: Sequence, grant: Grant, cloud: CloudClient, hasher: TritonHasher, k: int = 20,
                  local: "LocalIndex | None" = None) -> tuple[list[list[Hit]], QueryTimings]:
    """Top-k of each query image, as :func:`search_image`, for a batch: the queries are hashed in
    one call, searched in one request (or ranked locally in private mode) and their hits fetched
    in one; the timings are the whole batch's. Returns the hits of each query, in order."""
    import numpy as np

    _check_search(grant, hasher, local)
    if not queries:
        return [], QueryTimings(0.0, 0.0, 0.0)
    t0 = time.perf_counter()
    _, codes = hasher.hash_images(queries)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(len(queries), -1)
    t1 = time.perf_counter()
    sync_s = 0.0
    if local is None:  # private mode ranks raw codes; the server ranks transformed ones
        codes = CodeTransform(grant.transform_secret, hasher.bits).apply(codes)
        ranked = cloud.search(grant.collection, codes, k, model_fingerprint=hasher.fingerprint or "")
    else:
        sync_s = local.sync().seconds
        ranked = local.search(codes, k)
    t2 = time.perf_counter()
    wanted = sorted({int(i) for ids, _ in ranked for i in ids})  # id order: not the rank order
    blobs: dict[int, bytes] = {}
    for start in range(0, len(wanted), 256):
        blobs.update((int(i), b) for i, b, _ in cloud.fetch(grant.collection, wanted[start:start + 256]))
    binding = getattr(grant, "binding", grant.collection)
    opened: dict[int, tuple[str, bytes]] = {}
    for i, blob in blobs.items():
        if local is not None:  # the blob the owner's latest page names, not a replayed one
            local.check_blob(i, blob)
        opened[i] = decrypt_image(grant.image_keys, blob, binding, i)
    results = [[Hit(rank, int(i), int(d), *opened.get(int(i), ("", b"")))
                for rank, (i, d) in enumerate(zip(ids, dists), start=1)] for ids, dists in ranked]
    t3 = time.perf_counter()
    _log_search(grant.collection, len(queries), local is not None, t1 - t0, t2 - t1, len(opened), t3 - t2, results)
    return results, QueryTimings(t1 - t0, t2 - t1 - sync_s, t3 - t2, sync_s)


def _log_search(collection: str, queries: int, local: bool, hash_s: float, rank_s: float, fetched: int,
                fetch_s: float, results: list[list[Hit]]) -> None:
    """-v: what a search did and how long each step took; -vv: the hits (ids and distances)."""
    log.info("search %r: trapdoor %.1f ms for %d quer%s, %s %.1f ms, fetch+decrypt %d images %.1f ms", collection,
             hash_s * 1e3, queries, "y" if queries == 1 else "ies", "local ranking" if local else "server search",
             rank_s * 1e3, fetched, fetch_s * 1e3)
    for n, hits in enumerate(results):
        log.debug("hits (rank, id, distance) of query %d: %s", n, [(h.rank, h.id, h.distance) for h in hits])


def write_results(hits: list[Hit], out_dir: Path | str) -> list[Path]:
    """Decrypted images named ``<rank>_d<distance>_<original name>``, each written with mode 0600
    (atomically, replacing an earlier result of the same name); ``out_dir`` is created with mode
    0700 if it does not exist (an existing folder keeps its mode)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        try:
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    paths = []
    for hit in hits:
        if hit.image:
            path = out_dir / f"{hit.rank:03d}_d{hit.distance:02d}_{Path(hit.name).name or hit.id}"
            paths.append(replace_private(path, hit.image))
    return paths
