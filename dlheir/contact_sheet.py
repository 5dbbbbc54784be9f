"""The demo's picture: query images beside their decrypted top-k, right and wrong class marked, with the
retrieval metrics and the latencies under them (one PNG)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

RIGHT, WRONG = "#1a9850", "#d73027"  # green / red frames


@dataclass
class SheetHit:
    image: bytes  # the decrypted image file
    label: str
    distance: int


@dataclass
class SheetRow:
    query: bytes  # the query image file
    label: str
    hits: list[SheetHit]


def _pixels(data: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def contact_sheet(path: Path | str, rows: list[SheetRow], metrics: dict[str, dict[str, float]],
                  latency_ms: dict[str, dict[str, float]], title: str) -> Path:
    """Write the sheet: one row per query (the query, then its hits framed green when their class is the
    query's, red when not, with the Hamming distance); under it ``metrics`` ({series: {"P@1": ...}}) and
    ``latency_ms`` ({step: {"p50": ..., "p99": ...}}) as bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = max((len(r.hits) for r in rows), default=0)
    cols = k + 1
    fig = plt.figure(figsize=(max(8.0, 1.3 * cols), 1.35 * len(rows) + 4.2))
    grid = fig.add_gridspec(len(rows) + 1, cols, height_ratios=[1.0] * len(rows) + [2.6], hspace=0.45)
    for r, row in enumerate(rows):
        cells = [(row.query, f"query ({row.label})", "black")]
        cells += [(h.image, f"d={h.distance} ({h.label})", RIGHT if h.label == row.label else WRONG) for h in row.hits]
        for c, (data, caption, colour) in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_pixels(data), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if c == 0 else 3)
            ax.set_title(caption, fontsize=7, color=colour if c else "black", pad=2)
    charts = grid[len(rows), :].subgridspec(1, 2, wspace=0.35)
    ax = fig.add_subplot(charts[0, 0])
    names = list(next(iter(metrics.values()), {}))
    x = np.arange(len(names))
    width = 0.8 / max(1, len(metrics))
    for i, (series, values) in enumerate(metrics.items()):
        ax.bar(x + i * width, [values[n] for n in names], width, label=series)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, names, fontsize=8)
    ax.set_ylim(0, 1.25)  # room for the legend above the bars
    ax.set_ylabel("precision / mAP", fontsize=8)
    ax.set_title("retrieval quality (top-k, Hamming ranking)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax = fig.add_subplot(charts[0, 1])
    steps = list(latency_ms)
    x = np.arange(len(steps))
    for i, q in enumerate(("p50", "p99")):
        ax.bar(x + i * 0.4, [latency_ms[s][q] for s in steps], 0.4, label=q)
    ax.set_xticks(x + 0.2, steps, fontsize=8)
    ax.set_ylabel("ms per query (log scale)", fontsize=8)
    ax.set_yscale("log")
    ax.set_title("latency per query", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.07)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
