"""Checkpoints carry everything needed to rebuild the model: bits, size, arch, class names."""

from __future__ import annotations

from pathlib import Path

import torch

from dlheir.errors import UserError
from dlheir.export.model import DLHEIR

# 2: the inverted residual block is torchvision's own (state-dict keys changed), the network
#    normalises its pixel input itself. Older checkpoints are refused: train again.
FORMAT_VERSION = 2
RETRAIN = "train it again (dlheir train --force, or dlheir demo --retrain)"


def save_checkpoint(path: Path | str, model: DLHEIR, meta: dict) -> Path:
    """Write atomically: a crash mid-save never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": model.state_dict(),
        "bits": model.bits,
        "arch": model.arch,
        "num_classes": model.num_classes,
        **meta,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if not isinstance(version, int):
        raise UserError(f"{path} is not a dlheir checkpoint (format {FORMAT_VERSION})")
    if version < FORMAT_VERSION:
        raise UserError(f"{path} is a checkpoint of an older dlheir (format {version}; this version reads format "
                        f"{FORMAT_VERSION}, whose network layout differs); {RETRAIN}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} is a checkpoint of a newer dlheir (format {version}; this version reads format "
                        f"{FORMAT_VERSION}); upgrade dlheir or {RETRAIN}")
    return payload


def load_weights(model: DLHEIR, state_dict: dict, path: Path | str) -> None:
    """Strict load; a checkpoint of another layout is a UserError telling to retrain."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path} does not match this version's {model.arch} layout ({first[:160]}); {RETRAIN}") from exc


def load_checkpoint(path: Path | str) -> tuple[DLHEIR, dict]:
    """Rebuild the model in eval mode; returns (model, meta without the weights)."""
    payload = read_checkpoint(path)
    model = DLHEIR(payload["bits"], payload["num_classes"], payload["arch"])
    load_weights(model, payload["state_dict"], path)
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer")}
    return model, meta
