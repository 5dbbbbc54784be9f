"""`dlheir server migrate`: copy a whole deployment from one store to another, then verify it.

Any pair of backends through the store protocol (``server/store/base.py``): the embedded SQLite
store into PostgreSQL (+ an S3 object store), and back. The source server must be stopped: the
source data dir's server lock is taken for the whole run (so no server starts on it meanwhile),
and the target's too. The target is empty, or holds a previous, interrupted migration of the same
source (its collections carry the source's uids): that one is continued (items already there
skipped by id, code pages by number, collection fields and readers set again).

What is copied: each collection (name, uid, bits, owner/reader token hashes, model fingerprint,
image size, private mode, the key version of its codes), its items (id, code, blob, metadata) in
batches, each batch one durable ``write_batch``, its sealed code pages in order, its readers
(label, token hash, created, revoked) exactly, and the source data dir's ``admin.token`` (0600).

Verification (at the end, or alone with ``--verify-only``): per collection, its fields, readers
and key id equal; counts of items and pages; SHA-256 over (id, code) in id order and over the
pages, equal on both sides; every blob (and its metadata) read back from the target and compared
byte for byte with the source's, a batch at a time (bounded memory). The first difference is one
line (UserError), never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dlheir.errors import UserError

BATCH_ITEMS = 2000
BATCH_BYTES = 64 << 20  # a batch ends earlier when its blobs reach this (memory stays bounded)
VERIFY_CHUNK = 2000


@dataclass
class Side:
    """Where a store is: its data dir and, for PostgreSQL, its URLs."""

    data_dir: Path
    store_url: str | None = None
    blobs_url: str | None = None

    def describe(self) -> str:
        if self.store_url:
            from dlheir.server.store.postgres import describe

            return describe(self.store_url) + (" + object store" if self.blobs_url else "")
        return f"the embedded store in {self.data_dir}"


def _lock(side: Side, role: str) -> int:
    """Hold the data dir's server lock (no server runs on it, none starts during the migration)."""
    from dlheir.server.app import LOCK_FILE, lock_data_dir

    try:
        return lock_data_dir(side.data_dir)
    except UserError:
        holder = (side.data_dir / LOCK_FILE).read_text().strip() or "unknown"
        raise UserError(f"{role} {side.data_dir} is in use by a cloud server (pid {holder}): stop it first "
                        f"(dlheir server stop --data-dir {side.data_dir})") from None


def _open(side: Side, role: str, create: bool):
    from dlheir.server.store import STORE_FILE, StoreError, open_store

    if not side.store_url and not create and not (side.data_dir / STORE_FILE).exists():
        raise UserError(f"{role}: no store in {side.data_dir} (no {STORE_FILE}; give --{role}-store for PostgreSQL)")
    try:
        return open_store(side.data_dir, integrity_check=role == "from", store_url=side.store_url,
                          blobs_url=side.blobs_url)
    except StoreError as exc:
        raise UserError(f"{role}: {exc}") from None


def _same_store(a: Side, b: Side) -> bool:
    if a.store_url or b.store_url:
        return a.store_url == b.store_url
    return a.data_dir.resolve() == b.data_dir.resolve()


def _collections(store) -> dict[str, dict]:
    """Name -> every field a collection has, from the protocol's reads."""
    uids, models, keys, private = store.uids(), store.models(), store.key_ids(), store.page_private_collections()
    out = {}
    for name, bits, owner_hash, reader_hash in store.collections():
        fingerprint, image_size = models.get(name, ("", 0))
        out[name] = {"uid": uids[name], "bits": int(bits), "owner_hash": owner_hash, "reader_hash": reader_hash,
                     "private": name in private, "fingerprint": fingerprint, "image_size": int(image_size),
                     "key_id": int(keys.get(name, 1))}
    return out


def _readers(store) -> dict[str, list[tuple[str, str, float, float | None]]]:
    out: dict[str, list] = {}
    for collection, label, token_hash, created, revoked in store.readers():
        out.setdefault(collection, []).append((label, token_hash, float(created),
                                               None if revoked is None else float(revoked)))
    return out


def _batches(store, collection: str, after: int | None, limit: int, max_bytes: int):
    """(id, code) lists of the source's items above ``after``, ascending, cut at ``limit`` items or
    ``max_bytes`` of blobs (at least one item)."""
    while True:
        rows = store.export_codes(collection, after, limit)
        if not rows:
            return
        batch, size = [], 0
        for item_id, code, blob_size in rows:
            if batch and size + blob_size > max_bytes:
                break
            batch.append((item_id, code))
            size += blob_size
        yield batch
        after = batch[-1][0]


def _bar(total: int, name: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="items", unit_scale=True, disable=disable, leave=False)


def _copy_collection(src, dst, name: str, fields: dict, batch: int, quiet: bool,
                     on_batch: Callable[[str, int], None] | None) -> tuple[int, int]:
    """Copy one collection's items and pages (readers after, by the caller); (items written, skipped)."""
    created = dst.import_collection(name, fields["uid"], fields["bits"], fields["owner_hash"], fields["reader_hash"],
                                    fields["private"], fields["fingerprint"], fields["image_size"],
                                    fields["key_id"])
    total, _ = src.stats(name)
    written = skipped = 0
    with _bar(total, name, quiet) as bar:
        for chunk in _batches(src, name, None, batch, BATCH_BYTES):
            ids = [i for i, _ in chunk]
            have = set() if created else dst.existing_ids(name, ids)
            want = [i for i in ids if i not in have]
            if want:
                codes = dict(chunk)
                items = [(i, codes[i], blob, meta) for i, blob, meta in src.export_blobs(name, want)]
                dst.write_batch(name, items, replace=False)
                written += len(items)
                if on_batch is not None:
                    on_batch(name, written)
            skipped += len(have)
            bar.update(len(chunk))
    pages, _ = src.page_stats(name)
    done, _ = dst.page_stats(name)
    for page, data in src.page_read(name, done, pages):
        if dst.page_append(name, page, data) is None:
            raise UserError(f"to: code page {page} of {name!r} was refused (the target's pages differ from the source's)")
    return written, skipped


def _check_target(src_fields: dict[str, dict], dst, target: Side) -> None:
    """The target is empty or a previous migration of this source (each collection there has the
    source's uid under the same name); UserError otherwise."""
    for name, uid in sorted(dst.uids().items()):
        if name not in src_fields or src_fields[name]["uid"] != uid:
            raise UserError(f"to: {target.describe()} is not empty and not a migration of this source (it holds "
                            f"collection {name!r}, which the source {'has under another uid' if name in src_fields else 'lacks'}): "
                            f"migrate into an empty store")


def _copy_admin_token(source: Side, target: Side) -> bool:
    token = source.data_dir / "admin.token"
    if not token.exists():
        return False
    data = token.read_bytes()
    path = target.data_dir / "admin.token"
    tmp = path.with_name(".admin.token.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def _parts(rows: list[tuple[int, bytes, int]], items: int, max_bytes: int):
    """The ids of (id, code, blob size) rows in runs of at most ``items`` ids and ``max_bytes`` of blobs
    (at least one id): what one side's blobs of a run hold in memory."""
    part, size = [], 0
    for item_id, _, blob_size in rows:
        if part and (len(part) == items or size + blob_size > max_bytes):
            yield part
            part, size = [], 0
        part.append(item_id)
        size += blob_size
    if part:
        yield part


def _hash_and_compare(src, dst, name: str, quiet: bool) -> tuple[int, str, int]:
    """Walk both stores' items in id order: (items, sha256 of ids+codes, blobs compared equal), or
    UserError naming the first difference."""
    digest = hashlib.sha256()
    n = blobs = 0
    after = None
    total, _ = src.stats(name)
    with _bar(total, f"verify {name}", quiet) as bar:
        while True:
            a = src.export_codes(name, after, VERIFY_CHUNK)
            b = dst.export_codes(name, after, VERIFY_CHUNK)
            for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
                if ia != ib:
                    first = min(ia, ib)
                    raise UserError(f"verify: {name!r}: item {first} is only in the "
                                    f"{'source' if first == ia else 'target'}")
                if ca != cb:
                    raise UserError(f"verify: {name!r}: item {ia} has another code in the target")
                if sa != sb:
                    raise UserError(f"verify: {name!r}: item {ia} has a blob of {sb} bytes in the target, "
                                    f"{sa} in the source")
            if len(a) != len(b):
                extra = (a if len(a) > len(b) else b)[min(len(a), len(b))][0]
                raise UserError(f"verify: {name!r}: item {extra} is only in the {'source' if len(a) > len(b) else 'target'}")
            if not a:
                break
            for item_id, code, _ in a:
                digest.update(struct.pack("<qI", item_id, len(code)))
                digest.update(code)
            n += len(a)
            # blobs, byte for byte, a batch at a time (bounded by the batch's blob sizes)
            for part in _parts(a, 500, BATCH_BYTES // 2):
                got = dst.export_blobs(name, part)
                want = src.export_blobs(name, part)
                for (ia, ba, ma), (ib, bb, mb) in zip(want, got):
                    if ia != ib or ba != bb:
                        raise UserError(f"verify: {name!r}: the blob of item {ia} read back from the target differs "
                                        f"from the source's")
                    if ma != mb:
                        raise UserError(f"verify: {name!r}: the metadata of item {ia} differs in the target")
                if len(got) != len(want):
                    raise UserError(f"verify: {name!r}: a blob of items {part[0]}..{part[-1]} is missing in the target")
                blobs += len(got)
                del got, want
            bar.update(len(a))
            after = a[-1][0]
    return n, digest.hexdigest(), blobs


def _pages_hash(store, name: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    pages, _ = store.page_stats(name)
    for page, data in store.page_read(name, 0, pages):
        digest.update(struct.pack("<qQ", page, len(data)))
        digest.update(data)
    return pages, digest.hexdigest()


def verify(src, dst, quiet: bool = True, out=print) -> int:
    """Compare every collection of ``src`` with ``dst``; prints one line per collection; returns the
    items compared. UserError (one line) at the first difference."""
    a, b = _collections(src), _collections(dst)
    for name in sorted(set(a) | set(b)):
        if name not in b:
            raise UserError(f"verify: collection {name!r} is missing in the target")
        if name not in a:
            raise UserError(f"verify: collection {name!r} is in the target but not in the source")
        for field in a[name]:
            if a[name][field] != b[name][field]:
                raise UserError(f"verify: {name!r}: its {field.replace('_', ' ')} differs in the target")
    ra, rb = _readers(src), _readers(dst)
    total = 0
    for name in sorted(a):
        if ra.get(name, []) != rb.get(name, []):
            labels = {r[0] for r in ra.get(name, [])} ^ {r[0] for r in rb.get(name, [])}
            detail = f"reader {sorted(labels)[0]!r} is only on one side" if labels else "a reader's fields differ"
            raise UserError(f"verify: {name!r}: {detail}")
        n, code_hash, blobs = _hash_and_compare(src, dst, name, quiet)
        pa, ha = _pages_hash(src, name)
        pb, hb = _pages_hash(dst, name)
        if (pa, ha) != (pb, hb):
            raise UserError(f"verify: {name!r}: its code pages differ in the target ({pb} there, {pa} in the source)")
        readers = len(ra.get(name, []))
        out(f"{name}: {n:,} items, {pa:,} pages, ids+codes sha256 {code_hash[:12]}.. = source, "
            f"pages sha256 {ha[:12]}.. = source, {blobs:,} blobs read back equal, {readers} reader(s), "
            f"key id {a[name]['key_id']}")
        total += n
    return total


def migrate(source: Side, target: Side, verify_only: bool = False, batch: int = BATCH_ITEMS,
            quiet: bool | None = None, on_batch: Callable[[str, int], None] | None = None, out=print) -> dict:
    """Copy ``source`` into ``target`` (see the module docstring), then verify. ``on_batch(collection,
    items written so far)`` is called after each durable batch (tests interrupt with it). Returns
    {"items": written, "skipped": ..., "verified": items compared, "seconds": ..., "rate": items/s}."""
    from dlheir.server.store import StoreError

    if quiet is None:
        quiet = not sys.stderr.isatty()
    if _same_store(source, target):
        raise UserError("--from and --to name the same store: migrate into another one")
    if source.blobs_url and source.blobs_url == target.blobs_url:
        raise UserError("--from-blobs and --to-blobs name the same bucket: give the target a bucket (or prefix) "
                        "of its own")
    if not source.data_dir.is_dir():
        raise UserError(f"from: no such data dir {source.data_dir}")
    from dlheir.server.app import PRIVATE_UMASK

    locks = [_lock(source, "from")]
    src = dst = None
    umask = os.umask(PRIVATE_UMASK)  # the target's files as a server makes them: this user's alone
    try:
        if not verify_only:
            from dlheir.server.app import private_data_dir

            private_data_dir(target.data_dir)
        elif not target.data_dir.is_dir():
            raise UserError(f"to: no such data dir {target.data_dir}")
        locks.append(_lock(target, "to"))
        src = _open(source, "from", create=False)
        dst = _open(target, "to", create=not verify_only)
        started = time.monotonic()
        written = skipped = 0
        try:
            fields = _collections(src)
            if not verify_only:
                _check_target(fields, dst, target)
                readers = _readers(src)
                for name in sorted(fields):
                    w, s = _copy_collection(src, dst, name, fields[name], batch, quiet, on_batch)
                    dst.import_readers(name, readers.get(name, []))
                    written, skipped = written + w, skipped + s
                    out(f"{name}: copied {w:,} items" + (f" ({s:,} already there)" if s else ""))
                _copy_admin_token(source, target)
            copy_s = time.monotonic() - started
            verified = verify(src, dst, quiet=quiet, out=out)
        except StoreError as exc:
            raise UserError(str(exc)) from None
        seconds = time.monotonic() - started
        rate = written / copy_s if written and copy_s > 0 else 0.0
        if verify_only:
            out(f"verified {verified:,} items of {len(fields)} collection(s) in {seconds:.1f} s: the target equals "
                f"the source")
        else:
            out(f"migrated {written:,} items ({skipped:,} already there) of {len(fields)} collection(s) from "
                f"{source.describe()} to {target.describe()} in {copy_s:.1f} s ({rate:,.0f} items/s), "
                f"verified in {seconds - copy_s:.1f} s")
        return {"items": written, "skipped": skipped, "verified": verified, "seconds": seconds,
                "copy_seconds": copy_s, "rate": rate}
    finally:
        os.umask(umask)
        for store in (src, dst):
            if store is not None:
                store.close()
        for fd in locks:
            os.close(fd)


def run(args) -> int:
    """The CLI's ``dlheir server migrate``."""
    source = Side(Path(args.source), args.from_store, args.from_blobs)
    target = Side(Path(args.target), args.to_store, args.to_blobs)
    for side, role in ((source, "from"), (target, "to")):
        if side.blobs_url and not side.store_url:
            raise UserError(f"--{role}-blobs needs --{role}-store postgresql://...: the embedded store keeps its "
                            f"blobs in its own file")
    migrate(source, target, verify_only=args.verify_only, batch=args.batch_size,
            quiet=True if getattr(args, "quiet", False) else None)  # bars: only on a terminal, not with -q
    return 0
