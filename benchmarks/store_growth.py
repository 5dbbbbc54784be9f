"""The store's write path as it grows: seconds per million items with random 63-bit ids.

``python -m dlheir.benchmarks.store_growth MILLIONS [--store postgresql://...] [--blobs s3://...]``
times ``existing_ids`` + ``write_batch`` (what the server does per Upload batch) for batches of
10,000 random ids with 48-bit codes and 16-byte blobs, straight against the store (no server, no
gRPC), and prints per million: items/s, the two calls' seconds, the store's files, the bytes this
process wrote (``/proc/self/io``) and the load; then the time to read every code back (the index
rebuild at start). The embedded store goes into a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

BATCH = 10_000


def _written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])


def main(argv: list[str] | None = None) -> int:
    from dlheir.server.store import open_store

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("millions", type=int)
    p.add_argument("--store", default=None, help="postgresql://... (default: the embedded SQLite store)")
    p.add_argument("--blobs", default=None, help="with --store: s3://BUCKET?endpoint=URL")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="dlheir-store-growth-")
    rng = np.random.default_rng(7)
    blob = b"\x01" * 16
    try:
        store = open_store(folder, integrity_check=False, store_url=args.store, blobs_url=args.blobs)
        store.create_collection("bench", 48, "x", "y")
        for m in range(args.millions):
            start, written, t_exist, t_write = time.perf_counter(), _written(), 0.0, 0.0
            for _ in range(1_000_000 // BATCH):
                ids = [int(x) for x in rng.integers(0, 2**63 - 1, BATCH, dtype=np.int64)]
                codes = rng.integers(0, 256, (BATCH, 6), dtype=np.uint8)
                t0 = time.perf_counter()
                store.existing_ids("bench", ids)
                t1 = time.perf_counter()
                store.write_batch("bench", [(i, codes[k].tobytes(), blob, {}) for k, i in enumerate(ids)], replace=False)
                t_exist, t_write = t_exist + t1 - t0, t_write + time.perf_counter() - t1
            size = sum(f.stat().st_size for f in os.scandir(folder) if f.is_file())
            print(f"million {m + 1}: {1e6 / (time.perf_counter() - start):,.0f} items/s (existing_ids {t_exist:.1f} s, "
                  f"write_batch {t_write:.1f} s), files {size / 1e6:.0f} MB, written {(_written() - written) / 1e9:.2f} GB, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        t0 = time.perf_counter()
        n = sum(len(ids) for ids, _ in store.codes("bench"))
        print(f"every code read back: {n:,} in {time.perf_counter() - t0:.1f} s")
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
