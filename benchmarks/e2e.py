"""`dlheir bench e2e`: the paper's efficiency measurements, on the served pipeline here.

* trapdoor generation (Figure 6): one query image -> its code, through Triton;
* feature extraction (Figure 4): hashing 2,000..10,000 images through Triton (batched);
* retrieval (Table 3): top-20 search over 2,000..10,000 codes through the cloud server.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dlheir.contract import PUBLIC_MODEL
from dlheir.extras import needs

# Table 3, DLHEIR 48 bits, units not stated in the paper; Figure 6 (ms) as printed.
PAPER_RETRIEVAL_48 = {2000: 0.58, 4000: 0.742, 6000: 0.908, 8000: 1.073, 10000: 1.249}
PAPER_TRAPDOOR_MS = {"DLHEIR": 8.86, "Xia (CSD)": 2.13, "Xia (SCD)": 2.16, "Qin": 0.21}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("e2e", help="trapdoor, feature extraction and retrieval times beside the paper's figures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model to serve (default: an untrained 48-bit DLHEIR; speed is the same)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--sizes", default="2000,4000,6000,8000,10000")
    p.add_argument("--trapdoors", type=int, default=100, help="single-image trapdoors timed")
    p.add_argument("--model", default=PUBLIC_MODEL, help=f"Triton model to call (default {PUBLIC_MODEL})")
    p.add_argument("--store", default=None, metavar="URL",
                   help="run the cloud server on this store (postgresql://...; default: the embedded SQLite store)")
    p.add_argument("--blobs", default=None, metavar="URL", help="with --store: blobs in this object store (s3://...)")
    p.add_argument("--out-dir", default="results/bench_e2e",
                   help="where bench_e2e.json and .png go (default results/bench_e2e/)")
    p.set_defaults(func=run)
    needs(p, "train")


def plot(size: int, trap: dict, extraction: list[dict], retrieval: list[dict], path: Path) -> Path:
    """Three panels, one per printed measurement, each beside the paper's figure where it gives one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlheir.benchmarks.common import save_figure

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = ["ours p50", "ours p99", "paper (Fig. 6)"]
    a.bar(names, [trap["p50_ms"], trap["p99_ms"], PAPER_TRAPDOOR_MS["DLHEIR"]], color=["C0", "C0", "C1"])
    a.set_title(f"Trapdoor: one query image -> code\n(ours: Triton, {size} px, CPU; paper: 384 px, GPU)")
    a.set_ylabel("milliseconds per query (linear scale)")
    a.set_xlabel("measurement")
    n = [r["images"] for r in extraction]
    b.plot(n, [r["seconds"] for r in extraction], "o-", label="ours (Triton, batches of 16)")
    b.set_title("Feature extraction: hashing N images\n(paper Fig. 4: chart only, no values to plot)")
    b.set_xlabel("images hashed (count)")
    b.set_ylabel("seconds (linear scale)")
    b.set_ylim(bottom=0)
    b.legend(fontsize="small")
    codes = [r["codes"] for r in retrieval]
    c.plot(codes, [r["p50_ms"] for r in retrieval], "o-", label="ours p50 (ms)")
    c.plot(codes, [r["p99_ms"] for r in retrieval], "o--", color="C0", alpha=0.5, label="ours p99 (ms)")
    paper = [(r["codes"], r["paper_table3"]) for r in retrieval if r.get("paper_table3") is not None]
    if paper:
        c.plot(*zip(*paper), "s-", color="C1", label="paper Table 3 (units not stated)")
    c.set_title("Retrieval: top-20 over N codes\n(ours: through the cloud server)")
    c.set_xlabel("codes in the collection (count)")
    c.set_ylabel("time per query (linear scale)")
    c.set_ylim(bottom=0)
    c.legend(fontsize="small")
    fig.suptitle("dlheir bench e2e: the paper's efficiency measurements on the served pipeline")
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    from dlheir.benchmarks.common import (bench_model, latency_stats, sample_images, save_json, table, time_calls,
                                          triton_with_model)
    from dlheir.client.cloud import CloudClient
    from dlheir.client.triton import TritonHasher
    from dlheir.server.testing import run_cloud_server

    sizes = sorted(int(s) for s in args.sizes.split(","))
    model, size = bench_model(args.checkpoint, args.image_size, args.bits)
    images = sample_images(sizes[-1], 64)
    with tempfile.TemporaryDirectory() as tmp:
        server, _ = triton_with_model(model, size, tmp)
        with server, TritonHasher(server.grpc_url, batch_size=16, max_in_flight=4, model=args.model) as hasher:
            bits = hasher.bits  # read from the model called, as the clients do
            it = iter(range(10**9))
            trap = latency_stats(time_calls(lambda: hasher.hash_one(images[next(it) % len(images)]), args.trapdoors))
            extraction, all_codes = [], None
            for n in sizes:
                t0 = time.perf_counter()
                _, codes = hasher.hash_images(images[:n])
                extraction.append({"images": n, "seconds": time.perf_counter() - t0})
                all_codes = codes
        retrieval = []
        with run_cloud_server(Path(tmp) / "cloud", store_url=args.store, blobs_url=args.blobs) as cloud_server:
            admin = CloudClient(cloud_server.address)
            token, _ = admin.create_collection("bench", bits, cloud_server.admin_token)
            client = CloudClient(cloud_server.address, token)
            have = 0
            for n in sizes:
                list(client.upload("bench", ((i, all_codes[i].tobytes(), b"x", {}) for i in range(have, n)),
                                   batch_size=2000))
                have = n
                q = iter(range(10**9))
                st = latency_stats(time_calls(lambda: client.search("bench", all_codes[next(q) % n][None, :], 20), 200, 5))
                top = [int(i) for i in client.search("bench", all_codes[0][None, :], 20)[0][0]]
                fetch = latency_stats(time_calls(lambda: list(client.fetch("bench", top)), 50, 2))
                retrieval.append({"codes": n, **st, "fetch20_p50_ms": fetch["p50_ms"],
                                  "paper_table3": PAPER_RETRIEVAL_48.get(n)})
    for row in extraction:
        row["images_per_s"] = row["images"] / row["seconds"]
    print(f"trapdoor generation (one image via Triton, {size}px): p50 {trap['p50_ms']:.2f} ms, p99 {trap['p99_ms']:.2f} ms"
          f"  | paper Figure 6: DLHEIR {PAPER_TRAPDOOR_MS['DLHEIR']} ms (384px, GPU)")
    print("feature extraction via Triton (paper Figure 4 gives a chart only, no values in the text):")
    print(table(extraction, [("images", "images", "d"), ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".1f")]))
    store = f"{args.store} + {args.blobs}" if args.store else "embedded SQLite"
    print(f"retrieval, top-20 through the cloud server on {store} (paper Table 3, 48 bits, units not stated), and "
          "the fetch of those 20 items:")
    print(table(retrieval, [("codes", "codes", "d"), ("p50_ms", "p50 ms", ".3f"), ("p99_ms", "p99 ms", ".3f"),
                            ("paper_table3", "paper", ".3f"), ("fetch20_p50_ms", "fetch 20 p50 ms", ".2f")]))
    path = save_json("bench_e2e", {"image_size": size, "store": store, "trapdoor": trap, "extraction": extraction,
                                   "retrieval": retrieval, "paper": {"table3_48": PAPER_RETRIEVAL_48,
                                                                     "figure6_ms": PAPER_TRAPDOOR_MS}}, args.out_dir)
    png = plot(size, trap, extraction, retrieval, Path(args.out_dir) / "bench_e2e.png")
    print(f"written {path}, {png}")
    return 0
