"""Ports and child processes, one helper each (servers, launchers, tests and benchmarks use these).

* ``free_port``: a port nobody listens on now (bind port 0, read it back, close);
* ``stop_process``: stop a child (``subprocess.Popen``): a polite signal (SIGTERM, or SIGINT for
  programs that treat it as their clean stop), wait, then SIGKILL;
* ``stop_pid``: the same for a process that is not our child (started by an earlier command,
  known by the pid it left in a file).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (another process may take it before it is used:
    servers that can report their port should bind port 0 instead)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Send ``sig`` to a running child, wait up to ``timeout`` s for it to exit, then SIGKILL it.
    Returns its exit code (negative: killed by that signal); a child that already exited is only reaped."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Send ``sig`` to process ``pid`` (not our child), wait up to ``timeout`` s for it to go, then
    SIGKILL it. Returns False if it was not running in the first place."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.kill(pid, 0)  # ProcessLookupError once it is gone
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
