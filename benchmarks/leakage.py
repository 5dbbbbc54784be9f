"""`dlheir bench leakage`: how much of the default code transform the server can recover.

The owner stores ``T(c) = P(c) XOR m`` (a keyed bit permutation P and mask m, see
``dlheir.client.crypto.CodeTransform``). T preserves Hamming distance, so the server sees every
distance; this benchmark measures how far it can go towards T itself, against the client's
real transform with fresh random secrets:

* **known-pair attack**: given n (raw code, stored code) pairs (images the attacker knows are in
  the collection; it computes their raw codes with the public network), one pair cancels the
  mask, ``T(x) XOR T(c) = P(x XOR c)``, and every further pair narrows, for each stored bit
  position, the set of raw positions it can come from. Reported: the number of pairs after
  which P and m are determined exactly, and the fraction of held-out stored codes the attacker
  predicts exactly (raw code through its best-guess transform) from n known pairs;
* **statistics attack, no known pair**: the attacker computes raw codes of public look-alike
  images (the digits' query split, or fresh samples of the same synthetic clusters) and aligns
  their per-bit frequencies and pairwise bit correlations with those of the stored codes
  (flip-invariant matching, then mask signs from frequencies and correlation signs);
* **known pairs + bit statistics** (``tie_break_attack``): the known-pair attack, with the positions
  the pairs leave tied matched, inside each tie group, by the frequencies and correlations of ALL
  stored codes (which the server holds), un-masked through the first pair, against those of the
  look-alikes. Reported beside the known-pair attack alone: secrets whose T it recovers exactly,
  held-out codes it predicts exactly, and the pairs it needs;
* **confirm-a-guess attack on item ids** (``confirm_guess_attack``): the server hashes a candidate
  image file itself and checks the id against the stored ids. Candidates: the PNG bytes of
  scikit-learn's 8x8 digits, a random half uploaded; once under unkeyed ``content_id`` ids (the old
  upload rule), once under ``keyed_content_id`` with a random id key the server is not told.

Data: the codes of the demo's trained model (``runs/demo/model.pt``, database split = stored
items, query split = the attacker's look-alikes), or ``--synthetic`` clustered random codes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_CHECKPOINT = "runs/demo/model.pt"
DEFAULT_KNOWN = "0,1,2,5,8,10,12,15,20,30,50,100"


class Guess(NamedTuple):
    """An attacker's best guess of T: stored bit j = raw bit ``perm[j]`` XOR ``mask[j]``."""

    perm: np.ndarray  # intp [N], a permutation of range(N)
    mask: np.ndarray  # uint8 [N] in {0, 1}
    candidates: np.ndarray  # int [N]: raw positions still consistent with each stored position (1 = determined)

    @property
    def exact(self) -> bool:
        """True when the known pairs determine every position (and hence the mask) uniquely."""
        return bool((self.candidates == 1).all())


# --- the attacks (plain numpy on bit matrices uint8 {0,1} [B, N]) -------------------------------
def known_pair_attack(raw: np.ndarray, stored: np.ndarray) -> Guess:
    """Recover (P, m) as far as ``n`` known pairs ``stored[k] = T(raw[k])`` determine it.

    Differences to the first pair cancel the mask: ``stored[k] ^ stored[0] = P(raw[k] ^ raw[0])``,
    so stored position j can come from raw position i only if their difference columns are equal.
    Equal columns form groups of equal size on both sides; inside a group any matching is
    consistent with every known pair, and we match them in index order. The mask then follows
    from the first pair. With no pair at all the guess is the identity and a zero mask.
    """
    raw, stored = np.asarray(raw, np.uint8), np.asarray(stored, np.uint8)
    if raw.shape != stored.shape or raw.ndim != 2:
        raise ValueError(f"raw and stored must be [n, N] bit matrices of one shape, got {raw.shape}, {stored.shape}")
    n, bits = raw.shape
    if n < 2:  # nothing tells positions apart
        labels = np.zeros(2 * bits, np.intp)
    else:
        columns = np.concatenate([(raw[1:] ^ raw[0]).T, (stored[1:] ^ stored[0]).T])  # [2N, n-1]
        _, labels = np.unique(np.packbits(columns, axis=1), axis=0, return_inverse=True)
        labels = labels.reshape(-1)
    raw_label, stored_label = labels[:bits], labels[bits:]
    if not np.array_equal(np.sort(raw_label), np.sort(stored_label)):
        raise ValueError("these pairs are not related by one bit permutation and mask")
    perm = np.empty(bits, np.intp)
    perm[np.argsort(stored_label, kind="stable")] = np.argsort(raw_label, kind="stable")
    mask = stored[0] ^ raw[0, perm] if n else np.zeros(bits, np.uint8)
    candidates = np.bincount(raw_label, minlength=2 * bits)[stored_label]
    return Guess(perm, mask.astype(np.uint8), candidates)


def _bit_stats(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bit frequency [N] and pairwise Pearson correlation [N, N] (0 for constant bits and the diagonal)."""
    b = np.asarray(bits, np.float64)
    freq = b.mean(axis=0)
    centred = b - freq
    std = centred.std(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / len(b) / np.outer(std, std)
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(corr, 0.0)
    return freq, corr


def statistics_attack(public_raw: np.ndarray, stored: np.ndarray, iterations: int = 30) -> Guess:
    """Guess (P, m) with no known pair: align the bit statistics of the stored codes with those of
    raw codes the attacker computed on public look-alike images.

    A mask flip turns a frequency p into 1 - p and the sign of a correlation, so the position
    matching uses flip-invariant features: ``|2p - 1|`` and ``|corr|``. Start from a linear
    assignment on per-bit signatures (``|2p - 1|`` and the sorted ``|corr|`` row), then improve the
    quadratic agreement ``sum |corr_s[j, j']| |corr_a[P(j), P(j')]|`` by repeated linear assignments.
    Mask bits: coordinate ascent on the agreement of correlation signs, started from (and
    tie-broken by) the frequencies (p vs 1 - p).
    """
    from scipy.optimize import linear_sum_assignment

    fa, ca = _bit_stats(public_raw)
    fs, cs = _bit_stats(stored)
    bits = len(fs)
    ra, rs = np.abs(ca), np.abs(cs)
    node = (np.abs(np.abs(2 * fs - 1)[:, None] - np.abs(2 * fa - 1)[None, :])
            + np.abs(np.sort(rs, axis=1)[:, None, :] - np.sort(ra, axis=1)[None, :, :]).mean(axis=2))
    _, perm = linear_sum_assignment(node)
    for _ in range(iterations):
        gain = rs @ ra[:, perm].T / max(1, bits - 1)  # [stored j, raw i]: agreement if j -> i, others fixed
        _, new = linear_sum_assignment(node - gain)
        if np.array_equal(new, perm):
            break
        perm = new
    # signs s_j = +1 (no flip) / -1: frequencies say (fs - 1/2)(fa - 1/2) > 0 -> +1; correlations say
    # s_j s_j' ~ sign(cs[j, j'] * ca[P j, P j']). Maximise both by coordinate ascent.
    freq_vote = 4 * (fs - 0.5) * (fa[perm] - 0.5)
    agree = cs * ca[np.ix_(perm, perm)]
    s = np.where(freq_vote >= 0, 1.0, -1.0)
    for _ in range(iterations):
        new = np.where(agree @ s + freq_vote >= 0, 1.0, -1.0)
        if np.array_equal(new, s):
            break
        s = new
    mask = (s < 0).astype(np.uint8)
    return Guess(np.asarray(perm, np.intp), mask, np.full(bits, bits))


def tie_break_attack(raw: np.ndarray, stored: np.ndarray, all_stored: np.ndarray, public_raw: np.ndarray,
                     iterations: int = 10) -> Guess:
    """The known-pair attack with its ties broken by the bit statistics of every stored code.

    ``known_pair_attack`` leaves groups of stored positions whose difference columns (over the
    n known pairs) are equal, matched in index order. The server also holds ``all_stored`` (every
    stored code) and can compute raw codes of public look-alike images (``public_raw``). Inside a
    group, matching stored position j to raw position i fixes its mask bit through the first pair,
    ``m_j = stored[0, j] ^ raw[0, i]``, so the un-masked frequency of stored column j (``p`` or
    ``1 - p``) and its un-masked correlations with the positions outside the group (signs from
    their current guesses) can be compared with raw column i's frequency and correlations in the
    look-alikes. Cost of j -> i: squared frequency difference plus the mean squared correlation
    difference; each group is solved by a linear assignment, and all groups are re-solved with the
    updated guesses until nothing changes (at most ``iterations`` rounds; a single group of every
    position, n = 1, first matches on frequencies alone). Every guess stays consistent with all
    known pairs, so where the pairs alone determine T the result is the same. ``candidates`` is the
    known-pair attack's (what the pairs alone pin down); with no pair at all there is no mask
    anchor and this is :func:`statistics_attack`.
    """
    from scipy.optimize import linear_sum_assignment

    raw, stored = np.asarray(raw, np.uint8), np.asarray(stored, np.uint8)
    if len(raw) == 0:
        return statistics_attack(public_raw, all_stored)
    plain = known_pair_attack(raw, stored)
    bits = raw.shape[1]
    fa, ca = _bit_stats(public_raw)
    fs, cs = _bit_stats(all_stored)
    perm = plain.perm.copy()
    # group = the raw positions a stored position may come from (equal difference columns)
    if len(raw) < 2:
        groups = [(np.arange(bits), np.arange(bits))]
    else:
        cols = np.concatenate([(raw[1:] ^ raw[0]).T, (stored[1:] ^ stored[0]).T])
        _, labels = np.unique(np.packbits(cols, axis=1), axis=0, return_inverse=True)
        labels = labels.reshape(-1)
        groups = [(np.flatnonzero(labels[bits:] == g), np.flatnonzero(labels[:bits] == g))
                  for g in np.unique(labels[bits:])]
        groups = [(js, is_) for js, is_ in groups if len(js) > 1]
    everything = np.arange(bits)
    for round_ in range(max(1, iterations)):
        changed = False
        sign = 1.0 - 2.0 * (stored[0] ^ raw[0, perm])  # current un-masking: -1 = this stored bit is flipped
        for js, is_ in groups:
            flip = stored[0, js][:, None] ^ raw[0, is_][None, :]  # [|G|, |G|]: the mask bit if j -> i
            sgn = 1.0 - 2.0 * flip
            cost = (np.where(flip, 1.0 - fs[js][:, None], fs[js][:, None]) - fa[is_][None, :]) ** 2
            others = np.setdiff1d(everything, js)
            if len(others) == 0 and round_ > 0:  # one group of every position (n = 1): use the current guesses
                others = everything
            if len(others):
                a = cs[np.ix_(js, others)] * sign[others]  # stored j's correlations with the others, un-masked
                b = ca[np.ix_(is_, perm[others])]  # raw i's correlations with the others' raw positions
                cost = cost + ((a ** 2).mean(1)[:, None] + (b ** 2).mean(1)[None, :]
                               - 2.0 * sgn * (a @ b.T) / len(others))
            rows, choice = linear_sum_assignment(cost)
            if not np.array_equal(perm[js[rows]], is_[choice]):
                perm[js[rows]] = is_[choice]
                changed = True
        if not changed and round_ > 0:
            break
    mask = (stored[0] ^ raw[0, perm]).astype(np.uint8)
    return Guess(perm, mask, plain.candidates)


def predict(guess: Guess, raw: np.ndarray) -> np.ndarray:
    """The stored codes (bits) the attacker predicts for raw codes (bits) under its guess."""
    return np.asarray(raw, np.uint8)[:, guess.perm] ^ guess.mask


def prediction_scores(guess: Guess, raw: np.ndarray, stored: np.ndarray) -> tuple[float, float]:
    """(fraction of codes predicted exactly, fraction of bits predicted right)."""
    right = predict(guess, raw) == stored
    return float(right.all(axis=1).mean()), float(right.mean())


def pairs_needed(raw: np.ndarray, stored: np.ndarray, held_raw: np.ndarray,
                 held_stored: np.ndarray) -> tuple[int | None, int | None]:
    """Smallest n such that the first n pairs (a) determine T exactly, (b) predict every held-out
    code exactly; None when all the pairs given are not enough."""
    exact = predicts = None
    for n in range(1, len(raw) + 1):
        guess = known_pair_attack(raw[:n], stored[:n])
        if predicts is None and prediction_scores(guess, held_raw, held_stored)[0] == 1.0:
            predicts = n
        if guess.exact:
            exact = n
            break
    return exact, predicts


def confirm_guess_attack(stored_ids: set[int] | frozenset[int], candidates: list[bytes],
                         guessed_keys: tuple[bytes, ...] = ()) -> np.ndarray:
    """The server's "do you hold this image?" test: for each candidate file (bytes it has a copy
    of) compute the item id an upload would give it and check it against the stored ids. It tries
    the unkeyed :func:`dlheir.ids.content_id` and :func:`dlheir.ids.keyed_content_id` under each of
    ``guessed_keys`` (keys it makes up; it is not told the owner's id key). Returns bool [len(candidates)]:
    True = "stored". Against unkeyed ids this is exact; against keyed ids a hit needs the 32-byte key
    (or a 63-bit collision)."""
    from dlheir.ids import content_id, keyed_content_id

    stored_ids = frozenset(stored_ids)
    return np.array([content_id(c) in stored_ids or any(keyed_content_id(k, c) in stored_ids for k in guessed_keys)
                     for c in candidates], dtype=bool)


def membership_scores(said_stored: np.ndarray, uploaded: np.ndarray) -> dict:
    """Accuracy, true-positive rate (uploaded candidates said stored) and false-positive rate."""
    said_stored, uploaded = np.asarray(said_stored, bool), np.asarray(uploaded, bool)
    return {"accuracy": float((said_stored == uploaded).mean()),
            "true_positive_rate": float(said_stored[uploaded].mean()) if uploaded.any() else 0.0,
            "false_positive_rate": float(said_stored[~uploaded].mean()) if (~uploaded).any() else 0.0,
            "true_positives": int((said_stored & uploaded).sum()), "candidates": int(len(uploaded))}


def digits_png_files() -> list[bytes]:
    """Stand-in image files: the PNG bytes of scikit-learn's bundled 8x8 digits images (no download),
    de-duplicated (two equal files have one id under any rule, so a "not uploaded" copy of an uploaded
    file would be a true, not a false, match)."""
    import io

    from PIL import Image

    from dlheir.extras import require

    require("train", "the confirm-a-guess attack (scikit-learn's digits)")
    from sklearn.datasets import load_digits

    files = []
    for image in load_digits().images:
        buffer = io.BytesIO()
        Image.fromarray((image * 15).astype(np.uint8)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return list(dict.fromkeys(files))


def measure_confirm_guess(files: list[bytes], seed: int) -> list[dict]:
    """Upload a random half of ``files`` under unkeyed ids and, separately, under keyed ids with a
    random id key; the server runs :func:`confirm_guess_attack` on every file (it tries the unkeyed
    id and the keyed id under one key of its own). One row per id rule."""
    from dlheir.ids import content_id, keyed_content_id

    rng = np.random.default_rng([seed, 1])
    uploaded = np.zeros(len(files), bool)
    uploaded[rng.permutation(len(files))[:len(files) // 2]] = True
    id_key, attacker_key = rng.bytes(32), rng.bytes(32)  # the owner's collection key; the attacker's guess
    rows = []
    for rule, name_of in (("content_id (unkeyed)", content_id),
                          ("keyed_content_id (random key)", lambda data: keyed_content_id(id_key, data))):
        stored_ids = {name_of(f) for f, up in zip(files, uploaded) if up}
        said = confirm_guess_attack(stored_ids, files, guessed_keys=(attacker_key,))
        rows.append({"ids": rule, **membership_scores(said, uploaded)})
    return rows


def tie_break_pairs_needed(raw: np.ndarray, stored: np.ndarray, all_stored: np.ndarray, public_raw: np.ndarray,
                           perm: np.ndarray, mask: np.ndarray, limit: int | None = None) -> int | None:
    """Smallest n such that :func:`tie_break_attack` on the first n' pairs gives the true (perm, mask)
    for every n' from n to ``limit`` (default: all the pairs; past the point where the pairs alone
    determine T it cannot go wrong again). The attacker cannot see this point, only we can: it is
    how many pairs it takes, not when the attacker knows. None when not reached by ``limit``."""
    limit = len(raw) if limit is None else min(limit, len(raw))
    needed = None
    for n in range(1, limit + 1):
        guess = tie_break_attack(raw[:n], stored[:n], all_stored, public_raw)
        if np.array_equal(guess.perm, perm) and np.array_equal(guess.mask, mask):
            needed = n if needed is None else needed
        else:
            needed = None
    return needed


# --- data ---------------------------------------------------------------------------------------
def synthetic_codes(bits: int, items: int, public: int, clusters: int, flip: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored-item and public look-alike raw codes (bits) from one distribution: ``clusters``
    random centres, each bit flipped with probability ``flip``; ``clusters=0`` = uniform bits."""
    rng = np.random.default_rng([seed, bits])
    if clusters <= 0:
        return (rng.integers(0, 2, (items, bits), dtype=np.uint8),
                rng.integers(0, 2, (public, bits), dtype=np.uint8))
    centres = rng.integers(0, 2, (clusters, bits), dtype=np.uint8)

    def draw(n: int) -> np.ndarray:
        noise = (rng.random((n, bits)) < flip).astype(np.uint8)
        return centres[rng.integers(0, clusters, n)] ^ noise

    return draw(items), draw(public)


def model_codes(checkpoint: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Raw codes (bits) of the database split (stored items) and the query split (the attacker's
    public look-alikes) computed in-process with a trained checkpoint."""
    from dlheir.codes import unpack_bits
    from dlheir.errors import UserError

    if not Path(checkpoint).is_file():
        raise UserError(f"no checkpoint at {checkpoint}: run 'make demo' to train one, give --checkpoint PATH, "
                        "or use --synthetic")
    from dlheir.extras import require

    require("train", f"'dlheir bench leakage --checkpoint {checkpoint}' (use --synthetic without it)")
    from dlheir.export.checkpoint import load_checkpoint
    from dlheir.export.data import resolve_data, split_dataset
    from dlheir.export.train import compute_codes

    model, meta = load_checkpoint(checkpoint)
    config = meta.get("config") or {}
    data = config.get("data", "digits")
    database, queries, _ = split_dataset(resolve_data(data, meta["image_size"]), seed=config.get("seed", 0))
    _, db = compute_codes(model, database, meta["image_size"], desc="database codes")
    _, pub = compute_codes(model, queries, meta["image_size"], desc="look-alike codes")
    return unpack_bits(db, meta["bits"]), unpack_bits(pub, meta["bits"]), {"checkpoint": str(checkpoint), "data": str(data)}


# --- the measurement ----------------------------------------------------------------------------
def measure(raw: np.ndarray, public_raw: np.ndarray, known: list[int], trials: int, seed: int,
            held_fraction: float = 0.2) -> dict:
    """Run the code attacks (known pairs, known pairs + statistics, statistics alone) against
    ``trials`` random secrets through the real client transform."""
    from dlheir.client.crypto import CodeTransform
    from dlheir.codes import pack_bits, unpack_bits

    items, bits = raw.shape
    held_n = max(1, int(round(held_fraction * items)))
    pool_n = items - held_n
    known = [k for k in known if k <= pool_n]
    curves = {k: {"exact": [], "bits": [], "transform_exact": 0, "tb_exact": [], "tb_bits": [], "tb_transform": 0}
              for k in known}
    needed, to_predict, stats, tb_needed = [], [], [], []
    for t in range(trials):
        rng = np.random.default_rng([seed, bits, t])
        transform = CodeTransform(rng.bytes(32), bits)  # a secret the attacks are not told
        stored = unpack_bits(transform.apply(pack_bits(raw)), bits)
        order = rng.permutation(items)
        held, pool = order[:held_n], order[held_n:]
        for k in known:
            guess = known_pair_attack(raw[pool[:k]], stored[pool[:k]])
            exact, bit_frac = prediction_scores(guess, raw[held], stored[held])
            curves[k]["exact"].append(exact)
            curves[k]["bits"].append(bit_frac)
            curves[k]["transform_exact"] += int(guess.exact and np.array_equal(guess.perm, transform.perm)
                                                and np.array_equal(guess.mask, transform.mask))
            guess = tie_break_attack(raw[pool[:k]], stored[pool[:k]], stored, public_raw)
            exact, bit_frac = prediction_scores(guess, raw[held], stored[held])
            curves[k]["tb_exact"].append(exact)
            curves[k]["tb_bits"].append(bit_frac)
            curves[k]["tb_transform"] += int(np.array_equal(guess.perm, transform.perm)
                                             and np.array_equal(guess.mask, transform.mask))
        n_exact, n_predict = pairs_needed(raw[pool], stored[pool], raw[held], stored[held])
        needed.append(n_exact)
        to_predict.append(n_predict)
        tb_needed.append(tie_break_pairs_needed(raw[pool], stored[pool], stored, public_raw, transform.perm,
                                                transform.mask, limit=n_exact))
        guess = statistics_attack(public_raw, stored)
        exact, bit_frac = prediction_scores(guess, raw[held], stored[held])
        stats.append({"exact": exact, "bits": bit_frac,
                      "positions_right": float((guess.perm == transform.perm).mean()),
                      "mask_right": float((guess.mask == transform.mask).mean())})

    def spread(values: list) -> dict:
        got = [v for v in values if v is not None]
        return {"median": float(np.median(got)) if got else None, "min": min(got, default=None),
                "max": max(got, default=None), "not_reached": len(values) - len(got), "values": values}

    def most(key: str) -> int | None:  # smallest listed n with T recovered in more than half the trials
        return next((k for k, c in curves.items() if 2 * c[key] > trials), None)

    distinct = len(np.unique(pack_bits(raw), axis=0))
    return {
        "bits": bits, "items": items, "distinct_codes": distinct, "held_out": held_n, "pair_pool": pool_n,
        "public_lookalikes": len(public_raw), "trials": trials,
        "known_pairs": [{"pairs": k, "codes_exact_median": float(np.median(c["exact"])),
                         "codes_exact_min": float(min(c["exact"])), "codes_exact_max": float(max(c["exact"])),
                         "bits_right_median": float(np.median(c["bits"])), "transform_exact_trials": c["transform_exact"],
                         "tie_break_codes_exact_median": float(np.median(c["tb_exact"])),
                         "tie_break_codes_exact_min": float(min(c["tb_exact"])),
                         "tie_break_codes_exact_max": float(max(c["tb_exact"])),
                         "tie_break_bits_right_median": float(np.median(c["tb_bits"])),
                         "tie_break_transform_exact_trials": c["tb_transform"]}
                        for k, c in curves.items()],
        "pairs_to_recover_transform": spread(needed),
        "pairs_to_predict_all_held_out": spread(to_predict),
        "tie_break_pairs_to_recover_transform": spread(tb_needed),
        "pairs_for_most_trials": {"known_pair": most("transform_exact"), "tie_break": most("tb_transform")},
        "statistics_attack": {key: float(np.median([s[key] for s in stats])) for key in stats[0]}
                             | {"codes_exact_min": min(s["exact"] for s in stats),
                                "codes_exact_max": max(s["exact"] for s in stats)},
    }


def _fmt_spread(s: dict) -> str:
    if s["median"] is None:
        return f"not reached ({s['not_reached']}/{len(s['values'])})"
    text = f"{s['median']:g} [{s['min']}-{s['max']}]"
    return text + (f", not reached {s['not_reached']}" if s["not_reached"] else "")


def _fmt_n(n: int | None) -> str:
    return "not reached" if n is None else str(n)


def figure(runs: list[dict], title: str):
    """The two panels (exact codes, bits) against the known pairs, with one legend under both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for run in runs:
        r = run["result"]
        x = [p["pairs"] for p in r["known_pairs"]]
        label = f"{run['label']}, {r['bits']} bits"
        line, = axes[0].plot(x, [p["codes_exact_median"] for p in r["known_pairs"]], marker="o",
                             label=f"{label}: known pairs")
        axes[0].fill_between(x, [p["codes_exact_min"] for p in r["known_pairs"]],
                             [p["codes_exact_max"] for p in r["known_pairs"]], color=line.get_color(), alpha=0.15)
        axes[1].plot(x, [p["bits_right_median"] for p in r["known_pairs"]], marker="o", color=line.get_color())
        axes[0].plot(x, [p["tie_break_codes_exact_median"] for p in r["known_pairs"]], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{label}: known pairs + bit statistics")
        axes[1].plot(x, [p["tie_break_bits_right_median"] for p in r["known_pairs"]], marker="x", linestyle="--",
                     color=line.get_color())
        st = r["statistics_attack"]
        axes[0].plot([0], [st["exact"]], marker="*", markersize=14, color=line.get_color(), linestyle="none",
                     label=f"{label}: no pair, bit statistics only")
        axes[1].plot([0], [st["bits"]], marker="*", markersize=14, color=line.get_color(), linestyle="none")
    axes[0].set_ylabel("held-out stored codes\npredicted exactly (fraction)")
    axes[1].set_ylabel("held-out stored bits\npredicted right (fraction)")
    for ax in axes:
        ax.set_xlabel("known (raw code, stored code) pairs\n(symlog scale: linear to 10, log above)")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_title("exact codes (median; band: min-max over secrets)", fontsize=9)
    axes[1].set_title("bits (median over secrets)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title)
    height = 4.2 + 0.2 * len(labels)  # the panels keep their height; the legend's lines are added under them
    fig.set_size_inches(12, height)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * len(labels)) / height, 1, 1), w_pad=3)
    fig.legend(handles, labels, loc="lower center", fontsize=8, frameon=False)  # under both panels
    return fig


def plot(path: Path, runs: list[dict], title: str) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- CLI ----------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leakage", help="attacks on the code transform (known pairs, bit statistics) and on item ids",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"trained model whose codes are attacked (default {DEFAULT_CHECKPOINT}, from 'make demo')")
    p.add_argument("--synthetic", action="store_true", help="attack seeded clustered random codes instead (no model)")
    p.add_argument("--bits", default="48,64", help="--synthetic: code lengths, comma separated (default 48,64)")
    p.add_argument("--items", type=int, default=2000, help="--synthetic: stored items (default 2000)")
    p.add_argument("--public", type=int, default=500, help="--synthetic: public look-alike codes (default 500)")
    p.add_argument("--clusters", type=int, default=10, help="--synthetic: clusters, 0 = uniform random bits (default 10)")
    p.add_argument("--flip", type=float, default=0.1, help="--synthetic: per-bit noise around a centre (default 0.1)")
    p.add_argument("--known", default=DEFAULT_KNOWN, help=f"known-pair counts (default {DEFAULT_KNOWN})")
    p.add_argument("--trials", type=int, default=20, help="random secrets (and pair draws) per setting (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="results/bench_leakage",
                   help="where bench_leakage.json and .png go (default results/bench_leakage/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dlheir.benchmarks.common import save_json, table
    from dlheir.contract import validate_bits
    from dlheir.errors import UserError

    try:
        known = sorted({int(k) for k in args.known.split(",")})
        bit_lengths = [validate_bits(int(b)) for b in args.bits.split(",")]
    except ValueError:
        raise UserError("--known and --bits take comma-separated integers") from None
    if args.trials < 1 or min(known) < 0:
        raise UserError("--trials must be at least 1 and --known counts non-negative")
    runs = []
    if args.synthetic:
        if args.items < 2 or args.public < 2 or not 0 <= args.flip <= 0.5:
            raise UserError("--items and --public must be at least 2, --flip in [0, 0.5]")
        kind = f"{args.clusters} clusters, flip {args.flip}" if args.clusters > 0 else "uniform random"
        source = {"synthetic": True, "clusters": args.clusters, "flip": args.flip}
        for bits in bit_lengths:
            raw, public = synthetic_codes(bits, args.items, args.public, args.clusters, args.flip, args.seed)
            runs.append({"label": f"synthetic ({kind})", "result": measure(raw, public, known, args.trials, args.seed)})
    else:
        raw, public, source = model_codes(args.checkpoint)
        runs.append({"label": f"model {Path(args.checkpoint).parent.name or args.checkpoint}",
                     "result": measure(raw, public, known, args.trials, args.seed)})

    rows, summary = [], []
    for run_ in runs:
        r = run_["result"]
        for p in r["known_pairs"]:
            rows.append({"data": run_["label"], "bits": r["bits"], **p})
        st = r["statistics_attack"]
        summary.append({"data": run_["label"], "bits": r["bits"], "distinct": f"{r['distinct_codes']}/{r['items']}",
                        "recover": _fmt_spread(r["pairs_to_recover_transform"]),
                        "predict": _fmt_spread(r["pairs_to_predict_all_held_out"]),
                        "stats_exact": st["exact"], "stats_bits": st["bits"],
                        "tb_recover": _fmt_spread(r["tie_break_pairs_to_recover_transform"]),
                        "most_plain": _fmt_n(r["pairs_for_most_trials"]["known_pair"]),
                        "most_tb": _fmt_n(r["pairs_for_most_trials"]["tie_break"])})
    trials = runs[0]["result"]["trials"]
    print(f"known-pair attack: held-out stored codes predicted exactly (over {trials} random secrets)")
    print(table(rows, [("data", "data", ""), ("bits", "bits", "d"), ("pairs", "known pairs", "d"),
                       ("codes_exact_median", "codes exact (median)", ".3f"), ("codes_exact_min", "min", ".3f"),
                       ("codes_exact_max", "max", ".3f"), ("bits_right_median", "bits right (median)", ".3f"),
                       ("transform_exact_trials", f"T recovered (of {trials})", "d")]))
    print("\npairs needed, median [min-max] over secrets; no-pair statistics attack (median)")
    print(table(summary, [("data", "data", ""), ("bits", "bits", "d"), ("distinct", "distinct codes", ""),
                          ("recover", "pairs to recover T exactly", ""),
                          ("predict", "pairs to predict all held-out", ""),
                          ("stats_exact", "0 pairs: codes exact", ".3f"), ("stats_bits", "0 pairs: bits right", ".3f")]))
    print("\nknown pairs + bit statistics of all stored codes (tie_break_attack) beside the known-pair attack alone:"
          f" T recovered exactly (of {trials} secrets), held-out codes exact (median)")
    print(table(rows, [("data", "data", ""), ("bits", "bits", "d"), ("pairs", "known pairs", "d"),
                       ("transform_exact_trials", "T recovered: pairs alone", "d"),
                       ("tie_break_transform_exact_trials", "+ statistics", "d"),
                       ("codes_exact_median", "codes exact: pairs alone", ".3f"),
                       ("tie_break_codes_exact_median", "+ statistics", ".3f"),
                       ("tie_break_codes_exact_min", "min", ".3f")]))
    print(table(summary, [("data", "data", ""), ("bits", "bits", "d"),
                          ("recover", "pairs to recover T: pairs alone", ""),
                          ("tb_recover", "+ statistics", ""),
                          ("most_plain", "listed n, T in most trials: pairs alone", ""),
                          ("most_tb", "+ statistics", "")]))
    files = digits_png_files()
    confirm = measure_confirm_guess(files, args.seed)
    print(f"\nconfirm-a-guess attack: the server ids each of {len(files)} candidate files (sklearn digits as PNG "
          "bytes, a random half uploaded) and checks the stored ids")
    print(table(confirm, [("ids", "upload ids", ""), ("accuracy", "accuracy", ".3f"),
                          ("true_positive_rate", "true-positive rate", ".3f"),
                          ("false_positive_rate", "false-positive rate", ".3f"),
                          ("true_positives", "true positives", "d"), ("candidates", "candidates", "d")]))
    path = save_json("bench_leakage", {"source": source, "runs": runs, "known": known, "confirm_guess": confirm},
                     args.out_dir)
    png = plot(Path(args.out_dir) / "bench_leakage.png", runs,
               "Leakage of the code transform T(c) = P(c) xor m to the server")
    print(f"written {path}, {png}")
    return 0
