"""`dlheir bench private`: private-ranking mode beside server-ranked mode on the same codes.

For each collection size (the collections grow from one size to the next) the same random
codes and tiny blobs go into a server-ranked collection (codes with the items) and a
private-ranking one (items without codes, codes in sealed pages), on one real server:

* ``full sync``: a client with an empty cache fetches, authenticates, decrypts and indexes
  every page (bytes over the wire and seconds, median of ``--sync-repeats`` cold syncs);
* ``cache load``: a new client process whose cache holds every page (no page over the wire);
* ``new-page sync``: one new page of ``--new-page-records`` records (replacements of
  existing ids with their own codes, so the collection stays the same);
* ``no-op sync``: the per-query check for new pages when there are none (one round trip);
* ``search``: one query, top k: the server's Search through gRPC vs the local index;
* ``end to end``: what a user waits for per query once synced: server-ranked = Search +
  Fetch of the k blobs; private = no-op sync + local search + Fetch of the k blobs, each checked
  against the digest its page record names (``LocalIndex.check_blob``, as ``dlheir user search``);
* ``stats``: CollectionStats, for reference (``dlheir user search`` takes the mode from the
  owner's signed grant, and learns the rest from the sync header).

The private collection is keyed as ``dlheir owner create-collection`` keys it (key format 3:
its own keys from an owner key file, pages bound to ``NAME#UIDHEX``, hash-chained, each put
record naming its blob's digest), so the pages synced are those of a real collection.

Every size also checks that both modes return identical (id, distance) lists for
``--check-queries`` queries. No Triton is needed (random codes); writes
results/bench_private/bench_private.json and .png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("private", help="private-ranking mode (sync + local ranking) vs server-ranked search",
                       description="Sync size and time, local search time and end-to-end latency of the "
                                   "private-ranking mode beside the server-ranked mode on the same random codes "
                                   "and one real cloud server. Writes results/bench_private/bench_private.json and .png.")
    p.add_argument("--sizes", default="10000,100000", help="collection sizes, comma separated (default 10000,100000)")
    p.add_argument("--bits", type=int, default=48, help="code length in bits (default 48)")
    p.add_argument("-k", type=int, default=20, help="top k, also the blobs fetched per query (default 20)")
    p.add_argument("--queries", type=int, default=200, help="single queries timed per size and mode (default 200)")
    p.add_argument("--check-queries", type=int, default=50,
                   help="queries whose results are compared between the two modes (default 50)")
    p.add_argument("--blob-bytes", type=int, default=64, help="size of each blob (default 64: tiny)")
    p.add_argument("--upload-batch", type=int, default=5000, help="items per upload batch (default 5000)")
    p.add_argument("--page-records", type=int, default=50_000, help="records per sealed page (default 50000)")
    p.add_argument("--new-page-records", type=int, default=1000, help="records in the new-page sync (default 1000)")
    p.add_argument("--sync-repeats", type=int, default=3, help="cold full syncs timed per size (default 3)")
    p.add_argument("--out-dir", default="results/bench_private",
                   help="where bench_private.json and .png go (default results/bench_private/)")
    p.set_defaults(func=run)


def _plot(path: Path, rows: list[dict], bits: int, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    srv = [r for r in rows if r["mode"] == "server-ranked"]
    prv = [r for r in rows if r["mode"] == "private"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(sizes, [r["e2e_p50_ms"] for r in srv], "o-", label="server-ranked: Search + Fetch k")
    a.plot(sizes, [r["e2e_p50_ms"] for r in prv], "s-", label="private: no-op sync + local search + Fetch k")
    a.plot(sizes, [r["search_p50_ms"] for r in srv], "o--", label="server-ranked: Search alone")
    a.plot(sizes, [r["search_p50_ms"] for r in prv], "s--", label="private: local search alone")
    a.set(xscale="log", yscale="log", xlabel="codes in the collection (count, log scale)",
          ylabel="p50 latency per query (ms, log scale)",
          title=f"per-query latency, {bits}-bit codes, k={k}")
    a.legend(fontsize=8)
    b.plot(sizes, [r["full_sync_s"] for r in prv], "s-", label="full sync, empty cache")
    b.plot(sizes, [r["cache_load_s"] for r in prv], "^-", label="start from a full cache")
    b.plot(sizes, [r["new_page_sync_ms"] / 1e3 for r in prv], "v-", label="sync of one new page")
    b.set(xscale="log", yscale="log", xlabel="codes in the collection (count, log scale)", ylabel="seconds (log scale)",
          title="private mode: getting the codes to the client")
    for r in prv:
        b.annotate(f"{r['full_sync_mb']:.1f} MB", (r["size"], r["full_sync_s"]), textcoords="offset points",
                   xytext=(4, 4), fontsize=8)
    b.legend(fontsize=8)
    from dlheir.benchmarks.common import save_figure

    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dlheir.benchmarks.common import cycle_index, latency_stats, parse_sizes, save_json, table, time_calls
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import OwnerKeys
    from dlheir.client.private import LocalIndex, PageWriter
    from dlheir.contract import code_bytes, validate_bits
    from dlheir.errors import UserError
    from dlheir.server.testing import run_cloud_server

    validate_bits(args.bits)
    sizes = parse_sizes(args.sizes)
    if not sizes or sizes[0] < 1 or min(args.k, args.queries, args.check_queries, args.sync_repeats,
                                        args.page_records, args.upload_batch, args.new_page_records) < 1:
        raise UserError("--sizes, -k, --queries, --check-queries, --sync-repeats and the batch sizes must be positive")
    L = code_bytes(args.bits)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (sizes[-1], L), dtype=np.uint8)
    queries = rng.integers(0, 256, (max(args.queries, args.check_queries), L), dtype=np.uint8)
    if args.bits % 8:
        mask = (0xFF << (8 - args.bits % 8)) & 0xFF
        codes[:, -1] &= mask
        queries[:, -1] &= mask
    # the private collection's own keys, as an owner key file registers them (random uid, key version 1)
    keys = OwnerKeys.generate().register("private", "private").for_collection("private")
    image_key, binding = keys.image_key, keys.binding
    blob = rng.bytes(args.blob_bytes)
    rows: list[dict] = []
    checks: list[dict] = []
    print(f"private-mode bench: sizes {sizes}, {args.bits} bits, k={args.k}, {args.blob_bytes}-byte blobs, "
          f"pages of {args.page_records} records", flush=True)
    with tempfile.TemporaryDirectory(prefix="dlheir-bench-private-") as tmp, \
            run_cloud_server(Path(tmp) / "cloud") as server:
        with CloudClient(server.address) as admin:
            ranked_token, _ = admin.create_collection("ranked", args.bits, server.admin_token)
            private_token, private_reader = admin.create_collection("private", args.bits, server.admin_token,
                                                                    private=True)
        ranked = CloudClient(server.address, ranked_token)
        owner = CloudClient(server.address, private_token)
        reader = CloudClient(server.address, private_reader)
        writer = PageWriter(owner, image_key, "private", args.bits, binding=binding)
        have = 0
        for size in sizes:
            t0 = time.perf_counter()
            for _ in ranked.upload("ranked", ((i, codes[i].tobytes(), blob, {}) for i in range(have, size)),
                                   batch_size=args.upload_batch):
                pass
            up_ranked = time.perf_counter() - t0
            t0 = time.perf_counter()
            for s in range(have, size, args.page_records):  # pages first, then the blobs they index
                e = min(size, s + args.page_records)
                writer.put(np.arange(s, e), codes[s:e], [blob] * (e - s))  # each record names its blob's digest
            for _ in owner.upload("private", ((i, b"", blob, {}) for i in range(have, size)),
                                  batch_size=args.upload_batch):
                pass
            up_private = time.perf_counter() - t0
            have = size

            # cold full syncs (empty cache each time), then a start from the full cache
            sync_s, report = [], None
            for rep in range(args.sync_repeats):
                cache = Path(tmp) / f"cache-{size}-{rep}.pages"
                local = LocalIndex(reader, "private", args.bits, image_key, cache, binding=binding)
                report = local.sync()
                sync_s.append(report.seconds)
            warm = LocalIndex(reader, "private", args.bits, image_key, cache, binding=binding)
            warm_report = warm.sync()
            assert warm_report.pages_fetched == 0 and len(warm) == size
            # one new page (replacing existing ids with their own codes: the collection stays the same)
            n_new = min(args.new_page_records, size)
            writer.put(np.arange(n_new), codes[:n_new], [blob] * n_new)
            new_report = local.sync()
            assert new_report.pages_fetched == 1 and len(local) == size

            # both modes answer the same
            cq = queries[: args.check_queries]
            served = ranked.search("ranked", cq, args.k)
            mine = local.search(cq, args.k)
            same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(served, mine))
            checks.append({"size": size, "queries": len(cq), "identical": bool(same)})

            single = queries[: args.queries]
            nxt = cycle_index(args.queries)
            srv_search = time_calls(lambda: ranked.search("ranked", single[nxt()][None, :], args.k), args.queries, 10)
            nxt = cycle_index(args.queries)
            loc_search = time_calls(lambda: local.search(single[nxt()][None, :], args.k), args.queries, 10)
            noop_sync = time_calls(local.sync, args.queries, 10)
            # CollectionStats, for reference (`dlheir user search` takes the mode from the grant)
            stats_ranked = time_calls(lambda: ranked.stats("ranked"), 20, 2)
            stats_private = time_calls(lambda: reader.stats("private"), 20, 2)

            def server_e2e(q=iter(range(10**12))):
                (ids, _), = ranked.search("ranked", single[next(q) % args.queries][None, :], args.k)
                for _ in ranked.fetch("ranked", ids):
                    pass

            def private_e2e(q=iter(range(10**12))):
                local.sync()
                (ids, _), = local.search(single[next(q) % args.queries][None, :], args.k)
                for i, b, _ in reader.fetch("private", ids):
                    local.check_blob(i, b)  # the blob the owner's latest page names

            srv_e2e = latency_stats(time_calls(server_e2e, args.queries, 10))
            prv_e2e = latency_stats(time_calls(private_e2e, args.queries, 10))
            s_search, l_search = latency_stats(srv_search), latency_stats(loc_search)
            rows.append({"size": size, "mode": "server-ranked", "upload_s": up_ranked,
                         "stats_p50_ms": latency_stats(stats_ranked)["p50_ms"],
                         "search_p50_ms": s_search["p50_ms"], "search_p99_ms": s_search["p99_ms"],
                         "e2e_p50_ms": srv_e2e["p50_ms"], "e2e_p99_ms": srv_e2e["p99_ms"]})
            rows.append({"size": size, "mode": "private", "upload_s": up_private, "pages": report.pages_total,
                         "stats_p50_ms": latency_stats(stats_private)["p50_ms"],
                         "full_sync_s": float(np.median(sync_s)), "full_sync_mb": report.bytes_fetched / 1e6,
                         "cache_load_s": warm_report.seconds, "new_page_sync_ms": new_report.seconds * 1e3,
                         "new_page_kb": new_report.bytes_fetched / 1e3,
                         "noop_sync_p50_ms": latency_stats(noop_sync)["p50_ms"],
                         "search_p50_ms": l_search["p50_ms"], "search_p99_ms": l_search["p99_ms"],
                         "e2e_p50_ms": prv_e2e["p50_ms"], "e2e_p99_ms": prv_e2e["p99_ms"]})
            r = rows[-1]
            print(f"size {size}: full sync {r['full_sync_mb']:.2f} MB in {r['full_sync_s']:.3f} s, local search p50 "
                  f"{r['search_p50_ms']:.3f} ms, e2e p50 private {r['e2e_p50_ms']:.2f} ms vs server-ranked "
                  f"{rows[-2]['e2e_p50_ms']:.2f} ms; identical results: {'yes' if same else 'NO'}", flush=True)
            del warm
        for c in (ranked, owner, reader):
            c.close()
    print(table(rows, [("size", "codes", "d"), ("mode", "mode", ""), ("search_p50_ms", "search p50 ms", ".3f"),
                       ("e2e_p50_ms", "e2e p50 ms", ".2f"), ("e2e_p99_ms", "e2e p99 ms", ".2f"),
                       ("stats_p50_ms", "stats p50 ms", ".2f"), ("upload_s", "upload s", ".1f")]))
    prv = [r for r in rows if r["mode"] == "private"]
    print(table(prv, [("size", "codes", "d"), ("pages", "pages", "d"), ("full_sync_mb", "full sync MB", ".2f"),
                      ("full_sync_s", "full sync s", ".3f"), ("cache_load_s", "cache load s", ".3f"),
                      ("new_page_kb", "new page KB", ".1f"), ("new_page_sync_ms", "new page sync ms", ".2f"),
                      ("noop_sync_p50_ms", "no-op sync p50 ms", ".3f")]))
    identical = all(c["identical"] for c in checks)
    print(f"private mode == server-ranked on {sum(c['queries'] for c in checks)} checked queries: "
          f"{'yes' if identical else 'NO'}")
    path = save_json("bench_private", {"bits": args.bits, "k": args.k, "blob_bytes": args.blob_bytes,
                                       "page_records": args.page_records, "new_page_records": args.new_page_records,
                                       "rows": rows, "checks": checks, "identical": identical}, args.out_dir)
    png = _plot(Path(args.out_dir) / "bench_private.png", rows, args.bits, args.k)
    print(f"written {path}, {png}")
    return 0 if identical else 1
