"""One public Triton model name, any backend: generated repositories, versions, fingerprints, launcher.

The onnx-cpu backend runs here on a real tritonserver; the onnx-gpu and tensorrt repositories
are generated and parsed (Triton's ModelConfig proto) without a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from helpers import BITS, SMALL_SIZE, margined_model
from dlheir.cli import main
from dlheir.client.triton import TritonHasher
from dlheir.codes import to_hex
from dlheir.contract import PUBLIC_MODEL, model_fingerprint
from dlheir.errors import UserError
from dlheir.export.data import list_images
from dlheir.preprocess import preprocess
from dlheir.procs import free_port
from dlheir.triton.repository import check_repository, prepare_repository


def _config(repo: Path, model: str):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _dims(config) -> dict:
    return {t.name: list(t.dims) for t in [*config.input, *config.output]}


def _params(config) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


def _dlheir(*argv, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _onnx_codes(onnx_path, files) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["CODE"], {"IMAGE": np.stack([preprocess(f, SMALL_SIZE) for f in files])})[0]


@pytest.fixture
def second_checkpoint(served_model, digits_small):
    """Another model of the same shape (other weights): another fingerprint."""
    from dlheir.export.checkpoint import save_checkpoint
    from dlheir.export.data import split_dataset

    _, _, class_names = split_dataset(digits_small)
    return save_checkpoint(served_model["work"] / "model2.pt", margined_model(num_classes=len(class_names), seed=1),
                           {"image_size": SMALL_SIZE, "class_names": class_names, "epoch": 0,
                            "config": {"seed": 1}})


@pytest.mark.slow
def test_export_start_hash_reexport_restart_from_another_folder(served_model, second_checkpoint, digits_small,
                                                               tmp_path, monkeypatch, capsys):
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DLHEIR_STATE", str(state))
    monkeypatch.chdir(elsewhere)  # nothing depends on the current folder
    env = {**os.environ, "DLHEIR_STATE": str(state)}
    ports = [str(free_port()) for _ in range(3)]
    url = f"127.0.0.1:{ports[0]}"
    start = ["triton", "start", "--backend", "onnx-cpu", "--grpc-port", ports[0], "--http-port", ports[1],
             "--metrics-port", ports[2]]
    files = [str(p) for _, p in list_images(digits_small)][:4]

    assert main(start) == 2  # no export yet: one line, nothing started
    assert capsys.readouterr().err.strip() == ("dlheir: error: no ONNX export yet: run 'dlheir export onnx "
                                               "--checkpoint RUN_DIR/model.pt' first, or give --onnx")

    assert main(["export", "onnx", "--checkpoint", str(served_model["checkpoint"])]) == 0
    out = capsys.readouterr().out
    onnx1 = state / "exports" / "model.onnx"
    first = model_fingerprint(onnx1)
    assert f"dlheir_onnx_cpu version 1 (new) in {state / 'model_repository'}: fingerprint {first}" in out
    kept1 = state / "model_repository" / "dlheir_onnx_cpu" / "1" / "model.onnx"
    codes1 = _onnx_codes(onnx1, files)

    assert main(start) == 0
    try:
        assert "models dlheir_preprocess, dlheir_onnx_cpu, dlheir" in capsys.readouterr().out
        assert json.loads((state / "triton" / "tritonserver.pid").read_text())["backend"] == "onnx-cpu"
        # `dlheir hash` with --model omitted and given: the public ensemble, the same codes
        omitted = _dlheir("hash", *files, "--triton", url, cwd=elsewhere, env=env)
        given = _dlheir("hash", *files, "--triton", url, "--model", PUBLIC_MODEL, cwd=elsewhere, env=env)
        assert omitted.returncode == given.returncode == 0, omitted.stderr + given.stderr
        assert omitted.stdout == given.stdout == "".join(f"{to_hex(c)}  {f}\n" for c, f in zip(codes1, files))
        # a wrong model name: one line naming the ready models
        wrong = _dlheir("hash", files[0], "--triton", url, "--model", "dlheir_trt", cwd=elsewhere, env=env)
        assert wrong.returncode == 2 and wrong.stdout == ""
        assert wrong.stderr == (f"dlheir: error: Triton at {url} has no ready model 'dlheir_trt'; ready models: "
                                "dlheir, dlheir_onnx_cpu, dlheir_preprocess\n")
        with TritonHasher(url) as hasher:
            assert (hasher.model, hasher.pixel_model) == (PUBLIC_MODEL, "dlheir_onnx_cpu")
            assert (hasher.image_size, hasher.bits, hasher.fingerprint) == (SMALL_SIZE, BITS, first)
        with TritonHasher(url, model=PUBLIC_MODEL) as hasher:
            np.testing.assert_array_equal(hasher.hash_images(files)[1], codes1)

        # a second export into the same repository: version 2, version 1 untouched
        assert main(["export", "onnx", "--checkpoint", str(second_checkpoint)]) == 0
        out = capsys.readouterr().out
        second = model_fingerprint(onnx1)
        assert second != first and model_fingerprint(kept1) == first
        assert f"dlheir_onnx_cpu version 2 (new) in {state / 'model_repository'}: fingerprint {second}" in out
        assert "'dlheir triton stop' and 'dlheir triton start' to serve this one" in out
        codes2 = _onnx_codes(onnx1, files)
        assert not np.array_equal(codes1, codes2)
        with TritonHasher(url) as hasher:  # a running server keeps what it loaded
            assert hasher.fingerprint == first

        assert main(["triton", "stop"]) == 0
        assert main(start) == 0
        with TritonHasher(url) as hasher:  # after the restart: the new version, its fingerprint and codes
            assert hasher.fingerprint == second
            np.testing.assert_array_equal(hasher.hash_images(files)[1], codes2)
        for model in ("dlheir_onnx_cpu", PUBLIC_MODEL):
            assert _params(_config(state / "model_repository", model))["fingerprint"] == second
    finally:
        other = tmp_path / "another"
        other.mkdir()
        stopped = _dlheir("triton", "stop", cwd=other, env=env)  # from any folder
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not (state / "triton" / "tritonserver.pid").exists()


def test_installing_the_same_export_again_adds_no_version_and_keeps_edited_settings(served_model, tmp_path):
    from dlheir.triton.repository import max_pixels

    repo = prepare_repository(tmp_path / "repo", served_model["onnx"])
    config = repo.path / "dlheir_preprocess" / "config.pbtxt"
    config.write_text(config.read_text().replace('"40000000"', '"1234"'))  # a user's edit
    again = prepare_repository(tmp_path / "repo", served_model["onnx"])
    assert (repo.version, repo.new_version, again.version, again.new_version) == (1, True, 1, False)
    assert check_repository(tmp_path / "repo") == again
    assert max_pixels(repo.path) == 1234
    assert sorted(p.name for p in (repo.path / "dlheir_onnx_cpu").iterdir()) == ["1", "config.pbtxt"]


@pytest.mark.parametrize("backend, network, platform, kind", [
    ("onnx-cpu", "dlheir_onnx_cpu", "", model_config_pb2.ModelInstanceGroup.KIND_CPU),
    ("onnx-gpu", "dlheir_onnx", "onnxruntime_onnx", model_config_pb2.ModelInstanceGroup.KIND_GPU),
    ("tensorrt", "dlheir_trt", "tensorrt_plan", model_config_pb2.ModelInstanceGroup.KIND_GPU),
])
def test_generated_repository_per_backend(served_model, tmp_path, backend, network, platform, kind):
    from dlheir.export.tensorrt_export import write_engine_facts

    engine = None
    if backend == "tensorrt":  # the repository is generated without a GPU: any bytes stand in for the engine
        engine = tmp_path / "model.plan"
        engine.write_bytes(b"an engine built on a GPU host")
        write_engine_facts(engine, served_model["onnx"])
    repo = prepare_repository(tmp_path / "repo", served_model["onnx"], backend, engine_path=engine)
    fingerprint = model_fingerprint(served_model["onnx"])
    assert (repo.network, repo.version, repo.fingerprint) == (network, 1, fingerprint)
    assert repo.models == ("dlheir_preprocess", network, PUBLIC_MODEL)
    net = _config(repo.path, network)
    assert (net.name, net.platform, net.backend) == (network, platform, "python" if not platform else "")
    assert [g.kind for g in net.instance_group] == [kind]
    assert net.version_policy.latest.num_versions == 1
    want = {"IMAGE": [SMALL_SIZE, SMALL_SIZE, 3], "PROBS": [BITS], "CODE": [BITS // 8]}
    assert _dims(net) == want
    identity = {"fingerprint": fingerprint, "image_size": str(SMALL_SIZE), "bits": str(BITS)}
    assert {k: _params(net)[k] for k in identity} == identity
    ensemble = _config(repo.path, PUBLIC_MODEL)
    assert ensemble.platform == "ensemble" and _params(ensemble) == identity
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["dlheir_preprocess", network]
    assert _dims(ensemble) == {"IMAGE_BYTES": [1], "PROBS": [BITS], "CODE": [BITS // 8]}
    pre = _config(repo.path, "dlheir_preprocess")
    assert _dims(pre) == {"IMAGE_BYTES": [1], "IMAGE": [SMALL_SIZE, SMALL_SIZE, 3]}
    assert _params(pre)["image_size"] == str(SMALL_SIZE)
    model_file = repo.path / network / "1" / ("model.plan" if backend == "tensorrt" else "model.onnx")
    assert model_file.is_file() and (repo.path / PUBLIC_MODEL / "1").is_dir()
    assert (repo.path / network / "1" / "model.py").is_file() == (backend == "onnx-cpu")
    assert check_repository(repo.path).network == network


def test_an_engine_from_another_onnx_is_refused(served_model, tmp_path):
    from dlheir.export.onnx_export import export_onnx
    from dlheir.export.tensorrt_export import write_engine_facts

    other = export_onnx(margined_model(seed=2), tmp_path / "other.onnx", SMALL_SIZE)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    write_engine_facts(engine, other)
    with pytest.raises(UserError, match=f"built from the ONNX with fingerprint {model_fingerprint(other)}"):
        prepare_repository(tmp_path / "repo", served_model["onnx"], "tensorrt", engine_path=engine)
    (tmp_path / "model.plan.json").unlink()
    with pytest.raises(UserError, match="has no model.plan.json naming the ONNX it was built from"):
        prepare_repository(tmp_path / "repo", served_model["onnx"], "tensorrt", engine_path=engine)


def test_gpu_backends_say_what_they_need_and_still_generate(served_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLHEIR_STATE", str(tmp_path / "state"))
    assert main(["triton", "start", "--backend", "onnx-gpu", "--onnx", str(served_model["onnx"])]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(
        "dlheir: error: the tritonserver of nvidia-pytriton has only the python backend; --backend onnx-gpu needs "
        "Triton's onnxruntime backend and a GPU: run NVIDIA's Triton container (nvcr.io/nvidia/tritonserver:")
    assert check_repository(tmp_path / "state" / "model_repository").network == "dlheir_onnx"
    assert "dlheir_onnx version 1 (new)" in out
    assert not (tmp_path / "state" / "triton" / "tritonserver.pid").exists()
    # a given repository serves the backend it was generated for
    assert main(["triton", "start", "--backend", "onnx-cpu", "--model-repository",
                 str(tmp_path / "state" / "model_repository")]) == 2
    assert "serves backend onnx-gpu (dlheir_onnx), not onnx-cpu" in capsys.readouterr().err


def test_a_repository_whose_configs_do_not_describe_its_model_is_refused(served_model, tmp_path):
    repo = prepare_repository(tmp_path / "repo", served_model["onnx"])
    other = prepare_repository(tmp_path / "other", served_model["onnx"])
    # the newest version's file replaced behind the configs' back
    from dlheir.export.onnx_export import export_onnx

    export_onnx(margined_model(seed=3), repo.path / "dlheir_onnx_cpu" / "1" / "model.onnx", SMALL_SIZE)
    with pytest.raises(UserError, match="does not describe"):
        check_repository(repo.path)
    config = other.path / "dlheir" / "config.pbtxt"
    config.write_text(config.read_text().replace(other.fingerprint, "0" * 16))
    with pytest.raises(UserError, match="fingerprint 0000000000000000 is not the served model's"):
        check_repository(other.path)
