"""The data owner's upload flow: hashgen through Triton, EncImg, code transform, streamed upload."""

from __future__ import annotations

import logging

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dlheir.client.cloud import CloudClient, check_model
from dlheir.client.crypto import CodeTransform, CollectionKeys, OwnerKeys, decrypt_image, encrypt_image
from dlheir.client.private import PageWriter, is_private
from dlheir.client.triton import HashError, TritonHasher
from dlheir.contract import validate_bits
from dlheir.errors import UserError
from dlheir.ids import keyed_path_id
from dlheir.progress import progress as progress_bar

log = logging.getLogger(__name__)


class UploadRates:
    """images/s and MB/s of an upload, from its ``uploaded``, ``bytes_uploaded`` and ``seconds``."""

    uploaded: int
    bytes_uploaded: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.uploaded / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_uploaded / 1e6 / self.seconds if self.seconds else 0.0


@dataclass
class UploadReport(UploadRates):
    uploaded: int = 0
    already_present: int = 0
    replaced: int = 0  # with replace: items the server held and this upload overwrote
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    bytes_uploaded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelBinding:
    """What a new collection records about the model its codes come from (CreateCollection)."""

    bits: int
    fingerprint: str = ""  # '' : a raw-code collection, which the server does not check
    image_size: int = 0


def model_binding(hasher: TritonHasher | None = None, bits: int | None = None) -> ModelBinding:
    """A new collection's model: the one ``hasher`` calls (its N, S and fingerprint, so that codes
    of any other model are refused later), or, with ``bits`` alone, none: a raw-code collection
    that nothing checks (for codes made outside Triton, benchmarks)."""
    if hasher is None:
        if bits is None:
            raise UserError("a collection takes its code length and model fingerprint from the Triton model it is "
                            "made for (give --triton/--model), or give --bits for a raw-code collection")
        return ModelBinding(validate_bits(bits))
    if bits is not None and bits != hasher.bits:
        raise UserError(f"--bits {bits}: the Triton model '{hasher.model}' makes {hasher.bits}-bit codes "
                        "(leave --bits out to take it from the model, or give --bits alone for a raw-code collection)")
    if not hasher.fingerprint:
        raise UserError(f"the Triton model '{hasher.model}' at {hasher.url} names no fingerprint in its config: "
                        "serve a repository made by this version of dlheir ('dlheir triton start'), or give --bits "
                        "for a raw-code collection that is not tied to a model")
    return ModelBinding(hasher.bits, hasher.fingerprint, hasher.image_size)


def create_collection(cloud: CloudClient, name: str, admin_token: str, model: ModelBinding,
                      private: bool = False) -> tuple[str, str]:
    """Create ``name`` for ``model`` (see :func:`model_binding`): (owner token, reader token)."""
    return cloud.create_collection(name, model.bits, admin_token, private=private, model_fingerprint=model.fingerprint,
                                   image_size=model.image_size)


def image_files(root: Path | str) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every image under root, sorted. ``root`` may be
    one image file: that file alone, its path relative to its folder being its name."""
    from dlheir.export.data import IMAGE_EXTENSIONS, list_images

    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"{root} is not an image file (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        path = root.resolve()
        return [(path.name, path)]
    if not root.is_dir():
        raise UserError(f"images folder or file not found: {root}")
    return list_images(root)


def _hash_batch(hasher: TritonHasher, batch, report: UploadReport):
    """Hash a batch; if Triton refuses one image, find it, report it and keep the rest."""
    try:
        _, codes = hasher.hash_images([data for _, _, data in batch])
        return batch, codes
    except HashError:
        good, codes = [], []
        for entry in batch:
            try:
                codes.append(hasher.hash_one(entry[2])[1])
                good.append(entry)
            except HashError as exc:
                report.skipped.append((entry[0], exc.reason or str(exc)))  # the cause; the file is named beside it
        return good, (np.stack(codes) if codes else None)


def collection_keys(keys: OwnerKeys | CollectionKeys, collection: str, info) -> CollectionKeys:
    """``collection``'s keys at the version its codes are under, after checking what the server
    says (``info``, its CollectionStats) against what the owner's key file recorded: the mode, and
    the key version (a server that names an older one would have new items sealed under keys a
    revoked reader holds; a newer one, an unfinished rotation). UserError, one line, otherwise."""
    ck = keys.for_collection(collection) if isinstance(keys, OwnerKeys) else keys
    server_mode = "private" if is_private(info) else "server-ranked"
    if server_mode != ck.mode:
        raise UserError(f"the server reports collection {collection!r} as {server_mode}, but the owner key file "
                        f"created it {ck.mode}: refusing (a server that lies about the mode, or a collection "
                        "re-created by someone else)")
    at = info.key_id or 1
    if at != ck.key_id:
        from dlheir import paths

        behind = ("finish the rotation with 'dlheir owner rotate --resume'"
                  if paths.rotation_record(collection).is_file() else
                  "an earlier rotation did not reach the server: run 'dlheir owner rotate' again")
        raise UserError(f"the server says collection {collection!r} is at key version {at}, the owner key file at "
                        f"{ck.key_id}: " + (behind if at < ck.key_id else "a version this key file never made "
                                            "(another key file, or a lying server)"))
    return ck


def upload_images(files: Sequence[tuple[str, Path | bytes]], keys: OwnerKeys | CollectionKeys, collection: str,
                  cloud: CloudClient, hasher: TritonHasher, batch_size: int = 32, progress: bool = True,
                  ids: Sequence[int] | None = None, replace: bool = False) -> UploadReport:
    """Upload what the server does not hold yet (with ``replace``: everything, overwriting).
    ``files``: (name, path or encoded image bytes). ``ids``: one per file, distinct (default:
    :func:`dlheir.ids.keyed_path_id` of the relative path under the collection's id key)."""
    info = cloud.stats(collection)
    check_model(collection, info, hasher.fingerprint)  # before hashing: a private collection is checked only here
    if info.bits != hasher.bits:
        raise UserError(f"collection {collection!r} holds {info.bits}-bit codes; the Triton model makes {hasher.bits}")
    keys = collection_keys(keys, collection, info)
    transform = CodeTransform(keys.transform_secret, hasher.bits)
    # private-ranking mode: the codes go in sealed pages (dlheir.client.private), the items carry none
    pages = (PageWriter(cloud, keys.image_keys(), collection, hasher.bits, keys.key_id, keys.binding)
             if keys.private else None)
    failed: list[UserError] = []  # a page append that failed inside the stream, raised once it has ended
    report = UploadReport()
    ids = [keyed_path_id(keys.id_key, rel) for rel, _ in files] if ids is None else [int(i) for i in ids]
    present: set[int] = set()
    for start in range(0, len(ids), 50_000):
        present |= cloud.contains(collection, ids[start:start + 50_000])
    todo = [(rel, path, i) for (rel, path), i in zip(files, ids) if replace or i not in present]
    report.already_present = len(files) - len(todo)
    report.replaced = len(present) if replace else 0
    log.info("upload to %r (%s mode, key version %d): %d files, %d already stored, %d to send in batches of %d",
             collection, "private" if keys.private else "server-ranked", keys.key_id, len(files),
             report.already_present, len(todo), batch_size)
    bar = progress_bar(total=len(todo), unit="img", desc=f"upload to {collection}", disable=not progress)
    t0 = time.perf_counter()

    def items():
        for start in range(0, len(todo), batch_size):
            batch = []
            for rel, path, i in todo[start:start + batch_size]:
                try:  # a file, or an in-memory image's encoded bytes
                    data = bytes(path) if isinstance(path, (bytes, bytearray)) else Path(path).read_bytes()
                    batch.append((rel, i, data))
                except OSError as exc:
                    report.skipped.append((rel, exc.strerror or str(exc)))
            batch, codes = _hash_batch(hasher, batch, report)
            if not batch:
                continue
            blobs = [encrypt_image(keys.image_key, data, keys.binding, i, name=Path(rel).name, key_id=keys.key_id)
                     for rel, i, data in batch]
            if pages is not None:  # the page goes before its blobs: no blob is ever stored without its code
                try:  # raw codes: sealed, the transform adds nothing; each record names its blob's digest
                    pages.put([i for _, i, _ in batch], codes, blobs)
                except UserError as exc:
                    failed.append(exc)
                    return
                codes = np.zeros((len(batch), 0), np.uint8)  # items of a private collection carry no code
            else:
                codes = transform.apply(codes)
            log.debug("batch of %d items (%d bytes encrypted): ids %s", len(batch), sum(map(len, blobs)),
                      [i for _, i, _ in batch])
            for (rel, i, data), code, blob in zip(batch, codes, blobs):
                report.bytes_uploaded += len(blob)
                yield i, code.tobytes(), blob, {}

    fingerprint = hasher.fingerprint or ""  # the model that made the codes: the server checks it
    # the key version goes with every batch: a rotation during this upload ends it (FAILED_PRECONDITION,
    # one line) instead of storing old-key codes beside the converted ones; re-running it resumes
    for ack in cloud.upload(collection, items(), model_fingerprint=fingerprint, batch_size=batch_size, replace=replace,
                            key_id=keys.key_id):
        report.uploaded += len(ack.ids)
        bar.update(len(ack.ids))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(MB=f"{report.bytes_uploaded / 1e6:.1f}", MBps=f"{report.bytes_uploaded / 1e6 / max(elapsed, 1e-9):.2f}")
    bar.close()
    if failed:
        raise failed[0]
    report.seconds = time.perf_counter() - t0
    log.info("uploaded %d items, %d bytes in %.1f s; %d skipped", report.uploaded, report.bytes_uploaded,
             report.seconds, len(report.skipped))
    return report


@dataclass
class ReindexReport:
    """What ``owner reindex`` did: codes staged by this run, items switched, the two models."""

    collection: str
    previous_model: str
    model: str
    image_size: int
    staged_now: int = 0
    items: int = 0  # switched (0 when the collection already held the served model's codes)
    rounds: int = 0  # stage-then-switch rounds (another when items were uploaded during one)
    seconds: float = 0.0
    already: bool = False


REINDEX_PAGE = 10_000  # ids per UnstagedIds page
REINDEX_ROUNDS = 5  # uploads during a reindex add items to stage: this many rounds before giving up


def reindex_collection(keys: OwnerKeys | CollectionKeys, collection: str, cloud: CloudClient, hasher: TritonHasher,
                       batch_size: int = 64, progress: bool = True) -> ReindexReport:
    """Re-hash every stored image of ``collection`` with ``hasher``'s model: fetch each blob, decrypt it
    with the owner's keys, hash it, stage its transformed code on the server, then switch every code and
    the collection's model in one server transaction. Resumable (the server keeps what is staged:
    a re-run stages only the rest); searches use the old codes until the switch."""
    info = cloud.stats(collection)
    ck = collection_keys(keys, collection, info)  # the mode and key version the key file recorded
    if ck.private:
        raise UserError(f"collection {collection!r} is in private-ranking mode: its codes are in sealed pages, which "
                        "reindex does not rewrite; create a new collection and upload the images again")
    if not hasher.fingerprint:
        raise UserError(f"the model {getattr(hasher, 'model', '')!r} carries no fingerprint: serve an export of "
                        "'dlheir export onnx' ('dlheir triton start')")
    if hasher.bits != info.bits:
        raise UserError(f"the served model makes {hasher.bits}-bit codes, collection {collection!r} holds {info.bits}-bit "
                        "ones: a reindex keeps the code length; create a new collection for this model")
    report = ReindexReport(collection, info.model_fingerprint, hasher.fingerprint, hasher.image_size)
    if info.model_fingerprint == hasher.fingerprint:
        report.already = True
        return report
    transform = CodeTransform(ck.transform_secret, hasher.bits)
    image_keys = ck.image_keys()
    t0 = time.perf_counter()
    for report.rounds in range(1, REINDEX_ROUNDS + 1):
        page = cloud.unstaged_ids(collection, hasher.fingerprint, -1, REINDEX_PAGE)
        todo = max(0, int(page.items) - int(page.staged))
        log.info("reindex %r, round %d: %d of %d items to re-hash with model %s (%d staged before)", collection,
                 report.rounds, todo, page.items, hasher.fingerprint, page.staged)
        bar = progress_bar(total=todo, unit="img", desc=f"reindex {collection}", disable=not progress)
        while page.ids:
            ids = list(page.ids)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                blobs = {i: b for i, b, _ in cloud.fetch(collection, chunk)}  # one deleted meanwhile is gone
                kept = [i for i in chunk if i in blobs]
                if kept:
                    images = [decrypt_image(image_keys, blobs[i], ck.binding, i).data for i in kept]
                    _, codes = hasher.hash_images(images)
                    cloud.stage_codes(collection, hasher.fingerprint, ck.key_id, kept, transform.apply(codes))
                    report.staged_now += len(kept)
                bar.update(len(chunk))
            page = cloud.unstaged_ids(collection, hasher.fingerprint, ids[-1], REINDEX_PAGE)
        bar.close()
        try:
            done = cloud.switch_codes(collection, hasher.fingerprint, hasher.image_size, ck.key_id)
        except UserError as exc:
            if "no staged code" in str(exc) and report.rounds < REINDEX_ROUNDS:
                continue  # items uploaded during this round: stage them too
            raise
        report.items = int(done.items)
        break
    report.seconds = time.perf_counter() - t0
    log.info("reindex %r: %d codes switched from model %s to %s in %.1f s (%d staged by this run)", collection,
             report.items, report.previous_model or "-", report.model, report.seconds, report.staged_now)
    return report
