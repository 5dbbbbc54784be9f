"""`dlheir bench ...`: each benchmark prints a table beside its baseline and saves JSON + PNG.

Every module in ``BENCH_MODULES`` exposes ``register(bench_subparsers)``. Shared helpers (timing loop,
percentiles, tables, JSON and PNG output) live in ``dlheir.benchmarks.common``.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = (
    "dlheir.benchmarks.inference",  # PyTorch eager vs ONNX Runtime, in-process
    "dlheir.benchmarks.hash",  # through Triton vs in-process
    "dlheir.benchmarks.search",  # through the cloud server vs FAISS in-process
    "dlheir.benchmarks.fronts",  # several fronts over one PostgreSQL store
    "dlheir.benchmarks.e2e",  # the paper's efficiency figures
    "dlheir.benchmarks.leakage",  # what the server can recover of the code transform
    "dlheir.benchmarks.private",  # private-ranking mode (sync + local ranking) vs server-ranked
)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results/ JSON + PNG, baseline side by side)",
                           description="Benchmarks: each prints a table with its baseline measured in the same "
                                       "run and writes JSON (and a PNG) under results/.")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bsub)
