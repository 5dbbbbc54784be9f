"""Parameter and FLOP counts of DLHEIR vs the baseline, beside the paper's Table 2."""

from __future__ import annotations

import torch

from dlheir.export.model import build_model, count_parameters

# Table 2 as printed (units not stated in the paper; they do not match DenseNet201's real size).
PAPER_TABLE2 = {
    ("dlheir", 48): (176.64, 158.25), ("dlheir", 32): (176.54, 158.25),
    ("dlheir", 24): (176.49, 158.21), ("dlheir", 12): (176.41, 158.13),
    ("baseline", 48): (184.19, 164.97), ("baseline", 32): (183.87, 164.68),
    ("baseline", 24): (183.71, 164.54), ("baseline", 12): (183.46, 164.32),
}


def model_stats(bits: int, image_size: int, num_classes: int = 100) -> list[dict]:
    """Counts with torch's own counter (``torch.utils.flop_counter``): FLOPs = 2 x MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for arch in ("dlheir", "baseline"):
        model = build_model(bits, num_classes, arch).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
        flops = counter.get_total_flops()
        paper = PAPER_TABLE2.get((arch, bits), (None, None))
        rows.append({
            "arch": arch, "bits": bits, "image_size": image_size, "params": count_parameters(model),
            "params_hash_model": count_parameters(model) - count_parameters(model.classifier),
            "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "paper_params": paper[0], "paper_mflops": paper[1],
        })
    return rows


def format_stats(rows: list[dict]) -> str:
    lines = [f"{'model':<10} {'bits':>4} {'size':>4} {'params (M)':>11} {'GFLOPs':>8} {'GMACs':>7} | {'paper params':>12} {'paper MFLOPs':>12}"]
    for r in rows:
        pp = f"{r['paper_params']:.2f}" if r["paper_params"] else "-"
        pf = f"{r['paper_mflops']:.2f}" if r["paper_mflops"] else "-"
        lines.append(
            f"{r['arch']:<10} {r['bits']:>4} {r['image_size']:>4} {r['params'] / 1e6:>11.3f} {r['gflops']:>8.3f} "
            f"{r['gmacs']:>7.3f} | {pp:>12} {pf:>12}"
        )
    d, b = rows
    lines.append(f"DLHEIR / baseline: params {d['params'] / b['params']:.3f}, FLOPs {d['gflops'] / b['gflops']:.3f}"
                 f"  (paper: {176.64 / 184.19:.3f}, {158.25 / 164.97:.3f} at 48 bits)")
    return "\n".join(lines)
