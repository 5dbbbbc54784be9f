"""Training and evaluation of DLHEIR on an image-folder data set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dlheir.codes import probs_to_codes
from dlheir.config import quiet
from dlheir.errors import UserError
from dlheir.progress import progress
from dlheir.export import metrics
from dlheir.export.checkpoint import load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from dlheir.export.defaults import TrainConfig
from dlheir.export.data import Record, check_images, resolve_data, split_dataset
from dlheir.export.model import DLHEIR, build_model, to_input
from dlheir.preprocess import ImageDecodeError, preprocess

# Pushes hash values away from the 0.5 threshold so the codes are stable (weight of
# the term 1 - (2p - 1)^2, which is 0 at p in {0, 1} and 1 at p = 0.5).
QUANTIZATION_WEIGHT = 0.1


def data_spec(spec: str | Path) -> str:
    """What a checkpoint records as its data: 'digits', or the image folder as an absolute path
    (so ``dlheir evaluate`` finds it from any working directory)."""
    return "digits" if str(spec) == "digits" else str(Path(spec).resolve())


def _path_of(item: Record | str | Path) -> Path:
    return item.path if isinstance(item, Record) else Path(item)


def load_pixels(records: Sequence[Record | str | Path], image_size: int, desc: str | None = None) -> np.ndarray:
    """Preprocess files (records or paths) to uint8 [N, S, S, 3]; an unreadable file is a UserError naming it."""
    out = np.empty((len(records), image_size, image_size, 3), dtype=np.uint8)
    for i, rec in enumerate(progress(records, desc=desc or "", leave=False, unit="img", disable=desc is None)):
        path = _path_of(rec)
        try:
            out[i] = preprocess(path, image_size)
        except (ImageDecodeError, OSError) as exc:
            raise UserError(f"unreadable image {path}: {exc}") from exc
    return out


def loss_fn(probs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    quant = (1 - (2 * probs - 1) ** 2).mean()
    return F.cross_entropy(logits, labels) + QUANTIZATION_WEIGHT * quant


def train_step(model: DLHEIR, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.train()
    probs, logits = model(x)
    loss = loss_fn(probs, logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), (logits.argmax(1) == y).float().mean().item()  # .item(): float() on a grad tensor warns


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random translation (up to 1/16 of the side), the only augmentation."""
    s = x.shape[-1]
    pad = max(1, s // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[..., dy : dy + s, dx : dx + s]


def train(cfg: TrainConfig) -> Path:
    """Train and save ``<out>/model.pt``; returns its path. Resumable with ``cfg.resume``."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    ckpt_path = out_dir / "model.pt"
    if ckpt_path.exists() and not (cfg.resume or cfg.force):
        raise UserError(f"{ckpt_path} already exists; pass --resume to continue it or --force to start over "
                        "and replace it (or choose another --out)")
    root = resolve_data(cfg.data, cfg.image_size)
    database, queries, class_names = split_dataset(root, seed=cfg.seed)
    check_images(database + queries)
    start_epoch = 0
    if cfg.resume and ckpt_path.exists():
        payload = read_checkpoint(ckpt_path)
        for key in ("bits", "image_size", "arch"):
            if payload[key] != getattr(cfg, key):
                raise UserError(f"--resume: checkpoint has {key}={payload[key]}, asked for {getattr(cfg, key)}")
        model = DLHEIR(payload["bits"], payload["num_classes"], payload["arch"])
        load_weights(model, payload["state_dict"], ckpt_path)
        start_epoch = payload["epoch"]
    else:
        model = build_model(cfg.bits, len(class_names), cfg.arch, cfg.weights)
        payload = None
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    if payload is not None and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    if start_epoch >= cfg.epochs:
        print(f"{ckpt_path} already trained for {start_epoch} epochs")
        return ckpt_path

    pixels = torch.from_numpy(load_pixels(database, cfg.image_size, desc="loading images"))
    labels = torch.tensor([r.label for r in database])
    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        perm = torch.randperm(len(database), generator=gen)
        bar = progress(range(0, len(perm), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        tot_loss = tot_acc = seen = 0.0
        t0 = time.time()
        for start in bar:
            idx = perm[start : start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs 2+ samples
                continue
            x = _augment(to_input(pixels[idx]), gen)
            loss, acc = train_step(model, optimizer, x, labels[idx])
            tot_loss += loss * len(idx)
            tot_acc += acc * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{tot_acc / seen:.3f}", refresh=False)
        scheduler.step()
        history.append({"epoch": epoch + 1, "loss": tot_loss / seen, "acc": tot_acc / seen, "seconds": time.time() - t0})
        meta = {
            "image_size": cfg.image_size,
            "class_names": class_names,
            "epoch": epoch + 1,
            "config": {**cfg.__dict__, "data": data_spec(cfg.data)},
            "history": history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        save_checkpoint(ckpt_path, model, meta)
        if not quiet():  # the epoch's result, also in a log file; said once saved (an interrupt resumes after it)
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {tot_loss / seen:.3f}, accuracy {tot_acc / seen:.3f}, "
                  f"{history[-1]['seconds']:.0f} s, saved {ckpt_path}", flush=True)
    return ckpt_path


@torch.no_grad()
def compute_codes(model: DLHEIR, images: np.ndarray | Sequence[Record | str | Path], image_size: int | None = None,
                  batch_size: int = 64, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hash codes with the PyTorch model, in batches.

    ``images`` is either uint8 pixels [N, S, S, 3] (already ``dlheir.preprocess``-ed) or a list of
    image paths / ``Record``s, which are read with ``dlheir.preprocess.preprocess(path, image_size)``
    one batch at a time (the model normalises them itself).
    Returns (probs float32 [N, bits], packed codes uint8 [N, ceil(bits/8)]).
    """
    model.eval()
    is_pixels = isinstance(images, np.ndarray)
    if not is_pixels and image_size is None:
        raise ValueError("compute_codes: image_size is required when images are paths")
    probs = []
    starts = range(0, len(images), batch_size)
    for i in progress(starts, desc=desc or "", leave=False, disable=desc is None, unit="batch"):
        chunk = images[i : i + batch_size]
        pixels = chunk if is_pixels else load_pixels(chunk, image_size)
        probs.append(model(to_input(pixels))[0].numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, model.bits), np.float32)
    return p, probs_to_codes(p)


def evaluate(checkpoint: Path | str, data: str | None = None, json_out: Path | str | None = None,
             batch_size: int = 64, id_of: Callable[[str], int] | None = None) -> dict:
    """Offline retrieval evaluation: database = train split, queries = query split (same seed).
    Equal distances are ordered by id: ``id_of(relative path)`` (default :func:`dlheir.ids.item_id`),
    so that a served collection's ids (keyed ones) give the same order.

    ``data=None`` uses the data recorded in the checkpoint (``config["data"]``); a checkpoint that
    records none falls back to 'digits' with a one-line note.
    """
    model, meta = load_checkpoint(checkpoint)
    size = meta["image_size"]
    recorded = meta.get("config", {}).get("data")
    if data is not None:
        source = "--data"
    elif recorded:
        data, source = recorded, "recorded in the checkpoint"  # the caller shows it (result["data_source"])
    else:
        data, source = "digits", "default"
        print(f"note: {checkpoint} records no data folder (older checkpoint); using the default 'digits' "
              "(--data to choose)")
    if source == "recorded in the checkpoint" and data != "digits" and not Path(data).is_dir():
        raise UserError(f"{checkpoint} was trained on {data}, which is not a folder here; pass --data")
    root = resolve_data(data, size)
    seed = meta.get("config", {}).get("seed", 0)
    database, queries, class_names = split_dataset(root, seed=seed)
    if class_names != meta["class_names"]:
        raise UserError(f"{root} has classes {class_names[:5]}..., the checkpoint was trained on {meta['class_names'][:5]}...")
    check_images(database + queries)
    _, db_codes = compute_codes(model, database, size, batch_size, desc="database")
    _, q_codes = compute_codes(model, queries, size, batch_size, desc="queries")
    ids = [r.id if id_of is None else id_of(r.relpath) for r in database]
    order, _ = metrics.rankings(q_codes, db_codes, np.array(ids, dtype=np.int64))
    db_labels = np.array([r.label for r in database])
    rel = metrics.relevance(db_labels[order], np.array([r.label for r in queries]))
    result = {
        "checkpoint": str(checkpoint),
        "data": str(root),
        "data_source": source,
        "bits": meta["bits"],
        "image_size": size,
        "arch": meta["arch"],
        "database": len(database),
        "queries": len(queries),
        **metrics.summarize(rel),
    }
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


def format_metrics(result: dict) -> str:
    keys = [k for k in result if k.startswith("P@")] + ["mAP"]
    head = " | ".join(f"{k:>6}" for k in keys)
    vals = " | ".join(f"{result[k]:6.4f}" for k in keys)
    return f"{head}\n{vals}"
