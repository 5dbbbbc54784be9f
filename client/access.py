"""Per-user access and key rotation, the owner's side (issue 10, section 2).

* **Grants** (:func:`issue_grant`): the server issues a reader token for one user label
  (``AddReader``, owner token) and keeps only its SHA-256; the token goes into that user's
  grant (format version 2) and nowhere else. The user's public key is kept in the owner's key
  folder (``$DLHEIR_HOME/readers/COLLECTION/USER.pub.pem``) so a rotation can re-grant.
* **Revocation** (``RevokeReader``): that user's token is refused (UNAUTHENTICATED) from the
  next call on, also after a server restart; other users are unaffected.
* **Rotation** (:func:`rotate`): a new key version (image key + transform secret) is added to
  the owner key file *first*; then one ``RekeyCodes`` call sends the server the composed map
  T_new o T_old^-1 (itself a bit permutation + XOR mask), which it applies to every stored
  code in one transaction, recording the new key id and revoking every reader credential of
  the collection (per-user and shared) in the same transaction; then every user active before
  the rotation (less ``drop``) whose public key was kept gets a new token and a new grant.
  Blobs are not re-encrypted: they carry their key version, and new grants carry every image
  key version up to the current one, so old blobs keep decrypting; new uploads use the new key.
* **Resumable rotation** (:class:`PendingRotation`): once the key file holds the new version and
  before ``RekeyCodes`` is sent, the rotation is recorded durably in
  ``$DLHEIR_HOME/rotations/COLLECTION.json`` (0600: collection, from/to key version, the users to
  re-grant, the dropped ones, the users done so far, the grants folder); each written grant is
  added to it and it is removed once every grant is written. A rotation interrupted in between
  (the process killed after the server revoked every reader token, say) is finished by the next
  ``rotate`` of that collection, which never starts a new one while a record is pending: if the
  server is at the recorded new key version the re-key committed and only the users not yet done
  are re-granted; if it is still at the old one, ``RekeyCodes`` is sent again to the version
  already in the key file (no third version); anything else is a one-line error.

What the server learns from a rotation: the composed map, i.e. how each stored code's bits
move and flip. It holds every code before and after anyway, so it could compute that map
itself (re-uploading the codes would show it the same); it does not learn T_new or T_old.
A server that had already recovered T_old (from known image/code pairs) gets T_new too.
"""

from __future__ import annotations

import logging

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

from dlheir import paths
from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.crypto import (
    CodeTransform, OwnerKeys, make_grant, read_public_key_file, rekey_map, replace_private,
)
from dlheir.codes import pack_bits
from dlheir.errors import UserError

log = logging.getLogger(__name__)


# Test hook (fault injection), not a feature: when $DLHEIR_FAULT_POINT names one of these points,
# the process kills itself there with SIGKILL (no cleanup, no finally, no flush), as a crash or a
# `kill -9` would. tests/test_rotation_resume.py interrupts a real `dlheir owner rotate` with it:
# "rotate-before-rekey" (record and key file written, RekeyCodes not sent), "rotate-after-rekey"
# (RekeyCodes returned, no grant written), "rotate-after-grant" (after each written grant).
# Unset, as always outside tests, it does nothing.
FAULT_ENV = "DLHEIR_FAULT_POINT"


def _fault_point(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def default_label(public_key_path: Path | str) -> str:
    """A user label from a public key's file name: ``alice.pub.pem`` -> ``alice``."""
    name = Path(public_key_path).name
    for suffix in (".pub.pem", ".pem", ".pub"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def issue_grant(keys: OwnerKeys, public_pem: bytes, collection: str, user: str, cloud: CloudClient,
                server: str | None = None, bits: int | None = None, replace: bool = False) -> bytes:
    """A version-2 grant for ``user``: a new per-user reader token from the server (owner token
    in ``cloud``), the keys of the version the collection's codes are under. Re-granting a user
    whose kept public key is the same one re-issues the token (the old grant stops working); a
    label kept for another public key is refused unless ``replace``."""
    paths.check_label(user)
    kept = paths.kept_public_key(collection, user)
    if kept.is_file():
        same = kept.read_bytes() == bytes(public_pem)
        if not same and not replace:
            raise UserError(f"user label {user!r} of collection {collection!r} was granted to another public key "
                            f"({kept}); give another --user label, or --replace to hand it to this key")
        replace = True
    from dlheir.client.owner import collection_keys

    info = cloud.stats(collection)
    version = collection_keys(keys, collection, info)  # the mode and key version the key file recorded
    token = cloud.add_reader(collection, user, replace=replace)
    grant = make_grant(keys, public_pem, collection, token, server=server, bits=bits or info.bits, user=user,
                       key_id=version.key_id)
    paths.make_private_dirs(kept.parent)
    replace_private(kept, bytes(public_pem))
    log.info("grant for user %r on collection %r: a new reader token (the server keeps its hash), key version %d, "
             "%s mode; public key kept as %s", user, collection, version.key_id, version.mode, kept)
    return grant


@dataclass
class RotationReport:
    collection: str
    from_key: int
    to_key: int
    items: int = 0
    revoked: list[str] = field(default_factory=list)  # labels the rotation revoked
    granted: dict[str, Path] = field(default_factory=dict)  # label -> new grant file
    no_public_key: list[str] = field(default_factory=list)  # active before, but no kept public key
    dropped: list[str] = field(default_factory=list)
    resumed: bool = False  # this call finished an interrupted rotation (a pending record)
    rekeyed_now: bool = False  # this call's RekeyCodes moved the server (False: it had before)
    granted_before: dict[str, Path] = field(default_factory=dict)  # grants the interrupted run wrote


RECORD_FORMAT = "dlheir-rotation"


@dataclass
class PendingRotation:
    """A rotation in progress, recorded on the owner's side (:func:`dlheir.paths.rotation_record`,
    JSON, mode 0600, written durably: temporary file, fsync, rename, fsync of the folder)."""

    collection: str
    from_key: int
    to_key: int
    users: list[str]  # to re-grant: active before the rotation, less --drop, with a kept public key
    dropped: list[str]
    no_public_key: list[str]  # active before, not dropped, but no kept public key: not re-granted
    out_dir: str | None  # the grants folder (None: $DLHEIR_HOME/grants/COLLECTION/)
    key_file: str  # the owner key file the new version was added to
    done: dict[str, str] = field(default_factory=dict)  # user -> grant file written
    started: float = 0.0

    @property
    def path(self) -> Path:
        return paths.rotation_record(self.collection)

    @property
    def remaining(self) -> list[str]:
        return [u for u in self.users if u not in self.done]

    def describe(self) -> str:
        return (f"the interrupted rotation of collection {self.collection!r} from key version {self.from_key} to "
                f"{self.to_key} (recorded in {self.path})")

    def save(self) -> None:
        doc = {"format": RECORD_FORMAT, "version": 1, **asdict(self)}
        paths.make_private_dirs(self.path.parent, "the rotation record folder")
        replace_private(self.path, (json.dumps(doc, indent=2) + "\n").encode())  # durable, folder fsynced

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        paths.fsync_path(self.path.parent)

    @classmethod
    def load(cls, collection: str) -> "PendingRotation | None":
        """The pending record of ``collection``, None if there is none; UserError if it is unreadable."""
        path = paths.rotation_record(collection)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or doc.get("version") != 1:
                raise ValueError("not a version-1 dlheir rotation record")
            record = cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})
            ok = (record.collection == collection and all(isinstance(k, int) for k in (record.from_key, record.to_key))
                  and all(isinstance(u, str) for u in (*record.users, *record.dropped, *record.no_public_key,
                                                        *record.done)))
            if not ok:
                raise ValueError(f"unexpected values for collection {collection!r}")
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"cannot read the record of an interrupted rotation {path}: {exc}; if 'dlheir owner "
                            "grants' shows every user you want active, delete it") from None
        return record


def _server_key(cloud: CloudClient, collection: str) -> int | None:
    """The key version the server's codes are under, None if it does not answer."""
    try:
        return cloud.stats(collection).key_id or 1
    except CloudError:
        return None


def _rekey(record: PendingRotation, keys: OwnerKeys, cloud: CloudClient, bits: int, report: RotationReport) -> None:
    """``RekeyCodes`` from the record's old key version to its new one (both in ``keys``)."""
    ck = keys.for_collection(record.collection)
    old_t = CodeTransform(ck.at(record.from_key).transform_secret, bits)
    new_t = CodeTransform(ck.at(record.to_key).transform_secret, bits)
    perm, mask = rekey_map(old_t, new_t)
    _fault_point("rotate-before-rekey")
    try:
        answer = cloud.rekey_codes(record.collection, record.from_key, record.to_key, perm,
                                   pack_bits(mask[None, :])[0].tobytes())
    except CloudError as exc:
        at = _server_key(cloud, record.collection)
        if at == record.from_key:  # the server did not move: every token still works, nothing to finish
            record.remove()
            raise
        if at != record.to_key:  # unknown: the re-key may have committed, keep the record
            raise UserError(f"{exc} (the re-key may have been applied: {record.describe()} is finished by "
                            "'dlheir owner rotate --resume' once the server answers)") from None
        report.rekeyed_now = True  # committed, the answer was lost: go on with the grants
        return
    _fault_point("rotate-after-rekey")
    report.items, report.revoked, report.rekeyed_now = int(answer.items), list(answer.revoked_users), True


def _regrant(record: PendingRotation, keys: OwnerKeys, cloud: CloudClient, server: str | None, bits: int,
             report: RotationReport) -> None:
    """New grants for the record's users not yet done (each one recorded as written), then the
    record is removed: the rotation is over."""
    report.granted_before = {u: Path(p) for u, p in record.done.items()}
    for user in record.remaining:
        kept = paths.kept_public_key(record.collection, user)
        if not kept.is_file():  # removed since the rotation began
            report.no_public_key.append(user)
            continue
        pem = read_public_key_file(kept)
        grant = issue_grant(keys, pem, record.collection, user, cloud, server=server, bits=bits, replace=True)
        out = paths.rotated_grant(record.collection, user, record.out_dir)
        paths.make_private_dirs(out.parent)
        report.granted[user] = replace_private(out, grant)
        record.done[user] = str(out)
        record.save()
        _fault_point("rotate-after-grant")
    record.remove()


def _resume(record: PendingRotation, key_path: Path, cloud: CloudClient, server: str | None, drop: set[str],
            out_dir: Path | str | None) -> RotationReport:
    """Finish the rotation ``record`` describes (see the module docstring)."""
    keys = OwnerKeys.load(key_path)
    newest = keys.for_collection(record.collection, key_path).key_id
    if newest < record.to_key:
        raise UserError(f"{key_path} has no key version {record.to_key} of collection {record.collection!r} (it holds "
                        f"1 to {newest}): {record.describe()} added it to {record.key_file}: give --key "
                        f"{record.key_file}")
    done = sorted(drop & set(record.done))
    if done:
        raise UserError(f"--drop {done[0]!r}: {record.describe()} already re-granted that user; finish it without "
                        f"--drop, then 'dlheir owner revoke {done[0]}' and rotate again")
    unknown = sorted(drop - {*record.users, *record.dropped, *record.no_public_key})
    if unknown:
        raise UserError(f"--drop {unknown[0]!r}: {record.describe()} has no such user to re-grant (it re-grants: "
                        f"{', '.join(record.users) or 'nobody'})")
    moved = [u for u in record.remaining if u in drop]
    if moved or out_dir is not None:
        record.users = [u for u in record.users if u not in drop]
        record.dropped = [*record.dropped, *moved]
        record.out_dir = os.path.abspath(out_dir) if out_dir is not None else record.out_dir
        record.save()
    info = cloud.stats(record.collection)
    at = info.key_id or 1
    report = RotationReport(record.collection, record.from_key, record.to_key, int(info.items),
                            dropped=list(record.dropped), no_public_key=list(record.no_public_key), resumed=True)
    if at == record.from_key:  # the re-key did not commit: send it again, to the version already in the key file
        _rekey(record, keys, cloud, info.bits, report)
    elif at != record.to_key:
        raise UserError(f"cannot finish {record.describe()}: the server's codes are under key version {at}, so "
                        "another rotation moved them; give the users not yet re-granted "
                        f"({', '.join(record.remaining) or 'none'}) new grants with 'dlheir owner grant --user USER "
                        f"--user-pub KEY', then delete {record.path}")
    _regrant(record, keys, cloud, server, info.bits, report)
    return report


def rotate(key_path: Path | str, collection: str, cloud: CloudClient, server: str | None = None,
           drop: Iterable[str] = (), out_dir: Path | str | None = None, resume: bool = False) -> RotationReport:
    """Rotate ``collection``'s keys (see the module docstring). The key file gains the new
    version before the server is asked anything that depends on it, so an interruption leaves
    either the old state or the new one, never codes the key file cannot search; and the rotation
    is recorded before the server moves, so that an interruption before every grant is written is
    finished by the next call. With a pending record this call finishes that rotation (never a new
    one); ``resume`` only finishes one (UserError if none is pending)."""
    key_path = Path(key_path)
    drop = {paths.check_label(u) for u in drop}
    pending = PendingRotation.load(collection)
    if pending is not None:
        return _resume(pending, key_path, cloud, server, drop, out_dir)
    if resume:
        raise UserError(f"no interrupted rotation of collection {collection!r} to resume (no "
                        f"{paths.rotation_record(collection)}): 'dlheir owner rotate' without --resume starts one")
    from dlheir.client.owner import collection_keys

    keys = OwnerKeys.load(key_path)
    ck = keys.for_collection(collection, key_path)  # one line if the key file does not know it
    info = cloud.stats(collection)
    at = info.key_id or 1
    # the server behind the key file with no rotation pending: an earlier rotation's re-key was refused
    # (the key file had moved first); rotate from where the server is, to a version never used
    current = collection_keys(ck.at(at) if at < ck.key_id else ck, collection, info)
    to_key = ck.key_id + 1
    before = cloud.list_readers(collection)
    active = [r.user for r in before.readers if not r.revoked]
    unknown = drop - {r.user for r in before.readers}
    if unknown:
        raise UserError(f"collection {collection!r} has no reader {sorted(unknown)[0]!r} (see 'dlheir owner grants')")

    new = keys.rotated(collection)  # this collection's next version; the others' keys do not move
    keep = [u for u in active if u not in drop]
    has_key = {u: paths.kept_public_key(collection, u).is_file() for u in keep}
    record = PendingRotation(collection, current.key_id, to_key, users=[u for u in keep if has_key[u]],
                             dropped=[u for u in active if u in drop], no_public_key=[u for u in keep if not has_key[u]],
                             out_dir=os.path.abspath(out_dir) if out_dir is not None else None,
                             key_file=os.path.abspath(key_path), started=time.time())
    new.replace_file(key_path)  # durable before the server moves: never codes without their key
    record.save()  # durable before the server moves: never revoked users nobody will re-grant
    report = RotationReport(collection, current.key_id, to_key, dropped=list(record.dropped),
                            no_public_key=list(record.no_public_key))
    _rekey(record, new, cloud, info.bits, report)
    _regrant(record, new, cloud, server, info.bits, report)
    return report
