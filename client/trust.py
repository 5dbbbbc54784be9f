"""Which owners' grants a user accepts: owner signing keys pinned on first use or by fingerprint.

Every grant is signed with its owner's Ed25519 key (:func:`dlheir.client.crypto.open_grant`
checks the signature). A signature alone proves nothing against someone who made their own key
and sealed a grant naming their own server for the user's public key; what the user trusts is a
*pinned* owner key: ``$DLHEIR_HOME/trusted-owners.json`` (mode 0600)::

    {"format": "dlheir-trusted-owners", "version": 1,
     "owners": {"<fingerprint>": {"public_key": <base64>, "how": "first use" | "fingerprint", "since": <unix time>}}}

The first grant a user ever opens pins its owner's key (trust on first use, said in one line
with the fingerprint to compare with the one the owner gives out of band); after that a grant
signed by any other key is refused until the user runs ``dlheir user trust-owner FINGERPRINT``
with the fingerprint the owner gave (``dlheir owner fingerprint``).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from dlheir import paths
from dlheir.client.crypto import GrantError, fingerprint, read_secret, replace_private
from dlheir.errors import UserError

TRUST_FILE = "trusted-owners.json"
TRUST_FORMAT = "dlheir-trusted-owners"


def trust_path() -> Path:
    return paths.dlheir_home() / TRUST_FILE


def load_trusted(path: Path | None = None) -> dict[str, dict]:
    """Fingerprint -> record of every trusted owner key (empty if the file does not exist)."""
    path = path or trust_path()
    if not path.is_file():
        return {}
    try:
        doc = json.loads(read_secret(path, "trusted owners file"))
        if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT or not isinstance(doc.get("owners"), dict):
            raise ValueError("not a dlheir trusted-owners file")
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; fix or delete it (the next grant opened is then trusted on first use)") from None
    return doc["owners"]


def _save(owners: dict[str, dict], path: Path | None = None) -> None:
    path = path or trust_path()
    paths.make_private_dirs(path.parent)
    doc = {"format": TRUST_FORMAT, "version": 1, "owners": owners}
    replace_private(path, (json.dumps(doc, indent=2) + "\n").encode())


def trust_fingerprint(fp: str) -> str:
    """Record ``fp`` (as ``dlheir owner fingerprint`` prints it) as a trusted owner (a grant is
    checked against the fingerprint of the key that signed it)."""
    fp = fp.strip().lower()
    parts = fp.split(":")
    if len(parts) != 8 or not all(len(p) == 4 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise UserError(f"{fp!r} is not an owner fingerprint (8 groups of 4 hex digits, as 'dlheir owner fingerprint' "
                        "prints it)")
    owners = load_trusted()
    owners[fp] = {"public_key": None, "how": "fingerprint", "since": time.time()}
    _save(owners)
    return fp


def check_owner(grant) -> str | None:
    """GrantError (one line) unless the key that signed ``grant`` is trusted; pins it when no owner
    is trusted yet and returns the line to show then (None when it was trusted already)."""
    fp = fingerprint(grant.owner_key)
    owners = load_trusted()
    if fp in owners:
        return None
    if owners:
        raise GrantError(f"this grant is signed by owner key {fp}, which you do not trust (you trust "
                         f"{', '.join(sorted(owners))}): a grant from an unknown owner can name any server; if the "
                         f"owner confirms this fingerprint to you out of band, run: dlheir user trust-owner {fp}")
    owners[fp] = {"public_key": base64.b64encode(grant.owner_key).decode(), "how": "first use", "since": time.time()}
    _save(owners)
    return (f"trusted owner key {fp} on first use (pinned in {trust_path()}); compare it with the fingerprint the "
            "owner gives you ('dlheir owner fingerprint')")
