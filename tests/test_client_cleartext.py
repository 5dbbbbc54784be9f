"""No bearer token crosses the network in the clear unless asked for (issue 19, item 7).

Without a TLS CA, the cloud client refuses a server address that is not loopback when it is
built, before any connection, with one line naming the address and the fix (``tls_ca`` /
``$DLHEIR_TLS_CA``, or ``--insecure``); ``--insecure``, ``$DLHEIR_INSECURE`` or ``insecure`` in
the config file opt in. The CLI tests run the real ``dlheir`` with its per-user folders in a
temporary one; the opt-in tests try a closed port of a non-loopback address of this machine
(no server is bound off loopback), and are skipped where it has none.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dlheir.client.api import status
from dlheir.client.cloud import CloudClient
from dlheir.errors import UserError
from dlheir.netaddr import is_loopback, is_loopback_target
from dlheir.procs import free_port

FAR = "198.51.100.1:50051"  # TEST-NET-2: never this machine; nothing is sent to it anyway
TOKEN = "t" * 32


def _env(home: Path, **settings: str) -> dict:
    """The parent's environment less every DLHEIR_ and XDG_ variable, with the per-user folders in
    ``home``, Triton on a closed port, an admin token (sent to the server by 'collections list') and
    ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLHEIR_", "XDG_"))}
    env.update(HOME=str(home), DLHEIR_HOME=str(home / "keys"), DLHEIR_STATE=str(home / "state"),
               DLHEIR_TRITON=f"127.0.0.1:{free_port()}", DLHEIR_ADMIN_TOKEN=TOKEN)
    env.update(settings)
    return env


def _dlheir(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", *args], capture_output=True, text=True,
                          errors="backslashreplace", timeout=120, env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlheir: error: "), proc.stderr
    return lines[0]


def _refused(proc: subprocess.CompletedProcess, address: str) -> None:
    """The refusal itself, not a connection that was tried and failed."""
    line = _one_line(proc)
    assert address in line and "without TLS" in line and "--insecure" in line and "DLHEIR_TLS_CA" in line, line
    assert "cannot reach" not in line and "UNAVAILABLE" not in line, line


def _local_address() -> str | None:
    """A non-loopback IP address of this machine, or None."""
    candidates = []
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.51.100.1", 9))  # UDP: no packet is sent, only a route is chosen
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    for ip in candidates:
        if ":" not in ip and not is_loopback(ip):
            try:
                with socket.socket() as s:
                    s.bind((ip, 0))
            except OSError:
                continue
            return ip
    return None


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "keys").mkdir()
    return tmp_path


# --- the rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1:1", "127.1.2.3:50051", "localhost:50051", "[::1]:50051",
                                     "dns:///localhost:50051", "ipv4:127.0.0.1:1", "unix:/tmp/dlheir.sock"])
def test_loopback_targets(address):
    assert is_loopback_target(address)


@pytest.mark.parametrize("address", [FAR, "192.0.2.1:1", "10.0.0.1:50051", "example.com:50051", "[2001:db8::1]:1",
                                     "dns:///example.com:50051", "dns://127.0.0.1/example.com:50051",
                                     "ipv4:127.0.0.1:1,10.0.0.1:1", "0.0.0.0:50051", "localhost.example.com:1"])
def test_non_loopback_targets(address):
    assert not is_loopback_target(address)


def test_cloud_client_refuses_a_non_loopback_address_without_tls():
    with pytest.raises(UserError) as err:
        CloudClient("192.0.2.1:1")
    assert "192.0.2.1:1" in str(err.value) and "--insecure" in str(err.value) and "\n" not in str(err.value)
    CloudClient("127.0.0.1:1").close()
    CloudClient("192.0.2.1:1", insecure=True).close()


def test_status_reports_the_refusal_without_raising(home, monkeypatch):
    from dlheir import config as _config

    monkeypatch.setenv("DLHEIR_HOME", str(home / "keys"))
    cfg = _config.load(env={"DLHEIR_TRITON": f"127.0.0.1:{free_port()}"})
    st = status(server=FAR, config=cfg)
    assert not st.server.up and "without TLS" in st.server.detail and FAR in st.server.detail
    assert not cfg.insecure() and cfg.insecure(True)


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_refuses_a_non_loopback_server_without_tls(home):
    _refused(_dlheir(_env(home), "collections", "list", "--server", FAR), FAR)
    _refused(_dlheir(_env(home, DLHEIR_SERVER=FAR), "collections", "list"), FAR)
    _refused(_dlheir(_env(home, DLHEIR_SERVER=FAR, DLHEIR_INSECURE="false"), "collections", "list"), FAR)


def test_cli_status_shows_the_refusal(home):
    proc = _dlheir(_env(home), "status", "--server", FAR)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("cloud server"))
    assert "DOWN" in line and "without TLS" in line and "--insecure" in line, proc.stdout


def test_cli_bad_insecure_setting_is_one_line(home):
    line = _one_line(_dlheir(_env(home, DLHEIR_INSECURE="maybe"), "collections", "list", "--server", FAR))
    assert "$DLHEIR_INSECURE" in line and "true or false" in line, line
    (home / "keys" / "config.toml").write_text('insecure = "sometimes"\n')
    line = _one_line(_dlheir(_env(home), "collections", "list", "--server", FAR))
    assert "config.toml" in line and "insecure" in line and "true or false" in line, line


def test_cli_insecure_tries_to_connect(home):
    """With the opt-in the client connects: to a closed port of this machine's non-loopback
    address, the one-line 'cannot reach' error instead of the refusal."""
    ip = _local_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    address = f"{ip}:{free_port()}"
    _refused(_dlheir(_env(home), "collections", "list", "--server", address), address)
    line = _one_line(_dlheir(_env(home), "collections", "list", "--server", address, "--insecure"))
    assert "cannot reach" in line and address in line and "without TLS" not in line, line


def test_cli_every_opt_in_is_honoured(home):
    """Each way of opting in (flag, environment, config file as a TOML boolean or string) makes the
    client try the connection (a closed port of this machine's non-loopback address: 'cannot
    reach'), where without it the client refuses. No server is bound off loopback in the tests."""
    ip = _local_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    address = f"{ip}:{free_port()}"
    env = _env(home)
    _refused(_dlheir(env, "collections", "list", "--server", address), address)
    for extra, settings in (([], {"DLHEIR_INSECURE": "1"}), (["--insecure"], {}),
                            ([], {"DLHEIR_INSECURE": "true", "DLHEIR_SERVER": address})):
        args = ["collections", "list", *extra] + ([] if "DLHEIR_SERVER" in settings else ["--server", address])
        line = _one_line(_dlheir({**env, **settings}, *args))
        assert "cannot reach" in line and "without TLS" not in line, (settings, line)
    for text in ("insecure = true\n", 'insecure = "true"\n'):
        (home / "keys" / "config.toml").write_text(text)
        line = _one_line(_dlheir(env, "collections", "list", "--server", address))
        assert "cannot reach" in line and "without TLS" not in line, (text, line)
