"""Significance of AUC differences between two strategies: paired on the same test rows
(DeLong's test, a paired bootstrap over rows) and combined over seeds.

Why these tests: on a test split of a few hundred or thousand rows, the AUC itself has a
sampling error (about +-0.02 at 600 rows) far larger than the differences between transfer
strategies, and the spread over seeds does not show it (every seed is scored on the same rows).
Two strategies scored on the same rows are strongly correlated, so a *paired* test, which
uses that correlation, is much more sensitive than comparing two intervals.

- `delong_test`: DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more
  correlated receiver operating characteristic curves: a nonparametric approach", with the
  O(n log n) midrank computation of the structural components by Sun & Xu (2014), "Fast
  implementation of DeLong's algorithm for comparing the areas under correlated receiver
  operating characteristic curves". Ties count one half.
- `paired_bootstrap_auc`: the same question answered by resampling rows (no normal
  approximation), vectorised by drawing per-row multiplicities and computing weighted AUCs.
- `seed_paired_summary`: per-seed DeLong differences folded into one estimate whose variance has
  both the test-row sampling error and the seed-to-seed spread (a random-effects model).

Only numpy and the standard library are used: the normal distribution comes from
`statistics.NormalDist`, Student's t from the regularized incomplete beta function below.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

from .metrics import _as_numpy, _check_pair, midranks

__all__ = ["placement_values", "delong_test", "weighted_auc", "paired_bootstrap_auc",
           "seed_paired_summary", "t_cdf", "t_quantile", "normal_two_sided_p"]

_NORMAL = NormalDist()


# -- distributions ----------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        # even step
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    `y` is 1 - x when the caller can compute it without cancellation (x close to 1).
    """
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _check_df(df: float) -> float:
    df = float(df)
    if not df > 0:  # also rejects NaN
        raise ValueError(f"df must be > 0 (degrees of freedom), got {df!r}")
    return df


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (any real df > 0; df = inf is
    the standard normal).

    Example:
        >>> round(t_cdf(2.228138851986, 10), 6)
        0.975
    """
    df = _check_df(df)
    t = float(t)
    if math.isnan(t):
        return float("nan")
    if math.isinf(df):
        return _phi(t)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if df > 1e6:
        # The beta function's log-gamma terms cancel badly for huge df; the first-order
        # expansion around the normal is exact to O(1/df^2) there (< 1e-12). In the lower
        # tail the correction is applied as a factor, which keeps the relative precision
        # of tiny tail probabilities (an absolute correction swamped them).
        corr = _NORMAL.pdf(t) * (t ** 3 + t) / (4.0 * df)
        if t < 0:
            return _phi(t) * max(0.0, 1.0 - corr / _phi(t)) if _phi(t) > 0 else 0.0
        return _phi(t) - corr
    # P(T > |t|) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2); 1 - x is passed as
    # t^2 / (df + t^2), which keeps its digits near t = 0 where x rounds to 1.
    t2 = t * t
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return 1.0 - tail if t >= 0 else tail


def _phi(t: float) -> float:
    """The standard normal CDF through erfc: exact to relative precision in the lower tail,
    where 0.5 * (1 + erf(t / sqrt 2)) underflows to 0 from about t = -8.3 on."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (df = inf: the normal).

    Example:
        >>> round(t_quantile(0.975, 4), 4)
        2.7764
    """
    df = _check_df(df)
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be strictly between 0 and 1, got {p!r}")
    if math.isinf(df):
        return _NORMAL.inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    # Bracket, then bisect on the monotone CDF (about 200 halvings reach double precision).
    lo, hi = 0.0, max(1.0, _NORMAL.inv_cdf(p))
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def normal_two_sided_p(z: float) -> float:
    """Two-sided p-value of a standard-normal statistic: 2 * (1 - Phi(|z|)).

    Example:
        >>> round(normal_two_sided_p(1.959963985), 6)
        0.05
    """
    if math.isnan(z):
        return float("nan")
    # erfc keeps its relative precision far in the tail, where 2 * Phi(-|z|) underflows.
    return min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


def _t_two_sided_p(t: float, df: float) -> float:
    if math.isnan(t):
        return float("nan")
    return min(1.0, 2.0 * t_cdf(-abs(t), df))


# -- DeLong -----------------------------------------------------------------------------------

def _labels_scores(labels, scores_list: Sequence, names: Sequence[str]):
    y = _as_numpy(labels, "labels")
    out = []
    for s, name in zip(scores_list, names):
        arr = _as_numpy(s, name)
        if arr.shape != y.shape:
            raise ValueError(f"{name} must have one score per label, got {arr.size} scores for "
                             f"{y.size} labels")
        _check_pair(y, arr)
        if not np.isfinite(arr).all():
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(arr[i])!r}")
        out.append(arr)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"labels must hold at least 2 positives and 2 negatives for a variance "
                         f"of the AUC, got {n_pos} positives and {n_neg} negatives")
    return y, out


def placement_values(labels, scores) -> tuple[float, np.ndarray, np.ndarray]:
    """DeLong's structural components of one classifier's AUC: (auc, v10, v01).

    v10[i] is, for the i-th positive row (in row order), the fraction of negatives it outscores
    (ties one half); v01[j] is, for the j-th negative, the fraction of positives that outscore
    it. Both average to the AUC. Computed from midranks (Sun & Xu 2014) in O(n log n):
    v10 = (rank among all - rank among positives) / n_neg, and
    v01 = 1 - (rank among all - rank among negatives) / n_pos.

    Example:
        >>> a, v10, v01 = placement_values([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        >>> a, v10.tolist(), v01.tolist()
        (0.75, [0.5, 1.0], [1.0, 0.5])
    """
    y, (s,) = _labels_scores(labels, [scores], ["scores"])
    return _placements(y, s)


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    tz = midranks(np.concatenate([pos, neg]))
    v10 = (tz[:m] - midranks(pos)) / n
    v01 = 1.0 - (tz[m:] - midranks(neg)) / m
    return float(v10.mean()), v10, v01


def _diff_components(y, s_a, s_b):
    """(auc_a, auc_b, d10, d01): the per-row placement differences of a minus b, whose
    means are the AUC difference and whose variances give DeLong's variance of it."""
    auc_a, a10, a01 = _placements(y, s_a)
    auc_b, b10, b01 = _placements(y, s_b)
    return auc_a, auc_b, a10 - b10, a01 - b01


def _var_of_mean_diff(d10: np.ndarray, d01: np.ndarray) -> float:
    # Var(AUC_a - AUC_b) = [S10_aa + S10_bb - 2 S10_ab] / m + [S01 ...] / n, which is the
    # sample variance of the placement differences over each class divided by its size.
    return float(d10.var(ddof=1) / d10.size + d01.var(ddof=1) / d01.size)


def delong_test(labels, scores_a, scores_b, *, alpha: float = 0.05) -> dict:
    """DeLong's paired test of AUC(a) = AUC(b) for two score vectors on the same rows.

    Returns {'auc_a', 'auc_b', 'diff' (= auc_a - auc_b), 'se', 'z', 'p_value' (two-sided,
    normal), 'ci_low', 'ci_high' (the 1 - alpha interval of diff)}. When the two scores rank
    every pair the same way the variance is 0: z is 0 and p is 1 if the AUCs are equal.
    Scores may be logits or probabilities (only their order matters).

    Example:
        >>> r = delong_test([0, 0, 1, 1, 0, 1], [.1, .4, .35, .8, .2, .9], [.2, .1, .3, .7, .6, .5])
        >>> round(r["diff"], 4), round(r["p_value"], 3)
        (0.1111, 0.724)
    """
    _check_alpha(alpha)
    y, (s_a, s_b) = _labels_scores(labels, [scores_a, scores_b], ["scores_a", "scores_b"])
    auc_a, auc_b, d10, d01 = _diff_components(y, s_a, s_b)
    diff = auc_a - auc_b
    var = max(_var_of_mean_diff(d10, d01), 0.0)
    se = math.sqrt(var)
    z = _ratio(diff, se)
    half = _NORMAL.inv_cdf(1.0 - alpha / 2.0) * se
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": se, "z": z,
            "p_value": normal_two_sided_p(z), "ci_low": diff - half, "ci_high": diff + half}


def _ratio(diff: float, se: float) -> float:
    if se > 0:
        return diff / se
    return 0.0 if abs(diff) < 1e-15 else math.copysign(math.inf, diff)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha!r}")


# -- bootstrap --------------------------------------------------------------------------------

class _SortedScores:
    """One score vector grouped once into runs of equal scores, so that the AUC under many
    weightings (bootstrap replicates) of the same rows costs O(rows) each, without a sort.

    Each row gets the key (its tie group, in score order) + groups * label; a replicate's
    negative and positive weight per tie group is one bincount over those keys."""

    def __init__(self, y: np.ndarray, s: np.ndarray):
        uniq, group = np.unique(s, return_inverse=True)
        self.groups = int(uniq.size)
        self.key = group.reshape(-1).astype(np.int64) + self.groups * (y == 1)

    def _auc_from_bins(self, bins: np.ndarray) -> np.ndarray:
        bins = bins.reshape(-1, 2, self.groups)
        q, p = bins[:, 0, :], bins[:, 1, :]                # negative, positive weight per group
        # sum_g p_g * (negatives strictly below g + half the negatives tied with g)
        num = (np.einsum("ij,ij->i", p, np.cumsum(q, axis=1))
               - 0.5 * np.einsum("ij,ij->i", p, q)).astype(np.float64)
        den = (p.sum(axis=1) * q.sum(axis=1)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    def _offsets(self, b: int) -> np.ndarray:
        return (np.arange(b, dtype=np.int64) * (2 * self.groups))[:, None]

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """AUC for each row of `weights` (B x rows, a non-negative weight per row)."""
        b = weights.shape[0]
        keys = (self.key[None, :] + self._offsets(b)).ravel()
        return self._auc_from_bins(np.bincount(keys, weights=weights.ravel(),
                                               minlength=b * 2 * self.groups))

    def auc_resampled(self, idx: np.ndarray) -> np.ndarray:
        """AUC for each row of `idx` (B x rows of row indices drawn with replacement)."""
        b = idx.shape[0]
        keys = (self.key[idx] + self._offsets(b)).ravel()
        return self._auc_from_bins(np.bincount(keys, minlength=b * 2 * self.groups))


def weighted_auc(labels, scores, weights) -> float | np.ndarray:
    """AUC with a non-negative weight per row (a row of weight 2 counts as two copies; ties one
    half). `weights` of shape (rows,) gives a float, of shape (B, rows) one AUC per row of it.
    NaN where a weighting leaves only one class.

    Example:
        >>> weighted_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], [1, 1, 1, 1])
        0.75
        >>> weighted_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], [[1, 0, 1, 1], [0, 1, 1, 0]]).tolist()
        [1.0, 0.0]
    """
    y = _as_numpy(labels, "labels")
    s = _as_numpy(scores, "scores")
    _check_pair(y, s)
    w = np.asarray(weights, dtype=np.float64)
    single = w.ndim == 1
    w = w.reshape(1, -1) if single else w
    if w.ndim != 2 or w.shape[1] != y.size:
        raise ValueError(f"weights must have shape ({y.size},) or (B, {y.size}), got "
                         f"{np.asarray(weights).shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    if np.isnan(s).any():
        # As `auc`: a NaN score (a diverged model) has no rank, so the AUC is undefined
        # (sorting would rank it above every number).
        return float("nan") if single else np.full(w.shape[0], np.nan)
    out = _SortedScores(y, s).auc(w)
    return float(out[0]) if single else out


def paired_bootstrap_auc(labels, scores_a, scores_b, n_boot: int = 1000, seed: int = 0, *,
                         alpha: float = 0.05, chunk: int = 100) -> dict:
    """Paired bootstrap over test rows of AUC(a) - AUC(b): both score vectors are evaluated on
    the same resampled rows, so their correlation is kept.

    Returns {'auc_a', 'auc_b', 'diff' (on the original rows), 'se' (std of the replicates),
    'ci_low', 'ci_high' (percentile 1 - alpha interval), 'p_value', 'n_boot' (replicates
    used; one-class resamples are dropped)}. The two-sided p-value is
    min(1, 2 * min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (B + 1)): how often the resampled
    difference falls on the other side of zero (the +1 keeps p > 0 with finite B).
    Vectorised: the rows are grouped by score once, and each replicate's AUC is one bincount
    of its drawn rows over those groups (no sort per replicate); well under 2 s for 30k rows
    and 1000 replicates.

    Example:
        >>> r = paired_bootstrap_auc(y, logits_autoft, logits_finetune_all)  # doctest: +SKIP
        >>> r["diff"], (r["ci_low"], r["ci_high"]), r["p_value"]   # doctest: +SKIP
    """
    _check_alpha(alpha)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    y, (s_a, s_b) = _labels_scores(labels, [scores_a, scores_b], ["scores_a", "scores_b"])
    n = y.size
    sa, sb = _SortedScores(y, s_a), _SortedScores(y, s_b)
    ones = np.ones((1, n))
    auc_a, auc_b = float(sa.auc(ones)[0]), float(sb.auc(ones)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    left = int(n_boot)
    while left > 0:
        b = min(int(chunk), left)
        idx = rng.integers(0, n, size=(b, n))
        diffs.append(sa.auc_resampled(idx) - sb.auc_resampled(idx))
        left -= b
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    diff = auc_a - auc_b
    if d.size == 0:
        nan = float("nan")
        return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": nan, "ci_low": nan,
                "ci_high": nan, "p_value": nan, "n_boot": 0}
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (d.size + 1))
    lo, hi = np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff,
            "se": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "ci_low": float(lo), "ci_high": float(hi), "p_value": p, "n_boot": int(d.size)}


# -- over seeds -------------------------------------------------------------------------------

def seed_paired_summary(per_seed: Sequence[dict], *, alpha: float = 0.05,
                        same_rows: bool | None = None) -> dict:
    """Combine paired AUC differences (a minus b) over seeds into one estimate and test.

    `per_seed` holds one dict per seed: {'labels', 'scores_a', 'scores_b'} (optional 'seed').
    The seeds may share their test rows (the usual case: one split, different training seeds)
    or each have their own; `same_rows=None` decides by whether every seed's labels are
    identical, True/False says it.

    The model (random effects): seed i's observed difference is d_i = mu + u_i + e_i, where u_i
    is the seed's own deviation (variance tau^2: training noise) and e_i the test-row sampling
    error, whose covariance Sigma over seeds DeLong gives (for seeds on the same rows the
    errors are correlated, Sigma_ij = Cov of the placement differences; on different rows
    Sigma is diagonal). The estimate is the plain mean d = mean(d_i), with
    Var(d) = 1' Sigma 1 / k^2 + tau^2 / k.
    tau^2 is the method-of-moments estimate from the sample variance s^2 of the d_i, whose
    expectation is tau^2 + k/(k-1) * (mean(v_i) - 1' Sigma 1 / k^2) (v_i = Sigma_ii), truncated
    at 0. Why this and not the simpler "mean(v_i)/k + s^2/k": that one counts the test-row error
    twice on independent rows (s^2 already holds it) and, on shared rows, divides an error all
    seeds share by k as if it averaged out; this formula reduces to max(s^2, mean(v_i)) / k on
    independent rows and to the DeLong variance of the mean difference when the seeds agree.
    The test statistic is d / se against Student's t with Satterthwaite's degrees of freedom
    (the seed spread is estimated from only k - 1 degrees of freedom; infinite when tau^2 = 0,
    i.e. the normal): df = (k - 1) * (Var(d) / (s^2 / k))^2, at least k - 1.

    Returns {'k', 'seeds', 'diffs', 'variances' (per-seed DeLong), 'mean_diff',
    'seed_ci_low', 'seed_ci_high' (t-interval over seeds, NaN for one seed),
    'test_var' (1' Sigma 1 / k^2), 'between_var' (tau^2, NaN for one seed), 'se', 'df',
    'statistic', 'p_value', 'ci_low', 'ci_high' (combined interval), 'significant'
    (p < alpha), 'same_rows', 'per_seed' (each seed's `delong_test`)}.

    Example:
        >>> seeds = [{"labels": y, "scores_a": a0, "scores_b": b0},
        ...          {"labels": y, "scores_a": a1, "scores_b": b1}]   # doctest: +SKIP
        >>> s = seed_paired_summary(seeds)   # doctest: +SKIP
        >>> s["mean_diff"], s["p_value"], s["significant"]   # doctest: +SKIP
    """
    _check_alpha(alpha)
    per_seed = list(per_seed)
    if not per_seed:
        raise ValueError("per_seed must hold at least one seed's labels and scores, got none")
    comps, tests, seeds = [], [], []
    for i, entry in enumerate(per_seed):
        missing = [k for k in ("labels", "scores_a", "scores_b") if k not in entry]
        if missing:
            raise ValueError(f"per_seed[{i}] lacks key(s) {missing}; each entry needs "
                             f"'labels', 'scores_a' and 'scores_b'")
        y, (s_a, s_b) = _labels_scores(entry["labels"], [entry["scores_a"], entry["scores_b"]],
                                       [f"per_seed[{i}]['scores_a']",
                                        f"per_seed[{i}]['scores_b']"])
        comps.append((y, *_diff_components(y, s_a, s_b)))
        tests.append(delong_test(y, s_a, s_b, alpha=alpha))
        seeds.append(entry.get("seed", i))
    k = len(comps)
    ys = [c[0] for c in comps]
    if same_rows is None:
        same_rows = all(y.shape == ys[0].shape and np.array_equal(y, ys[0]) for y in ys)
    elif same_rows and not all(y.shape == ys[0].shape and np.array_equal(y, ys[0]) for y in ys):
        raise ValueError("same_rows=True but the seeds' labels differ; pass same_rows=False "
                         "when each seed has its own test rows")
    d = np.array([c[1] - c[2] for c in comps])
    v = np.array([_var_of_mean_diff(c[3], c[4]) for c in comps])
    if same_rows:
        # Var of the mean over seeds of the placement differences = 1' Sigma 1 / k^2.
        test_var = _var_of_mean_diff(np.mean([c[3] for c in comps], axis=0),
                                     np.mean([c[4] for c in comps], axis=0))
    else:
        test_var = float(v.sum()) / k ** 2
    mean_diff = float(d.mean())
    nan = float("nan")
    if k >= 2:
        s2 = float(d.var(ddof=1))
        t_seed = t_quantile(1.0 - alpha / 2.0, k - 1)
        seed_half = t_seed * math.sqrt(s2 / k)
        between = max(0.0, s2 - k / (k - 1) * (float(v.mean()) - test_var))
        var = test_var + between / k
        if between > 0 and s2 > 0:
            df = max(float(k - 1), (k - 1) * (var / (s2 / k)) ** 2)
        else:
            df = math.inf
    else:
        seed_half, between, var, df = nan, nan, test_var, math.inf
    var = max(var, 0.0)
    se = math.sqrt(var)
    stat = _ratio(mean_diff, se)
    p = _t_two_sided_p(stat, df)
    half = t_quantile(1.0 - alpha / 2.0, df) * se
    return {"k": k, "seeds": seeds, "diffs": d.tolist(), "variances": v.tolist(),
            "mean_diff": mean_diff, "seed_ci_low": mean_diff - seed_half,
            "seed_ci_high": mean_diff + seed_half, "test_var": test_var,
            "between_var": between, "se": se, "df": df, "statistic": stat, "p_value": p,
            "ci_low": mean_diff - half, "ci_high": mean_diff + half,
            "significant": bool(p < alpha), "same_rows": bool(same_rows), "per_seed": tests}
