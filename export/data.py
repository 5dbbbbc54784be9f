"""Data sets as image folders, and the paper's per-class split.

A data set is a folder with one sub-folder per class (as Corel10K is distributed).
``--data digits`` materializes scikit-learn's bundled digits (real, labelled, 10
classes, 8x8 grey) once as RGB PNG files of a chosen size in that layout, so every
later step (training, evaluation, the owner's upload) reads real image files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dlheir.errors import UserError
from dlheir.ids import item_id

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_CACHE = Path("runs/data")


@dataclass(frozen=True)
class Record:
    relpath: str  # posix path relative to the data set root, e.g. "3/0042.png"
    path: Path  # absolute path
    label: int
    id: int  # dlheir.ids.item_id(relpath)


def materialize_digits(size: int = 64, cache_dir: Path | str = DEFAULT_CACHE) -> Path:
    """Write sklearn's digits once as RGB PNGs ``<cache>/digits_<size>/<class>/<nnnn>.png``; return the root.

    1797 images, 10 classes; the 8x8 grey digits (0..16) are scaled to 0..255, resized
    bilinearly to ``size`` and saved as RGB. Written into a temporary folder and renamed, so
    a concurrent or interrupted run never leaves a half-written set behind.
    """
    import os
    import shutil

    root = Path(cache_dir) / f"digits_{size}"
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        out = tmp / str(int(label)) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(out)
    (tmp / ".complete").touch()
    if (root / ".complete").exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)  # an old, incomplete set
    try:
        tmp.rename(root)
    except OSError:  # lost a race: the winner's copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data(spec: str | Path, size: int = 64, cache_dir: Path | str = DEFAULT_CACHE) -> Path:
    """'digits' -> the materialized digits folder; anything else must be an image folder."""
    if str(spec) == "digits":
        return materialize_digits(size, cache_dir)
    check_data_spec(spec)
    return Path(spec)


def check_data_spec(spec: str | Path) -> None:
    """UserError unless ``spec`` is 'digits' or an existing folder (checked before anything heavy loads)."""
    if str(spec) != "digits" and not Path(spec).is_dir():
        raise UserError(f"data folder not found: {spec} (give an image folder with one sub-folder per class, or 'digits')")


def list_images(root: Path | str) -> list[tuple[str, Path]]:
    """All image files under ``root`` (recursive), sorted, as (relative posix path, absolute path)."""
    root = Path(root).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(p.relative_to(root).as_posix(), p) for p in files]


def split_dataset(
    root: Path | str, seed: int = 0, train_fraction: float = 0.8
) -> tuple[list[Record], list[Record], list[str]]:
    """Per class, a seeded ``train_fraction`` goes to the database (training set), the rest to queries.

    Returns (database, queries, class_names), each list sorted by relative path.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {c: [f for f in list_images(root / c)] for c in classes}
    per_class = {c: files for c, files in per_class.items() if files}
    if len(per_class) < 2:
        raise UserError(
            f"{root} has {len(per_class)} class folder(s) with images; need at least 2 "
            "(one sub-folder of images per class)"
        )
    class_names = sorted(per_class)
    database: list[Record] = []
    queries: list[Record] = []
    rng = random.Random(seed)
    for label, name in enumerate(class_names):
        files = per_class[name]
        if len(files) < 2:
            raise UserError(f"class {name!r} in {root} has {len(files)} image; need at least 2 to split")
        order = list(range(len(files)))
        rng.shuffle(order)
        n_train = min(len(files) - 1, max(1, round(train_fraction * len(files))))
        for rank, idx in enumerate(order):
            rel, path = files[idx]
            rel = f"{name}/{rel}"
            rec = Record(rel, path, label, item_id(rel))
            (database if rank < n_train else queries).append(rec)
    database.sort(key=lambda r: r.relpath)
    queries.sort(key=lambda r: r.relpath)
    return database, queries, class_names


def check_images(records: list[Record], limit: int = 5) -> None:
    """Fail early, naming the files, if any image cannot be read (header check, cheap)."""
    bad = []
    for rec in records:
        try:
            with Image.open(rec.path) as img:
                img.verify()
        except Exception as exc:  # Pillow raises many types for broken files
            bad.append(f"{rec.path} ({type(exc).__name__})")
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise UserError(f"unreadable image(s): {', '.join(bad[:limit])}{more}")
