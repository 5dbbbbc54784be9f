"""The ``dlheir`` console script: one entry point, one subcommand group per component.

Each listed module exposes ``register(subparsers)`` which adds its subcommands and sets
``func`` (a callable taking the parsed ``argparse.Namespace``, returning an exit code or
None). Modules must stay import-light (no torch, grpc or faiss at import time) so that
``dlheir --help`` is instant; heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from dlheir import __version__
from dlheir.contract import ContractError
from dlheir.errors import UserError

COMMAND_MODULES = (
    "dlheir.export.cli",  # train, evaluate, model-stats, export
    "dlheir.triton.cli",  # triton start/stop, hash
    "dlheir.server.cli",  # server start/stop
    "dlheir.client.cli",  # owner ..., user ...
    "dlheir.benchmarks.cli",  # bench ...
    "dlheir.demo",  # demo
    "dlheir.check",  # check gpu
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlheir",
        description=(
            "Privacy-preserving image retrieval with deep hashing (DLHEIR): train and export the "
            "hashing network, serve it with Triton, keep encrypted images and binary codes on a "
            "gRPC cloud server, and search it as an owner or an authorized user."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dlheir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # a group given without its subcommand: show that group's help
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        code = args.func(args)
    except (UserError, ContractError) as exc:
        print(f"dlheir: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlheir: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
