"""`dlheir train` never silently replaces a checkpoint; `evaluate` defaults to the checkpoint's own data;
`dlheir demo` picks settings that finish on a machine without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import SMALL_SIZE, make_digit_folder
from dlheir.cli import main
from dlheir.demo import pick_settings
from dlheir.errors import UserError
from dlheir.export.defaults import DIGITS_DEMO, PAPER


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--image-size", str(SMALL_SIZE), "--epochs", "1",
            "--bits", "12", "--batch-size", "8", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (2 classes x 5 images, 32 px, 1 epoch) into a fresh run directory."""
    base = tmp_path_factory.mktemp("overwrite")
    data = make_digit_folder(base / "images", classes=(3, 7), per_class=5)
    out = base / "run"
    assert main(_train_args(data, out)) == 0
    return data, out, out / "model.pt"


@pytest.mark.slow
def test_second_train_without_flags_refuses_and_keeps_the_checkpoint(trained, capsys):
    data, out, ckpt = trained
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(_train_args(data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(ckpt) in err and "--force" in err and "--resume" in err
    assert ckpt.read_bytes() == before


@pytest.mark.slow
def test_force_replaces_the_checkpoint(trained, capsys):
    data, out, ckpt = trained
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(_train_args(data, out, "--force", "--seed", "1")) == 0
    # stderr is not a terminal here: no progress bar, one line per epoch instead of silence
    assert [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")][0].startswith("epoch 1/1: loss ")
    after = ckpt.read_bytes()
    assert after != before
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["config"]["seed"] == 1


def test_resume_and_force_together_are_refused(tmp_path, capsys):
    assert main(_train_args(tmp_path / "nowhere", tmp_path / "run", "--force", "--resume")) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_without_data_uses_the_checkpoints_folder(trained, tmp_path, capsys, monkeypatch):
    data, _, ckpt = trained
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert payload["config"]["data"] == str(data.resolve())  # recorded absolute, usable from any directory
    monkeypatch.chdir(tmp_path)  # a relative default would not find the folder from here
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--json-out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"data: {data.resolve()}" in stdout and "recorded in the checkpoint" in stdout
    result = json.loads(out.read_text())
    assert result["data"] == str(data.resolve()) and result["data_source"] == "recorded in the checkpoint"
    assert result["database"] + result["queries"] == 10


@pytest.mark.slow
def test_evaluate_of_an_old_checkpoint_falls_back_to_digits_with_a_note(trained, tmp_path, capsys, monkeypatch):
    _, _, ckpt = trained
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    del payload["config"]["data"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    asked = []

    def fake_resolve(spec, size=64, *a, **k):
        asked.append(spec)
        raise UserError("stop here")  # the digits data itself is not needed to see the choice

    monkeypatch.setattr("dlheir.export.train.resolve_data", fake_resolve)
    assert main(["evaluate", "--checkpoint", str(old)]) == 2
    assert asked == ["digits"]
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "digits" in notes[0] and "--data" in notes[0]


def test_demo_settings_without_cuda_fit_the_cpu_and_warn():
    none = {k: None for k in DIGITS_DEMO}
    cfg, warning = pick_settings("/data/corel10k", none, cuda=False)
    assert cfg["image_size"] == DIGITS_DEMO["image_size"] and cfg["epochs"] == DIGITS_DEMO["epochs"]
    assert cfg["weights"] == "none"
    assert warning is not None and len(warning.splitlines()) == 1
    assert "--image-size 384" in warning and "--epochs 200" in warning and "--weights imagenet" in warning


def test_demo_settings_keep_what_the_user_gave_and_the_paper_on_cuda():
    given = {k: None for k in DIGITS_DEMO} | {"image_size": 384, "epochs": 200, "weights": "imagenet",
                                                "batch_size": 64, "lr": 0.01}
    cfg, warning = pick_settings("/data/corel10k", given, cuda=False)
    assert cfg == PAPER and warning is None  # everything asked for explicitly: no substitution, no warning
    partial = {k: None for k in DIGITS_DEMO} | {"epochs": 3}
    cfg, warning = pick_settings("/data/corel10k", partial, cuda=False)
    assert cfg["epochs"] == 3 and cfg["image_size"] == DIGITS_DEMO["image_size"] and "--epochs" not in warning
    cfg, warning = pick_settings("/data/corel10k", {k: None for k in DIGITS_DEMO}, cuda=True)
    assert cfg == PAPER and warning is None
    cfg, warning = pick_settings("digits", {k: None for k in DIGITS_DEMO}, cuda=False)
    assert cfg == DIGITS_DEMO and warning is None
