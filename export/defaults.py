"""Training settings, declared once (import-light: no torch, so ``dlheir train --help`` is instant).

``TrainConfig``'s fields are the one declaration: their defaults are the digits demo, their
metadata carry the help text and the paper's value, and ``add_train_arguments`` generates
``dlheir train``'s flags from them (help "default X; paper: Y"). ``DIGITS_DEMO`` and ``PAPER``
(the settings ``dlheir demo`` chooses between) are read off the same fields.

``DIGITS_DEMO`` is the setting ``make demo`` trains: a 48-bit DLHEIR at 64x64 from random
initialization on the bundled digits. Measured on the 2-core development machine (shared with
other work): about 45 s per epoch, 6 epochs, P@20 about 0.99 on the digits query split.
``PAPER`` is the paper's setting (Corel10K, 384x384, ImageNet weights, 200 epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("dlheir", "baseline")


def _setting(default: Any, help: str, paper: Any = None, demo: bool = False, metavar: str | None = None,
             choices: tuple | None = None) -> Any:
    """A field with its CLI help; ``paper``: the paper's value (shown in the help); ``demo``: one of the
    settings ``dlheir demo`` picks between the digits and the paper's values."""
    return field(default=default, metadata={"help": help, "paper": paper, "demo": demo, "metavar": metavar,
                                            "choices": choices})


@dataclass
class TrainConfig:
    """Training settings; the defaults are the digits demo, ``paper`` in each field's metadata the paper's."""

    data: str = _setting("digits", "image folder (one sub-folder per class) or 'digits', the bundled digits",
                         paper="Corel10K", metavar="DATA")
    bits: int = _setting(48, "code length N, a multiple of 4 from 8 to 256", paper=48, demo=True, metavar="N")
    image_size: int = _setting(64, "input side S; images are warped to SxS", paper=384, demo=True, metavar="S")
    epochs: int = _setting(6, "training epochs", paper=200, demo=True)
    batch_size: int = _setting(32, "images per SGD step", paper=64, demo=True)
    lr: float = _setting(0.05, "SGD learning rate, cosine-annealed; the paper's is with ImageNet weights",
                         paper=0.01, demo=True)
    momentum: float = _setting(0.9, "SGD momentum", paper=0.9, demo=True)
    weight_decay: float = _setting(5e-4, "SGD weight decay, not stated in the paper")
    weights: str = _setting("none", "initial weights: 'none' (random), 'imagenet' (torchvision's DenseNet201 "
                                    "weights, downloaded once) or a state dict path", paper="imagenet", demo=True)
    arch: str = _setting("dlheir", "dlheir (inverted residual block) or baseline (original DenseNet201 + hash "
                                   "layer)", paper="both", choices=ARCHS)
    seed: int = _setting(0, "seed of the split, the initialisation and the batch order")
    out: str = _setting("runs/train", "run directory; RUN_DIR/model.pt is saved there each epoch",
                        metavar="RUN_DIR")
    resume: bool = _setting(False, "continue from RUN_DIR/model.pt")
    force: bool = _setting(False, "start over and replace an existing RUN_DIR/model.pt (without --force or "
                                  "--resume, train refuses to overwrite it)")

    def validate(self) -> "TrainConfig":
        """Refuse impossible settings with one line (UserError / ContractError); returns self."""
        from dlheir.contract import validate_bits
        from dlheir.errors import UserError

        validate_bits(self.bits)
        if self.resume and self.force:
            raise UserError("--resume continues the checkpoint and --force replaces it: give one of them")
        if self.image_size < 32:
            raise UserError(f"--image-size must be at least 32 (DenseNet downsamples 32x), got {self.image_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.arch not in ARCHS:
            raise UserError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        return self


SETTINGS = dataclasses.fields(TrainConfig)
DIGITS_DEMO = {f.name: f.default for f in SETTINGS if f.metadata["demo"]}
PAPER = {f.name: f.metadata["paper"] for f in SETTINGS if f.metadata["demo"]}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field (``--image-size`` for ``image_size``), help from its metadata."""
    for f in SETTINGS:
        flag, meta = f"--{f.name.replace('_', '-')}", f.metadata
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        paper = f"; paper: {meta['paper']}" if meta["paper"] is not None else ""
        parser.add_argument(flag, type=type(f.default), default=f.default, choices=meta["choices"],
                            metavar=meta["metavar"], help=f"{meta['help']} (default {f.default}{paper})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``add_train_arguments`` flags."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in SETTINGS})
