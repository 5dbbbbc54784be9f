"""The ``dlheir`` console script: one entry point, one subcommand group per component.

Each listed module exposes ``register(subparsers)`` which adds its subcommands and sets
``func`` (a callable taking the parsed ``argparse.Namespace``, returning an exit code or
None). Modules must stay import-light (no torch, grpc or faiss at import time) so that
``dlheir --help`` is instant; heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    _add_global_flags(parser, top=True)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q/--config on the top level and on every subcommand (``dlheir -q owner upload`` and
    ``dlheir owner upload -q`` both work); a subcommand's copy does not reset the top level's."""
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("output and settings (every command)")
    group.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                       help="more log output (-v INFO, -vv DEBUG)")
    group.add_argument("-q", "--quiet", action="count", default=0 if top else argparse.SUPPRESS,
                       help="errors only; no progress bars")
    group.add_argument("--config", metavar="FILE", default=default,
                       help="client config file (TOML; default $DLHEIR_CONFIG, else $DLHEIR_HOME/config.toml)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _add_global_flags(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dlheir import config

    config.set_verbosity(-1 if args.quiet else min(args.verbose, 2))
    if not getattr(args, "func", None):
        # a group given without its subcommand: show that group's help
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    args.argv = list(argv if argv is not None else sys.argv[1:])  # which flags were given (settings files)
    try:
        if getattr(args, "needs_extra", None):
            from dlheir import extras

            extras.require(args.needs_extra, f"'{args.needs_what}'")
        code = args.func(args)
        sys.stdout.flush()  # a reader gone early (``| head``) shows here, not at interpreter exit
    except BrokenPipeError:
        # the standard handling: nothing more can be written there, so no traceback and no
        # "Exception ignored" at exit; 141 = 128 + SIGPIPE, as a tool killed by the signal
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UserError, ContractError) as exc:
        print(f"dlheir: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlheir: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
