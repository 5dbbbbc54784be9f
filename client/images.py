"""Images as the Python API takes them: a path, encoded bytes, a numpy array or a PIL image,
alone or in a list.

Pixels are never preprocessed here: an in-memory array or PIL image is made RGB by
:func:`dlheir.preprocess.load_image` (the one preprocessing module) and encoded losslessly as
PNG, so Triton's preprocessing model, an in-process ONNX Runtime hasher and the encrypted blob
all see the same image. Paths and encoded bytes are passed on as they are.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

from dlheir.errors import UserError

ACCEPTED = ("a path (str or os.PathLike), encoded image bytes, a numpy uint8 array (HxW or HxWxC), "
            "a PIL image, or a list of them")


class ImageTypeError(UserError, TypeError):
    """A value that is not an image the API takes (a ``TypeError`` and a ``UserError``)."""


def _is_array(x: Any) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _is_pil(x: Any) -> bool:
    if "PIL" not in __import__("sys").modules:
        return False
    from PIL import Image

    return isinstance(x, Image.Image)


def is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def is_image(x: Any) -> bool:
    """One image of a kind the API takes (a 4-D array is a batch, not one image)."""
    return (is_path(x) or isinstance(x, (bytes, bytearray, memoryview)) or _is_pil(x)
            or (_is_array(x) and x.ndim in (2, 3)))


def describe(x: Any) -> str:
    """What was given, in a few words (for error messages)."""
    if _is_array(x):
        return f"a numpy array of {x.dtype} {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    if type(x).__module__ != "builtins":
        return f"a {type(x).__module__}.{type(x).__qualname__}"
    return f"{type(x).__name__} {x!r:.40}"


def as_batch(images: Any, what: str = "images") -> tuple[list, bool]:
    """(list of images, True when ``images`` was a single image). A list or tuple is a batch, and so
    is a 4-D numpy array [B, H, W, C]. ImageTypeError naming the offending value otherwise."""
    if is_image(images):
        return [images], True
    if _is_array(images) and images.ndim == 4:
        return list(images), False
    if isinstance(images, (list, tuple)):
        for i, x in enumerate(images):
            if not is_image(x):
                raise ImageTypeError(f"{what}[{i}] is {describe(x)}; expected {ACCEPTED}")
        return list(images), False
    raise ImageTypeError(f"{what} is {describe(images)}; expected {ACCEPTED}")


def label(x: Any, index: int | None = None) -> str:
    """A short name for one image: its path, or its kind, place and size."""
    at = "" if index is None else f" #{index}"
    if is_path(x):
        return str(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"image bytes{at} ({len(x)} bytes)"
    if _is_array(x):
        return f"array{at} {'x'.join(map(str, x.shape))}"
    return f"PIL image{at} ({x.width}x{x.height} {x.mode})"


def encode(x: Any, name: str | None = None) -> bytes:
    """The encoded bytes of one image: a file's bytes, bytes as given, or an in-memory array or PIL
    image as a lossless PNG of its RGB pixels (:func:`dlheir.preprocess.load_image`)."""
    if is_path(x):
        try:
            return Path(x).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {x}: {exc.strerror or exc}") from None
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if _is_array(x) or _is_pil(x):
        from dlheir.preprocess import ImageDecodeError, load_image

        try:
            img = load_image(x)
        except ImageDecodeError as exc:
            raise UserError(f"{name or label(x)}: {exc.reason}") from None
        except (TypeError, ValueError) as exc:  # e.g. an HxWx2 array Pillow has no mode for
            raise UserError(f"{name or label(x)}: cannot make an RGB image of it ({exc})") from None
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    raise ImageTypeError(f"{name or 'image'} is {describe(x)}; expected {ACCEPTED}")


_EXT = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg", b"GIF87a": ".gif", b"GIF89a": ".gif", b"BM": ".bmp",
        b"RIFF": ".webp"}


def extension(data: bytes) -> str:
    """A file extension for encoded image bytes ('' when the format is not recognised)."""
    return next((ext for magic, ext in _EXT.items() if data.startswith(magic)), "")


def for_hashing(sources: Sequence[Any]) -> list:
    """Sources a hasher takes: paths and bytes as they are, in-memory images encoded (PNG)."""
    return [x if is_path(x) or isinstance(x, (bytes, bytearray, memoryview)) else encode(x, label(x, i))
            for i, x in enumerate(sources)]
