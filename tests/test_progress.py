"""Long steps show their progress in a log file too: without a terminal, timed plain lines with the
count, the elapsed time and the time left (dlheir/progress.py); nothing under -q."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, time
import dlheir.progress as p
from dlheir import config
config.set_verbosity(int(sys.argv[1]))  # as the CLI does: without a terminal it sets TQDM_DISABLE
p.LOG_INTERVAL = 0.05
for _ in p.progress(range(8), desc="epoch 1/3", unit="batch"):
    time.sleep(0.03)
"""


def _run(verbosity: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(verbosity)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr.splitlines()


def test_without_a_terminal_progress_is_timed_lines_with_the_time_left():
    lines = _run(0)
    assert len(lines) >= 3, lines  # the first, some in between, the last
    assert all("\r" not in line and line.startswith("epoch 1/3: ") for line in lines), lines
    assert "about" in lines[1] and "left" in lines[1] and "elapsed" in lines[1], lines
    assert lines[-1].startswith("epoch 1/3: 8/8 batch (100%)"), lines
    assert len(set(lines)) == len(lines), lines  # the closing redraw is not repeated


def test_quiet_shows_no_progress():
    assert _run(-1) == []
