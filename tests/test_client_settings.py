"""Hostile client settings end in one line naming the setting, not a traceback (issue 20, item 9).

Each test runs the real ``dlheir`` CLI with its per-user folders in a temporary one and one bad
setting (config file or environment): the exit code is non-zero and stderr is one line that names
the setting and where it was given, with no traceback and no gRPC C-core log line. Every check
runs when the settings are read, before any connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlheir.procs import free_port
from dlheir.server.testing import CloudServerProcess, self_signed_certificate


def _env(home: Path, **settings: str | bytes) -> dict:
    """The parent's environment less every DLHEIR_ and XDG_ variable, with the per-user folders
    in ``home``, the services on closed ports (nothing is ever reached) and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLHEIR_", "XDG_"))}
    env.update(HOME=str(home), DLHEIR_HOME=str(home / "keys"), DLHEIR_STATE=str(home / "state"),
               DLHEIR_SERVER=f"127.0.0.1:{free_port()}", DLHEIR_TRITON=f"127.0.0.1:{free_port()}")
    env.update({k: os.fsdecode(v) for k, v in settings.items()})
    return env


def _dlheir(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", *args], capture_output=True, text=True,
                          errors="backslashreplace", timeout=120, env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL)


def _one_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The one stderr line of a refused command; it names each of ``names``."""
    assert proc.returncode != 0, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not any("E0000" in line or ".cc:" in line for line in lines), proc.stderr  # gRPC C-core log lines
    assert len(lines) == 1 and lines[0].startswith("dlheir: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "keys").mkdir()
    return tmp_path


def _config(home: Path, data: bytes) -> Path:
    path = home / "keys" / "config.toml"
    path.write_bytes(data)
    return path


# --- the config file ---------------------------------------------------------------------------

def test_config_file_not_utf8(home):
    path = _config(home, 'server = "caf\xe9:50051"\n'.encode("latin-1"))
    line = _one_line(_dlheir(_env(home), "status"), str(path), "not UTF-8", "0xe9")
    assert "save it as UTF-8" in line


def test_config_file_named_by_env_not_utf8(home):
    path = home / "other.toml"
    path.write_bytes(b"\xff\xfe[\x00")
    _one_line(_dlheir(_env(home, DLHEIR_CONFIG=str(path)), "owner", "grants"), str(path), "not UTF-8")


@pytest.mark.parametrize("key", ["tls_ca", "grant", "user_key", "owner_key", "admin_token_file"])
def test_nul_in_a_path_from_the_config_file(home, key):
    path = _config(home, f'{key} = "a\\u0000b.pem"\n'.encode())
    line = _one_line(_dlheir(_env(home), "status"), str(path), key, "NUL")
    assert f"fix {key} there" in line


def test_nul_in_the_server_address_from_the_config_file(home):
    path = _config(home, b'server = "127.0.0.1\\u0000:50051"\n')
    env = _env(home)
    del env["DLHEIR_SERVER"]  # the file's value is the one used
    _one_line(_dlheir(env, "status"), str(path), "server", "NUL")


def test_control_character_in_a_path_from_the_config_file(home):
    path = _config(home, b'grant = "grant.bin\\n"\n')
    _one_line(_dlheir(_env(home), "user", "search", "query.png"), str(path), "grant", "control character")


# --- the environment (a NUL cannot be passed in one: other bytes and lengths can) --------------

def test_env_value_not_utf8(home):
    _one_line(_dlheir(_env(home, DLHEIR_SERVER=b"\xff:50051"), "status"), "$DLHEIR_SERVER", "server", "not UTF-8")


def test_env_path_not_utf8(home):
    _one_line(_dlheir(_env(home, DLHEIR_TLS_CA=b"ca\xff.pem"), "status"), "$DLHEIR_TLS_CA", "tls_ca", "not UTF-8")


def test_env_path_too_long(home):
    line = _one_line(_dlheir(_env(home, DLHEIR_TLS_CA="a" * 5000), "status"), "$DLHEIR_TLS_CA", "too long")
    assert len(line) < 300  # the 5000 characters are not repeated


# --- the TLS CA file ---------------------------------------------------------------------------

def test_tls_ca_missing(home):
    missing = home / "nope" / "ca.pem"
    line = _one_line(_dlheir(_env(home, DLHEIR_TLS_CA=str(missing)), "status"), "$DLHEIR_TLS_CA", str(missing),
                     "no such file")
    assert "PEM" in line and "--tls-cert" in line  # what to give instead


def test_tls_ca_missing_from_the_config_file_is_named_relative_to_it(home):
    path = _config(home, b'tls_ca = "ca.pem"\n')
    _one_line(_dlheir(_env(home), "status"), f"config file {path}", "tls_ca", str(home / "keys" / "ca.pem"))


def test_tls_ca_is_a_folder(home):
    _one_line(_dlheir(_env(home, DLHEIR_TLS_CA=str(home)), "status"), "$DLHEIR_TLS_CA", str(home), "cannot read")


@pytest.mark.parametrize("content", [b"not a certificate\n", b"", bytes(range(256)),
                                     b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"],
                         ids=["text", "empty", "binary", "bad-base64"])
def test_tls_ca_not_a_pem_certificate(home, content):
    ca = home / "ca.pem"
    ca.write_bytes(content)
    line = _one_line(_dlheir(_env(home, DLHEIR_TLS_CA=str(ca)), "status"), "$DLHEIR_TLS_CA", str(ca),
                     "not a PEM certificate")
    assert "connection refused" not in line and "unreachable" not in line


def test_tls_ca_not_pem_refused_by_a_command_that_connects(home):
    """``owner create-collection`` builds a CloudClient: refused before it, not as 'connection refused'."""
    ca = home / "ca.pem"
    ca.write_text("junk\n")
    env = _env(home, DLHEIR_TLS_CA=str(ca), DLHEIR_ADMIN_TOKEN="a" * 32)
    _one_line(_dlheir(env, "owner", "create-collection", "c", "--bits", "48"), "tls_ca", "not a PEM certificate")


def test_tls_ca_given_to_the_api_is_checked_too(tmp_path):
    """A ``tls_ca`` passed to CloudClient directly (no config): the same one-line UserError."""
    from dlheir.client.cloud import CloudClient
    from dlheir.errors import UserError

    ca = tmp_path / "ca.pem"
    ca.write_text("junk\n")
    with pytest.raises(UserError, match="tls_ca: the TLS CA file .* is not a PEM certificate"):
        CloudClient(f"127.0.0.1:{free_port()}", tls_ca=str(ca))
    with pytest.raises(UserError, match="tls_ca: cannot read the TLS CA file .*no such file"):
        CloudClient(f"127.0.0.1:{free_port()}", tls_ca=str(tmp_path / "missing.pem"))


def test_a_good_tls_ca_still_works(home):
    """The checks refuse nothing valid: with the server's certificate as CA, status reaches it over TLS."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    (home / "cert").mkdir()
    cert, key = self_signed_certificate(home / "cert")
    with CloudServerProcess(home / "cloud", tls_cert=cert, tls_key=key) as server:
        env = _env(home, DLHEIR_TLS_CA=str(cert), DLHEIR_SERVER=server.address)
        proc = _dlheir(env, "status")
    assert "Traceback" not in proc.stderr and "tls_ca" not in proc.stderr, proc.stderr
    cloud = next(line for line in proc.stdout.splitlines() if line.startswith("cloud server"))
    assert "serving" in cloud, proc.stdout
