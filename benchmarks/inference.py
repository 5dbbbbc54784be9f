"""`dlheir bench inference`: CPU images/s of PyTorch eager vs ONNX Runtime, same model, same inputs."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dlheir.contract import IMAGE
from dlheir.extras import needs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inference", help="PyTorch eager vs ONNX Runtime images/s at several sizes and batches")
    p.add_argument("--sizes", default="224,384", help="input sides (default 224,384)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default="results/bench_inference",
                   help="where bench_inference.json and .png go (default results/bench_inference/)")
    p.set_defaults(func=run)
    needs(p, "train")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    from dlheir.benchmarks.common import bar_plot, latency_stats, save_json, table, time_calls
    from dlheir.export.model import build_model
    from dlheir.export.onnx_export import export_onnx
    from dlheir.export.model import to_input

    torch.manual_seed(0)
    model = build_model(args.bits, 100).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            session = ort.InferenceSession(str(export_onnx(model, Path(tmp) / f"m{size}.onnx", size)))
            for batch in [int(b) for b in args.batches.split(",")]:
                pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                with torch.no_grad():
                    eager = time_calls(lambda: model(to_input(pixels)), args.repeats, warmup=1)
                onnx = time_calls(lambda: session.run(None, {IMAGE: pixels}), args.repeats, warmup=1)
                for name, secs in (("pytorch-eager", eager), ("onnxruntime", onnx)):
                    st = latency_stats(secs)
                    rows.append({"runtime": name, "size": size, "batch": batch,
                                 "images_per_s": batch / np.median(secs), **st})
    print(table(rows, [("runtime", "runtime", ""), ("size", "size", "d"), ("batch", "batch", "d"),
                       ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f")]))
    path = save_json("bench_inference", {"rows": rows, "threads": torch.get_num_threads()}, args.out_dir)
    labels = [f"{r['size']} px, batch {r['batch']}" for r in rows if r["runtime"] == "onnxruntime"]
    png = bar_plot(Path(args.out_dir) / "bench_inference.png",
                   f"DLHEIR CPU inference, {torch.get_num_threads()} threads (higher is better)", labels,
                   {rt: [r["images_per_s"] for r in rows if r["runtime"] == rt] for rt in ("pytorch-eager", "onnxruntime")},
                   "images per second", xlabel="input size and batch size (images per call)")
    print(f"written {path}, {png}")
    return 0
