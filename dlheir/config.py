"""Client settings, defined once: built-in defaults < config file < environment < command-line flag.

The config file is TOML (read with ``tomllib``): ``--config FILE`` if given, else
``$DLHEIR_CONFIG``, else ``dlheir_home()/config.toml`` (see :mod:`dlheir.paths`); a file named by
``--config`` or ``$DLHEIR_CONFIG`` must exist, the default one may be absent. Every key is
optional; an unknown key or a value of the wrong type is a one-line error naming the file::

    server = "127.0.0.1:50051"        # the cloud server           env DLHEIR_SERVER
                                      # (fronts of one store: "HOST:PORT,HOST:PORT")
    triton = "127.0.0.1:8001"         # Triton's gRPC port         env DLHEIR_TRITON
    model = "dlheir"                  # the Triton model to hash with   env DLHEIR_MODEL
    collection = "photos"             # default --collection       env DLHEIR_COLLECTION
    admin_token_file = "runs/cloud/admin.token"                   # env DLHEIR_ADMIN_TOKEN_FILE
    owner_key = "owner.key"           # default --key              env DLHEIR_OWNER_KEY
    user_key = "user.pem"             # default --user-key         env DLHEIR_USER_KEY
    grant = "grant.bin"               # default --grant            env DLHEIR_GRANT
    tls_ca = "ca.pem"                 # the server's CA (TLS)      env DLHEIR_TLS_CA
    triton_tls_ca = "triton-ca.pem"   # Triton's CA (TLS)          env DLHEIR_TRITON_TLS_CA
    insecure = "false"                # "true": allow a non-loopback server without TLS (tokens in the
                                      # clear); flag --insecure    env DLHEIR_INSECURE

Relative paths in the file are relative to the file's folder; in the environment and in flags,
to the working directory. When the settings are read, before any connection, a file that is not
UTF-8, a value that is not UTF-8 text or holds a control character (a NUL above all) or is a
path too long for the file system, and a ``tls_ca`` that is missing, unreadable or not a PEM
certificate are each a one-line error naming the setting, where it was given and the fix. The admin token itself is read only from ``$DLHEIR_ADMIN_TOKEN`` (the
variable the server reads too) or from a token file: a config file is not a place for secrets.
Where a setting is given nowhere, the server address recorded in a tokens file or grant comes
next, then the built-in default.

Import-light: standard library only (and :mod:`dlheir.contract` for the public model name).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dlheir import paths
from dlheir.contract import PUBLIC_MODEL
from dlheir.errors import UserError

CONFIG_ENV = "DLHEIR_CONFIG"
CONFIG_NAME = "config.toml"
ADMIN_TOKEN_ENV = "DLHEIR_ADMIN_TOKEN"  # the token itself (the server reads the same variable)

DEFAULTS: dict[str, Any] = {
    "server": "127.0.0.1:50051",
    "triton": "127.0.0.1:8001",
    "model": PUBLIC_MODEL,
    "collection": None,
    "admin_token_file": None,
    "owner_key": None,  # None: paths.OWNER_KEY in the key folder
    "user_key": None,  # None: paths.USER_KEY
    "grant": None,  # None: paths.GRANT
    "tls_ca": None,
    "triton_tls_ca": None,  # Triton's CA: TLS to Triton (required for a non-loopback Triton unless insecure)
    "insecure": "false",  # "true" (1, yes, on): a non-loopback server without TLS is allowed (see client.cloud)
}
ENV: dict[str, str] = {key: f"DLHEIR_{key.upper()}" for key in DEFAULTS}
PATH_KEYS = frozenset({"admin_token_file", "owner_key", "user_key", "grant", "tls_ca", "triton_tls_ca"})
BOOL_KEYS = frozenset({"insecure"})
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(key: str, value: Any, where: str) -> bool:
    """A yes/no setting's value (true/false, 1/0, yes/no, on/off; a TOML boolean) or a UserError
    naming the setting and where it was given."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise UserError(f"{where}: {key} must be true or false, got {value!r}")


def default_path() -> Path:
    """Where the config file is looked for when neither ``--config`` nor ``$DLHEIR_CONFIG`` names one."""
    return paths.dlheir_home() / CONFIG_NAME


@dataclass(frozen=True)
class Config:
    """Resolved settings: ``values[key]`` and where each came from (``sources[key]``:
    ``default``, ``file PATH``, ``env VAR``)."""

    values: dict[str, Any]
    sources: dict[str, str]
    path: Path | None = None  # the config file read, if any
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def get(self, key: str, flag: Any = None) -> Any:
        """``flag`` if given (not None), else the configured value."""
        if key not in self.values:
            raise KeyError(key)
        return flag if flag is not None else self.values[key]

    def source(self, key: str, flag: Any = None) -> str:
        return "flag" if flag is not None else self.sources[key]

    def given(self, key: str, flag: Any = None) -> bool:
        """Whether ``key`` was set anywhere (flag, env, file), not left at its built-in default."""
        return flag is not None or self.sources[key] != "default"

    def has_admin_token(self, flag_file: str | os.PathLike | None = None) -> bool:
        """Whether an admin token is given anywhere (flag, env, file); it may still be unreadable."""
        return bool(flag_file is not None or self.env.get(ADMIN_TOKEN_ENV, "").strip()
                    or self.values.get("admin_token_file"))

    def admin_token(self, flag_file: str | os.PathLike | None = None) -> str:
        """The server's admin token: ``--admin-token-file`` > ``$DLHEIR_ADMIN_TOKEN`` >
        ``admin_token_file`` (env, then file). UserError naming the ways to give it if none."""
        from dlheir.client.crypto import read_secret

        if flag_file is None and self.env.get(ADMIN_TOKEN_ENV, "").strip():
            return self.env[ADMIN_TOKEN_ENV].strip()
        path = self.get("admin_token_file", flag_file)
        if path is None:
            raise UserError(f"this needs the server's admin token: give --admin-token-file FILE (the server's "
                            f"DATA_DIR/admin.token), set ${ADMIN_TOKEN_ENV} or ${ENV['admin_token_file']}, or "
                            f"admin_token_file in {self.path or default_path()}")
        token = read_secret(path, "admin token file").decode("utf-8", "replace").strip()
        if not token:
            raise UserError(f"{path}: the admin token file is empty")
        return token

    def insecure(self, flag: bool | None = None) -> bool:
        """Whether a cloud server that is not loopback may be reached without TLS: ``flag``
        (``--insecure``, ``insecure=``) if given, else the ``insecure`` setting."""
        return parse_bool("insecure", self.get("insecure", flag), self.source("insecure", flag))

    def as_dict(self) -> dict[str, Any]:
        return {"config_file": str(self.path) if self.path else None,
                "settings": {k: {"value": str(v) if isinstance(v, Path) else v, "from": self.sources[k]}
                             for k, v in self.values.items()}}


TLS_CA_FIX = ("give the PEM certificate of the CA that signed the server's certificate (for a self-signed server, "
              "its --tls-cert file)")


def check_value(key: str, value: str, where: str) -> None:
    """UserError naming the setting, where it was given (``config file PATH`` or ``$VAR``) and the
    fix, for a value that no address, name or path can hold: text that is not UTF-8 (an environment
    variable of other bytes), a control character (NUL above all: no file name can hold it), a
    path too long for the file system."""
    fix = f"fix {key} there" if where.startswith("config file") else f"fix or unset {where}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown: Any = value.encode("utf-8", "surrogateescape")  # the bytes the environment held
        except UnicodeEncodeError:
            shown = value
        raise UserError(f"{where}: {key} is not UTF-8 text ({shown!r}): {fix}") from None
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        what = "a NUL character" if bad == "\0" else f"the control character {bad!r}"
        raise UserError(f"{where}: {key} {value!r} holds {what}: {fix}")
    if key in PATH_KEYS:
        import errno

        try:
            os.stat(value)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise UserError(f"{where}: {key} is too long to be a path ({len(value)} characters): {fix}") from None
    if key == "server":  # one address, or several fronts' comma-separated
        from dlheir.netaddr import parse_addresses

        try:
            parse_addresses(value)
        except UserError as exc:
            raise UserError(f"{where}: {exc}: {fix}") from None


def read_tls_ca(path: str | os.PathLike, where: str = "tls_ca") -> bytes:
    """The TLS CA file's bytes, once checked to hold a PEM certificate: else UserError naming
    ``where`` (the setting and where it was given), the file and the fix, before gRPC is given it
    (gRPC would log C-core errors and report the server unreachable)."""
    import ssl

    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else getattr(exc, "strerror", None) or exc
        raise UserError(f"{where}: cannot read the TLS CA file {path} ({reason}): {TLS_CA_FIX}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except UnicodeDecodeError:
        reason = "binary, not PEM text"
    except ValueError:
        reason = "empty"
    except ssl.SSLError as exc:
        reason = "no PEM certificate in it" if "no start line" in str(exc) else (exc.reason or str(exc))
    else:
        return data
    raise UserError(f"{where}: the TLS CA file {path} is not a PEM certificate ({reason}): {TLS_CA_FIX}")


def _read_file(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise UserError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path}: not valid TOML ({exc})") from None
    for key, value in doc.items():
        if key not in DEFAULTS:
            raise UserError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(DEFAULTS))})")
        if key in BOOL_KEYS and isinstance(value, bool):
            continue
        if not isinstance(value, str) or not value:
            raise UserError(f"config file {path}: {key} must be a non-empty string, got {value!r}")
        check_value(key, value, f"config file {path}")
    out = {}
    for key, value in doc.items():
        if key in PATH_KEYS:
            try:
                value = str((path.parent / Path(value).expanduser()).resolve())
            except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13), no home folder
                raise UserError(f"config file {path}: {key} {value!r}: {exc}") from None
        if key in BOOL_KEYS:
            value = "true" if parse_bool(key, value, f"config file {path}") else "false"
        out[key] = value
    return out


def _is_file(path: Path, named_by: str) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:
        raise UserError(f"config file {path} ({named_by}): {getattr(exc, 'strerror', None) or exc}") from None


def load(config_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The settings from built-in defaults, the config file and the environment (flags are
    applied by the caller through :meth:`Config.get`)."""
    env = dict(os.environ if env is None else env)
    values, sources = dict(DEFAULTS), {k: "default" for k in DEFAULTS}
    if config_path is not None:
        path: Path | None = Path(config_path).expanduser()
        if not _is_file(path, "given with --config"):
            raise UserError(f"config file not found: {path} (given with --config)")
    elif env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV]).expanduser()
        if not _is_file(path, f"named by ${CONFIG_ENV}"):
            raise UserError(f"config file not found: {path} (named by ${CONFIG_ENV})")
    else:
        path = default_path()
        path = path if _is_file(path, f"the default one: set ${paths.HOME_ENV} to a usable folder") else None
    if path is not None:
        for key, value in _read_file(path).items():
            values[key], sources[key] = value, f"file {path}"
    for key, var in ENV.items():
        if env.get(var):
            check_value(key, env[var], f"${var}")
            values[key], sources[key] = env[var], f"env {var}"
    if sources["insecure"].startswith("env"):  # a bad value is an error here, before any connection
        parse_bool("insecure", values["insecure"], f"${ENV['insecure']}")
    for key in ("tls_ca", "triton_tls_ca"):  # checked here, where it is known where it came from, before any connection
        if values[key] is not None:
            where = f"${ENV[key]}" if sources[key].startswith("env") else f"config file {path}"
            read_tls_ca(values[key], f"{where}: {key}")
    return Config(values, sources, path, env)


# --- output behaviour: set once by the ``dlheir`` entry point --------------------------------
_verbosity = 0  # -1 quiet, 0 normal, 1 verbose


def set_verbosity(level: int) -> None:
    """-q (-1), normal (0), -v (1) or -vv (2): the logging level and whether progress bars show.
    Normal leaves logging as it is (warnings and errors reach stderr); -q shows errors only, -v
    adds INFO and -vv DEBUG records."""
    import logging

    global _verbosity
    _verbosity = level
    if level:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel({-1: logging.ERROR, 1: logging.INFO}.get(level, logging.DEBUG))
    if not show_progress():
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* defaults: bars made elsewhere stay off too


def quiet() -> bool:
    """True under ``-q``: errors only."""
    return _verbosity < 0


def show_progress() -> bool:
    """Progress bars only on a terminal, and not with ``-q``."""
    return _verbosity >= 0 and sys.stderr.isatty()
