"""Evaluation metrics for CTR prediction: AUC and LogLoss, overall and per domain.

Both are computed in float64 with numpy (no sklearn dependency), from the model's logits
(pre-sigmoid scores), so LogLoss never takes the log of a rounded-to-zero probability.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["auc", "logloss", "compute_metrics", "midranks"]


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    return arr


def _check_pair(labels: np.ndarray, scores: np.ndarray) -> None:
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must have the same number of elements, got {labels.size} "
            f"labels and {scores.size} scores")
    bad = ~((labels == 0) | (labels == 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels must be 0 or 1, got labels[{i}] = {float(labels[i])!r}")


def midranks(values) -> np.ndarray:
    """1-based ranks of `values` where each run of equal values shares its average rank.

    This is the rank that makes a tie count one half in AUC and in DeLong's placement values.
    O(n log n) (one stable sort).

    Example:
        >>> midranks([0.3, 0.1, 0.3, 0.2]).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    v_sorted = v[order]
    starts = np.flatnonzero(np.r_[True, v_sorted[1:] != v_sorted[:-1]])
    ends = np.r_[starts[1:], v_sorted.size].astype(np.int64)
    avg_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty_like(v)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula.

    Tied scores share their average rank, so a tie between a positive and a negative counts
    one half, exactly as the pairwise definition P(s_pos > s_neg) + 0.5 P(s_pos == s_neg).
    Returns NaN when only one class is present (AUC is undefined there).

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y = _as_numpy(labels, "labels")
    s = _as_numpy(scores, "scores")
    _check_pair(y, s)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if np.isnan(s).any():
        return float("nan")
    ranks = midranks(s)
    rank_sum_pos = float(ranks[y == 1].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels, logits) -> float:
    """Mean binary cross-entropy of labels given logits (pre-sigmoid scores), natural log.

    Computed as log(1 + exp(-|x|)) + max(x, 0) - y * x, which is exact for any finite logit
    size; an infinite logit on its label's side costs 0 and on the other side inf.

    Example:
        >>> round(logloss([1, 0], [0.0, 0.0]), 6)
        0.693147
    """
    y = _as_numpy(labels, "labels")
    x = _as_numpy(logits, "logits")
    _check_pair(y, x)
    if y.size == 0:
        return float("nan")
    with np.errstate(invalid="ignore"):
        losses = np.logaddexp(0.0, -np.abs(x)) + np.maximum(x, 0.0) - y * x
    inf = np.isinf(x)
    if inf.any():  # max(x, 0) - y * x is inf - inf there: the limit instead
        right = (x > 0) == (y > 0.5)
        losses = np.where(inf, np.where(right, 0.0, np.inf), losses)
    return float(losses.mean())


def compute_metrics(labels, logits, domains=None,
                    domain_names: Sequence[str] | None = None) -> dict:
    """AUC and LogLoss overall and, when `domains` is given, per domain.

    `domains` holds one integer per row, an index into `domain_names`.
    Returns {'auc': float, 'logloss': float, 'n': int,
             'per_domain': {name: {'auc', 'logloss', 'n'}}}.

    Example:
        >>> m = compute_metrics([0, 1, 1, 0], [-1.0, 2.0, 0.5, 0.1], [0, 0, 1, 1], ["a", "b"])
        >>> m["auc"], m["per_domain"]["a"]["auc"]
        (1.0, 1.0)
    """
    y = _as_numpy(labels, "labels")
    x = _as_numpy(logits, "logits")
    out = {"auc": auc(y, x), "logloss": logloss(y, x), "n": int(y.size), "per_domain": {}}
    if domains is not None:
        raw = _as_numpy(domains, "domains")
        if raw.size != y.size:
            raise ValueError(f"domains must have one entry per row, got {raw.size} for {y.size} rows")
        n_names = len(domain_names) if domain_names is not None else None
        ok = np.isfinite(raw) & (raw >= 0) & (raw == np.floor(raw))
        if n_names is not None:
            ok &= raw < n_names
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            want = (f"indices into domain_names (0 to {n_names - 1})" if n_names is not None
                    else "non-negative integers")
            raise ValueError(f"domains must be {want}, got {raw[i]:g} at row {i}")
        d = raw.astype(np.int64)
        for k in np.unique(d):
            name = domain_names[k] if domain_names is not None else str(int(k))
            mask = d == k
            out["per_domain"][name] = {"auc": auc(y[mask], x[mask]),
                                       "logloss": logloss(y[mask], x[mask]),
                                       "n": int(mask.sum())}
    return out


def is_better(metric: str, new: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `new` improves on `best` for `metric` ('auc' is maximised, 'logloss' minimised).

    NaN never improves; anything improves on None.

    Example:
        >>> is_better("auc", 0.71, 0.70), is_better("logloss", 0.45, 0.44)
        (True, False)
    """
    if new is None or math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    if metric == "auc":
        return new > best + min_delta
    return new < best - min_delta
