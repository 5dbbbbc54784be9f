"""dlheir.procs: the one free_port and the one "signal, wait, then SIGKILL" used by every launcher."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from dlheir.procs import free_port, stop_pid, stop_process

# a child that announces itself, then either exits cleanly on SIGTERM or ignores it
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
print("ready", flush=True)
time.sleep(120)
"""


def _child(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # its handler is installed
    return proc


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_stop_process_signals_then_kills():
    polite = _child("exit")
    assert stop_process(polite, signal.SIGTERM, timeout=30) == 3  # its own clean exit
    stubborn = _child("ignore")
    assert stop_process(stubborn, signal.SIGTERM, timeout=0.5) == -signal.SIGKILL
    assert stop_process(stubborn) == -signal.SIGKILL  # already stopped: only reaped


def test_stop_pid_of_a_process_that_is_gone():
    proc = _child("exit")
    pid = proc.pid
    stop_process(proc)
    assert stop_pid(pid) is False
