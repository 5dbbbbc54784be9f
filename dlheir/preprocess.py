"""Image preprocessing, defined once: decode, RGB, warp to SxS, uint8; normalization constants.

Every consumer uses this module: training and evaluation (``dlheir.export``), the ONNX
graph (which takes the uint8 pixels this produces and normalizes in-graph with
``MEAN``/``STD``), the Triton preprocess model and the clients.

As in the paper, images are *warped* to S x S (resized without keeping the aspect
ratio, no crop), so nothing is cut off.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# ImageNet statistics, the ones torchvision's DenseNet201 weights were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESAMPLE = Image.Resampling.BILINEAR

ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]


class ImageDecodeError(ValueError):
    """The bytes or file are not an image Pillow can read."""


def load_image(source: ImageSource) -> Image.Image:
    """Open a path, encoded bytes, a PIL image or an HxWx3 uint8 array as an RGB PIL image."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageDecodeError(f"expected a uint8 HxW or HxWx3 array, got {source.dtype} {source.shape}")
        img = Image.fromarray(source)
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(source)))
            else:
                img = Image.open(source)
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            if isinstance(source, (bytes, bytearray, memoryview)):
                raise ImageDecodeError(
                    f"cannot decode image bytes ({len(source)} bytes): not an image format Pillow can read"
                ) from exc
            raise ImageDecodeError(f"cannot decode image {source}: {exc}") from exc
    return img.convert("RGB")


def warp_resize(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 array [size, size, 3], warped (no crop, aspect not kept)."""
    return np.asarray(img.convert("RGB").resize((size, size), RESAMPLE), dtype=np.uint8)


def preprocess(source: ImageSource, size: int) -> np.ndarray:
    """Any image source -> the network's input pixels: uint8 [size, size, 3] RGB."""
    return warp_resize(load_image(source), size)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> float32 [..., 3, S, S] normalized; numpy reference of the in-graph step."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return np.moveaxis(x, -1, -3)
