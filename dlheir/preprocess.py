"""Image preprocessing, defined once: decode, RGB, warp to SxS, uint8 pixels.

Every consumer uses this module: training and evaluation (``dlheir.export``), the ONNX
graph (which takes the uint8 pixels this produces), the Triton preprocess model and the
clients. Normalisation is not done here: it is the network's own first layer
(``dlheir.export.model.Normalize``), so every path feeds the network the same pixels.

As in the paper, images are *warped* to S x S (resized without keeping the aspect
ratio, no crop), so nothing is cut off.

Decoding is bounded: the pixel count is read from the image header and an image of more
than ``max_pixels`` pixels (default ``DEFAULT_MAX_PIXELS``, 40 megapixels) is refused
before any pixel is decoded. A JPEG at least twice as large as S x S on both sides is
decoded at a reduced scale (Pillow's ``draft``: 1/2, 1/4 or 1/8, still at least S x S),
which is part of this definition: every path (training, Triton, clients) gets the same
pixels. Every way decoding can fail is an ``ImageDecodeError`` (a ``ValueError``) whose
subclass and one-line ``reason`` say what is wrong with the image.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = Image.Resampling.BILINEAR
DEFAULT_MAX_PIXELS = 40_000_000  # width x height; the Triton model reads its own from config.pbtxt

ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAGIC = {PNG_SIGNATURE: "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF"}


class ImageDecodeError(ValueError):
    """An image that cannot be preprocessed. ``reason`` is one line without the source's name."""

    default_reason = "cannot decode image"

    def __init__(self, reason: str | None = None, source: str | None = None) -> None:
        self.reason = " ".join((reason or self.default_reason).split())
        self.source = source
        super().__init__(f"cannot decode {source}: {self.reason}" if source else f"cannot decode image: {self.reason}")


class NotAnImageError(ImageDecodeError):
    """Pillow recognizes no image format in the data."""

    default_reason = "not an image Pillow can read"


class TruncatedImageError(ImageDecodeError):
    """The data ends before the image does."""

    default_reason = "truncated image"


class CorruptImageError(ImageDecodeError):
    """A recognized format whose data is damaged (bad checksum, broken compressed stream)."""

    default_reason = "corrupt image data"


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the configured limit (or Pillow's decompression-bomb limit)."""

    default_reason = "too large"


def _png_diagnosis(data: bytes) -> ImageDecodeError | None:
    """Walk a PNG's chunks: a truncated stream or a bad CRC, or None when the chunks look intact."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            return TruncatedImageError()
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            return TruncatedImageError()
        crc = struct.unpack(">I", data[end - 4:end])[0]
        if zlib.crc32(data[pos + 4:end - 4]) & 0xFFFFFFFF != crc:
            return CorruptImageError("corrupt image data (bad checksum)")
        if ctype == b"IEND":
            return None
        pos = end


def _too_large(width: int, height: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"too large: {width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels")


def _classify(exc: BaseException, data: bytes | None, max_pixels: int | None) -> ImageDecodeError:
    """Pillow's exception (and the raw data, when at hand) -> the ImageDecodeError subclass that says why."""
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own limit, checked inside Image.open
        found = re.search(r"\((\d+) pixels\).*?limit of (\d+)", str(exc))
        if not found:
            return ImageTooLargeError(f"too large: {exc}")
        limit = min(int(found[2]), max_pixels or int(found[2]))
        if data is not None and data.startswith(PNG_SIGNATURE) and len(data) >= 24:
            return _too_large(*struct.unpack(">II", data[16:24]), limit)
        return ImageTooLargeError(f"too large: {found[1]} pixels exceeds the limit of {limit} pixels")
    if data is not None and data.startswith(PNG_SIGNATURE):
        diagnosis = _png_diagnosis(data)
        if diagnosis is not None:
            return diagnosis
    message = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        fmt = next((name for magic, name in _MAGIC.items() if data is not None and data.startswith(magic)), None)
        if fmt:
            return CorruptImageError(f"corrupt image data (a {fmt} file whose header Pillow cannot read)")
        return NotAnImageError()
    if isinstance(exc, OSError) and "truncated" in message.lower():
        return TruncatedImageError()
    if isinstance(exc, SyntaxError) and "crc" in message.lower():
        return CorruptImageError("corrupt image data (bad checksum)")
    if isinstance(exc, (SyntaxError, zlib.error)) or "broken" in message:
        return CorruptImageError(f"corrupt image data ({message})")
    if isinstance(exc, MemoryError):
        return ImageTooLargeError("too large: out of memory while decoding")
    return ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {message})")


def check_size(img: Image.Image, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when ``img`` (opened, not yet decoded) has more than ``max_pixels`` pixels."""
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise _too_large(width, height, max_pixels)


def _decode(source: str | Path | bytes, max_pixels: int | None, draft_size: int | None) -> Image.Image:
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    try:
        img = Image.open(io.BytesIO(data)) if data is not None else Image.open(source)
        check_size(img, max_pixels)
        if draft_size:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, keeping both sides >= draft_size
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"cannot read: {exc.strerror}") from exc
    except Exception as exc:  # hostile input can make Pillow raise almost anything; each is one image's failure
        if data is None:  # a file: its bytes tell a truncated PNG from a bad checksum, or a bomb's size
            try:
                with open(source, "rb") as f:
                    data = f.read(24 if isinstance(exc, Image.DecompressionBombError) else -1)
            except OSError:
                pass
        raise _classify(exc, data, max_pixels) from exc


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Open a path, encoded bytes, a PIL image or an HxWx3 uint8 array as an RGB PIL image.

    Encoded images of more than ``max_pixels`` pixels (None: only Pillow's own limit) are
    refused from their header; ``draft_size`` lets a JPEG decode at a reduced scale that
    keeps both sides >= ``draft_size``. Raises an ``ImageDecodeError`` subclass.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageDecodeError(f"expected a uint8 HxW or HxWx3 array, got {source.dtype} {source.shape}")
        return Image.fromarray(source).convert("RGB")
    try:
        return _decode(source, max_pixels, draft_size)
    except ImageDecodeError as exc:
        label = f"image bytes ({len(source)} bytes)" if isinstance(source, (bytes, bytearray, memoryview)) \
            else f"image {source}"
        raise type(exc)(exc.reason, label) from exc.__cause__


def warp_resize(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 array [size, size, 3], warped (no crop, aspect not kept)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img.resize((size, size), RESAMPLE), dtype=np.uint8)


def preprocess(source: ImageSource, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image source -> the network's input pixels: uint8 [size, size, 3] RGB.

    Raises an ``ImageDecodeError`` subclass for an image that cannot be decoded or has
    more than ``max_pixels`` pixels.
    """
    return warp_resize(load_image(source, max_pixels, draft_size=size), size)

