"""Hash codes from Triton: images (paths, bytes or pixel arrays) -> (PROBS, CODE).

Sends batches to the public ensemble (``dlheir.contract.PUBLIC_MODEL``, or the model named
by ``model``: encoded bytes; Triton decodes and warps) or to the ensemble's network model
directly (pre-resized uint8 pixels), with several requests in flight so Triton's dynamic
batcher stays busy. S, N and the model's fingerprint are read from the model called (its
config parameters, written by ``dlheir.triton.repository.prepare_repository``), whatever
backend runs it.
"""

from __future__ import annotations

import logging

from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from dlheir.contract import (
    BITS_PARAM, CODE, FINGERPRINT_PARAM, IMAGE, IMAGE_BYTES, IMAGE_SIZE_PARAM, PROBS, PUBLIC_MODEL,
    signature_from_shapes,
)
from dlheir.errors import UserError

log = logging.getLogger(__name__)


class HashError(UserError):
    """Triton refused an image (e.g. it cannot be decoded); names the image.

    ``reason`` is the one-line cause without the image's name (e.g. "truncated image",
    "too large: 12000x12000 = 144000000 pixels exceeds the limit of 40000000 pixels").
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class HashResult(NamedTuple):
    """One image's outcome in ``hash_each``: probs and code, or the reason it failed."""

    probs: np.ndarray | None
    code: np.ndarray | None
    error: str | None


def _reason(message: str) -> str:
    """Triton's error text -> the preprocessing model's one-line reason when it is there."""
    marker = "dlheir_preprocess: "
    return message[message.index(marker) + len(marker):] if marker in message else message


def _read(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, PathLike)):  # a numpy array or PIL image: a PNG of its RGB pixels
        from dlheir.client.images import encode

        return encode(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise HashError(f"cannot read {path}: {exc.strerror}", f"cannot read: {exc.strerror}") from exc


START_HINT = "start it with 'dlheir triton start', or give --triton HOST:PORT"


TRITON_CLEARTEXT_FIX = ("serve Triton with TLS ('dlheir triton start --tls-cert CERT --tls-key KEY') and give its CA "
                        "(--triton-tls-ca, triton_tls_ca in the config file, or $DLHEIR_TRITON_TLS_CA), or run it on "
                        "this machine; --insecure accepts images crossing the network in the clear")


def connection_error(url: str, exc) -> UserError:
    """A failed first call to ``url`` -> one line: Triton not reachable (UNAVAILABLE), a gRPC
    server that is not Triton (UNIMPLEMENTED: e.g. the cloud server), or Triton's own message."""
    from dlheir.client.cloud import unreachable_reason

    status = str(exc.status() or "")
    message = " ".join(str(exc.message() or "").split())
    if status.endswith("UNAVAILABLE"):
        reason = unreachable_reason(message)
        return UserError(f"cannot reach Triton at {url}{f' ({reason})' if reason else ''}: {START_HINT}")
    if status.endswith("UNIMPLEMENTED"):
        return UserError(f"{url} answers gRPC but is not Triton (is it the cloud server's port?): {START_HINT}")
    return UserError(f"Triton at {url}: {status.rsplit('.', 1)[-1] or 'error'}: {message}")


class TritonHasher:
    """Client of the Triton hash service (gRPC).

    ``model`` (default the public ensemble) is what ``hash_images`` calls; ``pixel_model``
    (default: the ensemble's last step, or ``model`` itself if it is not an ensemble) is what
    ``hash_pixels`` calls. ``image_size``, ``bits`` and ``fingerprint`` are read from ``model``:
    its config parameters, S and N checked against its tensor shapes. ``fingerprint`` is None
    for a model whose config does not carry one.
    """

    def __init__(self, url: str = "127.0.0.1:8001", batch_size: int = 16, max_in_flight: int = 4,
                 model: str = PUBLIC_MODEL, pixel_model: str | None = None, tls_ca: str | None = None,
                 insecure: bool = False) -> None:
        import tritonclient.grpc as grpcclient

        from dlheir.client.cloud import check_cleartext

        # Triton sees every plaintext image: never over a network in the clear unless asked to
        check_cleartext(url, tls_ca, insecure, "Triton", TRITON_CLEARTEXT_FIX)
        self._grpc = grpcclient
        self.url, self.batch_size, self.max_in_flight = url, batch_size, max_in_flight
        self.model = model
        self.client = (grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(tls_ca)) if tls_ca
                       else grpcclient.InferenceServerClient(url))
        try:
            ready = self.client.is_model_ready(model)
        except grpcclient.InferenceServerException as exc:
            self.client.close()
            raise connection_error(url, exc) from None
        except Exception as exc:
            self.client.close()
            raise UserError(f"cannot reach Triton at {url}: {exc}") from exc
        try:
            if not ready:
                raise UserError(f"Triton at {url} has no ready model '{model}'; ready models: "
                                f"{', '.join(self._ready_models()) or 'none'}")
            self._read_model(pixel_model)
        except BaseException:
            self.client.close()
            raise

    def _ready_models(self) -> list[str]:
        index = self.client.get_model_repository_index().models
        return sorted({m.name for m in index if m.state == "READY"})

    def _read_model(self, pixel_model: str | None) -> None:
        """S, N, fingerprint and the pixel model, from the model called."""
        config = self.client.get_model_config(self.model).config
        params = {k: v.string_value for k, v in config.parameters.items()}
        steps = config.ensemble_scheduling.step
        self.pixel_model = pixel_model or (steps[-1].model_name if steps else self.model)
        meta = self.client.get_model_metadata(self.model)
        shapes = {t.name: list(t.shape) for t in [*meta.inputs, *meta.outputs]}
        # a network model itself (dlheir_onnx_cpu, ...) takes warped pixels, not image files: the
        # images are then preprocessed here, with the module the ensemble's first step runs
        self.takes_pixels = IMAGE in {t.name for t in meta.inputs} and IMAGE_BYTES not in {t.name for t in meta.inputs}
        if PROBS not in shapes:
            raise UserError(f"Triton model '{self.model}' has no {PROBS} output: not a DLHEIR hashing model")
        if IMAGE not in shapes:  # an ensemble takes IMAGE_BYTES: S from the network it runs
            pixel_meta = self.client.get_model_metadata(self.pixel_model)
            shapes[IMAGE] = next((list(t.shape) for t in pixel_meta.inputs if t.name == IMAGE), [])
        size, bits = signature_from_shapes(shapes)
        for name, value in ((IMAGE_SIZE_PARAM, size), (BITS_PARAM, bits)):
            if name in params and params[name] != str(value):
                raise UserError(f"Triton model '{self.model}': parameter {name} {params[name]} disagrees with its "
                                f"tensor shapes ({value}); regenerate its repository")
        self.image_size, self.bits = size, bits
        self.fingerprint: str | None = params.get(FINGERPRINT_PARAM) or None
        log.info("Triton %s, model %r: %d px, %d bits, fingerprint %s%s", self.url, self.model, size, bits,
                 self.fingerprint, " (images preprocessed here: the model takes pixels)" if self.takes_pixels else "")

    def _infer(self, model: str, name: str, array: np.ndarray, datatype: str, labels: Sequence[str]):
        inp = self._grpc.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        outputs = [self._grpc.InferRequestedOutput(PROBS), self._grpc.InferRequestedOutput(CODE)]
        try:
            result = self.client.infer(model, [inp], outputs=outputs)
        except self._grpc.InferenceServerException as exc:
            where = labels[0] if len(labels) == 1 else f"one of {', '.join(labels)}"
            message = " ".join(str(exc.message()).split())
            raise HashError(f"Triton could not hash {where}: {message}", _reason(message)) from exc
        return result.as_numpy(PROBS), result.as_numpy(CODE)

    def _run(self, model, name, chunks, datatype, labels_of) -> tuple[np.ndarray, np.ndarray]:
        with ThreadPoolExecutor(self.max_in_flight) as pool:
            results = list(pool.map(lambda c: self._infer(model, name, c[1], datatype, labels_of(c[0], len(c[1]))), chunks))
        if not results:
            return np.zeros((0, self.bits), np.float32), np.zeros((0, (self.bits + 7) // 8), np.uint8)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def hash_images(self, sources: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """Images (paths, encoded bytes, numpy arrays or PIL images) -> (probs float32 [B, N], codes uint8 [B, L])."""
        from dlheir.client.images import is_path, label

        sources = list(sources)
        labels = [str(s) if is_path(s) else label(s, i) for i, s in enumerate(sources)]
        if self.takes_pixels:
            pixels = np.stack([self._pixels(s, name) for s, name in zip(sources, labels)]) if sources else \
                np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
            return self.hash_pixels(pixels)
        data = [_read(s) for s in sources]
        chunks = [(i, np.array([[d] for d in data[i:i + self.batch_size]], dtype=object))
                  for i in range(0, len(data), self.batch_size)]
        return self._run(self.model, IMAGE_BYTES, chunks, "BYTES", lambda i, n: labels[i:i + n])

    def hash_each(self, sources: Iterable) -> Iterator[HashResult]:
        """One request per image, ``max_in_flight`` at a time (Triton batches them): a failure
        is that image's ``HashResult.error`` and the others are still hashed. Yields in order."""

        def one(source) -> HashResult:
            if self.takes_pixels:
                try:
                    probs, codes = self.hash_images([source])
                except HashError as exc:
                    return HashResult(None, None, exc.reason)
                return HashResult(probs[0], codes[0], None)
            try:
                probs, codes = self._infer(self.model, IMAGE_BYTES, np.array([[_read(source)]], dtype=object),
                                           "BYTES", [str(source) if isinstance(source, (str, PathLike)) else "image"])
            except HashError as exc:
                return HashResult(None, None, exc.reason)
            return HashResult(probs[0], codes[0], None)

        with ThreadPoolExecutor(self.max_in_flight) as pool:
            yield from pool.map(one, sources)

    def _pixels(self, source, name: str) -> np.ndarray:
        """One image -> uint8 [S, S, 3] by dlheir.preprocess (for a model that takes pixels)."""
        from dlheir.preprocess import ImageDecodeError, preprocess

        if isinstance(source, (str, PathLike)):
            source = _read(source)  # a missing file: HashError naming it
        try:
            return preprocess(source, self.image_size)
        except ImageDecodeError as exc:
            raise HashError(f"cannot hash {name}: {exc.reason}", exc.reason) from None

    def hash_one(self, source) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (probs [N], code [L]) in a single request (the trapdoor path)."""
        probs, codes = self.hash_images([source])
        return probs[0], codes[0]

    def hash_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, S, S, 3] already warped -> (probs, codes), calling the network model directly."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise UserError(f"pixels must be uint8 [B, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        chunks = [(i, pixels[i:i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
        return self._run(self.pixel_model, IMAGE, chunks, "UINT8", lambda i, n: [f"pixels[{i}:{i + n}]"])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
