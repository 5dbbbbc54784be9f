"""The hash service against hostile images (issue 9, items 13-15): every failure of one image
fails that image's request alone with a one-line reason, decoding is bounded by a pixel
limit read from the header, JPEGs decode via draft, and `dlheir hash` hashes every input."""

from __future__ import annotations

import io
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from helpers import REPO_ROOT, SMALL_SIZE
from dlheir.codes import to_hex
from dlheir.export.data import list_images
from dlheir.preprocess import (DEFAULT_MAX_PIXELS, CorruptImageError, ImageDecodeError, ImageTooLargeError,
                               NotAnImageError, TruncatedImageError, load_image, preprocess, warp_resize)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A tiny PNG that declares width x height (8-bit gray): zlib-compressed zero rows, or ``idat`` as given."""
    if idat is None:
        idat = zlib.compress(b"\0" * (1 + width) * 4, 9)  # a few rows; Pillow never gets that far
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


BOMB = png_header(30000, 30000)  # 900 MP: Pillow's own DecompressionBombError, raised inside Image.open
TOO_LARGE = png_header(7000, 7000, idat=b"not zlib data")  # 49 MP > 40 MP; decoding it would fail as corrupt


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_files(digits_small) -> list[Path]:
    return [p for _, p in list_images(digits_small)][:6]


@pytest.fixture(scope="module")
def bad_images(good_files) -> dict[str, bytes]:
    png = Path(good_files[0]).read_bytes()
    flipped = bytearray(png)
    idat = png.find(b"IDAT")
    flipped[idat + 6] ^= 0xFF  # a data byte inside IDAT: the chunk's CRC no longer matches
    return {"not an image": b"hello, this is text", "truncated": png[: len(png) * 2 // 3],
            "bad checksum": bytes(flipped), "bomb": BOMB, "too large": TOO_LARGE}


@pytest.fixture(scope="module")
def onnx_codes(served_model):
    session = ort.InferenceSession(str(served_model["onnx"]))

    def codes(sources) -> np.ndarray:
        return session.run(None, {"IMAGE": np.stack([preprocess(s, SMALL_SIZE) for s in sources])})[1]
    return codes


# --- item 15 (in process): each failure is a distinct ImageDecodeError subclass with its reason ---

@pytest.mark.parametrize("name, error, reason", [
    ("not an image", NotAnImageError, "not an image Pillow can read"),
    ("truncated", TruncatedImageError, "truncated image"),
    ("bad checksum", CorruptImageError, "corrupt image data (bad checksum)"),
    ("bomb", ImageTooLargeError, f"too large: 30000x30000 = 900000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} pixels"),
    ("too large", ImageTooLargeError, f"too large: 7000x7000 = 49000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} pixels"),
])
def test_each_failure_has_its_own_reason(bad_images, tmp_path, name, error, reason):
    with pytest.raises(error) as info:
        preprocess(bad_images[name], SMALL_SIZE)
    assert isinstance(info.value, ImageDecodeError) and isinstance(info.value, ValueError)
    assert info.value.reason == reason and "\n" not in str(info.value)
    path = tmp_path / "image.png"
    path.write_bytes(bad_images[name])
    with pytest.raises(error, match=str(path)):  # the same reason for a file, named in the message
        preprocess(path, SMALL_SIZE)


# --- item 14 (in process): the pixel limit is checked from the header; JPEGs decode via draft ---

def test_pixel_limit_is_checked_before_decoding(good_files):
    # TOO_LARGE's pixel data is not even zlib: it is refused as too large, so it was never decoded
    with pytest.raises(ImageTooLargeError):
        load_image(TOO_LARGE)
    with pytest.raises(CorruptImageError):  # ... which decoding would have found
        load_image(TOO_LARGE, max_pixels=None)
    with pytest.raises(ImageTooLargeError, match="32x32 = 1024 pixels exceeds the limit of 1000 pixels"):
        preprocess(good_files[0], SMALL_SIZE, max_pixels=1000)
    assert preprocess(good_files[0], SMALL_SIZE, max_pixels=1024).shape == (SMALL_SIZE, SMALL_SIZE, 3)


def test_large_jpeg_is_decoded_at_reduced_scale(good_files):
    big = Image.open(good_files[0]).convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC)
    jpeg = encoded(big, "JPEG", quality=95)
    assert load_image(jpeg, draft_size=SMALL_SIZE).size == (128, 96)  # 1/8 scale, both sides >= 32
    assert load_image(jpeg, draft_size=150).size == (256, 192)  # 1/4 (1/8 would make 96 < 150)
    assert load_image(jpeg).size == (1024, 768)  # no draft asked: full decode
    pixels = preprocess(jpeg, SMALL_SIZE)
    np.testing.assert_array_equal(pixels, warp_resize(load_image(jpeg, draft_size=SMALL_SIZE), SMALL_SIZE))
    full = warp_resize(load_image(jpeg), SMALL_SIZE)  # draft changes pixels only slightly
    assert np.abs(pixels.astype(int) - full.astype(int)).mean() < 4


def test_committed_preprocess_config_bounds_decoding():
    config = text_format.Parse((REPO_ROOT / "model_repository" / "dlheir_preprocess" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert int(config.parameters["max_pixels"].string_value) == DEFAULT_MAX_PIXELS
    assert sum(group.count for group in config.instance_group) >= 2
    assert not config.HasField("dynamic_batching")  # a small request never shares an execution with a heavy one


def test_bad_max_pixels_is_refused_at_start(served_model, tmp_path):
    from dlheir.errors import UserError
    from dlheir.triton.repository import check_repository, max_pixels

    assert max_pixels(served_model["repo"]) == DEFAULT_MAX_PIXELS
    repo = shutil.copytree(served_model["repo"], tmp_path / "model_repository")
    config_path = repo / "dlheir_preprocess" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace('"40000000"', '"40 MP"'))
    with pytest.raises(UserError, match="max_pixels must be a whole number of pixels"):
        check_repository(repo)


# --- item 13: a bomb (or any bad image) fails its own request only, with one line, no traceback ---

def _infer_raw(url: str, model: str, items: list[bytes], output: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("IMAGE_BYTES", [len(items), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b] for b in items], dtype=object))
        return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(output)]).as_numpy(output)
    except grpcclient.InferenceServerException as exc:
        return exc
    finally:
        client.close()


def _assert_one_line(exc, reason: str) -> None:
    message = exc.message()
    assert reason in message
    assert "\n" not in message and "Traceback" not in message and ".py" not in message and "At:" not in message


def test_bomb_batched_with_good_images_fails_alone(triton_server, good_files, bad_images, onnx_codes):
    expected = onnx_codes(good_files)
    requests = [Path(f).read_bytes() for f in good_files]
    requests.insert(3, bad_images["bomb"])
    requests.insert(5, bad_images["truncated"])
    for _ in range(3):  # all requests released together, so Triton's batcher puts them in the same batches
        results: list = [None] * len(requests)
        barrier = threading.Barrier(len(requests))

        def send(i: int) -> None:
            barrier.wait()
            results[i] = _infer_raw(triton_server.grpc_url, "dlheir", [requests[i]], "CODE")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bomb, truncated = results.pop(3), results.pop(4)
        _assert_one_line(bomb, "too large: 30000x30000 = 900000000 pixels exceeds the limit of 40000000 pixels")
        _assert_one_line(truncated, "truncated image")
        np.testing.assert_array_equal(np.concatenate(results), expected)


def test_one_request_with_a_bomb_fails_naming_the_image(triton_server, good_files):
    good = Path(good_files[0]).read_bytes()
    error = _infer_raw(triton_server.grpc_url, "dlheir_preprocess", [good, BOMB, good], "IMAGE")
    _assert_one_line(error, "dlheir_preprocess: image 2 of 3: too large: 30000x30000")
    pixels = _infer_raw(triton_server.grpc_url, "dlheir_preprocess", [good, good], "IMAGE")
    np.testing.assert_array_equal(pixels, np.stack([preprocess(good, SMALL_SIZE)] * 2))


# --- item 14 through Triton: refused from the header; a large JPEG gives the in-process code ---

def test_triton_refuses_too_large_and_hashes_large_jpeg(triton_server, good_files, onnx_codes):
    from dlheir.client.triton import TritonHasher

    jpeg = encoded(Image.open(good_files[1]).convert("RGB").resize((1600, 1200)), "JPEG")
    with TritonHasher(triton_server.grpc_url) as hasher:
        refused, ok = hasher.hash_each([TOO_LARGE, jpeg])
    assert refused.code is None
    assert refused.error == "too large: 7000x7000 = 49000000 pixels exceeds the limit of 40000000 pixels"
    assert ok.error is None
    np.testing.assert_array_equal(ok.code, onnx_codes([jpeg])[0])


def test_small_requests_are_served_while_a_heavy_one_runs(triton_server, good_files, onnx_codes):
    """An ordering check, not a timing one: 3 small requests sent after a heavy request started all
    complete before it does (with one instance, or merged into its batch, they would wait for it)."""
    from dlheir.client.triton import TritonHasher
    from dlheir.triton.stall import heavy_png

    heavy = heavy_png(5000)  # 25 MP, 85 KB on disk; 8 of them take seconds to decode
    done = threading.Event()

    def send_heavy() -> None:
        assert not isinstance(_infer_raw(triton_server.grpc_url, "dlheir", [heavy] * 8, "CODE"), Exception)
        done.set()

    thread = threading.Thread(target=send_heavy)
    thread.start()
    try:
        time.sleep(0.5)  # the heavy request is being decoded
        with TritonHasher(triton_server.grpc_url) as hasher:
            codes = [hasher.hash_one(f)[1] for f in good_files[:3]]
        assert not done.is_set(), "the small requests waited for the heavy one"
    finally:
        thread.join()
    np.testing.assert_array_equal(np.stack(codes), onnx_codes(good_files[:3]))


@pytest.fixture(scope="module")
def low_limit_triton(served_model, tmp_path_factory):
    """A second tritonserver, preprocessing only, with max_pixels lowered in its config.pbtxt."""
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer

    work = tmp_path_factory.mktemp("low_limit")
    repo = shutil.copytree(served_model["repo"], work / "model_repository")
    config_path = repo / "dlheir_preprocess" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace('"40000000"', '"2000"'))
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          state_dir=work / "triton", models=("dlheir_preprocess",))
    with server:
        yield server


def test_max_pixels_is_read_from_the_model_config(low_limit_triton, good_files):
    small = Path(good_files[0]).read_bytes()  # 32x32 = 1024 pixels
    large = encoded(Image.open(good_files[0]).resize((50, 50)))  # 2500 pixels
    pixels = _infer_raw(low_limit_triton.grpc_url, "dlheir_preprocess", [small], "IMAGE")
    np.testing.assert_array_equal(pixels[0], preprocess(small, SMALL_SIZE))
    error = _infer_raw(low_limit_triton.grpc_url, "dlheir_preprocess", [large], "IMAGE")
    _assert_one_line(error, "dlheir_preprocess: too large: 50x50 = 2500 pixels exceeds the limit of 2000 pixels")


# --- item 15: `dlheir hash` hashes every input and reports each failure on its own line ---

def test_hash_cli_hashes_every_input(triton_server, good_files, bad_images, onnx_codes, tmp_path, capsys):
    from dlheir.cli import main

    good1, good2 = str(good_files[0]), str(good_files[1])
    bad = {}
    for name, filename in [("not an image", "notanimage.txt"), ("truncated", "truncated.png"),
                           ("bad checksum", "badcrc.png"), ("too large", "huge.png")]:
        bad[name] = tmp_path / filename
        bad[name].write_bytes(bad_images[name])
    missing = str(tmp_path / "missing.png")
    argv = ["hash", good1, str(bad["not an image"]), str(bad["truncated"]), good2, str(bad["bad checksum"]),
            str(bad["too large"]), missing, "--triton", triton_server.grpc_url]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    want = onnx_codes([good1, good2])
    assert out.splitlines() == [f"{to_hex(want[0])}  {good1}", f"{to_hex(want[1])}  {good2}"]
    assert err.splitlines() == [
        f"dlheir: error: {bad['not an image']}: not an image Pillow can read",
        f"dlheir: error: {bad['truncated']}: truncated image",
        f"dlheir: error: {bad['bad checksum']}: corrupt image data (bad checksum)",
        f"dlheir: error: {bad['too large']}: too large: 7000x7000 = 49000000 pixels exceeds the limit of 40000000 pixels",
        f"dlheir: error: {missing}: cannot read: No such file or directory",
        "dlheir: error: 5 of 7 images could not be hashed",
    ]
    assert main(["hash", good1, good2, "--triton", triton_server.grpc_url]) == 0
