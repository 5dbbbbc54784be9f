"""`dlheir bench fronts`: several cloud-server fronts over one PostgreSQL store (issue 18).

One run, one store (``--store postgresql://...``; ``make bench-fronts`` starts a throwaway
PostgreSQL):

* **upload with a follower**: ``--items`` random codes uploaded through front A while front B
  follows the store; after each acknowledged batch one search on B for a code of that batch,
  timed: B waits (the consistency rule) until it has applied the batch, so that time is the
  follower's lag as a client sees it (read-after-write on another front), and the code must come
  back at distance 0;
* **fronts 1, 2, 4, ...**: ``--clients`` client processes send single top-k searches for
  ``--seconds``, spread over the running fronts; queries/s, p50/p99 and queries per CPU-second
  of the fronts (on a machine with few cores the total cannot grow past the cores: the CPU
  figure shows what each front costs);
* **the cost of the rule**: one front with it and one with ``--consistency-wait 0``, the same
  load on each in turns (twice each), with one client (the latency a call gains) and with
  ``--clients`` (the queries/s it costs when the machine is saturated).

Writes ``OUT_DIR/bench_fronts.json``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fronts", help="several fronts over one PostgreSQL store: queries/s per front count, "
                                      "follower lag, the consistency rule's cost",
                       description="Starts fronts over one PostgreSQL store (--store), uploads through one while "
                                   "another follows (read-after-write time on the follower), then measures "
                                   "single-query searches spread over 1, 2, 4 ... fronts and over one front "
                                   "without the consistency wait. Writes OUT_DIR/bench_fronts.json.")
    p.add_argument("--store", required=True, metavar="URL", help="postgresql://... (an empty database)")
    p.add_argument("--fronts", default="1,2,4", help="front counts, comma separated (default 1,2,4)")
    p.add_argument("--items", type=int, default=200_000, help="items uploaded (default 200000)")
    p.add_argument("--bits", type=int, default=48, help="code length (default 48)")
    p.add_argument("-k", type=int, default=20, help="top k (default 20)")
    p.add_argument("--clients", type=int, default=4, help="client processes sending searches (default 4)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per front count (default 8)")
    p.add_argument("--upload-batch", type=int, default=10_000, help="items per upload batch (default 10000)")
    p.add_argument("--out-dir", default="results/bench_fronts", help="where the JSON goes")
    p.set_defaults(func=run)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _search_worker(address: str, token: str, bits: int, k: int, seconds: float, seed: int, out) -> None:
    """One client process: single searches on ``address`` for ``seconds``; puts its latencies (s)."""
    import numpy as np

    from dlheir.client.cloud import CloudClient

    rng = np.random.default_rng(seed)
    queries = rng.integers(0, 256, size=(256, bits // 8), dtype=np.uint8)
    latencies = []
    with CloudClient(address, token) as client:
        for q in queries[:5]:
            client.search("c", q[None], k)  # warm up: channel, first calls
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.search("c", queries[i % len(queries)][None], k)
            latencies.append(time.perf_counter() - t0)
            i += 1
    out.put(latencies)


def _load(fronts: list, token: str, args, seed: int) -> dict:
    """``args.clients`` processes searching the fronts (client i on front i mod n) for ``args.seconds``."""
    import multiprocessing

    import numpy as np

    from dlheir.benchmarks.common import latency_stats

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding gRPC channels
    out = ctx.Queue()
    cpu0 = sum(_cpu_seconds(f.process.pid) for f in fronts)
    procs = [ctx.Process(target=_search_worker, args=(fronts[i % len(fronts)].address, token, args.bits, args.k,
                                                      args.seconds, seed + i, out)) for i in range(args.clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    wall = time.monotonic() - t0
    cpu = sum(_cpu_seconds(f.process.pid) for f in fronts) - cpu0
    latencies = np.concatenate([np.asarray(r) for r in results])
    n = len(latencies)
    return {"fronts": len(fronts), "queries": n, "queries_per_s": n / args.seconds,
            "queries_per_cpu_s": n / cpu if cpu else None, "front_cpu_s": cpu, "wall_s": wall,
            **latency_stats(latencies), "load_avg_1min": os.getloadavg()[0]}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dlheir.benchmarks.common import machine, save_json, table
    from dlheir.client.cloud import CloudClient
    from dlheir.contract import validate_bits
    from dlheir.errors import UserError
    from dlheir.server.testing import CloudServerProcess

    validate_bits(args.bits)
    counts = sorted({int(x) for x in args.fronts.split(",") if x.strip()})
    if not counts or counts[0] < 1 or args.items < args.upload_batch or args.clients < 1:
        raise UserError("--fronts: counts >= 1; --items >= --upload-batch; --clients >= 1")
    if not args.store.startswith("postgresql://"):
        raise UserError("--store must be a postgresql:// URL: fronts share a PostgreSQL store")
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="dlheir-bench-fronts-") as tmp:
        token_file = Path(tmp) / "admin.token"
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(token_file, 0o600)
        admin_token = token_file.read_text().strip()
        running: list = []

        def start(name: str, *extra: str):
            server = CloudServerProcess(Path(tmp) / name, store_url=args.store,
                                        extra_args=["--admin-token-file", str(token_file), *extra])
            t0 = time.monotonic()
            server.start()
            server.start_s = time.monotonic() - t0
            running.append(server)
            return server

        try:
            a, b = start("front0"), start("front1")
            with CloudClient(a.address) as admin:
                owner_token, reader_token = admin.create_collection("c", args.bits, admin_token)
            owner, follower = CloudClient(a.address, owner_token), CloudClient(b.address, reader_token)
            width = args.bits // 8
            print(f"fronts bench: {args.items} random {args.bits}-bit codes uploaded through one front in batches of "
                  f"{args.upload_batch}, a second front following", flush=True)
            lags, t_upload, done = [], time.monotonic(), 0
            for start_id in range(0, args.items, args.upload_batch):
                n = min(args.upload_batch, args.items - start_id)
                codes = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
                items = [(start_id + i, codes[i].tobytes(), b"", {}) for i in range(n)]
                for _ack in owner.upload("c", items, batch_size=args.upload_batch):
                    pass
                done += n
                t0 = time.perf_counter()
                ids, dist = follower.search("c", codes[-1:], k=1)[0]
                lags.append(time.perf_counter() - t0)
                if not (dist.size and dist[0] == 0):
                    raise UserError(f"the follower front did not find item {start_id + n - 1} at distance 0")
            upload_s = time.monotonic() - t_upload
            lag = {"p50_ms": float(np.percentile(lags, 50) * 1e3), "p99_ms": float(np.percentile(lags, 99) * 1e3),
                   "max_ms": float(np.max(lags) * 1e3), "n": len(lags)}
            print(f"upload {done / upload_s:,.0f} items/s; read-after-write on the follower front: p50 "
                  f"{lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, max {lag['max_ms']:.1f} ms "
                  f"({len(lags)} batches)", flush=True)
            b.stop()
            running.remove(b)
            rows = []
            for count in counts:
                while len(running) < count:
                    server = start(f"front{len(running) + 1}-{count}")
                    print(f"front {len(running)} ready in {server.start_s:.1f} s (index of {args.items} items built "
                          f"from the store)", flush=True)
                rows.append({"setting": "consistency wait (default)", **_load(running[:count], reader_token,
                                                                                  args, seed=count)})
                print(f"{count} front(s): {rows[-1]['queries_per_s']:,.0f} queries/s, p50 {rows[-1]['p50_ms']:.2f} ms, "
                      f"p99 {rows[-1]['p99_ms']:.2f} ms", flush=True)
            # the rule's cost: one front with it and one without, measured in turns (A, B, A, B) so that
            # a change of load on this shared machine falls on both
            for server in running[1:]:
                server.stop()
            del running[1:]
            plain = start("front-no-wait", "--consistency-wait", "0")
            # with one client (the machine not saturated: the added latency of a call) and with
            # --clients (saturated: the queries/s it costs)
            one = argparse.Namespace(**{**vars(args), "clients": 1})
            for turn in (1, 2):
                for load_args in (one, args):
                    for server, setting in ((running[0], "with the consistency wait"), (plain, "no consistency wait")):
                        rows.append({"setting": f"{setting}, {load_args.clients} client(s), turn {turn}",
                                     **_load([server], reader_token, load_args, seed=100 + turn)})
        finally:
            for server in running:
                server.stop()
    print(table(rows, [("setting", "setting", ""), ("fronts", "fronts", ""), ("queries_per_s", "queries/s", ",.0f"),
                       ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                       ("queries_per_cpu_s", "queries/CPU-s", ",.0f"), ("load_avg_1min", "load", ".1f")]))
    payload = {"machine": machine(), "items": args.items, "bits": args.bits, "k": args.k, "clients": args.clients,
               "seconds": args.seconds, "upload_items_per_s": args.items / upload_s, "follower_read_after_write": lag,
               "rows": rows}
    print(f"saved {save_json('bench_fronts', payload, args.out_dir)}")
    return 0
