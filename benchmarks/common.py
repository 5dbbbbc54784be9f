"""Small helpers shared by the benchmarks: timing, percentiles, tables, JSON and PNG output."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS_DIR = Path("results")


def cycle_index(n: int) -> Callable[[], int]:
    """0, 1, ..., n-1, 0, 1, ...: one index per call (which query a timed call uses next)."""
    it = iter(range(10**12))
    return lambda: next(it) % n


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> np.ndarray:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def latency_stats(seconds: np.ndarray | list[float]) -> dict:
    s = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(s, 50)), "p99_ms": float(np.percentile(s, 99)),
            "mean_ms": float(s.mean()), "n": int(len(s))}


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "platform": platform.platform()}


def save_json(name: str, payload: dict, out_dir: Path | str = RESULTS_DIR) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def parse_sizes(text: str, flag: str = "--sizes") -> list[int]:
    """A comma-separated list of integers (a flag's value), de-duplicated and sorted; UserError if not."""
    from dlheir.errors import UserError

    try:
        return sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"{flag}: comma-separated integers, got {text!r}") from None


def save_figure(fig, path: Path | str) -> Path:
    """Lay out, write as PNG (parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format)."""
    heads = [h for _, h, _ in columns]
    cells = [[format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "")) for k, _, f in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def bar_plot(path: Path | str, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
             log: bool = False, xlabel: str | None = None) -> Path:
    """Grouped bars: one group per label, one bar per series; a None/NaN value leaves its bar out
    (not measured there). The y label states the scale (linear or log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.5, len(labels) * 0.9 + len(series) * 0.6) + 3, 4.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0,
                  ha="right" if max(map(len, labels), default=0) > 8 else "center")
    ax.set_ylabel(f"{ylabel} ({'log' if log else 'linear'} scale)")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    return save_figure(fig, path)


def bench_model(checkpoint: str | None, image_size: int, bits: int):
    """The model to benchmark: a checkpoint, or a deterministic untrained DLHEIR (speed does not
    depend on the weights). Returns (model, image_size)."""
    import torch

    if checkpoint:
        from dlheir.export.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        return model, meta["image_size"]
    from dlheir.export.model import build_model

    torch.manual_seed(0)
    return build_model(bits, 10).eval(), image_size


def triton_with_model(model, image_size: int, work_dir: Path | str):
    """A TritonServer (not started) serving ``model`` from a repository generated in ``work_dir``
    (backend onnx-cpu); returns (server, onnx_path)."""
    from dlheir.export.onnx_export import export_onnx
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import prepare_repository

    work_dir = Path(work_dir)
    onnx_path = export_onnx(model, work_dir / "model.onnx", image_size)
    repo = prepare_repository(work_dir / "model_repository", onnx_path, "onnx-cpu")
    server = TritonServer(repo.path, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          state_dir=work_dir / "triton")
    return server, onnx_path


def sample_images(n: int, image_size: int = 64) -> list[bytes]:
    """``n`` real encoded images: the bundled digits as PNG bytes, cycled if n is larger."""
    from dlheir.export.data import list_images, materialize_digits

    files = [p for _, p in list_images(materialize_digits(image_size))]
    return [files[i % len(files)].read_bytes() for i in range(n)]
