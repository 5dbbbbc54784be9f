"""Progress of long steps, on a terminal and in a log file alike.

On a terminal: tqdm's bar. Without one (output to a file, ``make demo > demo.log``): one plain
line at most every ``LOG_INTERVAL`` seconds and one at the end, each with the count, the elapsed
time and an estimate of the time left, so that a log shows the work moving. Nothing under ``-q``.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

from dlheir.config import quiet

LOG_INTERVAL = 30.0  # seconds between two lines without a terminal
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, about {remaining} left{postfix}"


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:  # tqdm's close redraws the last state once more
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             leave: bool = True, log: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm over ``iterable`` (or for ``total`` updates): a bar on a terminal, timed lines in a log
    (``log=False``: nothing without a terminal, for short inner steps), nothing under ``-q``."""
    stream = sys.stderr
    if kwargs.pop("disable", False) or quiet() or not (stream.isatty() or log):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True, **kwargs)
    # disable=False: dlheir.config sets TQDM_DISABLE without a terminal, for bars made elsewhere
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=False, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=False, file=_Lines(stream), mininterval=LOG_INTERVAL,
                maxinterval=LOG_INTERVAL, bar_format=LOG_FORMAT, leave=True, dynamic_ncols=False, **kwargs)
