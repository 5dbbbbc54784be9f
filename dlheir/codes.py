"""The hash code format: written down once, used by every component.

A DLHEIR code of N bits (N a multiple of 4, 8..256: ``dlheir.contract.validate_bits``) comes from the hash layer's
N values p_0..p_{N-1} in (0, 1):

* bit i = 1 if p_i >= 0.5 else 0 (``THRESHOLD``);
* bits are packed MSB-first: bit 0 is the most significant bit of byte 0,
  bit 8 the most significant bit of byte 1, and so on (``numpy.packbits`` order);
* the last byte is zero-padded on the right when N is not a multiple of 8,
  so a code is ``ceil(N / 8)`` bytes (12 bits -> 2 bytes, 48 -> 6, 64 -> 8).

Zero padding never changes a Hamming distance. The exported ONNX graph computes the
same packing in-graph (output ``CODE``); ``pack_bits`` here is the reference the
tests compare it against. Codes print as lowercase hex of those bytes.
"""

from __future__ import annotations

import numpy as np

from dlheir.contract import ContractError, code_bytes

THRESHOLD = 0.5


def binarize(probs: np.ndarray) -> np.ndarray:
    """Hash-layer values [B, N] -> bits uint8 {0,1} [B, N]."""
    return (np.asarray(probs) >= THRESHOLD).astype(np.uint8)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bits {0,1} [B, N] -> packed codes uint8 [B, ceil(N/8)], MSB-first, zero-padded."""
    return np.packbits(np.asarray(bits, dtype=np.uint8), axis=-1, bitorder="big")


def unpack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes uint8 [B, ceil(N/8)] -> bits uint8 {0,1} [B, N] (padding dropped)."""
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=-1, count=int(bits), bitorder="big")


def probs_to_codes(probs: np.ndarray) -> np.ndarray:
    """Hash-layer values [B, N] -> packed codes uint8 [B, ceil(N/8)]."""
    return pack_bits(binarize(probs))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed codes a [Q, L] and b [D, L] -> int32 [Q, D].

    A reference for tests and offline evaluation; the server searches with FAISS.
    """
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    xor = a[:, None, :] ^ b[None, :, :]
    return np.unpackbits(xor, axis=-1).sum(axis=-1, dtype=np.int32)


def to_hex(code: np.ndarray | bytes) -> str:
    """One packed code -> lowercase hex."""
    return bytes(np.asarray(bytearray(code) if isinstance(code, bytes) else code, dtype=np.uint8)).hex()


def from_hex(text: str, bits: int) -> np.ndarray:
    """Lowercase/uppercase hex -> one packed code uint8 [ceil(bits/8)], length checked."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ContractError(f"not a hex code: {text!r}") from None
    if len(raw) != code_bytes(bits):
        raise ContractError(f"a {bits}-bit code is {code_bytes(bits)} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).copy()
