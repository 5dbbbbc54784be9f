import numpy as np
import pytest

from dlheir import codes
from dlheir.contract import ContractError, validate_bits


@pytest.mark.parametrize("bits", [8, 12, 24, 48, 64, 256])
def test_pack_roundtrip_and_length(bits):
    rng = np.random.default_rng(bits)
    b = rng.integers(0, 2, size=(5, bits), dtype=np.uint8)
    packed = codes.pack_bits(b)
    assert packed.shape == (5, codes.code_bytes(bits))
    np.testing.assert_array_equal(codes.unpack_bits(packed, bits), b)


def test_msb_first_and_zero_padding():
    bits = np.zeros((1, 12), dtype=np.uint8)
    bits[0, 0] = 1  # first bit -> MSB of byte 0
    bits[0, 11] = 1  # last bit -> bit 4 (0x10) of byte 1, low nibble is padding
    assert codes.to_hex(codes.pack_bits(bits)[0]) == "8010"


def test_threshold_is_inclusive():
    probs = np.array([[0.5, 0.4999, 0.9, 0.1, 0.5, 0.5, 0.0, 1.0]], dtype=np.float32)
    assert codes.to_hex(codes.probs_to_codes(probs)[0]) == format(0b10101101, "02x")


def test_hamming_matches_bit_count():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(4, 48), dtype=np.uint8)
    b = rng.integers(0, 2, size=(7, 48), dtype=np.uint8)
    expected = (a[:, None, :] != b[None, :, :]).sum(-1)
    np.testing.assert_array_equal(codes.hamming(codes.pack_bits(a), codes.pack_bits(b)), expected)


@pytest.mark.parametrize("bad", [0, 4, 10, 260, 47])
def test_bad_bits_rejected(bad):
    with pytest.raises(ContractError, match="multiple of 4"):
        validate_bits(bad)


def test_hex_roundtrip_checks_length():
    c = np.array([1, 2, 3, 4, 5, 255], dtype=np.uint8)
    np.testing.assert_array_equal(codes.from_hex(codes.to_hex(c), 48), c)
    with pytest.raises(ContractError, match="6 bytes"):
        codes.from_hex("0102", 48)


def test_item_id_stable_and_positive():
    from dlheir.contract import rank
    from dlheir.ids import item_id

    assert item_id("3/0042.png") == item_id("3/0042.png")
    assert item_id("3/0042.png") != item_id("3/0043.png")
    assert 0 <= item_id("a") < 2**63
    order = rank(np.array([2, 1, 1, 0]), np.array([5, 9, 3, 7]))
    assert order.tolist() == [3, 2, 1, 0]
