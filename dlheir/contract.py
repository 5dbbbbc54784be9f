"""The serving contract: what every component agrees on and none of them owns.

The export, the Triton model repository, the hash client, the cloud server and the
clients all import their shared facts from here, so that a fact has one place:

* the public Triton model name and the tensor names of the hashing models;
* the image size S and bit count N, read from the model actually called
  (:func:`signature_from_shapes`), never from a number kept elsewhere;
* the code length rule and padding check (:func:`validate_bits`, :func:`check_code`),
  raising :class:`ContractError`, a ``ValueError`` that the CLI prints as one line and the
  cloud server answers with ``INVALID_ARGUMENT``;
* the model fingerprint that ties stored codes to the network that made them
  (:func:`model_fingerprint`, exposed in Triton's configs as the ``fingerprint`` parameter);
* the ranking order, (Hamming distance, id) ascending (:func:`rank`);
* the sealed code page header of private-ranking mode.

The bit packing itself is ``dlheir.codes``; the wire protocol (proto and stubs) is
``dlheir.proto``. Import-light: the standard library only (numpy inside :func:`rank`), so the
CLI can import :class:`ContractError` without loading numpy.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

# --- Triton ---------------------------------------------------------------------------
PUBLIC_MODEL = "dlheir"  # the ensemble every client calls, whatever backend runs the network
IMAGE_BYTES = "IMAGE_BYTES"  # ensemble input: encoded image bytes (TYPE_STRING [1])
IMAGE = "IMAGE"  # network input: uint8 [B, S, S, 3], RGB, warped to S x S
PROBS = "PROBS"  # network output: float32 [B, N], the hash layer's values
CODE = "CODE"  # network output: uint8 [B, ceil(N/8)], packed codes (dlheir.codes)

# --- names ----------------------------------------------------------------------------
# Collection names and user labels: the server's rule, which clients check before sending (and use
# as file names: no paths). Always used with fullmatch, so a trailing "\n" is refused.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# --- codes ----------------------------------------------------------------------------
MIN_BITS = 8
MAX_BITS = 256


class ContractError(ValueError):
    """Input that breaks the contract (a bad code length, padding, model mismatch)."""


def code_bytes(bits: int) -> int:
    """Number of bytes of a packed code of ``bits`` bits."""
    return (int(bits) + 7) // 8


def validate_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported code length (a multiple of 4 from 8 to 256)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS \
            or bits % 4:
        raise ContractError(f"bits must be a multiple of 4 from {MIN_BITS} to {MAX_BITS}, got {bits}")
    return int(bits)


def check_code(code: bytes, bits: int, what: str = "code") -> None:
    """A packed code of ``bits`` bits: exactly ``code_bytes(bits)`` bytes, padding bits zero."""
    want = code_bytes(bits)
    if len(code) != want:
        raise ContractError(f"{what}: code is {len(code)} bytes, a {bits}-bit code is {want} bytes")
    if bits % 8 and code[-1] & (0xFF >> (bits % 8)):
        raise ContractError(f"{what}: the {8 - bits % 8} padding bits after bit {bits} must be zero")


def signature_from_shapes(shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(S, N) from a network's tensor shapes ({name: shape}, with or without the batch axis)."""
    try:
        image, probs = list(shapes[IMAGE]), list(shapes[PROBS])
    except KeyError as exc:
        raise ContractError(f"the model has no {exc.args[0]} tensor: not a DLHEIR hashing network") from None
    if len(image) == 4:
        image = image[1:]
    if len(probs) == 2:
        probs = probs[1:]
    if len(image) != 3 or image[0] != image[1] or image[2] != 3 or len(probs) != 1:
        raise ContractError(f"{IMAGE} {image} / {PROBS} {probs}: expected [S, S, 3] and [N]")
    return int(image[0]), validate_bits(int(probs[0]))


def onnx_signature(path: "str | os.PathLike") -> tuple[int, int]:
    """(image size S, bits N) read from an exported ONNX graph's static shapes (onnx, not torch:
    Triton's host reads it without the training extra)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    return signature_from_shapes(dims)


# --- model identity -------------------------------------------------------------------
FINGERPRINT_PARAM = "fingerprint"  # Triton config parameter naming the network's fingerprint
IMAGE_SIZE_PARAM = "image_size"  # Triton config parameter: S, on models whose inputs do not show it
BITS_PARAM = "bits"  # Triton config parameter: N
MAX_PIXELS_PARAM = "max_pixels"  # dlheir_preprocess config parameter: its pixel limit (0: Pillow's only)


def model_fingerprint(onnx_file: str | os.PathLike) -> str:
    """The fingerprint of an exported network: the first 16 hex digits of the SHA-256 of its ONNX
    file (graph and weights). Codes from networks with different fingerprints are not comparable."""
    digest = hashlib.sha256()
    with open(onnx_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_mismatch(collection: str, fingerprint: str, image_size: int, bits: int, given: str) -> str | None:
    """Why codes of model ``given`` may not go into (or search) a collection recorded with model
    ``fingerprint`` (S = ``image_size``, N = ``bits``), in one line; None when they may. A
    collection recorded without a fingerprint (raw codes, made before fingerprints) is unchecked.
    The cloud server answers this line with FAILED_PRECONDITION; clients of private-ranking
    collections (whose codes the server never sees) raise it as a :class:`ContractError`."""
    if not fingerprint or given == fingerprint:
        return None
    size = f"{image_size} px, " if image_size else ""
    held = f"collection {collection!r} holds codes of model {fingerprint} ({size}{bits} bits)"
    if not given:
        return (f"{held}; this request names no model: hash with that model and send its fingerprint "
                f"(dlheir owner upload and user search do)")
    return (f"{held}; this request's codes come from model {given}: hash with the model the collection was "
            f"made with, or create a new collection")


# --- ranking --------------------------------------------------------------------------
def rank(distances: "np.ndarray", ids: "np.ndarray") -> "np.ndarray":
    """Indices that sort candidates by (distance, id) ascending along the last axis (one query's
    row, or [Q, D] row by row): ties go to the smaller id, so offline evaluation, the server's
    index and private mode give one list."""
    import numpy as np

    return np.lexsort((np.asarray(ids), np.asarray(distances)))


# --- private-ranking mode: sealed code pages -------------------------------------------
PAGE_MAGIC, PAGE_VERSION = b"DLHS", 2  # version 1 (no hash chain, no blob digests) is refused
