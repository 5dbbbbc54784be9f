"""`dlheir check gpu`: the one command a GPU owner runs first.

In one run, each part on its own (a part that cannot run records why and the others go on):

* ``engine``: the FP16 TensorRT engine built from the model's ONNX graph (build time);
* ``compare``: its codes against FP32 ONNX Runtime on the digits splits (fraction of equal
  bits, P@k and mAP from each runtime's codes);
* ``throughput``: images/s at each batch and image size for PyTorch CUDA, ONNX Runtime's
  CUDA execution provider and the TensorRT engine (through Triton where ``--triton-url``
  names one serving it, else the engine directly; the result says which);
* ``faiss``: top-k Hamming search in FAISS binary flat indexes on the GPU and the CPU.

Everything lands in ``<out-dir>/check_gpu.json`` and ``check_gpu.png``. Without a CUDA GPU
the command says so in one line and exits 2. The CPU-testable pieces (the throughput loop,
the code comparison, the FAISS timing, the report) take their runtimes as arguments.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from dlheir.contract import CODE, IMAGE
from dlheir.errors import UserError
from dlheir.extras import needs

OUT_DIR = "results/check_gpu"
NO_GPU = ("no CUDA GPU visible here (torch.cuda.is_available() is False); "
          "`dlheir check gpu` measures a GPU host and has nothing to check on this one")
FAISS_QUERIES, FAISS_K = 100, 100

Runner = Callable  # uint8 pixels [B, S, S, 3] -> anything (the call must finish the work before returning)
RunnerFactory = Callable[[int], Runner]  # image size -> Runner; raises Unavailable when it cannot run here


class Unavailable(Exception):
    """A part or backend that cannot run on this host; the message says why (and what to install)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="checks of a deployment host (check gpu)")
    csub = p.add_subparsers(dest="check", metavar="CHECK")
    g = csub.add_parser("gpu", help="first command on a GPU host: TensorRT FP16 engine, FP16 vs FP32 codes, "
                                    "images/s per runtime, FAISS GPU vs CPU; JSON and plot")
    g.add_argument("--checkpoint", help="model for the engine and the code comparison (default: train the "
                                        "digits demo setting into OUT_DIR/train, reused on later runs)")
    g.add_argument("--sizes", default="224,384", help="image sides for throughput (default 224,384)")
    g.add_argument("--batches", default="1,8,32,64", help="batch sizes for throughput (default 1,8,32,64)")
    g.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    g.add_argument("--faiss-sizes", default="1000000,10000000", help="index sizes in codes for FAISS search (default 1000000,10000000)")
    g.add_argument("--triton-url", help="gRPC address of a Triton serving a TensorRT model of this network "
                                        "(measured through it at its image size)")
    g.add_argument("--triton-model", default="dlheir_trt", help="that Triton's TensorRT model (default dlheir_trt)")
    g.add_argument("--out-dir", default=OUT_DIR, help=f"check_gpu.json, check_gpu.png, engines (default {OUT_DIR}/)")
    g.set_defaults(func=run)
    needs(g, "train")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------- parts, one at a time


def run_part(name: str, fn: Callable[[], object]) -> dict:
    """``fn()`` as one part of the check: its result, or why it could not run (status skipped/failed)."""
    print(f"[check gpu] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except (Unavailable, UserError, ImportError) as exc:
        out = {"status": "skipped", "reason": _one_line(exc)}
    except Exception as exc:  # noqa: BLE001 - one part's failure must not end the others
        out = {"status": "failed", "reason": f"{type(exc).__name__}: {_one_line(exc)}"}
    else:
        out = {"status": "ok", **(result if isinstance(result, dict) else {"result": result})}
    out["seconds"] = time.perf_counter() - t0
    print(f"[check gpu] {name}: {out['status']}" + (f" ({out['reason']})" if "reason" in out else ""), flush=True)
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def measure_throughput(runners: dict[str, RunnerFactory], sizes: list[int], batches: list[int],
                       repeats: int, warmup: int = 3) -> list[dict]:
    """images/s and latency of each runner at each (size, batch) on random uint8 pixels.

    A runner that cannot be made at a size gives one row with ``status`` skipped/failed and its
    reason instead of numbers; the other runners and sizes go on.
    """
    import numpy as np

    from dlheir.benchmarks.common import latency_stats, time_calls

    rows = []
    for name, factory in runners.items():
        for size in sizes:
            try:
                run = factory(size)
            except (Unavailable, UserError, ImportError) as exc:
                rows.append({"backend": name, "size": size, "status": "skipped", "reason": _one_line(exc)})
                continue
            except Exception as exc:  # noqa: BLE001
                rows.append({"backend": name, "size": size, "status": "failed",
                             "reason": f"{type(exc).__name__}: {_one_line(exc)}"})
                continue
            for batch in batches:
                pixels = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                try:
                    secs = time_calls(lambda: run(pixels), repeats, warmup=warmup)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch
                    rows.append({"backend": name, "size": size, "batch": batch, "status": "failed",
                                 "reason": f"{type(exc).__name__}: {_one_line(exc)}"})
                    continue
                rows.append({"backend": name, "size": size, "batch": batch, "status": "ok",
                             "images_per_s": batch / float(np.median(secs)), **latency_stats(secs)})
    return rows


def faiss_search(sizes: list[int], bits: int = 48, queries: int = FAISS_QUERIES, k: int = FAISS_K,
                 repeats: int = 3) -> list[dict]:
    """Top-k Hamming search of ``queries`` random codes in flat binary indexes of each size, CPU and GPU.

    The GPU rows say why they are missing when this faiss build has no GPU support or sees no
    GPU; where both run, ``same_distances`` checks that the GPU returns the CPU's distances.
    """
    import faiss
    import numpy as np

    from dlheir.contract import code_bytes

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    gpu_reason = None
    if not hasattr(faiss, "GpuIndexBinaryFlat"):
        gpu_reason = "this faiss build has no GPU support (faiss-cpu); install a faiss with GPU support for these rows"
    elif gpus == 0:
        gpu_reason = "faiss sees no GPU (faiss.get_num_gpus() == 0)"
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (queries, code_bytes(bits)), dtype=np.uint8)
    rows = []
    for n in sizes:
        db = rng.integers(0, 256, (n, code_bytes(bits)), dtype=np.uint8)
        cpu = faiss.IndexBinaryFlat(bits)
        cpu.add(db)
        cpu_secs, (cpu_d, _) = _time_search(cpu, q, k, repeats)
        rows.append({"device": "cpu", "codes": n, "status": "ok", **_search_row(cpu_secs, queries)})
        if gpu_reason:
            rows.append({"device": "gpu", "codes": n, "status": "skipped", "reason": gpu_reason})
            continue
        try:
            res = faiss.StandardGpuResources()
            gpu = faiss.GpuIndexBinaryFlat(res, bits)
            gpu.add(db)
            gpu_secs, (gpu_d, _) = _time_search(gpu, q, k, repeats)
        except Exception as exc:  # noqa: BLE001
            rows.append({"device": "gpu", "codes": n, "status": "failed", "reason": f"{type(exc).__name__}: {_one_line(exc)}"})
            continue
        rows.append({"device": "gpu", "codes": n, "status": "ok", **_search_row(gpu_secs, queries),
                     "same_distances": bool(np.array_equal(np.sort(cpu_d, axis=1), np.sort(gpu_d, axis=1)))})
    return rows


def _time_search(index, q, k: int, repeats: int):
    out = index.search(q, k)  # warm-up, and the result to compare
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(q, k)
        secs.append(time.perf_counter() - t0)
    return secs, out


def _search_row(secs: list[float], queries: int) -> dict:
    import numpy as np

    best = float(np.median(secs))
    return {"batch_ms": best * 1e3, "queries_per_s": queries / best}


# ---------------------------------------------------------------------------- runtimes


def pytorch_runner(model, device: str) -> RunnerFactory:
    """PyTorch eager (FP32) on ``device``: the exported graph's computation (probs and packed codes)."""

    def make(size: int) -> Runner:
        import copy

        import torch

        from dlheir.export.onnx_export import ExportWrapper

        wrapper = ExportWrapper(copy.deepcopy(model)).to(device).eval()  # a copy: .to() moves in place

        def run(pixels):
            with torch.no_grad():
                probs, codes = wrapper(torch.from_numpy(pixels).to(device))
            return probs.cpu().numpy(), codes.cpu().numpy()  # .cpu() waits for the GPU

        return run

    return make


def onnxruntime_runner(onnx_for_size: Callable[[int], Path], provider: str) -> RunnerFactory:
    """ONNX Runtime with exactly ``provider`` (no silent fallback to the CPU)."""

    def make(size: int) -> Runner:
        import onnxruntime as ort

        if provider not in ort.get_available_providers():
            hint = "; pip install onnxruntime-gpu" if provider == "CUDAExecutionProvider" else ""
            raise Unavailable(f"this onnxruntime build has no {provider} (it has {', '.join(ort.get_available_providers())}){hint}")
        session = ort.InferenceSession(str(onnx_for_size(size)), providers=[provider])
        if session.get_providers()[0] != provider:
            raise Unavailable(f"onnxruntime could not start {provider} (it fell back to {session.get_providers()[0]})")
        return lambda pixels: session.run(None, {IMAGE: pixels})

    return make


def tensorrt_runner(engine_for_size: Callable[[int], Path]) -> RunnerFactory:
    def make(size: int) -> Runner:
        from dlheir.export.tensorrt_export import EngineRunner

        engine = EngineRunner(engine_for_size(size))
        return lambda pixels: engine(pixels, len(pixels))

    return make


def triton_runner(url: str, model: str, fallback: RunnerFactory) -> tuple[RunnerFactory, dict]:
    """The TensorRT engine through a Triton at ``url`` at that model's image size, the engine directly
    at other sizes. The returned dict records which size went which way."""
    via: dict = {}

    def make(size: int) -> Runner:
        import numpy as np
        import tritonclient.grpc as g

        client = g.InferenceServerClient(url)
        try:
            meta = client.get_model_metadata(model, as_json=True)
            cfg = client.get_model_config(model, as_json=True)["config"]
        except Exception as exc:  # noqa: BLE001 - not reachable, or no such model
            via[size] = f"engine directly (Triton at {url} has no model {model}: {_one_line(exc)})"
            return fallback(size)
        backend = cfg.get("backend") or cfg.get("platform", "")
        served = {i["name"]: [int(d) for d in i["shape"]] for i in meta["inputs"]}.get(IMAGE, [])
        if "tensorrt" not in backend or size not in served:
            via[size] = f"engine directly (Triton's {model} is backend {backend!r}, IMAGE {served})"
            return fallback(size)
        via[size] = f"Triton {url} model {model}"

        def run(pixels):
            inp = g.InferInput(IMAGE, list(pixels.shape), "UINT8")
            inp.set_data_from_numpy(np.ascontiguousarray(pixels))
            return client.infer(model, [inp], outputs=[g.InferRequestedOutput(CODE)]).as_numpy(CODE)

        return run

    return make, via


# ---------------------------------------------------------------------------- report


def report(results: dict) -> str:
    """Plain-text summary of a results dict (what ``run`` prints)."""
    from dlheir.benchmarks.common import table

    lines = [f"GPU: {results.get('gpu', {}).get('name', '?')}"]
    for key in ("model", "engine", "compare"):
        part = results.get(key)
        if part is None:
            continue
        if part.get("status", "ok") != "ok":
            lines.append(f"{key}: {part['status']} ({part['reason']})")
        elif key == "engine":
            lines.append(f"engine: TensorRT {'FP16' if part.get('fp16') else 'FP32'}, {part['image_size']} px, "
                         f"batch 1..{part['max_batch']}, built in {part['build_seconds']:.1f} s")
        elif key == "compare":
            names = [n for n in part if isinstance(part[n], dict)]
            lines.append(f"codes on {part['images']} images: {part['bit_agreement']:.4%} of bits equal, "
                         f"{part['codes_differing']:.2%} of codes differ in some bit")
            metric_keys = list(part[names[0]]) if names else []
            lines.append(table([{"runtime": n, **part[n]} for n in names],
                               [("runtime", "runtime", ""), *((m, m, ".4f") for m in metric_keys)]))
        elif key == "model":
            lines.append(f"model: {part.get('checkpoint')} ({part.get('bits')} bits, {part.get('image_size')} px)")
    tp = results.get("throughput") or {}
    _rows_part(lines, "throughput", tp, None,
               [("backend", "backend", ""), ("size", "size", "d"), ("batch", "batch", "d"),
                ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f")],
               lambda r: f"{r['backend']} {r['size']} px" + (f" batch {r['batch']}" if "batch" in r else ""))
    for size, how in sorted((tp.get("tensorrt_via") or {}).items()):
        lines.append(f"tensorrt at {size} px measured via {how}")
    fs = results.get("faiss") or {}
    _rows_part(lines, "faiss", fs, f"FAISS binary flat search, {fs.get('queries')} queries, top {fs.get('k')}:",
               [("device", "device", ""), ("codes", "codes", "d"),
                ("batch_ms", "ms/batch", ".1f"), ("queries_per_s", "queries/s", ".0f")],
               lambda r: f"faiss {r['device']} {r['codes']} codes")
    return "\n".join(lines)


def _rows_part(lines: list[str], name: str, part: dict, title: str | None, columns: list, label) -> None:
    """One measured part of ``report``: why it did not run, a table of its ok rows, one line per other row."""
    from dlheir.benchmarks.common import table

    if part.get("status", "ok") != "ok":
        lines.append(f"{name}: {part['status']} ({part['reason']})")
    rows = part.get("rows", [])
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        if title:
            lines.append(title)
        lines.append(table(ok, columns))
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{label(r)}: {r['status']} ({r['reason']})")


def plot(results: dict, path: Path | str) -> Path:
    """Throughput per backend (one panel per image size) and FAISS search time, CPU vs GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dlheir.benchmarks.common import save_figure

    rows = [r for r in (results.get("throughput") or {}).get("rows", []) if r.get("status") == "ok"]
    frows = [r for r in (results.get("faiss") or {}).get("rows", []) if r.get("status") == "ok"]
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["backend"] == backend and r["size"] == size)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.set_title(f"{size} px")
        ax.legend()
    ax = axes[0][-1]
    codes = sorted({r["codes"] for r in frows})
    for i, device in enumerate(("cpu", "gpu")):
        ms = [next((r["batch_ms"] for r in frows if r["device"] == device and r["codes"] == n), np.nan) for n in codes]
        ax.bar(np.arange(len(codes)) + (i - 0.5) * 0.4, ms, 0.4, label=f"faiss {device}")
    ax.set_xticks(np.arange(len(codes)), [f"{n:,}" for n in codes])
    ax.set_xlabel("codes in the index")
    ax.set_ylabel(f"ms per {(results.get('faiss') or {}).get('queries', '')} queries")
    ax.set_title("FAISS binary search")
    if codes:
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"dlheir check gpu: {results.get('gpu', {}).get('name', '?')}")
    return save_figure(fig, path)


def write_outputs(results: dict, out_dir: Path | str) -> tuple[Path, Path]:
    """``check_gpu.json`` and ``check_gpu.png`` under ``out_dir``."""
    from dlheir.benchmarks.common import save_json

    json_path = save_json("check_gpu", results, out_dir)
    return json_path, plot(results, Path(out_dir) / "check_gpu.png")


# ---------------------------------------------------------------------------- the command


def _model(args: argparse.Namespace, out_dir: Path):
    """(model, checkpoint path, meta): --checkpoint, or the digits demo trained once into out_dir/train."""
    from dlheir.export.checkpoint import load_checkpoint

    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / "train" / "model.pt"
    if not args.checkpoint:
        from dlheir.export.train import TrainConfig, train

        print(f"[check gpu] no --checkpoint: training the digits demo setting into {ckpt.parent} (once)", flush=True)
        train(TrainConfig(out=str(ckpt.parent), resume=True))
    model, meta = load_checkpoint(ckpt)
    return model, ckpt, meta


def run(args: argparse.Namespace) -> int:
    if not cuda_available():
        raise UserError(NO_GPU)
    import torch

    from dlheir.benchmarks.common import bench_model, parse_sizes
    from dlheir.export.onnx_export import export_onnx
    from dlheir.export.tensorrt_export import build_engine, compare_fp16_fp32

    out_dir = Path(args.out_dir)
    sizes, batches = parse_sizes(args.sizes), parse_sizes(args.batches, "--batches")
    faiss_sizes = parse_sizes(args.faiss_sizes, "--faiss-sizes")
    props = torch.cuda.get_device_properties(0)
    results: dict = {"gpu": {"name": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / 2**30,
                             "torch": torch.__version__, "cuda": torch.version.cuda}}
    model, ckpt, meta = _model(args, out_dir)
    results["model"] = {"checkpoint": str(ckpt), "bits": model.bits, "image_size": meta["image_size"]}
    work = out_dir / "models"  # the ONNX graphs and engines built here, kept for a look afterwards
    onnx_path = export_onnx(model, work / "model.onnx", meta["image_size"])
    plan = work / "model.plan"
    results["engine"] = run_part("engine", lambda: build_engine(onnx_path, plan, fp16=True, max_batch=max(batches)))
    if results["engine"]["status"] == "ok":
        results["compare"] = run_part("compare", lambda: compare_fp16_fp32(plan, onnx_path, "digits"))
    else:
        results["compare"] = {"status": "skipped", "reason": "no TensorRT engine (see engine)"}

    # throughput: a deterministic untrained model at each size (speed does not depend on the weights)
    speed_model, _ = bench_model(None, sizes[0], model.bits)
    onnx_cache: dict[int, Path] = {}
    plan_cache: dict[int, Path] = {}

    def onnx_for(size: int) -> Path:
        if size not in onnx_cache:
            onnx_cache[size] = export_onnx(speed_model, work / f"speed_{size}.onnx", size)
        return onnx_cache[size]

    def plan_for(size: int) -> Path:
        if size not in plan_cache:
            facts = build_engine(onnx_for(size), work / f"speed_{size}.plan", fp16=True, max_batch=max(batches))
            print(f"[check gpu] engine at {size} px built in {facts['build_seconds']:.1f} s", flush=True)
            plan_cache[size] = Path(facts["engine"])
        return plan_cache[size]

    trt = tensorrt_runner(plan_for)
    via: dict = {}
    if args.triton_url:
        trt, via = triton_runner(args.triton_url, args.triton_model, trt)
    runners = {"pytorch-cuda": pytorch_runner(speed_model, "cuda"),
               "onnxruntime-cuda": onnxruntime_runner(onnx_for, "CUDAExecutionProvider"),
               "tensorrt": trt}

    def throughput() -> dict:
        rows = measure_throughput(runners, sizes, batches, args.repeats)
        return {"rows": rows, "tensorrt_via": {s: via.get(s, "engine directly (no --triton-url given)")
                                               for s in sizes}}

    results["throughput"] = run_part("throughput", throughput)
    results["faiss"] = run_part("faiss", lambda: {"queries": FAISS_QUERIES, "k": FAISS_K, "bits": model.bits,
                                                  "rows": faiss_search(faiss_sizes, model.bits)})
    json_path, png = write_outputs(results, out_dir)
    print(report(results))
    print(f"written {json_path}, {png}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("status") == "failed"]
    if failed:
        print(f"dlheir check gpu: parts failed: {', '.join(failed)} (reasons above)")
        return 1
    return 0
