"""`dlheir bench search`: top-k through the cloud server vs FAISS in-process on the same codes."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="server search latency/throughput vs in-process FAISS, plus upload speed")
    p.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes (default 10000,100000,1000000)")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--queries", type=int, default=300, help="single queries timed per size")
    p.add_argument("--batch-queries", type=int, default=1000, help="queries in one batched request")
    p.add_argument("--blob-bytes", type=int, default=1024, help="size of each uploaded blob")
    p.add_argument("--out-dir", default="results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import faiss
    import numpy as np

    from dlheir.benchmarks.common import bar_plot, latency_stats, save_json, table, time_calls
    from dlheir.client.cloud import CloudClient
    from dlheir.codes import code_bytes, validate_bits
    from dlheir.server.index import BinaryIndex
    from dlheir.server.testing import run_cloud_server

    validate_bits(args.bits)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    L = code_bytes(args.bits)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (sizes[-1], L), dtype=np.uint8)
    if args.bits % 8:
        codes[:, -1] &= (0xFF << (8 - args.bits % 8)) & 0xFF
    queries = rng.integers(0, 256, (max(args.queries, args.batch_queries), L), dtype=np.uint8)
    blob = rng.bytes(args.blob_bytes)
    rows, uploads = [], []
    with tempfile.TemporaryDirectory() as tmp, run_cloud_server(Path(tmp) / "cloud") as server:
        admin = CloudClient(server.address)
        owner_token, _ = admin.create_collection("bench", args.bits, server.admin_token)
        client = CloudClient(server.address, owner_token)
        have = 0
        for size in sizes:
            t0 = time.perf_counter()
            n = size - have
            for _ in client.upload("bench", ((i, codes[i].tobytes(), blob, {}) for i in range(have, size)),
                                   batch_size=2000):
                pass
            secs = time.perf_counter() - t0
            have = size
            uploads.append({"size": size, "items": n, "items_per_s": n / secs,
                            "mb_per_s": n * (args.blob_bytes + L) / 1e6 / secs})
            # through the server: one query per request, then one batched request
            single = time_calls(lambda it=iter(range(10**9)): client.search(
                "bench", queries[next(it) % args.queries][None, :], args.k), args.queries, warmup=5)
            batch_secs = time_calls(lambda: client.search("bench", queries[:args.batch_queries], args.k), 3, warmup=1)
            # in-process baselines on the same codes: plain FAISS flat index, and our padded + sharded index
            flat = faiss.IndexBinaryFlat(L * 8)
            flat.add(codes[:size])
            faiss.omp_set_num_threads(1)
            flat_single = time_calls(lambda it=iter(range(10**9)): flat.search(
                queries[next(it) % args.queries][None, :], args.k), args.queries, warmup=5)
            faiss.omp_set_num_threads(0 or __import__("os").cpu_count())
            flat_batch = time_calls(lambda: flat.search(queries[:args.batch_queries], args.k), 3, warmup=1)
            faiss.omp_set_num_threads(1)
            ours = BinaryIndex(args.bits)
            ours.add(np.arange(size), codes[:size])
            ours_single = time_calls(lambda it=iter(range(10**9)): ours.search(
                queries[next(it) % args.queries][None, :], args.k), args.queries, warmup=5)
            for name, s, b in (("server (gRPC)", single, batch_secs), ("faiss flat in-process", flat_single, flat_batch),
                               ("sharded index in-process", ours_single, None)):
                st = latency_stats(s)
                rows.append({"size": size, "path": name, **st,
                             "batch_qps": args.batch_queries / float(np.median(b)) if b is not None else float("nan")})
            print(f"size {size}: server p50 {rows[-3]['p50_ms']:.3f} ms, faiss flat p50 {rows[-2]['p50_ms']:.3f} ms, "
                  f"sharded p50 {rows[-1]['p50_ms']:.3f} ms", flush=True)
    print(table(rows, [("size", "codes", "d"), ("path", "path", ""), ("p50_ms", "p50 ms", ".3f"),
                       ("p99_ms", "p99 ms", ".3f"), ("batch_qps", "batched q/s", ".0f")]))
    print(table(uploads, [("size", "to size", "d"), ("items", "items", "d"), ("items_per_s", "items/s", ".0f"),
                          ("mb_per_s", "MB/s", ".2f")]))
    big = [r for r in rows if r["size"] == sizes[-1]]
    target = 2 * big[1]["p50_ms"] + 1.0
    print(f"at {sizes[-1]} codes: server p50 {big[0]['p50_ms']:.3f} ms vs target 2 x FAISS ({big[1]['p50_ms']:.3f}) + 1 ms "
          f"= {target:.3f} ms -> {'met' if big[0]['p50_ms'] <= target else 'NOT met'}")
    path = save_json("bench_search", {"bits": args.bits, "k": args.k, "rows": rows, "uploads": uploads}, args.out_dir)
    labels = [str(s) for s in sizes]
    series = {name: [r["p50_ms"] for r in rows if r["path"] == name]
              for name in ("server (gRPC)", "faiss flat in-process", "sharded index in-process")}
    png = bar_plot(Path(args.out_dir) / "bench_search.png", f"single-query p50, {args.bits} bits, k={args.k}",
                   labels, series, "ms", log=True)
    print(f"written {path}, {png}")
    return 0
