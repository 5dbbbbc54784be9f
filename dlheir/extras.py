"""The optional parts of the install (pyproject's extras) and the one-line refusal when one is missing.

The base install (``pip install dlheir``) runs the cloud server, the owner and user clients and
Triton; training, evaluation, export and the benchmarks that run the network in-process need
the ``train`` extra (PyTorch). A command that needs an extra says so in one line before it
imports anything heavy; the check only looks for the modules (``find_spec``), it imports none.
"""

from __future__ import annotations

import argparse
import importlib.util

from dlheir.errors import UserError

# extra -> the top-level modules it provides (what find_spec looks for)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "torchvision", "sklearn"),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """UserError naming the install command when ``extra``'s modules are missing; ``what`` is the
    command or feature that needs them (``'dlheir train'``)."""
    absent = missing(extra)
    if absent:
        raise UserError(f"{what} needs {', '.join(absent)} (the '{extra}' extra), which this install leaves out: "
                        f"pip install 'dlheir[{extra}]' (make install installs everything)")


def needs(parser: argparse.ArgumentParser, extra: str) -> None:
    """Mark a subcommand as needing ``extra``: ``dlheir.cli.main`` checks it before running the command."""
    parser.set_defaults(needs_extra=extra, needs_what=parser.prog)
