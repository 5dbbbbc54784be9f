"""Where the client's keys, tokens and grants live by default: one per-user folder.

``$DLHEIR_HOME`` if set, else ``$XDG_CONFIG_HOME/dlheir``, else ``~/.config/dlheir``. The
folder is created with mode 0700 when a command first writes into it; one that group or others
can write to is refused (:func:`check_home`). Inside it:

- ``owner.key``: written by ``owner init``, read by ``owner upload`` and ``owner grant``;
- ``COLLECTION.tokens.json``: written by ``owner create-collection``, read by ``owner upload``
  and ``owner grant``;
- ``user.pem`` and ``user.pub.pem``: written by ``user keygen``, the private one read by
  ``user search``;
- ``user-grants/COLLECTION.grant``: the grants this machine's user holds, one per collection
  (mode 0600): written by ``user add-grant`` (and by ``owner grant`` when the grant is for this
  machine's own user key), read by ``user search [--collection C]``;
- ``grant.bin``: where ``owner grant`` wrote every grant before grants were kept per collection;
  still read by ``user search`` when it holds no per-collection grant;
- ``readers/COLLECTION/USER.pub.pem``: the public key of each user ``owner grant`` made a grant
  for, kept so that ``owner rotate`` can issue that user a new grant;
- ``grants/COLLECTION/USER.grant``: the grants ``owner grant`` and ``owner rotate`` issue for
  other users' keys, to send to them (mode 0600).
- ``rotations/COLLECTION.json``: the record of a rotation in progress (mode 0600), written by
  ``owner rotate`` before the server re-keys and removed when every grant is written; a
  rotation interrupted in between is finished by the next ``owner rotate``.

Every command's path flag (``--out``, ``--key``, ``--tokens``, ``--grant``, ``--user-key``)
overrides its default.

Machine state that is not a secret (the Triton launcher's pid file and log, its backend
links, the generated model repository, the latest ONNX export) lives in a second per-user
folder, :func:`state_dir`: ``$DLHEIR_STATE`` if set, else ``$XDG_STATE_HOME/dlheir``, else
``~/.local/state/dlheir``. Import-light: only the standard library.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dlheir.contract import NAME_RE
from dlheir.errors import UserError

HOME_ENV = "DLHEIR_HOME"
STATE_ENV = "DLHEIR_STATE"
OWNER_KEY = "owner.key"
USER_KEY = "user.pem"
GRANT = "grant.bin"
TOKENS_SUFFIX = ".tokens.json"
READERS_DIR = "readers"
GRANTS_DIR = "grants"
USER_GRANTS_DIR = "user-grants"
ROTATIONS_DIR = "rotations"



def _user_dir(own_env: str, xdg_env: str, fallback: str) -> Path:
    """``$own_env`` if set, else ``$xdg_env/dlheir``, else ``~/fallback/dlheir``."""
    env = os.environ.get(own_env)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get(xdg_env)
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / fallback  # XDG: relative values are ignored
    return base / "dlheir"


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder (a folder: so a rename or unlink in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dlheir_home() -> Path:
    """The per-user folder for keys, tokens and grants (not created here); UserError if it
    exists and group or others can write to it (:func:`check_home`)."""
    return check_home(_user_dir(HOME_ENV, "XDG_CONFIG_HOME", ".config"))


def check_home(home: Path) -> Path:
    """``home``, unless it is a folder group or others can write to: then UserError (one line
    naming it and the ``chmod 700`` fix), since whoever can write there can swap the owner key,
    tokens files, grants and the config file this user reads and writes. Absent: fine
    (:func:`ensure_home` creates it 0700)."""
    try:
        st = home.stat()
    except OSError:
        return home
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022:
        raise UserError(f"the dlheir key folder {home} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}): refusing to keep or read keys, tokens and grants "
                        f"there; fix with: chmod 700 {home}")
    return home


def state_dir() -> Path:
    """The per-user folder for the Triton launcher's state and the exports (not created here)."""
    return _user_dir(STATE_ENV, "XDG_STATE_HOME", ".local/state")


def ensure_home() -> Path:
    """:func:`dlheir_home`, created with mode 0700 (parents too) if it does not exist yet."""
    home = dlheir_home()
    if not home.is_dir():
        try:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the dlheir key folder {home}: {exc.strerror or exc} "
                            f"(set ${HOME_ENV} to another folder)") from None
    return home


def make_private_dirs(folder: Path, what: str = "") -> Path:
    """Create ``folder`` and every missing parent with mode 0700 (existing ones keep theirs);
    UserError naming ``what`` (e.g. "the page cache folder") if that fails."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        for f in reversed(missing):
            f.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what + ' ' if what else ''}{folder}: {exc.strerror or exc}") from None
    return folder


def default_path(name: str, create: bool = False) -> Path:
    """``name`` inside the per-user folder; ``create`` makes the folder (0700) first, for writers."""
    return (ensure_home() if create else dlheir_home()) / name


def tokens_name(collection: str) -> str:
    """File name of a collection's tokens file: ``COLLECTION.tokens.json`` (names checked: no paths)."""
    if not isinstance(collection, str) or not NAME_RE.fullmatch(collection):
        raise UserError(f"invalid collection name {collection!r}: letters, digits, '_', '.', '-', "
                        "starting with a letter or digit, at most 128 characters")
    return collection + TOKENS_SUFFIX


def resolve(given: str | os.PathLike | None, name: str, create: bool = False) -> Path:
    """The path a flag gave, else ``name`` in the per-user folder (created 0700 if ``create``)."""
    return Path(given) if given is not None else default_path(name, create)


def check_label(user: str) -> str:
    """A user label (the server's rule for names: no paths), else UserError."""
    if not isinstance(user, str) or not NAME_RE.fullmatch(user):
        raise UserError(f"invalid user label {user!r}: letters, digits, '_', '.', '-', starting with a letter "
                        "or digit, at most 128 characters")
    return user


def kept_public_key(collection: str, user: str) -> Path:
    """Where ``owner grant`` keeps ``user``'s public key for ``collection`` (folder not created)."""
    tokens_name(collection)  # checks the name
    return dlheir_home() / READERS_DIR / collection / f"{check_label(user)}.pub.pem"


def held_grant(collection: str) -> Path:
    """Where this machine's user keeps their grant for ``collection`` (folder not created)."""
    tokens_name(collection)  # checks the name
    return dlheir_home() / USER_GRANTS_DIR / f"{collection}.grant"


def held_grants() -> list[Path]:
    """Every grant this machine's user keeps, by collection name."""
    return sorted((dlheir_home() / USER_GRANTS_DIR).glob("*.grant"))


def rotated_grant(collection: str, user: str, folder: str | os.PathLike | None = None) -> Path:
    """Where ``owner grant`` and ``owner rotate`` write ``user``'s grant, to send to them (``folder``
    overrides the default)."""
    tokens_name(collection)
    base = Path(folder) if folder is not None else dlheir_home() / GRANTS_DIR / collection
    return base / f"{check_label(user)}.grant"


def rotation_record(collection: str) -> Path:
    """Where ``owner rotate`` records ``collection``'s rotation in progress (folder not created)."""
    tokens_name(collection)  # checks the name
    return dlheir_home() / ROTATIONS_DIR / f"{collection}.json"
