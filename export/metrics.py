"""Retrieval metrics on Hamming rankings (pure numpy).

The ranking of the database for a query is by (Hamming distance, id) ascending
(``dlheir.contract.rank``), so offline evaluation and the served pipeline agree exactly.
"""

from __future__ import annotations

import numpy as np

from dlheir.codes import hamming
from dlheir.contract import rank

PAPER_KS = (20, 40, 60, 80, 100)


def rankings(query_codes: np.ndarray, db_codes: np.ndarray, db_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query, database indices ordered by (distance, id) and the sorted distances."""
    dist = hamming(query_codes, db_codes)
    order = rank(dist, np.broadcast_to(np.asarray(db_ids, dtype=np.int64), dist.shape))  # row by row
    return order, np.take_along_axis(dist, order, axis=1)


def ranking(query_codes: np.ndarray, db_codes: np.ndarray, db_ids: np.ndarray) -> np.ndarray:
    """Database indices [Q, D] for each query, ordered by (Hamming distance, id) ascending."""
    return rankings(query_codes, db_codes, db_ids)[0]


def retrieval_metrics(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray,
                      db_labels: np.ndarray, db_ids: np.ndarray, ks: tuple[int, ...] = PAPER_KS) -> dict:
    """P@k and mAP of packed query codes against a packed database (relevant = same label)."""
    order = ranking(query_codes, db_codes, db_ids)
    return summarize(relevance(np.asarray(db_labels)[order], query_labels), ks)


def relevance(ranked_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """[Q, D] bool: ranked database item has the query's label."""
    return np.asarray(ranked_labels) == np.asarray(query_labels)[:, None]


def precision_at_k(rel: np.ndarray, k: int) -> float:
    """Mean over queries of (relevant among the top k) / k; ``rel`` is [Q, D] bool in ranked order."""
    return float(rel[:, :k].sum(axis=1).mean() / k)


def mean_average_precision(rel: np.ndarray) -> float:
    """mAP over the full ranking; a query with no relevant item scores 0."""
    rel = np.asarray(rel, dtype=np.float64)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    ap = np.where(n_rel > 0, (rel * hits / ranks).sum(axis=1) / np.maximum(n_rel, 1), 0.0)
    return float(ap.mean())


def summarize(rel: np.ndarray, ks: tuple[int, ...] = PAPER_KS) -> dict:
    """P@k for each k and mAP, as a JSON-ready dict."""
    out = {f"P@{k}": precision_at_k(rel, k) for k in ks}
    out["mAP"] = mean_average_precision(rel)
    return out
