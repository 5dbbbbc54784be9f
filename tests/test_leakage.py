"""`dlheir bench leakage`: the attacks recover a transform they were not told (the client's real
CodeTransform under a random secret), fail when they should, and the CLI writes its results."""

import json
import os

import numpy as np
import pytest

from dlheir.benchmarks.leakage import (
    confirm_guess_attack, known_pair_attack, membership_scores, pairs_needed, predict, prediction_scores,
    statistics_attack, synthetic_codes, tie_break_attack, tie_break_pairs_needed,
)
from dlheir.cli import main
from dlheir.client.crypto import CodeTransform
from dlheir.codes import pack_bits, unpack_bits
from dlheir.ids import content_id, keyed_content_id


def stored_of(raw_bits: np.ndarray, transform: CodeTransform) -> np.ndarray:
    """What the server holds, through the client's real transform (packed and unpacked)."""
    return unpack_bits(transform.apply(pack_bits(raw_bits)), transform.bits)


@pytest.mark.parametrize("bits", [48, 64])
def test_enough_known_pairs_recover_the_secret_transform(bits):
    rng = np.random.default_rng(bits)
    transform = CodeTransform(os.urandom(32), bits)  # nothing below is told this secret
    raw = rng.integers(0, 2, (300, bits), dtype=np.uint8)
    stored = stored_of(raw, transform)
    known, held = slice(0, 60), slice(60, None)

    guess = known_pair_attack(raw[known], stored[known])

    assert guess.exact
    np.testing.assert_array_equal(guess.perm, transform.perm)
    np.testing.assert_array_equal(guess.mask, transform.mask)
    np.testing.assert_array_equal(pack_bits(predict(guess, raw[held])), transform.apply(pack_bits(raw[held])))
    assert prediction_scores(guess, raw[held], stored[held]) == (1.0, 1.0)
    # the first n pairs that determine T: around log2(N^2) for uniform codes, never more than we gave
    needed, predicts = pairs_needed(raw[known], stored[known], raw[held], stored[held])
    assert needed is not None and 2 < needed <= 60
    assert predicts is not None and predicts <= needed
    assert not known_pair_attack(raw[:needed - 1], stored[:needed - 1]).exact


@pytest.mark.parametrize("bits", [48, 64])
def test_one_known_pair_does_not_recover_the_transform(bits):
    rng = np.random.default_rng(100 + bits)
    transform = CodeTransform(os.urandom(32), bits)
    raw = rng.integers(0, 2, (200, bits), dtype=np.uint8)
    stored = stored_of(raw, transform)

    guess = known_pair_attack(raw[:1], stored[:1])

    assert not guess.exact
    assert (guess.candidates == bits).all()  # one pair says nothing about the permutation
    np.testing.assert_array_equal(predict(guess, raw[:1]), stored[:1])  # ... but is consistent with itself
    exact, bit_fraction = prediction_scores(guess, raw[1:], stored[1:])
    assert exact < 0.05 and bit_fraction < 0.7


def test_partial_guess_is_consistent_with_every_known_pair():
    """Clustered codes leave positions ambiguous for a while; any guess must still fit the pairs."""
    raw, _ = synthetic_codes(48, 400, 10, clusters=5, flip=0.05, seed=3)
    transform = CodeTransform(b"k" * 32, 48)
    stored = stored_of(raw, transform)
    previous = np.full(48, 48)
    for n in (0, 1, 2, 5, 10, 40, 400):
        guess = known_pair_attack(raw[:n], stored[:n])
        assert sorted(guess.perm) == list(range(48))
        np.testing.assert_array_equal(predict(guess, raw[:n]), stored[:n])
        assert (guess.candidates >= 1).all() and (guess.candidates <= previous).all()  # more pairs, fewer choices
        previous = guess.candidates
    assert known_pair_attack(raw, stored).exact


def test_known_pairs_from_another_transform_are_rejected():
    raw = np.random.default_rng(0).integers(0, 2, (30, 48), dtype=np.uint8)
    stored = stored_of(raw, CodeTransform(b"a" * 32, 48))
    stored[5:] = stored_of(raw[5:], CodeTransform(b"b" * 32, 48))
    with pytest.raises(ValueError, match="not related"):
        known_pair_attack(raw, stored)


@pytest.mark.parametrize("bits", [48, 64])
def test_zero_pair_statistics_attack_returns_a_valid_guess(bits):
    raw, public = synthetic_codes(bits, 1000, 300, clusters=10, flip=0.1, seed=0)
    transform = CodeTransform(os.urandom(32), bits)
    stored = stored_of(raw, transform)

    guess = statistics_attack(public, stored)

    assert sorted(guess.perm) == list(range(bits))
    assert guess.mask.dtype == np.uint8 and set(np.unique(guess.mask)) <= {0, 1}
    exact, bit_fraction = prediction_scores(guess, raw, stored)
    assert 0.0 <= exact <= 1.0 and 0.0 <= bit_fraction <= 1.0


def test_statistics_attack_recovers_independent_bits_with_distinct_frequencies():
    """When every bit has its own frequency, p vs 1-p alone gives P and m: the attack must find them."""
    bits = 12
    rng = np.random.default_rng(7)
    p = rng.permutation(np.linspace(0.04, 0.37, bits))  # far apart, all below 1/2
    draw = lambda n: (rng.random((n, bits)) < p).astype(np.uint8)
    transform = CodeTransform(os.urandom(32), bits)
    raw = draw(20000)

    guess = statistics_attack(draw(20000), stored_of(raw, transform))

    np.testing.assert_array_equal(guess.perm, transform.perm)
    np.testing.assert_array_equal(guess.mask, transform.mask)


def test_tie_break_recovers_the_secret_transform_from_fewer_pairs_than_known_pairs_alone():
    """Clustered codes: the pairs alone leave ties for many pairs; the stored codes' bit statistics
    (un-masked through the first pair) break them. Never worse: always consistent with the pairs,
    the same guess once the pairs determine T, and no fewer held-out codes predicted."""
    bits = 48
    raw, public = synthetic_codes(bits, 1200, 400, clusters=10, flip=0.1, seed=0)
    transform = CodeTransform(os.urandom(32), bits)  # nothing below is told this secret
    stored = stored_of(raw, transform)
    pool, held = slice(0, 1000), slice(1000, None)

    plain_needed, _ = pairs_needed(raw[pool], stored[pool], raw[held], stored[held])
    needed = tie_break_pairs_needed(raw[pool], stored[pool], stored, public, transform.perm, transform.mask,
                                    limit=plain_needed)

    assert plain_needed is not None and needed is not None
    assert needed < plain_needed
    guess = tie_break_attack(raw[:needed], stored[:needed], stored, public)
    np.testing.assert_array_equal(guess.perm, transform.perm)
    np.testing.assert_array_equal(guess.mask, transform.mask)
    assert not known_pair_attack(raw[:needed], stored[:needed]).exact  # the pairs alone do not pin T down yet
    assert prediction_scores(guess, raw[held], stored[held]) == (1.0, 1.0)
    for n in range(1, plain_needed + 1):
        plain = known_pair_attack(raw[:n], stored[:n])
        better = tie_break_attack(raw[:n], stored[:n], stored, public)
        np.testing.assert_array_equal(predict(better, raw[:n]), stored[:n])
        np.testing.assert_array_equal(better.candidates, plain.candidates)
        if plain.exact:
            np.testing.assert_array_equal(better.perm, plain.perm)
        assert prediction_scores(better, raw[held], stored[held])[0] >= prediction_scores(plain, raw[held],
                                                                                          stored[held])[0]


def test_tie_break_with_one_pair_recovers_skewed_independent_bits():
    """One pair leaves every position tied (and fixes the mask candidates); distinct bit frequencies
    then give the permutation. The known-pair attack alone cannot."""
    bits = 12
    rng = np.random.default_rng(11)
    p = rng.permutation(np.linspace(0.04, 0.37, bits))
    draw = lambda n: (rng.random((n, bits)) < p).astype(np.uint8)
    transform = CodeTransform(os.urandom(32), bits)
    raw = draw(20000)
    stored = stored_of(raw, transform)

    guess = tie_break_attack(raw[:1], stored[:1], stored, draw(20000))

    assert not known_pair_attack(raw[:1], stored[:1]).exact
    np.testing.assert_array_equal(guess.perm, transform.perm)
    np.testing.assert_array_equal(guess.mask, transform.mask)


def test_confirm_a_guess_works_on_unkeyed_ids_and_not_on_keyed_ids():
    """Random byte strings stand in for image files; a random half is uploaded."""
    rng = np.random.default_rng(5)
    files = [os.urandom(int(n)) for n in rng.integers(50, 500, 400)]
    uploaded = np.zeros(len(files), bool)
    uploaded[rng.permutation(len(files))[:200]] = True
    id_key, attacker_key = os.urandom(32), os.urandom(32)

    unkeyed = {content_id(f) for f, up in zip(files, uploaded) if up}
    scores = membership_scores(confirm_guess_attack(unkeyed, files, guessed_keys=(attacker_key,)), uploaded)
    assert scores["accuracy"] == 1.0
    assert scores["true_positive_rate"] == 1.0 and scores["false_positive_rate"] == 0.0

    keyed = {keyed_content_id(id_key, f) for f, up in zip(files, uploaded) if up}
    said = confirm_guess_attack(keyed, files, guessed_keys=(attacker_key,))
    scores = membership_scores(said, uploaded)
    assert scores["true_positives"] == 0 and not said.any()
    assert scores["accuracy"] == 0.5  # chance: the attacker says "not stored" to everything
    # the same attack with the owner's key would confirm every upload: the key is what stops it
    assert membership_scores(confirm_guess_attack(keyed, files, guessed_keys=(id_key,)), uploaded)["accuracy"] == 1.0


def test_cli_bench_leakage_synthetic_writes_json_and_png(tmp_path, capsys):
    rc = main(["bench", "leakage", "--synthetic", "--bits", "48", "--items", "300", "--public", "100",
               "--trials", "2", "--known", "0,1,20,100", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "known pairs" in out and "pairs to recover T exactly" in out
    assert "+ statistics" in out and "confirm-a-guess" in out
    doc = json.loads((tmp_path / "bench_leakage.json").read_text())
    (result,) = [r["result"] for r in doc["runs"]]
    assert result["bits"] == 48 and result["trials"] == 2
    assert [p["pairs"] for p in result["known_pairs"]] == [0, 1, 20, 100]
    assert result["known_pairs"][0]["codes_exact_median"] == 0.0
    assert result["known_pairs"][-1]["codes_exact_median"] == 1.0
    assert len(result["pairs_to_recover_transform"]["values"]) == 2
    assert len(result["tie_break_pairs_to_recover_transform"]["values"]) == 2
    for p in result["known_pairs"]:  # the tie-break recovers T whenever the pairs alone do
        assert p["tie_break_transform_exact_trials"] >= p["transform_exact_trials"]
    assert result["known_pairs"][-1]["tie_break_transform_exact_trials"] == 2
    unkeyed, keyed = doc["confirm_guess"]
    assert unkeyed["ids"].startswith("content_id") and unkeyed["accuracy"] == 1.0
    assert keyed["ids"].startswith("keyed_content_id") and keyed["true_positives"] == 0
    png = tmp_path / "bench_leakage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _labels_fit_and_do_not_overlap(doc["runs"] * 2)  # the figure of the runs, twice (a longer legend)


def _labels_fit_and_do_not_overlap(runs: list[dict]) -> None:
    """Every title, axis label and the legend lies inside the figure, and none overlaps another or the
    other panel (they were cut off and overlapped)."""
    import matplotlib.pyplot as plt

    from dlheir.benchmarks.leakage import figure

    fig = figure(runs, "title")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    page = fig.bbox
    boxes = {"legend": fig.legends[0].get_window_extent(renderer)}
    for n, ax in enumerate(fig.axes):
        for name, text in (("title", ax.title), ("x label", ax.xaxis.label), ("y label", ax.yaxis.label)):
            boxes[f"panel {n} {name}"] = text.get_window_extent(renderer)
    for name, box in boxes.items():
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, f"{name} is cut off"
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), f"{a} overlaps {b}"
        for n, ax in enumerate(fig.axes):
            if not a.startswith(f"panel {n}"):
                assert not boxes[a].overlaps(ax.get_window_extent(renderer)), f"{a} overlaps panel {n}"
    plt.close(fig)


def test_cli_bench_leakage_without_checkpoint_is_one_line(tmp_path, capsys):
    rc = main(["bench", "leakage", "--checkpoint", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "make demo" in err and "--synthetic" in err
    assert not (tmp_path / "bench_leakage.json").exists()


def test_cli_bench_leakage_on_a_checkpoint_attacks_the_networks_codes(tmp_path, capsys, digits_small):
    """The default path: codes computed in-process from a checkpoint on its data's two splits."""
    from helpers import SMALL_SIZE, margined_model
    from dlheir.export.checkpoint import save_checkpoint
    from dlheir.export.data import split_dataset

    database, queries, class_names = split_dataset(digits_small)
    ckpt = save_checkpoint(tmp_path / "model.pt", margined_model(num_classes=len(class_names)),
                           {"image_size": SMALL_SIZE, "class_names": class_names,
                            "config": {"data": str(digits_small), "seed": 0}})
    rc = main(["bench", "leakage", "--checkpoint", str(ckpt), "--trials", "2", "--known", "0,1,5",
               "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (run,) = json.loads((tmp_path / "out" / "bench_leakage.json").read_text())["runs"]
    result = run["result"]
    assert result["items"] == len(database) and result["public_lookalikes"] == len(queries)
    assert result["bits"] == 48 and [p["pairs"] for p in result["known_pairs"]] == [0, 1, 5]
    assert (tmp_path / "out" / "bench_leakage.png").is_file()
