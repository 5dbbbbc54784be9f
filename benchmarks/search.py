"""`dlheir bench search`: top-k through the cloud server, side by side with its baselines.

For each kind of codes (``random``: uniform bits; ``structured``: clustered like a trained
network's codes, a few centres with bit noise) a fresh server is started and one collection
grows through the given sizes. At each size:

* ``bare gRPC``: the standard health check on the same channel, the floor of any call;
* ``server``: one query per Search request (p50/p99), and batched requests (queries/s);
* ``faiss flat``: a plain ``IndexBinaryFlat`` in-process on the same codes, one thread;
* ``index in-process``: the server's own index class called directly (flat shards, or exact
  multi-index hashing from ``--mih-min-items`` codes), which isolates the gRPC cost;
* the index the server chose (from its log), its RSS per stored item after a restart and again
  after the searches (minus an empty server's; SQLite's page cache is a few MB and not
  subtracted), the restart time after a clean shutdown (SIGTERM, start, until the health check
  answers SERVING: the index snapshot is loaded) and after a crash (SIGKILL, snapshot removed:
  the index is rebuilt from the store; SQLite's quick_check time from the log), the upload
  rate and the 1-minute load average (this machine is shared: say under what load);
* at the end, each goal of issue 11 with the figure measured for it (worst kind of codes).

Writes ``OUT_DIR/bench_search.json`` and ``OUT_DIR/bench_search.png``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="server search latency/throughput, index chosen, RSS, restart time, "
                                      "vs bare gRPC and in-process FAISS",
                       description="Single-query p50/p99 and batched queries/s of exact top-k search through the "
                                   "cloud server, beside a bare gRPC call and FAISS in-process on the same codes, "
                                   "for random and structured codes; also the index the server chose, RSS per item, "
                                   "restart time and upload rate. Writes OUT_DIR/bench_search.json and .png.")
    p.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes, comma separated "
                                                                  "(default 10000,100000,1000000)")
    p.add_argument("--codes", default="random,structured", help="kinds of codes: random, structured or both "
                                                               "(default both)")
    p.add_argument("--bits", type=int, default=48, help="code length in bits (default 48)")
    p.add_argument("-k", type=int, default=20, help="top k (default 20)")
    p.add_argument("--queries", type=int, default=300, help="single queries timed per size and path (default 300)")
    p.add_argument("--batch-queries", type=int, default=1000, help="queries in one batched request (default 1000)")
    p.add_argument("--blob-bytes", type=int, default=16, help="size of each uploaded blob (default 16)")
    p.add_argument("--upload-batch", type=int, default=10000, help="items per upload batch / ack (default 10000)")
    p.add_argument("--direct-from", type=int, default=None, metavar="SIZE",
                   help="from this collection size on, write the items into the stopped server's store directly "
                        "(Store.write_batch, the durable write of an Upload, without gRPC: 100M items in minutes "
                        "instead of ~45 min); the server then starts by rebuilding its index from the store")
    p.add_argument("--index-only-sizes", default="", metavar="SIZES",
                   help="further sizes (comma separated, e.g. 100000000) measured in-process only, not through the "
                        "server: the server's index class is built on them and timed on single queries, and its "
                        "first queries are checked exact against FAISS's flat scan (default: none)")
    p.add_argument("--shards", type=int, default=None, help="server index shards (default: one per core)")
    p.add_argument("--mih-min-items", type=int, default=None,
                   help="collection size from which the server uses multi-index hashing (default: the server's)")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "mih"),
                   help="the server's index choice (default auto: timed per collection)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="run the server on this store (postgresql://...; default: the embedded SQLite store)")
    p.add_argument("--blobs", default=None, metavar="URL", help="with --store: blobs in this object store (s3://...)")
    p.add_argument("--ids", default="sequential", choices=("sequential", "random"),
                   help="item ids: 0, 1, 2, ... (default) or random 63-bit integers in random order, as clients "
                        "choose them (the store's b-trees then take every batch all over their key range)")
    p.add_argument("--out-dir", default="results/bench_search", help="where JSON and PNG go "
                                                                    "(default results/bench_search)")
    p.set_defaults(func=run)


def make_codes(kind: str, n: int, bits: int, seed: int = 0):
    """``n`` codes of ``bits`` bits (packed, zero padding bits): uniform random, or structured
    (100 random centres, each bit flipped with probability 0.08, like a trained network's
    clustered codes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nbytes = -(-bits // 8)
    if kind == "random":
        codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    else:
        centres = rng.integers(0, 2, (100, nbytes * 8), dtype=np.uint8)
        codes = np.empty((n, nbytes), dtype=np.uint8)
        for start in range(0, n, 1_000_000):  # in chunks: the unpacked bits are 8x the codes
            m = min(n, start + 1_000_000) - start
            noisy = centres[rng.integers(0, 100, m)] ^ (rng.random((m, nbytes * 8)) < 0.08)
            codes[start:start + m] = np.packbits(noisy.astype(np.uint8), axis=1)
    if bits % 8:
        codes[:, -1] &= (0xFF << (8 - bits % 8)) & 0xFF
    return codes


def run(args: argparse.Namespace) -> int:
    import faiss
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dlheir.benchmarks.common import cycle_index, latency_stats, parse_sizes, save_json, table, time_calls
    from dlheir.client.cloud import CloudClient
    from dlheir.contract import code_bytes, validate_bits
    from dlheir.errors import UserError
    from dlheir.server import snapshot
    from dlheir.server.index import MIH_MIN_ITEMS, BinaryIndex, default_shards, faiss_threads
    from dlheir.server.testing import CloudServerProcess, proc_status_bytes

    validate_bits(args.bits)
    sizes = parse_sizes(args.sizes) if args.sizes.strip() else []
    index_only = parse_sizes(args.index_only_sizes, "--index-only-sizes") if args.index_only_sizes.strip() else []
    kinds = [k.strip() for k in args.codes.split(",") if k.strip()]
    if not kinds or set(kinds) - {"random", "structured"}:
        raise UserError(f"--codes: random, structured or both, got {args.codes!r}")
    if not (sizes or index_only) or min(sizes + index_only) < 1 or args.k < 1 or args.queries < 1 or args.batch_queries < 1 or args.blob_bytes < 0:
        raise UserError("--sizes (or --index-only-sizes), -k, --queries and --batch-queries must be positive, "
                        "--blob-bytes >= 0")
    shards = args.shards or default_shards()
    mih_min = args.mih_min_items or MIH_MIN_ITEMS
    code_len = code_bytes(args.bits)
    server_args = ["--shards", str(shards), "--mih-min-items", str(mih_min), "--index", args.index]
    backend = "embedded SQLite" if not args.store else "PostgreSQL" + (" + S3" if args.blobs else "")
    print(f"search bench on the {backend} store: {kinds} codes, sizes {sizes}, {args.bits} bits, k={args.k}, "
          f"{shards} shard(s), "
          f"multi-index hashing from {mih_min} codes, {args.blob_bytes}-byte blobs", flush=True)
    rows = []
    for kind in kinds:
        rows += [_index_only(kind, size, args, shards, mih_min) for size in index_only]
        if not sizes:
            continue
        codes = make_codes(kind, sizes[-1], args.bits, seed=0)
        item_ids = _make_ids(args.ids, sizes[-1])
        rng = np.random.default_rng(1)
        n_q = max(args.queries, args.batch_queries)
        flips = _query_flips(rng, n_q, args.bits)
        blob = np.random.default_rng(2).bytes(args.blob_bytes)
        with tempfile.TemporaryDirectory(prefix="dlheir-bench-") as tmp:
            server = CloudServerProcess(Path(tmp) / "cloud", extra_args=server_args, store_url=args.store or "",
                                        blobs_url=args.blobs or "").start()
            try:
                time.sleep(0.5)
                rss_empty = proc_status_bytes(server.process.pid)
                with CloudClient(server.address) as admin:
                    owner_token, _ = admin.create_collection("bench", args.bits, server.admin_token)
                have = 0
                # upload seconds (summed over the sizes: the searches between them not counted) at which
                # the collection reached each whole million: the rate of every successive million
                upload_clock, million_marks = 0.0, [0.0]
                for size in sizes:
                    queries = codes[rng.integers(0, size, n_q)] ^ flips
                    direct = args.direct_from is not None and size >= args.direct_from
                    t0 = time.perf_counter()
                    if direct:
                        server.stop()
                        _write_store(server.data_dir, "bench", codes, have, size, blob, args.upload_batch, args.store,
                                     args.blobs, item_ids)
                        upload_s = time.perf_counter() - t0
                        server.start()  # rebuilds the index from the store
                    else:
                        client = CloudClient(server.address, owner_token)
                        millions_before = len(million_marks)
                        for ack in client.upload("bench", ((int(item_ids[i]), codes[i].tobytes(), blob, {})
                                                           for i in range(have, size)), batch_size=args.upload_batch):
                            while ack.total_items >= len(million_marks) * 1_000_000:
                                million_marks.append(upload_clock + time.perf_counter() - t0)
                        upload_s = time.perf_counter() - t0
                        upload_clock += upload_s
                        client.close()
                        per_million = [round(1_000_000 / (b - a)) for a, b in
                                       zip(million_marks[millions_before - 1:-1], million_marks[millions_before:])]
                        if per_million:
                            print(f"{kind} upload to {size}: items/s per million (millions {millions_before} to "
                                  f"{len(million_marks) - 1}): {per_million}", flush=True)
                    # the server was started before this upload: its peak RSS so far is the upload's (or its start's)
                    rss_peak = proc_status_bytes(server.process.pid, "VmHWM")
                    rss_after_upload = proc_status_bytes(server.process.pid)
                    if not direct:
                        print(f"{kind} upload to {size} ({args.ids} ids): {(size - have) / upload_s:.0f} items/s; server "
                              f"RSS peak {rss_peak / 1e6:.0f} MB during it, {rss_after_upload / 1e6:.0f} MB after it "
                              f"({rss_peak / rss_after_upload:.2f}x)", flush=True)
                    n_new, have = size - have, size
                    server.stop()  # clean shutdown: the index snapshot is written
                    t0 = time.perf_counter()
                    server.start()  # ... and loaded
                    restart_s = time.perf_counter() - t0
                    started = _server_start(server)
                    time.sleep(0.5)
                    rss = proc_status_bytes(server.process.pid) - rss_empty
                    client = CloudClient(server.address, owner_token)
                    health = health_pb2_grpc.HealthStub(client.channel)
                    single = queries[: args.queries]
                    nxt = cycle_index(len(single))
                    bare = time_calls(lambda: health.Check(health_pb2.HealthCheckRequest()), args.queries, warmup=20)
                    srv = time_calls(lambda: client.search("bench", single[nxt()][None, :], args.k), args.queries,
                                     warmup=20)
                    bare2 = time_calls(lambda: health.Check(health_pb2.HealthCheckRequest()), args.queries, warmup=5)
                    batch = queries[: args.batch_queries]
                    srv_batch = time_calls(lambda: client.search("bench", batch, args.k), 3, warmup=1)
                    fetch_ids = item_ids[rng.integers(0, size, args.queries)]
                    nxt = cycle_index(len(fetch_ids))
                    fetched = time_calls(lambda: list(client.fetch("bench", [int(fetch_ids[nxt()])])), args.queries,
                                         warmup=5)
                    client.close()
                    rss_used = proc_status_bytes(server.process.pid) - rss_empty  # after searches (thread stacks...)
                    server.kill()  # a crash: the store has no newer write, but the snapshot is removed below
                    snapshot.snapshot_path(server.data_dir, "bench").unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    server.start()  # rebuilt from the store (SQLite rows, multi-index hash build)
                    rebuild_s = time.perf_counter() - t0
                    rebuilt = _server_start(server)
                    # in-process baselines on the same codes
                    n_base = args.queries if size <= 2_000_000 else min(args.queries, 30)
                    flat = faiss.IndexBinaryFlat(code_len * 8)
                    flat.add(codes[:size])
                    nxt = cycle_index(n_base)
                    with faiss_threads(1):
                        flat_t = time_calls(lambda: flat.search(single[nxt()][None, :], args.k), n_base, warmup=3)
                    flat = None  # frees its codes before the next index is built
                    ours = BinaryIndex(args.bits, shards, mih_min=mih_min, choose=args.index)
                    ours.add(np.arange(size), codes[:size], seal=False)
                    t0 = time.perf_counter()
                    ours.maybe_seal()
                    build_s = time.perf_counter() - t0
                    nxt = cycle_index(len(single))
                    ours_t = time_calls(lambda: ours.search(single[nxt()][None, :], args.k), args.queries, warmup=10)
                    index_kind = ours.kind
                    ours = None
                    bare_p50 = min(latency_stats(bare)["p50_ms"], latency_stats(bare2)["p50_ms"])
                    row = {"codes": kind, "size": size, "store": backend, "server_index": started["index"],
                           "index": index_kind, "fetch_p50_ms": latency_stats(fetched)["p50_ms"],
                           "bare_grpc_p50_ms": bare_p50,
                           "server_p50_ms": latency_stats(srv)["p50_ms"], "server_p99_ms": latency_stats(srv)["p99_ms"],
                           "server_batch_qps": args.batch_queries / float(np.median(srv_batch)),
                           "index_p50_ms": latency_stats(ours_t)["p50_ms"], "index_build_s": build_s,
                           "faiss_flat_p50_ms": latency_stats(flat_t)["p50_ms"],
                           "rss_bytes_per_item": rss / size, "rss_after_queries_bytes_per_item": rss_used / size,
                           "code_and_id_bytes": code_len + 8,
                           "restart_s": restart_s, "restart_from": started["from"],
                           "restart_rebuild_s": rebuild_s, "rebuild_quick_check_s": rebuilt["quick_check_s"],
                           "upload_items_per_s": n_new / upload_s, "filled": "store" if direct else "upload",
                           "upload_rate_per_million": [] if direct else per_million, "ids": args.ids,
                           "upload_rss_peak_bytes": rss_peak, "upload_rss_after_bytes": rss_after_upload,
                           "load_avg_1min": os.getloadavg()[0]}
                    row["server_overhead_ms"] = row["server_p50_ms"] - row["bare_grpc_p50_ms"]
                    rows.append(row)
                    print(f"{kind} {size}: server index {row['server_index']} (in-process copy {index_kind}); p50 bare "
                          f"gRPC {row['bare_grpc_p50_ms']:.3f} ms, server {row['server_p50_ms']:.3f} ms (+"
                          f"{row['server_overhead_ms']:.3f}; p99 {row['server_p99_ms']:.3f}), in-process index "
                          f"{row['index_p50_ms']:.3f} ms, FAISS flat {row['faiss_flat_p50_ms']:.3f} ms; batched "
                          f"{row['server_batch_qps']:.0f} q/s; RSS {row['rss_bytes_per_item']:.1f} B/item "
                          f"({row['rss_after_queries_bytes_per_item']:.1f} after queries); restart {restart_s:.1f} s "
                          f"(from {started['from']}), after a crash {rebuild_s:.1f} s (quick_check "
                          f"{rebuilt['quick_check_s']:.1f} s); {'store writes' if direct else 'upload'} "
                          f"{row['upload_items_per_s']:.0f} items/s; fetch one blob p50 {row['fetch_p50_ms']:.2f} ms; "
                          f"load {row['load_avg_1min']:.1f}", flush=True)
            finally:
                server.stop()
    print(table([r for r in rows if "server_p50_ms" in r], [
                       ("store", "store", ""), ("codes", "codes", ""), ("size", "size", "d"),
                       ("server_index", "server index", ""), ("fetch_p50_ms", "fetch p50 ms", ".2f"),
                       ("bare_grpc_p50_ms", "bare gRPC p50 ms", ".3f"), ("server_p50_ms", "server p50 ms", ".3f"),
                       ("server_overhead_ms", "overhead ms", ".3f"), ("server_p99_ms", "p99 ms", ".3f"),
                       ("index_p50_ms", "index in-proc ms", ".3f"), ("faiss_flat_p50_ms", "FAISS flat ms", ".3f"),
                       ("server_batch_qps", "batched q/s", ".0f"), ("rss_bytes_per_item", "RSS B/item", ".1f"),
                       ("rss_after_queries_bytes_per_item", "RSS after q", ".1f"), ("restart_s", "restart s", ".1f"),
                       ("restart_rebuild_s", "crash restart s", ".1f"), ("upload_items_per_s", "upload items/s", ".0f"),
                       ("filled", "filled by", ""), ("load_avg_1min", "load", ".1f")]))
    if index_only:
        print(table([r for r in rows if "exact_checked" in r],
                    [("codes", "codes", ""), ("size", "size", "d"), ("index", "index (in-process only)", ""),
                     ("index_build_s", "build s", ".1f"), ("index_p50_ms", "p50 ms", ".3f"),
                     ("index_p99_ms", "p99 ms", ".3f"), ("index_bytes_per_item", "bytes/item held", ".1f"),
                     ("exact_checked", "exact (checked)", ""), ("load_avg_1min", "load", ".1f")]))
    goals = _goals(rows, code_len)
    for line in goals:
        print(line)
    out = Path(args.out_dir)
    path = save_json("bench_search", {"store": backend, "bits": args.bits, "k": args.k, "shards": shards, "mih_min_items": mih_min,
                                      "blob_bytes": args.blob_bytes, "queries": args.queries,
                                      "batch_queries": args.batch_queries, "rows": rows, "goals": goals}, out)
    png = _plot(out / "bench_search.png", rows, kinds, args)
    print(f"written {path}, {png}")
    return 0


def _query_flips(rng, n: int, bits: int):
    """Queries are noisy copies of stored codes (a look-alike image): these masks flip 2 bits on
    average."""
    import numpy as np

    flips = np.packbits((rng.random((n, -(-bits // 8) * 8)) < 2 / bits).astype(np.uint8), axis=1)
    if bits % 8:
        flips[:, -1] &= (0xFF << (8 - bits % 8)) & 0xFF
    return flips


def _index_only(kind: str, size: int, args: argparse.Namespace, shards: int, mih_min: int) -> dict:
    """The server's index class in-process on ``size`` codes: build time, single-query p50/p99,
    bytes held per item, and the first queries checked against FAISS's flat scan (exact top k by
    (distance, id): the flat scan's k-th distance, then every item within it, ranked)."""
    import faiss
    import numpy as np

    from dlheir.benchmarks.common import cycle_index, latency_stats, time_calls
    from dlheir.contract import rank
    from dlheir.server.index import BinaryIndex, faiss_threads

    codes = make_codes(kind, size, args.bits, seed=0)
    rng = np.random.default_rng(1)
    queries = codes[rng.integers(0, size, args.queries)] ^ _query_flips(rng, args.queries, args.bits)
    index = BinaryIndex(args.bits, shards, mih_min=mih_min, choose=args.index)
    t0 = time.perf_counter()
    index.add(np.arange(size), codes, seal=False)
    index.maybe_seal()
    build_s = time.perf_counter() - t0
    nbytes = index.sealed.nbytes if index.sealed is not None else size * (index.nbytes + 8)
    nxt = cycle_index(len(queries))
    timings = time_calls(lambda: index.search(queries[nxt()][None, :], args.k), len(queries), warmup=5)
    n_check = min(5, len(queries))
    flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    flat.add(codes)
    del codes
    exact = 0
    with faiss_threads(1):
        for q, (ids, d) in zip(queries[:n_check], index.search(queries[:n_check], args.k)):
            kth = int(flat.search(q[None], args.k)[0][0, -1])
            lims, dist, pos = flat.range_search(q[None], kth + 1)
            top = rank(dist.astype(np.int64), pos)[:args.k]
            exact += list(ids) == list(pos[top]) and list(d) == list(dist[top])
    stats = latency_stats(timings)
    row = {"codes": kind, "size": size, "server_index": "(in-process only)", "index": index.kind,
           "index_p50_ms": stats["p50_ms"], "index_p99_ms": stats["p99_ms"], "index_build_s": build_s,
           "index_bytes_per_item": nbytes / size, "exact_checked": f"{exact}/{n_check}",
           "load_avg_1min": os.getloadavg()[0]}
    print(f"{kind} {size} in-process only: {index.kind}, built in {build_s:.1f} s, p50 {stats['p50_ms']:.3f} ms, "
          f"p99 {stats['p99_ms']:.3f} ms, {row['index_bytes_per_item']:.1f} B/item held; exact top-{args.k} on "
          f"{exact} of {n_check} queries checked against FAISS flat; load {row['load_avg_1min']:.1f}", flush=True)
    if exact != n_check:
        raise RuntimeError(f"the index's top {args.k} differs from the flat scan's on {n_check - exact} queries")
    return row


def _make_ids(kind: str, n: int):
    """``n`` distinct item ids: 0..n-1, or random non-negative 63-bit integers in random order."""
    import numpy as np

    if kind == "sequential":
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(3)
    while True:
        ids = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
        if len(np.unique(ids)) == n:  # a repeat among 10M is a few-in-a-million chance: draw again
            return ids


def _write_store(data_dir: Path, name: str, codes, start: int, end: int, blob: bytes, batch: int,
                 store_url: str | None = None, blobs_url: str | None = None, ids=None) -> None:
    """Items start..end-1 (id ids[i], default i; code i) written into the stopped server's store, in
    transactions of ``batch`` items, as an Upload writes them (without gRPC and the index)."""
    from dlheir.server.store import open_store

    store = open_store(data_dir, integrity_check=False, store_url=store_url, blobs_url=blobs_url)
    try:
        for at in range(start, end, batch):
            stop = min(end, at + batch)
            store.write_batch(name, [(i if ids is None else int(ids[i]), codes[i].tobytes(), blob, {})
                                     for i in range(at, stop)], replace=False)
    finally:
        store.close()


def _server_start(server) -> dict:
    """What the server's log says about its last start: the index it chose, whether it came from
    a snapshot or was rebuilt, and how long SQLite's quick_check took."""
    import re

    text = (server.data_dir / "server.log").read_text()
    # the last start's lines (the check runs beside the index load: its line comes after the load's)
    text = text[text.rindex(") starting on "):] if ") starting on " in text else text
    check = re.search(r"quick_check of .* passed in ([0-9.]+) s", text)
    ready = re.search(r"index ready in [0-9.]+ s: 'bench' \d+ items \(([a-z+]+)\)", text)
    return {"index": ready.group(1) if ready else "?", "from": "snapshot" if "loaded in" in text else "store",
            "quick_check_s": float(check.group(1)) if check else 0.0}


def _goals(rows: list[dict], code_len: int) -> list[str]:
    """Issue 11's goals, each with the figures measured in this run (worst kind of codes)."""
    def at(size: int, key: str, worst=max):
        values = [r[key] for r in rows if r["size"] == size and key in r]
        return worst(values) if values else None

    lines = []

    def goal(text: str, value, ok) -> None:
        if value is not None:
            lines.append(f"goal {text}: measured {value} -> {'met' if ok else 'NOT met'}")

    v = at(10_000, "server_overhead_ms")
    goal("server p50 at 10k within 0.15 ms of bare gRPC", None if v is None else f"+{v:.3f} ms", v is not None and v <= 0.15)
    for size, limit in ((1_000_000, 1.0), (10_000_000, 5.0), (100_000_000, 50.0)):
        v = at(size, "server_p50_ms")
        goal(f"server p50 at {size:,} <= {limit:g} ms", None if v is None else f"{v:.2f} ms", v is not None and v <= limit)
    v = at(100_000_000, "index_p50_ms")
    if v is not None and at(100_000_000, "server_p50_ms") is None:
        # what a request through the server cost above the index's own search, at the largest such cost
        over = max((r["server_p50_ms"] - r["index_p50_ms"] for r in rows if "server_p50_ms" in r), default=None)
        goal("server p50 at 100,000,000 <= 50 ms (in-process index p50 plus the largest cost of going through "
             "the server measured in this run: server p50 minus in-process index p50; not measured through the server)",
             f"{v:.2f} ms" + ("" if over is None else f" + {over:.2f} ms"), v + (over or 0) <= 50)
    v = at(1_000_000, "server_batch_qps", min)
    goal("batched >= 4,000 queries/s at 1M", None if v is None else f"{v:.0f} q/s", v is not None and v >= 4000)
    big = [r for r in rows if r["size"] >= 1_000_000 and "rss_after_queries_bytes_per_item" in r]
    if big:
        v = max(r["rss_after_queries_bytes_per_item"] for r in big)
        goal(f"RSS per item at 1M+ <= 2 x (code + id) = {2 * (code_len + 8)} B", f"{v:.1f} B",
             v <= 2 * (code_len + 8))
    rates = [r for r in rows if r.get("upload_rate_per_million")]
    if rates:
        worst = min(min(r["upload_rate_per_million"]) for r in rates)
        top = max(r["size"] for r in rates)
        goal(f"upload >= 30,000 items/s in every million up to {top:,} (issue 17; slowest million)",
             f"{worst:,} items/s", worst >= 30_000)
    peaks = [(r["upload_rss_peak_bytes"] / r["upload_rss_after_bytes"], r) for r in rows
             if r.get("upload_rss_after_bytes") and r.get("filled") == "upload"]
    if peaks:
        ratio, r = max(peaks, key=lambda p: p[0])
        goal("server peak RSS during an upload <= 2x its RSS after it (issue 17)",
             f"{r['upload_rss_peak_bytes'] / 1e6:.0f} MB / {r['upload_rss_after_bytes'] / 1e6:.0f} MB = {ratio:.2f}x",
             ratio <= 2)
    v = at(10_000_000, "restart_s")
    goal("restart to SERVING at 10M <= 10 s (clean shutdown)", None if v is None else f"{v:.1f} s",
         v is not None and v <= 10)
    v = at(10_000_000, "restart_rebuild_s")
    goal("restart to SERVING at 10M <= 10 s (after a crash: rebuilt)", None if v is None else f"{v:.1f} s",
         v is not None and v <= 10)
    if v is not None and any(r.get("store", "").startswith("PostgreSQL") for r in rows):
        goal("restart to SERVING at 10M <= 15 s on PostgreSQL (index rebuilt from the store; issue 17)",
             f"{v:.1f} s", v <= 15)
    return lines


def _plot(path: Path, rows: list[dict], kinds: list[str], args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["codes"] == kind]
        for key, label, style in (("server_p50_ms", "server p50 (gRPC)", "o-"),
                                  ("server_p99_ms", "server p99 (gRPC)", "o:"),
                                  ("index_p50_ms", "server's index in-process p50", "s-"),
                                  ("faiss_flat_p50_ms", "FAISS IndexBinaryFlat in-process p50", "^-"),
                                  ("bare_grpc_p50_ms", "bare gRPC call p50 (health check)", "x--")):
            have = [r for r in mine if key in r]  # sizes measured in-process only have no server figures
            if have:
                ax.plot([r["size"] for r in have], [r[key] for r in have], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("codes in the collection (log scale)")
        ax.set_ylabel("single-query latency, ms (log scale)")
        ax.set_title(f"{kind} {args.bits}-bit codes, exact top-{args.k}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    from dlheir.benchmarks.common import save_figure

    return save_figure(fig, path)
