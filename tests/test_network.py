import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import SMALL_SIZE, make_digit_folder, margined_model
from dlheir import codes
from dlheir.cli import main
from dlheir.export import metrics
from dlheir.export.model import build_model, count_parameters
from dlheir.export.onnx_export import export_onnx, onnx_signature
from dlheir.export.train import compute_codes, load_pixels, loss_fn, to_input, train_step


@pytest.mark.parametrize("bits", [12, 24, 48, 64])
def test_model_shapes(bits):
    torch.manual_seed(0)
    model = build_model(bits, num_classes=5).eval()
    with torch.no_grad():
        probs, logits = model(torch.randn(2, 3, 64, 64))
    assert probs.shape == (2, bits) and logits.shape == (2, 5)
    assert ((probs > 0) & (probs < 1)).all()


def test_inverted_residual_has_fewer_parameters_than_baseline():
    dlheir, baseline = build_model(48, 100, "dlheir"), build_model(48, 100, "baseline")
    assert len(dlheir.features.denseblock4) == 32 - 14
    assert len(baseline.features.denseblock4) == 32
    assert count_parameters(dlheir) < count_parameters(baseline)
    removed = sum(count_parameters(l) for l in list(baseline.features.denseblock4.children())[-14:])
    assert count_parameters(dlheir.features.inverted_residual) < removed


def test_the_block_is_torchvisions_inverted_residual_and_norm5_keeps_the_first_channels():
    from torchvision.models.mobilenetv2 import InvertedResidual

    from dlheir.export.model import _first_channels

    model = build_model(48, 100)
    block = model.features.inverted_residual
    assert isinstance(block, InvertedResidual) and block.use_res_connect
    assert count_parameters(block) == 2_179_296  # 1472 -> 736 -> 1472: the figure in the module docstring
    assert list(dict(model.features.named_children()))[-2:] == ["inverted_residual", "norm5"]
    norm = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        norm.running_mean.copy_(torch.arange(8.0))
        norm.weight.copy_(torch.arange(8.0) + 10)
    small = _first_channels(norm, 5)
    assert small.running_mean.tolist() == [0, 1, 2, 3, 4] and small.weight.tolist() == [10, 11, 12, 13, 14]


def _old_layout(state: dict) -> dict:
    """The state dict a format-1 checkpoint held: the hand-made block's expand/depthwise/project names."""
    names = {"conv.0.0.": "expand.0.", "conv.0.1.": "expand.1.", "conv.1.0.": "depthwise.0.",
             "conv.1.1.": "depthwise.1.", "conv.2.": "project.0.", "conv.3.": "project.1."}
    out = {}
    for key, value in state.items():
        for new, old in names.items():
            key = key.replace(f"inverted_residual.{new}", f"inverted_residual.{old}")
        out[key] = value
    return out


def test_an_old_checkpoint_is_one_line_saying_to_retrain(tmp_path, capsys):
    model = margined_model(num_classes=2)
    old = tmp_path / "old.pt"
    torch.save({"format_version": 1, "state_dict": _old_layout(model.state_dict()), "bits": 48, "arch": "dlheir",
                "num_classes": 2, "image_size": SMALL_SIZE, "class_names": ["0", "1"], "epoch": 1,
                "config": {"seed": 0}}, old)
    for argv in (["evaluate", "--checkpoint", str(old), "--data", "digits"],
                 ["export", "onnx", "--checkpoint", str(old), "--out", str(tmp_path / "m.onnx")]):
        code, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "older dlheir (format 1" in lines[0] and "train it again" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model(48, 3)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    with torch.no_grad():
        before = float(loss_fn(*model(x), y))
    with warnings.catch_warnings():  # a warning here breaks the first progress bar of every run
        warnings.simplefilter("error")
        loss, acc = train_step(model, opt, x, y)
    assert isinstance(loss, float) and 0 <= acc <= 1
    with torch.no_grad():
        after = float(loss_fn(*model(x), y))
    assert after < before


def test_metrics_on_a_hand_made_ranking():
    # query labels 0 and 1; database labels ranked as below
    ranked = np.array([[0, 0, 1, 0], [0, 1, 1, 1]])
    rel = metrics.relevance(ranked, np.array([0, 1]))
    assert metrics.precision_at_k(rel, 2) == pytest.approx((1.0 + 0.5) / 2)
    assert metrics.precision_at_k(rel, 4) == pytest.approx((0.75 + 0.75) / 2)
    ap0 = (1 / 1 + 2 / 2 + 3 / 4) / 3
    ap1 = (1 / 2 + 2 / 3 + 3 / 4) / 3
    assert metrics.mean_average_precision(rel) == pytest.approx((ap0 + ap1) / 2)


def test_ranking_breaks_ties_by_id():
    db = codes.pack_bits(np.array([[1] * 8, [0] * 8, [0] * 8, [1] + [0] * 7], dtype=np.uint8))
    q = codes.pack_bits(np.zeros((1, 8), dtype=np.uint8))
    order, dist = metrics.rankings(q, db, np.array([40, 30, 10, 20]))
    assert order[0].tolist() == [2, 1, 3, 0]
    assert dist[0].tolist() == [0, 0, 1, 8]


def test_onnx_matches_pytorch_on_real_images(tmp_path):
    from dlheir.export.data import split_dataset

    root = make_digit_folder(tmp_path / "digits", per_class=6)
    records, _, _ = split_dataset(root)
    pixels = load_pixels(records, SMALL_SIZE)
    model = margined_model()
    path = export_onnx(model, tmp_path / "model.onnx", SMALL_SIZE)
    onnx.checker.check_model(str(path))
    assert onnx_signature(path) == (SMALL_SIZE, 48)
    probs, code = ort.InferenceSession(str(path)).run(None, {"IMAGE": pixels})
    t_probs, t_codes = compute_codes(model, pixels)
    assert code.dtype == np.uint8 and code.shape == (len(pixels), 6)
    assert (np.abs(t_probs - 0.5) > 1e-3).mean() > 0.95  # the comparison is not decided by noise
    np.testing.assert_allclose(probs, t_probs, atol=1e-4)
    np.testing.assert_array_equal(code, t_codes)
    np.testing.assert_array_equal(code, codes.probs_to_codes(probs))


def test_the_network_normalises_pixels_once_with_imagenet_statistics():
    from torchvision.models import DenseNet201_Weights

    from dlheir.export.onnx_export import ExportWrapper

    preset = DenseNet201_Weights.IMAGENET1K_V1.transforms()
    px = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = np.moveaxis((px / 255.0 - np.array(preset.mean)) / np.array(preset.std), -1, 1)
    model = margined_model()
    np.testing.assert_allclose(model.normalize(to_input(px)).numpy(), expected, atol=1e-5)
    assert "normalize.mean" not in model.state_dict()  # a constant, not a weight
    # the export wrapper adds no second normalisation: it feeds the same pixels as training
    px = np.random.default_rng(1).integers(0, 256, (2, SMALL_SIZE, SMALL_SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        wrapped, _ = ExportWrapper(model)(torch.from_numpy(px))
        direct, _ = model(to_input(px))
    np.testing.assert_array_equal(wrapped.numpy(), direct.numpy())


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    code, err = _cli(capsys, "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert code == 2 and "data folder not found" in err and "Traceback" not in err

    one = tmp_path / "one"
    make_digit_folder(one, classes=(3,), per_class=4)
    code, err = _cli(capsys, "train", "--data", str(one), "--out", str(tmp_path / "r"))
    assert code == 2 and "need at least 2" in err

    bad = make_digit_folder(tmp_path / "bad", classes=(0, 1), per_class=3)
    (bad / "0" / "broken.png").write_bytes(b"this is not a png")
    code, err = _cli(capsys, "train", "--data", str(bad), "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "r"))
    assert code == 2 and "unreadable image" in err and "broken.png" in err

    code, err = _cli(capsys, "train", "--bits", "30", "--out", str(tmp_path / "r"))
    assert code == 2 and "multiple of 4" in err

    code, err = _cli(capsys, "train", "--resume", "--force", "--out", str(tmp_path / "r"))
    assert code == 2 and "give one of them" in err

    code, err = _cli(capsys, "train", "--epochs", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and "--epochs must be at least 1" in err

    code, err = _cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert code == 2 and "checkpoint not found" in err


def test_train_flags_are_generated_from_the_one_declaration(capsys):
    import argparse
    import dataclasses

    from dlheir.export.defaults import DIGITS_DEMO, PAPER, TrainConfig, add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    cfg = config_from_args(parser.parse_args(["--image-size", "96", "--weight-decay", "0.001", "--force"]))
    assert (cfg.image_size, cfg.weight_decay, cfg.force) == (96, 0.001, True)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text and f.metadata["help"] in text
        if not isinstance(f.default, bool):
            paper = f"; paper: {f.metadata['paper']}" if f.metadata["paper"] is not None else ""
            assert f"(default {f.default}{paper})" in text
    assert PAPER == {"bits": 48, "image_size": 384, "epochs": 200, "batch_size": 64, "lr": 0.01, "momentum": 0.9,
                     "weights": "imagenet"}
    assert DIGITS_DEMO == {k: getattr(TrainConfig(), k) for k in PAPER}


def test_tensorrt_export_without_gpu_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the TensorRT path is exercised for real there")
    path = export_onnx(margined_model(), tmp_path / "m.onnx", SMALL_SIZE)
    code, err = _cli(capsys, "export", "tensorrt", "--onnx", str(path), "--out", str(tmp_path / "m.plan"))
    assert code == 2 and ("TensorRT" in err or "GPU" in err)


def test_ranking_is_lexsort_by_distance_then_id():
    from dlheir.contract import rank

    rng = np.random.default_rng(1)
    db = rng.integers(0, 256, (50, 2), dtype=np.uint8) & 0x0F  # few distinct distances: many ties
    q = rng.integers(0, 256, (4, 2), dtype=np.uint8) & 0x0F
    ids = rng.permutation(1000)[:50]
    order = metrics.ranking(q, db, ids)
    dist = codes.hamming(q, db)
    for i in range(len(q)):
        assert order[i].tolist() == rank(dist[i], ids).tolist()


def test_split_is_per_class_seeded_and_stable(tmp_path):
    from dlheir.export.data import split_dataset
    from dlheir.ids import item_id

    root = make_digit_folder(tmp_path / "d", classes=(0, 1), per_class=10)
    db, q, names = split_dataset(root, seed=0)
    db2, q2, _ = split_dataset(root, seed=0)
    _, q3, _ = split_dataset(root, seed=1)
    assert names == ["0", "1"] and db == db2 and q == q2 and q != q3
    assert [sum(r.label == c for r in db) for c in (0, 1)] == [8, 8]
    assert [sum(r.label == c for r in q) for c in (0, 1)] == [2, 2]
    assert all(r.id == item_id(r.relpath) and r.path.is_file() for r in db + q)
    assert not {r.relpath for r in db} & {r.relpath for r in q}


def test_compute_codes_from_paths_equals_from_pixels(tmp_path):
    from dlheir.export.data import split_dataset

    root = make_digit_folder(tmp_path / "d", classes=(0, 1), per_class=5)
    records, _, _ = split_dataset(root)
    model = margined_model(num_classes=2)
    p1, c1 = compute_codes(model, load_pixels(records, SMALL_SIZE))
    p2, c2 = compute_codes(model, [r.path for r in records], SMALL_SIZE, batch_size=3)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_array_equal(c1, c2)


def test_evaluate_names_an_unreadable_image(tmp_path, capsys):
    from dlheir.export.checkpoint import save_checkpoint

    bad = make_digit_folder(tmp_path / "bad", classes=(0, 1), per_class=4)
    (bad / "1" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ckpt = save_checkpoint(tmp_path / "model.pt", margined_model(num_classes=2),
                           {"image_size": SMALL_SIZE, "class_names": ["0", "1"], "epoch": 0, "config": {"seed": 0}})
    code, err = _cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--data", str(bad))
    assert code == 2 and "unreadable image" in err and "zz_corrupt.png" in err and "Traceback" not in err


def test_bench_group_lists_the_inference_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "inference" in capsys.readouterr().out
