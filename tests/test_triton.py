import io

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from helpers import BITS, REPO_ROOT, SMALL_SIZE
from dlheir.client.triton import HashError, TritonHasher
from dlheir.contract import model_fingerprint
from dlheir.export.data import list_images
from dlheir.preprocess import preprocess
from dlheir.triton.repository import TEMPLATES, templates_dir


@pytest.mark.parametrize("model", TEMPLATES)
def test_committed_templates_parse(model):
    config = text_format.Parse((REPO_ROOT / "model_repository" / model / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.name == model and config.max_batch_size >= 32


def test_templates_are_found_and_hold_only_templates():
    assert templates_dir() == REPO_ROOT / "model_repository"  # this checkout's (editable install)
    files = {p.relative_to(templates_dir()).as_posix() for p in templates_dir().rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert files == {f"{m}/config.pbtxt" for m in TEMPLATES} | {"dlheir_preprocess/model.py",
                                                                "dlheir_onnx_cpu/model.py"}


def test_generated_repository_has_the_models_shapes(served_model):
    served = served_model["served"]
    assert served.models == ("dlheir_preprocess", "dlheir_onnx_cpu", "dlheir")
    assert (served.image_size, served.bits, served.version) == (SMALL_SIZE, BITS, 1)
    assert served.fingerprint == model_fingerprint(served_model["onnx"])
    for model in served.models:
        config = text_format.Parse((served_model["repo"] / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        dims = {t.name: list(t.dims) for t in [*config.input, *config.output]}
        if "IMAGE" in dims:
            assert dims["IMAGE"] == [SMALL_SIZE, SMALL_SIZE, 3]
        if "CODE" in dims:
            assert dims["CODE"] == [BITS // 8] and dims["PROBS"] == [BITS]


def test_codes_from_triton_equal_in_process_onnx(triton_server, served_model, digits_small):
    files = [p for _, p in list_images(digits_small)]
    session = ort.InferenceSession(str(served_model["onnx"]))
    _, expected = session.run(None, {"IMAGE": np.stack([preprocess(f, SMALL_SIZE) for f in files])})
    with TritonHasher(triton_server.grpc_url, batch_size=5, max_in_flight=3) as hasher:
        assert (hasher.image_size, hasher.bits) == (SMALL_SIZE, BITS)
        assert hasher.fingerprint == model_fingerprint(served_model["onnx"])
        assert (hasher.model, hasher.pixel_model) == ("dlheir", "dlheir_onnx_cpu")
        _, codes = hasher.hash_images(files)  # ensemble: encoded bytes in
        np.testing.assert_array_equal(codes, expected)
        # a JPEG of a different size goes through the same preprocessing
        buf = io.BytesIO()
        from PIL import Image

        Image.open(files[0]).resize((50, 30)).save(buf, "JPEG")
        _, one = hasher.hash_one(buf.getvalue())
        _, want = session.run(None, {"IMAGE": preprocess(buf.getvalue(), SMALL_SIZE)[None]})
        np.testing.assert_array_equal(one, want[0])
        # the ONNX model directly, with pre-resized pixels
        _, direct = hasher.hash_pixels(np.stack([preprocess(f, SMALL_SIZE) for f in files[:7]]))
        np.testing.assert_array_equal(direct, expected[:7])


def test_the_network_model_itself_hashes_image_files_too(triton_server, digits_small, capsys):
    """--model dlheir_onnx_cpu (the network, which takes warped pixels) hashes files like the ensemble:
    the client preprocesses them with the same module; a bad image is one line naming it."""
    files = [p for _, p in list_images(digits_small)][:9]
    with TritonHasher(triton_server.grpc_url) as ensemble, \
            TritonHasher(triton_server.grpc_url, model="dlheir_onnx_cpu", batch_size=4) as network:
        assert not ensemble.takes_pixels and network.takes_pixels
        assert network.fingerprint == ensemble.fingerprint
        np.testing.assert_array_equal(network.hash_images(files)[1], ensemble.hash_images(files)[1])
        results = list(network.hash_each([files[0], b"definitely not an image"]))
        np.testing.assert_array_equal(results[0].code, ensemble.hash_one(files[0])[1])
        assert results[1].code is None and "not an image Pillow can read" in results[1].error
        want = ensemble.hash_one(files[0])[1].tobytes().hex()
    from dlheir.cli import main

    capsys.readouterr()
    assert main(["hash", str(files[0]), "--triton", triton_server.grpc_url, "--model", "dlheir_onnx_cpu"]) == 0
    assert want in capsys.readouterr().out


def test_corrupt_image_fails_only_its_request(triton_server, digits_small):
    good = [p for _, p in list_images(digits_small)][:3]
    with TritonHasher(triton_server.grpc_url, batch_size=1) as hasher:
        with pytest.raises(HashError, match="not an image Pillow can read"):
            hasher.hash_one(b"definitely not an image")
        _, codes = hasher.hash_images(good)  # the server still serves
        assert codes.shape == (3, BITS // 8)


def test_hash_cli_prints_hex(triton_server, digits_small, capsys):
    from dlheir.cli import main

    f = str(next(iter(list_images(digits_small)))[1])
    assert main(["hash", f, "--triton", triton_server.grpc_url, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"bits": 48' in out and f in out
    assert main(["hash", "/nonexistent.png", "--triton", triton_server.grpc_url]) == 2
    assert "cannot read" in capsys.readouterr().err
