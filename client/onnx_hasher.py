"""Hash codes in this process with ONNX Runtime, from an exported ONNX graph: no Triton needed.

:class:`OnnxHasher` has :class:`dlheir.client.triton.TritonHasher`'s interface (``hash_images``,
``hash_one``, ``hash_each``, ``hash_pixels``, ``image_size``, ``bits``, ``fingerprint``), so the
owner and user flows can run on it. Images are decoded and warped by
:func:`dlheir.preprocess.preprocess`, the same function Triton's preprocessing model runs, and the
graph is the one Triton serves: the codes are the same either way, and so is the fingerprint
(:func:`dlheir.contract.model_fingerprint` of the ONNX file), which the cloud server checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dlheir.client.triton import HashError, HashResult
from dlheir.contract import CODE, IMAGE, PROBS, model_fingerprint, signature_from_shapes
from dlheir.errors import UserError
from dlheir.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess


class OnnxHasher:
    """ONNX Runtime (CPU) on ``onnx_path`` (a graph from ``dlheir export onnx``: uint8 ``IMAGE``
    [B, S, S, 3] -> ``PROBS``, ``CODE``). ``max_pixels``: the decoding limit, as Triton's
    ``max_pixels`` (default :data:`dlheir.preprocess.DEFAULT_MAX_PIXELS`; None: Pillow's only)."""

    def __init__(self, onnx_path: str | os.PathLike, batch_size: int = 16, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 threads: int | None = None) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path} (export one with 'dlheir export onnx')")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("hashing without Triton needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise UserError(f"{path}: not an ONNX model ONNX Runtime can load ({' '.join(str(exc).split())[:200]})") \
                from None
        shapes = {t.name: list(t.shape) for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        if CODE not in shapes:
            raise UserError(f"{path} has no {CODE} output: not a DLHEIR hashing network")
        self.image_size, self.bits = signature_from_shapes(shapes)
        self.fingerprint: str | None = model_fingerprint(path)
        self.path = path
        self.url = self.model = self.pixel_model = str(path)  # where the codes come from, in messages
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def _pixels(self, source, index: int) -> np.ndarray:
        from dlheir.client.images import is_path, label

        try:
            return preprocess(source, self.image_size, self.max_pixels)
        except ImageDecodeError as exc:
            name = str(source) if is_path(source) else label(source, index)
            raise HashError(f"cannot hash {name}: {exc.reason}", exc.reason) from None

    def hash_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, S, S, 3] already warped -> (probs float32 [B, N], codes uint8 [B, L])."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise UserError(f"pixels must be uint8 [B, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        if not len(pixels):
            return np.zeros((0, self.bits), np.float32), np.zeros((0, (self.bits + 7) // 8), np.uint8)
        probs, codes = [], []
        for i in range(0, len(pixels), self.batch_size):
            p, c = self.session.run([PROBS, CODE], {IMAGE: pixels[i:i + self.batch_size]})
            probs.append(p)
            codes.append(c)
        return np.concatenate(probs).astype(np.float32), np.concatenate(codes).astype(np.uint8)

    def hash_images(self, sources: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """Images (paths, encoded bytes, numpy arrays, PIL images) -> (probs [B, N], codes [B, L])."""
        sources = list(sources)
        if not sources:
            return self.hash_pixels(np.zeros((0, self.image_size, self.image_size, 3), np.uint8))
        return self.hash_pixels(np.stack([self._pixels(s, i) for i, s in enumerate(sources)]))

    def hash_one(self, source) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (probs [N], code [L])."""
        probs, codes = self.hash_images([source])
        return probs[0], codes[0]

    def hash_each(self, sources: Iterable) -> Iterator[HashResult]:
        """Per image, in order: its probs and code, or the reason it cannot be hashed."""
        for index, source in enumerate(sources):
            try:
                probs, codes = self.hash_pixels(self._pixels(source, index)[None])
            except HashError as exc:
                yield HashResult(None, None, exc.reason)
                continue
            yield HashResult(probs[0], codes[0], None)

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
