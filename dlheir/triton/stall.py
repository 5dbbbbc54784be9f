"""Latency of small hash requests while heavy ones run (issue 9, item 14): prints numbers, asserts nothing.

    python -m dlheir.triton.stall [--onnx MODEL.onnx]

starts a tritonserver from a temporary repository generated for the ONNX graph (default: the
latest ``dlheir export onnx``), optionally with another preprocessing instance count,
``max_pixels`` or with dynamic batching (as before issue 9: 1 instance, dynamic batching), then

1. ``--small-clients`` threads send one small image per request (a 640x480 JPEG) back to
   back for ``--seconds``: the baseline latencies;
2. the same while ``--heavy-clients`` threads keep sending requests of ``--heavy-images``
   PNGs of ``--heavy-side`` squared pixels (default 6000x6000 = 36 MP, just under the
   default 40 MP limit);

and prints p50/p90/p99/max of the small requests' latency in both phases and the heavy
requests' duration. ``--triton HOST:PORT`` measures an already running server instead.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dlheir.contract import CODE, IMAGE_BYTES, PUBLIC_MODEL


def small_jpeg(width: int = 640, height: int = 480, seed: int = 1) -> bytes:
    """A photo-like JPEG: smooth random gradients plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)).copy()
    pixels += rng.integers(0, 24, pixels.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def heavy_png(side: int) -> bytes:
    """A side x side RGB PNG that is small on disk (every row one colour) but costs its full size to decode,
    like the hostile 420 KB 12000x12000 PNG of issue 9."""
    from PIL import Image

    rows = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.broadcast_to(np.stack([rows, rows[::-1], rows // 2], axis=-1)[:, None, :], (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return buf.getvalue()


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` and its descendants (tritonserver and its backend stubs), in MB."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for member in tree:
        try:
            rss = [line for line in Path(f"/proc/{member}/status").read_text().splitlines() if line.startswith("VmRSS")]
            total += int(rss[0].split()[1]) if rss else 0
        except (OSError, ValueError):
            continue
    return total / 1024


def _percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ms = np.asarray(values) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"n={len(ms)} p50={p50:.1f} ms p90={p90:.1f} ms p99={p99:.1f} ms max={ms.max():.1f} ms"


def _preprocess_summary(repo: Path) -> str:
    """One line: dlheir_preprocess's instances, pixel limit and batching in the generated ``repo``."""
    from dlheir.triton.repository import PREPROCESS, load_config, max_pixels

    config = load_config(repo, PREPROCESS)
    return (f"dlheir_preprocess: {sum(g.count for g in config.instance_group)} instance(s), max_pixels "
            f"{max_pixels(repo)}, dynamic batching {'on' if config.HasField('dynamic_batching') else 'off'}")


def measure(url: str, seconds: float, small_clients: int, heavy_clients: int, heavy_images: int,
            heavy_side: int, server_pid: int | None = None) -> dict[str, list[float]]:
    """Run both phases against the ``dlheir`` ensemble at ``url``; latencies in seconds, and the
    server's resident memory (MB, sampled every 0.2 s) under "rss <phase>" when ``server_pid`` is given."""
    import tritonclient.grpc as grpcclient

    small = small_jpeg()
    heavy = heavy_png(heavy_side) if heavy_clients else b""
    print(f"small request: 1 JPEG 640x480 ({len(small)} bytes); heavy request: {heavy_images} PNG "
          f"{heavy_side}x{heavy_side} ({len(heavy) // 1024} KiB each)", flush=True)

    def send(client, data: bytes, count: int) -> float:
        inp = grpcclient.InferInput(IMAGE_BYTES, [count, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]] * count, dtype=object))
        start = time.perf_counter()
        try:
            client.infer(PUBLIC_MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(CODE)])
        except grpcclient.InferenceServerException as exc:
            print(f"request failed: {exc.message()}", flush=True)
        return time.perf_counter() - start

    def loop(data: bytes, count: int, out: list[float], stop: threading.Event) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            while not stop.is_set():
                out.append(send(client, data, count))
        finally:
            client.close()

    results: dict[str, list[float]] = {"small alone": [], "small with heavy": [], "heavy": [],
                                       "rss small alone": [], "rss small with heavy": []}
    warm = grpcclient.InferenceServerClient(url)
    for _ in range(4):
        send(warm, small, 1)
    warm.close()
    for phase, heavy_n in (("small alone", 0), ("small with heavy", heavy_clients)):
        stop = threading.Event()
        threads = [threading.Thread(target=loop, args=(heavy, heavy_images, results["heavy"], stop))
                   for _ in range(heavy_n)]
        for t in threads:
            t.start()
        if heavy_n:
            time.sleep(0.5)  # the heavy requests are running before the small ones are timed
        small_threads = [threading.Thread(target=loop, args=(small, 1, results[phase], stop))
                         for _ in range(small_clients)]
        for t in small_threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if server_pid is not None:
                results[f"rss {phase}"].append(_tree_rss_mb(server_pid))
            time.sleep(0.2)
        stop.set()
        for t in threads + small_threads:
            t.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlheir.triton.stall", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--onnx", type=Path,
                       help="start a tritonserver serving this graph (default: the latest 'dlheir export onnx')")
    where.add_argument("--triton", help="gRPC address of a running tritonserver")
    parser.add_argument("--instances", type=int, help="dlheir_preprocess instance count (default: the config's)")
    parser.add_argument("--max-pixels", type=int, help="dlheir_preprocess max_pixels (default: the config's)")
    parser.add_argument("--dynamic-batching", action="store_true",
                        help="give dlheir_preprocess dynamic batching (0.5 ms queue delay), as before issue 9")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each phase (default 20)")
    parser.add_argument("--small-clients", type=int, default=4)
    parser.add_argument("--heavy-clients", type=int, default=1)
    parser.add_argument("--heavy-images", type=int, default=16, help="images per heavy request (default 16)")
    parser.add_argument("--heavy-side", type=int, default=6000, help="heavy image side in pixels (default 6000)")
    args = parser.parse_args(argv)

    def run(url: str, pid: int | None = None) -> None:
        results = measure(url, args.seconds, args.small_clients, args.heavy_clients, args.heavy_images,
                          args.heavy_side, pid)
        print(f"small requests alone:           {_percentiles(results['small alone'])}")
        print(f"small requests with heavy load: {_percentiles(results['small with heavy'])}")
        print(f"heavy requests:                 {_percentiles(results['heavy'])}")
        if pid is not None:
            print(f"tritonserver + stubs RSS:       {max(results['rss small alone'], default=0):.0f} MB peak alone, "
                  f"{max(results['rss small with heavy'], default=0):.0f} MB peak with heavy load")

    if args.triton:
        run(args.triton)
        return 0
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import latest_export, prepare_repository

    with tempfile.TemporaryDirectory(prefix="dlheir-stall-") as tmp:
        repo = prepare_repository(Path(tmp) / "model_repository", args.onnx or latest_export(),
                                  max_pixels=args.max_pixels, preprocess_instances=args.instances,
                                  dynamic_batching=args.dynamic_batching or None).path
        print(_preprocess_summary(repo), flush=True)
        with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          state_dir=Path(tmp) / "state") as server:
            run(server.grpc_url, server.process.pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
