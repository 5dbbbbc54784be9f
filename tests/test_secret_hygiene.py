"""Server-side and owner-side secret hygiene (issue 19, item 8).

1. ``owner grant`` takes no token on the command line (argv shows in ``ps``): ``--reader-token``
   is refused; ``--reader-token-file`` (mode 0600) or ``$DLHEIR_READER_TOKEN`` give it.
2. The cloud server keeps its data folder 0700 and every file it writes 0600, whatever the umask;
   an existing data folder others can access is tightened, with a WARNING.
3. The server refuses an ``--admin-token-file`` that group or others can access.
4. A ``$DLHEIR_HOME`` that group or others can write to is refused before any secret is read or
   written there.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dlheir.client.cloud import CloudClient
from dlheir.client.crypto import OwnerKeys, generate_user_keypair, open_grant
from dlheir.procs import free_port
from dlheir.server.app import READY_FILE
from dlheir.server.cli import wait_ready
from dlheir.server.testing import CloudServerProcess


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _env(home: Path, **extra: str) -> dict:
    """The parent's environment less every DLHEIR_/XDG_ variable, the per-user folders in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLHEIR_", "XDG_"))}
    env.update(HOME=str(home), DLHEIR_HOME=str(home / "keys"), DLHEIR_STATE=str(home / "state"),
               DLHEIR_SERVER=f"127.0.0.1:{free_port()}", DLHEIR_TRITON=f"127.0.0.1:{free_port()}")
    env.update(extra)
    return env


def _dlheir(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL, umask=0o022)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("dlheir: error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# --- 2. the server's files: 0700 folder, 0600 files, whatever the umask -----------------------

def _loose_files(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) that group or others can access."""
    found = [root, *root.rglob("*")]
    return [f"{p} {mode_of(p):04o}" for p in found if not p.is_symlink() and mode_of(p) & 0o077]


def test_server_files_are_private_under_umask_022(tmp_path):
    data = tmp_path / "cloud"
    data.mkdir(mode=0o755)  # an existing data folder others can read: tightened, with a WARNING
    os.chmod(data, 0o755)
    old = os.umask(0o022)  # the launcher's and the server's umask (inherited)
    try:
        server = CloudServerProcess(data).start()
    finally:
        os.umask(old)
    try:
        with CloudClient(server.address) as admin:
            owner_token, _ = admin.create_collection("c", 48, server.admin_token)
        with CloudClient(server.address, owner_token) as owner:
            items = [(i, bytes([i] * 6), b"blob-%d" % i, {}) for i in range(40)]
            list(owner.upload("c", items, batch_size=16))
        names = {p.name for p in data.iterdir()}
        assert {"store.sqlite3", "store.sqlite3-wal", "admin.token", "server.log"} <= names, names
    finally:
        server.stop()
    assert (data / "index").is_dir() and any((data / "index").iterdir())  # the snapshot taken at the stop
    assert mode_of(data) == 0o700
    assert _loose_files(data) == []
    log = (data / "server.log").read_text()
    assert "WARNING" in log and "tightened to 0700" in log and "0755" in log


def test_server_creates_its_data_folder_0700(tmp_path):
    data = tmp_path / "new" / "cloud"
    proc = subprocess.Popen([sys.executable, "-m", "dlheir.server", "--data-dir", str(data), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            umask=0o022, env={k: v for k, v in os.environ.items() if k != "DLHEIR_ADMIN_TOKEN"})
    try:
        wait_ready(data / READY_FILE, proc)
        assert mode_of(data) == 0o700 and mode_of(data.parent) == 0o700
        assert mode_of(data / "admin.token") == 0o600 and mode_of(data / "store.sqlite3") == 0o600
        assert mode_of(data / READY_FILE) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _loose_files(data) == []
    assert b"tightened" not in err  # a folder it made itself is private from the start


# --- 3. the admin token file's mode ----------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o604])
def test_server_refuses_admin_token_file_others_can_access(tmp_path, mode):
    token = tmp_path / "admin.token"
    token.write_text("x" * 40 + "\n")
    os.chmod(token, mode)
    proc = subprocess.run([sys.executable, "-m", "dlheir.server", "--data-dir", str(tmp_path / "cloud"),
                           "--port", str(free_port()), "--admin-token-file", str(token)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"chmod 600 {token}" in lines[0] and f"{mode:04o}" in lines[0] and str(token) in lines[0]


def test_server_accepts_a_0600_admin_token_file(tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("y" * 40 + "\n")
    os.chmod(token, 0o600)
    with CloudServerProcess(tmp_path / "cloud", extra_args=["--admin-token-file", str(token)]) as server:
        with CloudClient(server.address) as admin:
            admin.create_collection("c", 48, "y" * 40)


# --- 4. a $DLHEIR_HOME others can write to ----------------------------------------------------

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_home_others_can_write_to_is_refused(tmp_path, mode):
    env = _env(tmp_path)
    keys = tmp_path / "keys"
    keys.mkdir()
    os.chmod(keys, mode)
    for argv in (("owner", "init"), ("user", "keygen")):
        _one_line(_dlheir(env, *argv), str(keys), f"chmod 700 {keys}", "group or others")
    assert list(keys.iterdir()) == []  # nothing written there
    os.chmod(keys, 0o700)
    proc = _dlheir(env, "owner", "init")
    assert proc.returncode == 0, proc.stderr
    assert mode_of(keys / "owner.key") == 0o600


def test_home_readable_but_not_writable_by_others_is_used(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    os.chmod(keys, 0o755)
    proc = _dlheir(_env(tmp_path), "owner", "init")
    assert proc.returncode == 0, proc.stderr


# --- 1. owner grant: no reader token in argv ---------------------------------------------------

@pytest.fixture
def offline_grant(tmp_path):
    """(env, owner key, user public key, user private key) for an offline ``owner grant``."""
    home = tmp_path / "h"
    (home / "keys").mkdir(parents=True)
    key = tmp_path / "o.key"
    OwnerKeys.generate("photos").register("photos").save(key)  # photos registered, as create-collection does
    private, public = generate_user_keypair(tmp_path / "alice.pem")
    return _env(home), key, public, private


def test_reader_token_in_argv_is_refused(offline_grant, tmp_path):
    env, key, public, _ = offline_grant
    out = tmp_path / "g.bin"
    line = _one_line(_dlheir(env, "owner", "grant", "--key", key, "--user-pub", public, "--reader-token",
                             "sekrit-token", "--out", out), "--reader-token-file", "DLHEIR_READER_TOKEN", "ps")
    assert "sekrit-token" not in line and not out.exists()
    help_text = _dlheir(env, "owner", "grant", "--help").stdout
    assert "--reader-token-file" in help_text and "--reader-token " not in help_text


def test_reader_token_from_a_file_or_the_environment(offline_grant, tmp_path):
    env, key, public, private = offline_grant
    token = tmp_path / "reader.token"
    token.write_text("file-token-123\n")
    os.chmod(token, 0o644)  # a token file others can read is refused like every secret file
    out = tmp_path / "g1.bin"
    _one_line(_dlheir(env, "owner", "grant", "--key", key, "--user-pub", public, "--reader-token-file", token,
                      "--out", out), str(token), f"chmod 600 {token}")
    assert not out.exists()
    os.chmod(token, 0o600)
    proc = _dlheir(env, "owner", "grant", "--key", key, "--user-pub", public, "--reader-token-file", token,
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert open_grant(out.read_bytes(), private.read_bytes()).reader_token == "file-token-123"

    out2 = tmp_path / "g2.bin"
    proc = _dlheir({**env, "DLHEIR_READER_TOKEN": "env-token-456"}, "owner", "grant", "--key", key,
                   "--user-pub", public, "--out", out2)
    assert proc.returncode == 0, proc.stderr
    assert open_grant(out2.read_bytes(), private.read_bytes()).reader_token == "env-token-456"

    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    _one_line(_dlheir(env, "owner", "grant", "--key", key, "--user-pub", public, "--reader-token-file", empty,
                      "--out", tmp_path / "g3.bin"), str(empty), "empty")


def test_no_secret_flag_takes_a_value_in_argv():
    """Every flag of the CLIs whose name says it holds a token, passphrase or secret names a file or
    a variable (or is a switch), never the secret itself."""
    import argparse

    from dlheir.cli import build_parser
    from dlheir.server.app import add_server_args

    def flags(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    yield from flags(child)
            elif action.help != argparse.SUPPRESS:
                yield from ((o, action) for o in action.option_strings)

    server = argparse.ArgumentParser()
    add_server_args(server)
    for parser in (build_parser(), server):
        for option, action in flags(parser):
            if any(w in option for w in ("token", "passphrase", "secret", "password")):
                is_path = option == "--tokens"  # the tokens file from create-collection
                assert action.nargs == 0 or is_path or option.endswith(("-file", "-env")), option
