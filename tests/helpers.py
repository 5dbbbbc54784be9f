"""Test helpers (plain functions and constants; fixtures stay in conftest.py): the repository root,
the small image size and code length the tests use, a real image folder, a deterministic model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_SIZE = 32  # DenseNet's block 4 is 1x1 here: fast, and each hash value is one sigmoid
BITS = 48


def make_digit_folder(root: Path, classes=(0, 1, 2), per_class: int = 12, size: int = SMALL_SIZE) -> Path:
    """Real images: scikit-learn's digits, as RGB PNGs in an image-folder layout."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in classes:
        idx = np.flatnonzero(digits.target == c)[:per_class]
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((size, size)).convert("RGB").save(root / str(c) / f"{i:04d}.png")
    return root


def margined_model(bits: int = BITS, num_classes: int = 3, seed: int = 0):
    """An untrained but deterministic model whose hash values sit far from the 0.5 threshold,
    so codes are stable across batchings and runtimes (a fair equality test)."""
    from dlheir.export.model import build_model

    torch.manual_seed(seed)
    model = build_model(bits, num_classes).eval()
    with torch.no_grad():
        model.hash.bn.weight.mul_(1000.0)
    return model
