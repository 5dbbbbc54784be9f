"""`dlheir bench search`: top-k through the cloud server vs FAISS in-process on the same codes.

For each collection size (the collection grows from one size to the next, so the upload
throughput of each step is measured too):

* ``server (gRPC)``: one query per Search request (p50/p99), and one batched request;
* ``faiss flat in-process``: a plain ``IndexBinaryFlat`` on the same (unpadded) codes, one
  FAISS call per query on one thread (FAISS answers a single query on one thread anyway), and
  the batch on all cores;
* ``sharded index in-process``: the server's own index class (padded, sharded, exact ties)
  called directly, which isolates the gRPC + protobuf cost.

Uses the shared helpers of ``dlheir.benchmarks.common`` (timing loop, percentiles, table,
JSON, PNG).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="server search latency/throughput vs in-process FAISS, plus upload speed",
                       description="Single-query p50/p99 and batched queries/s of top-k search through the cloud "
                                   "server, side by side with FAISS in-process on the same random codes, and the "
                                   "upload throughput (items/s, MB/s). Writes results/bench_search.json and .png.")
    p.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes, comma separated "
                                                                  "(default 10000,100000,1000000)")
    p.add_argument("--bits", type=int, default=48, help="code length in bits (default 48)")
    p.add_argument("-k", type=int, default=20, help="top k (default 20)")
    p.add_argument("--queries", type=int, default=300, help="single queries timed per size and path (default 300)")
    p.add_argument("--batch-queries", type=int, default=1000, help="queries in one batched request (default 1000)")
    p.add_argument("--blob-bytes", type=int, default=1024, help="size of each uploaded blob (default 1024)")
    p.add_argument("--upload-batch", type=int, default=2000, help="items per upload batch / ack (default 2000)")
    p.add_argument("--shards", type=int, default=None, help="server index shards (default: one per core)")
    p.add_argument("--out-dir", default="results", help="where JSON and PNG go (default results/)")
    p.set_defaults(func=run)


def _cycle(n: int):
    it = iter(range(10**12))
    return lambda: next(it) % n


def run(args: argparse.Namespace) -> int:
    import faiss
    import numpy as np

    from dlheir.benchmarks.common import bar_plot, latency_stats, save_json, table, time_calls
    from dlheir.client.cloud import CloudClient
    from dlheir.codes import code_bytes, validate_bits
    from dlheir.errors import UserError
    from dlheir.server.index import BinaryIndex, default_shards
    from dlheir.server.testing import run_cloud_server

    validate_bits(args.bits)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--sizes: comma-separated integers, got {args.sizes!r}") from None
    if not sizes or sizes[0] < 1 or args.k < 1 or args.queries < 1 or args.batch_queries < 1:
        raise UserError("--sizes, -k, --queries and --batch-queries must be positive")
    shards = args.shards or default_shards()
    L = code_bytes(args.bits)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (sizes[-1], L), dtype=np.uint8)
    queries = rng.integers(0, 256, (max(args.queries, args.batch_queries), L), dtype=np.uint8)
    if args.bits % 8:  # zero padding bits, as the code format says
        mask = (0xFF << (8 - args.bits % 8)) & 0xFF
        codes[:, -1] &= mask
        queries[:, -1] &= mask
    blob = rng.bytes(args.blob_bytes)
    single_q = queries[: args.queries]
    batch_q = queries[: args.batch_queries]
    rows, uploads = [], []
    server_args = ["--shards", str(shards)]
    print(f"search bench: sizes {sizes}, {args.bits} bits, k={args.k}, {shards} shard(s), "
          f"{args.blob_bytes}-byte blobs", flush=True)
    with tempfile.TemporaryDirectory(prefix="dlheir-bench-") as tmp, \
            run_cloud_server(Path(tmp) / "cloud", extra_args=server_args) as server:
        with CloudClient(server.address) as admin:
            owner_token, _ = admin.create_collection("bench", args.bits, server.admin_token)
        client = CloudClient(server.address, owner_token)
        have = 0
        for size in sizes:
            n = size - have
            t0 = time.perf_counter()
            for _ in client.upload("bench", ((i, codes[i].tobytes(), blob, {}) for i in range(have, size)),
                                   batch_size=args.upload_batch):
                pass
            secs = time.perf_counter() - t0
            have = size
            uploads.append({"size": size, "items": n, "seconds": secs, "items_per_s": n / secs,
                            "mb_per_s": n * (args.blob_bytes + L) / 1e6 / secs})
            # through the server: one query per request, then one batched request
            nxt = _cycle(args.queries)
            srv_single = time_calls(lambda: client.search("bench", single_q[nxt()][None, :], args.k),
                                    args.queries, warmup=10)
            srv_batch = time_calls(lambda: client.search("bench", batch_q, args.k), 3, warmup=1)
            # in-process baselines on the same codes
            flat = faiss.IndexBinaryFlat(L * 8)
            flat.add(codes[:size])
            faiss.omp_set_num_threads(1)
            nxt = _cycle(args.queries)
            flat_single = time_calls(lambda: flat.search(single_q[nxt()][None, :], args.k), args.queries, warmup=10)
            faiss.omp_set_num_threads(default_shards())
            flat_batch = time_calls(lambda: flat.search(batch_q, args.k), 3, warmup=1)
            faiss.omp_set_num_threads(1)  # as the server's index runs it
            del flat
            ours = BinaryIndex(args.bits, shards)
            ours.add(np.arange(size), codes[:size])
            nxt = _cycle(args.queries)
            ours_single = time_calls(lambda: ours.search(single_q[nxt()][None, :], args.k), args.queries, warmup=10)
            ours_batch = time_calls(lambda: ours.search(batch_q, args.k), 3, warmup=1)
            del ours
            for name, single, batch in (("server (gRPC)", srv_single, srv_batch),
                                        ("faiss flat in-process", flat_single, flat_batch),
                                        ("sharded index in-process", ours_single, ours_batch)):
                rows.append({"size": size, "path": name, **latency_stats(single),
                             "batch_qps": args.batch_queries / float(np.median(batch))})
            r = rows[-3:]
            print(f"size {size}: upload {uploads[-1]['items_per_s']:.0f} items/s; single-query p50 server "
                  f"{r[0]['p50_ms']:.3f} ms, faiss flat {r[1]['p50_ms']:.3f} ms, sharded {r[2]['p50_ms']:.3f} ms",
                  flush=True)
        client.close()
    print(table(rows, [("size", "codes", "d"), ("path", "path", ""), ("p50_ms", "p50 ms", ".3f"),
                       ("p99_ms", "p99 ms", ".3f"), ("batch_qps", "batched q/s", ".0f")]))
    print(table(uploads, [("size", "to size", "d"), ("items", "items", "d"), ("items_per_s", "items/s", ".0f"),
                          ("mb_per_s", "MB/s", ".2f")]))
    big = [r for r in rows if r["size"] == sizes[-1]]
    target = 2 * big[1]["p50_ms"] + 1.0
    met = big[0]["p50_ms"] <= target
    print(f"at {sizes[-1]} codes: server p50 {big[0]['p50_ms']:.3f} ms vs target 2 x FAISS flat "
          f"({big[1]['p50_ms']:.3f} ms) + 1 ms = {target:.3f} ms -> {'met' if met else 'NOT met'}")
    path = save_json("bench_search", {"bits": args.bits, "k": args.k, "shards": shards, "blob_bytes": args.blob_bytes,
                                      "upload_batch": args.upload_batch, "rows": rows, "uploads": uploads,
                                      "target": {"size": sizes[-1], "server_p50_ms": big[0]["p50_ms"],
                                                 "limit_ms": target, "met": met}}, args.out_dir)
    labels = [str(s) for s in sizes]
    series = {name: [r["p50_ms"] for r in rows if r["path"] == name]
              for name in ("server (gRPC)", "faiss flat in-process", "sharded index in-process")}
    png = bar_plot(Path(args.out_dir) / "bench_search.png",
                   f"single-query p50 latency, {args.bits}-bit codes, k={args.k}", labels, series, "ms", log=True)
    print(f"written {path}, {png}")
    return 0
