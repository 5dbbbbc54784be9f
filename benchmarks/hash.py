"""`dlheir bench hash`: hashing through Triton vs ONNX Runtime and PyTorch in-process, same images."""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dlheir.contract import CODE, IMAGE, IMAGE_BYTES, PUBLIC_MODEL
from dlheir.extras import needs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hash", help="images/s and latency through Triton (batch x concurrency) vs in-process")
    p.add_argument("--checkpoint", help="model to serve (default: an untrained 48-bit DLHEIR; speed is the same)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--images", type=int, default=256, help="images per measurement (default 256)")
    p.add_argument("--model", default=PUBLIC_MODEL, help=f"Triton model to call (default {PUBLIC_MODEL})")
    p.add_argument("--out-dir", default="results/bench_hash",
                   help="where bench_hash.json and .png go (default results/bench_hash/)")
    p.set_defaults(func=run)
    needs(p, "train")


def _triton_run(client_url: str, images: list[bytes], batch: int, concurrency: int, model: str = PUBLIC_MODEL) -> dict:
    import numpy as np
    import tritonclient.grpc as g

    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    clients = [g.InferenceServerClient(client_url) for _ in range(concurrency)]

    def one(i: int) -> float:
        client = clients[i % concurrency]
        inp = g.InferInput(IMAGE_BYTES, [len(chunks[i]), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b] for b in chunks[i]], dtype=object))
        t0 = time.perf_counter()
        client.infer(model, [inp], outputs=[g.InferRequestedOutput(CODE)])
        return time.perf_counter() - t0

    for i in range(min(concurrency, len(chunks))):  # warm up
        one(i)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(len(chunks))))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return {"images_per_s": len(images) / wall, "latencies": lat}


def perf_analyzer_figures(url: str, model: str, images: list[bytes], batch: int, concurrency: list[int],
                          **options) -> dict:
    """NVIDIA perf_analyzer on ``model`` with real encoded images, where it is installed
    (``make perf-analyzer``); else ``installed: False`` and how to install it. ``options`` go to
    ``dlheir.benchmarks.perf_analyzer.measure``."""
    from dlheir.benchmarks import perf_analyzer as pa

    exe = pa.find()
    if exe is None:
        return {"installed": False, "hint": pa.INSTALL_HINT}
    return {"installed": True, "exe": str(exe), **pa.measure(exe, url, model, images[:64], batch, concurrency, **options)}


def _side_by_side(rows: list[dict], pa: dict) -> str:
    """perf_analyzer's rows beside ours at the same batch and concurrency."""
    from dlheir.benchmarks.common import table

    ours = {(r["batch"], r["concurrency"]): r for r in rows if r["path"] == "triton ensemble"}
    both = []
    for r in pa.get("rows", []):
        if "error" in r:
            continue
        mine = ours.get((pa["batch"], r["concurrency"]), {})
        both.append({"batch": pa["batch"], "concurrency": r["concurrency"], "ours": mine.get("images_per_s"),
                     "pa": r["infer_per_s"], "ours_p50": mine.get("p50_ms"), "pa_p50": r["p50_ms"],
                     "ours_p99": mine.get("p99_ms"), "pa_p99": r["p99_ms"]})
    return table(both, [("batch", "batch", "d"), ("concurrency", "conc", "d"), ("ours", "ours images/s", ".1f"),
                        ("pa", "perf_analyzer infer/s", ".1f"), ("ours_p50", "ours p50 ms", ".1f"),
                        ("pa_p50", "pa p50 ms", ".1f"), ("ours_p99", "ours p99 ms", ".1f"), ("pa_p99", "pa p99 ms", ".1f")])


def plot(rows: list[dict], batches: list[int], concs: list[int], size: int, n_images: int, path: Path) -> Path:
    """One group of bars per batch size; each bar is one measured setting only: the in-process
    paths run one request at a time (no bar at other concurrencies), Triton at each concurrency."""
    from dlheir.benchmarks.common import bar_plot

    def value(path_name: str, batch: int, conc: int):
        return next((r["images_per_s"] for r in rows if r["path"] == path_name and r["batch"] == batch
                     and r["concurrency"] == conc), None)

    series = {f"{name}, 1 request at a time": [value(name, b, 1) for b in batches]
              for name in ("onnxruntime in-process", "pytorch eager in-process")}
    for c in concs:
        series[f"Triton ensemble, {c} request{'s' if c > 1 else ''} in flight"] = [value("triton ensemble", b, c)
                                                                               for b in batches]
    return bar_plot(path, f"Hashing throughput (higher is better)\n{size}x{size} px model, the same {n_images} "
                          "encoded images for every path", [str(b) for b in batches], series, "images per second",
                    xlabel="batch size (images per request)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    from dlheir.benchmarks.common import (bench_model, latency_stats, sample_images, save_json, table,
                                          triton_with_model)
    from dlheir.export.model import to_input
    from dlheir.preprocess import preprocess

    model, size = bench_model(args.checkpoint, args.image_size, args.bits)
    images = sample_images(args.images, 64)
    batches = [int(b) for b in args.batches.split(",")]
    concs = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server, onnx_path = triton_with_model(model, size, tmp)
        session = ort.InferenceSession(str(onnx_path))
        # in-process baselines on the same encoded images: decode + warp + run
        for batch in batches:
            chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
            for name in ("onnxruntime in-process", "pytorch eager in-process"):
                lat = []
                t0 = time.perf_counter()
                for chunk in chunks:
                    t1 = time.perf_counter()
                    px = np.stack([preprocess(b, size) for b in chunk])
                    if name.startswith("onnx"):
                        session.run(None, {IMAGE: px})
                    else:
                        with torch.no_grad():
                            model(to_input(px))
                    lat.append(time.perf_counter() - t1)
                wall = time.perf_counter() - t0
                rows.append({"path": name, "batch": batch, "concurrency": 1,
                             "images_per_s": len(images) / wall, **latency_stats(lat)})
        with server:
            for batch in batches:
                for conc in concs:
                    r = _triton_run(server.grpc_url, images, batch, conc, args.model)
                    rows.append({"path": "triton ensemble", "batch": batch, "concurrency": conc,
                                 "images_per_s": r["images_per_s"], **latency_stats(r["latencies"])})
            pa = perf_analyzer_figures(server.grpc_url, args.model, images, 8 if 8 in batches else batches[-1], concs)
    print(table(rows, [("path", "path", ""), ("batch", "batch", "d"), ("concurrency", "conc", "d"),
                       ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f")]))
    ort8 = next((r["images_per_s"] for r in rows if r["path"].startswith("onnx") and r["batch"] == 8), None)
    tri8 = max((r["images_per_s"] for r in rows if r["path"] == "triton ensemble" and r["batch"] == 8
                and r["concurrency"] == 4), default=None)
    ratio = tri8 / ort8 if ort8 and tri8 else None
    if ratio:
        print(f"Triton (batch 8, concurrency 4) / in-process ONNX Runtime (batch 8): {ratio:.2f}")
    if not pa["installed"]:
        print(f"perf_analyzer: not installed; to add its figures: {pa['hint']}")
    elif "error" in pa:
        print(f"perf_analyzer: failed: {pa['error']}")
    else:
        print(f"perf_analyzer ({pa['exe']}, batch {pa['batch']}, {pa['images']} real images as input data):")
        print(_side_by_side(rows, pa))
        for r in pa["rows"]:
            if "error" in r:
                print(f"perf_analyzer at concurrency {r['concurrency']}: failed: {r['error']}")
    path = save_json("bench_hash", {"image_size": size, "rows": rows, "triton_over_ort_batch8": ratio,
                                    "perf_analyzer": pa}, args.out_dir)
    png = plot(rows, batches, concs, size, len(images), Path(args.out_dir) / "bench_hash.png")
    print(f"written {path}, {png}")
    return 0
