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

What the server learns from a rotation: the composed map, i.e. how each stored code's bits
move and flip. It holds every code before and after anyway, so it could compute that map
itself (re-uploading the codes would show it the same); it does not learn T_new or T_old.
A server that had already recovered T_old (from known image/code pairs) gets T_new too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dlheir import paths
from dlheir.client.cloud import CloudClient
from dlheir.client.crypto import (
    CodeTransform, OwnerKeys, make_grant, read_public_key_file, rekey_map, replace_private,
)
from dlheir.codes import pack_bits
from dlheir.errors import UserError


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
    info = cloud.stats(collection)
    version = keys.at(info.key_id or 1)
    token = cloud.add_reader(collection, user, replace=replace)
    grant = make_grant(version, public_pem, collection, token, server=server, bits=bits or info.bits, user=user)
    paths.make_private_dirs(kept.parent)
    replace_private(kept, bytes(public_pem))
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


def rotate(key_path: Path | str, collection: str, cloud: CloudClient, server: str | None = None,
           drop: Iterable[str] = (), out_dir: Path | str | None = None) -> RotationReport:
    """Rotate ``collection``'s keys (see the module docstring). The key file gains the new
    version before the server is asked anything that depends on it, so an interruption leaves
    either the old state or the new one, never codes the key file cannot search."""
    key_path = Path(key_path)
    keys = OwnerKeys.load(key_path)
    if keys.collection not in (None, collection) and len(keys.key_ids) > 1:
        raise UserError(f"{key_path} was rotated for collection {keys.collection!r}; a rotated key file serves one "
                        f"collection (its newer image keys go into that collection's grants): give --key")
    drop = {paths.check_label(u) for u in drop}
    info = cloud.stats(collection)
    current = keys.at(info.key_id or 1)
    before = cloud.list_readers(collection)
    active = [r.user for r in before.readers if not r.revoked]
    unknown = drop - {r.user for r in before.readers}
    if unknown:
        raise UserError(f"collection {collection!r} has no reader {sorted(unknown)[0]!r} (see 'dlheir owner grants')")

    new = keys.rotated()
    if new.collection is None:
        new = OwnerKeys(new.image_key, new.transform_secret, collection, new.key_id, new.previous)
    new.replace_file(key_path)  # durable before the server moves: never codes without their key
    old_t, new_t = CodeTransform(current.transform_secret, info.bits), CodeTransform(new.transform_secret, info.bits)
    perm, mask = rekey_map(old_t, new_t)
    answer = cloud.rekey_codes(collection, current.key_id, new.key_id, perm, pack_bits(mask[None, :])[0].tobytes())
    report = RotationReport(collection, current.key_id, new.key_id, int(answer.items), list(answer.revoked_users))

    for user in active:
        if user in drop:
            report.dropped.append(user)
            continue
        kept = paths.kept_public_key(collection, user)
        if not kept.is_file():
            report.no_public_key.append(user)
            continue
        pem = read_public_key_file(kept)
        grant = issue_grant(new, pem, collection, user, cloud, server=server, bits=info.bits, replace=True)
        out = paths.rotated_grant(collection, user, out_dir)
        paths.make_private_dirs(out.parent)
        report.granted[user] = replace_private(out, grant)
    return report
