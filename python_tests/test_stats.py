"""AUC significance tests (autoft_fast.train.stats) against brute-force and known answers."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from autoft_fast.train.metrics import auc, midranks
from autoft_fast.train.stats import (delong_test, normal_two_sided_p, paired_bootstrap_auc,
                                     placement_values, seed_paired_summary, t_cdf, t_quantile,
                                     weighted_auc)


def brute_delong(y, a, b):
    """O(n^2) DeLong: placement values from every (positive, negative) pair, then the
    2 x 2 covariance S = S10 / m + S01 / n and Var(diff) = S_aa + S_bb - 2 S_ab."""
    y = np.asarray(y)
    out = []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.stack([out[0][1], out[1][1]]))
    s01 = np.cov(np.stack([out[0][2], out[1][2]]))
    cov = s10 / m + s01 / n
    return out[0][0], out[1][0], cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], out


def correlated_scores(rng, n, shift=0.0, ties=None, pos_rate=0.3):
    y = (rng.random(n) < pos_rate).astype(int)
    base = rng.normal(size=n) + 0.9 * y
    a = base + rng.normal(scale=0.6, size=n) + shift * y
    b = base + rng.normal(scale=0.6, size=n)
    if ties is not None:  # coarse scores: many ties inside and across the classes
        a, b = np.round(a * ties) / ties, np.round(b * ties) / ties
    return y, a, b


def test_midranks_known_answers():
    assert midranks([0.3, 0.1, 0.3, 0.2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert midranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    assert midranks([]).size == 0


@pytest.mark.parametrize("seed,n,ties", [(0, 40, 2), (1, 57, 1), (2, 80, None), (3, 33, 4)])
def test_delong_matches_brute_force_placement_values(seed, n, ties):
    rng = np.random.default_rng(seed)
    y, a, b = correlated_scores(rng, n, shift=0.3, ties=ties)
    auc_a, auc_b, var, out = brute_delong(y, a, b)
    if ties is not None:
        assert np.unique(a).size < n / 2  # the case really has ties
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert r["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert r["auc_a"] == pytest.approx(auc(y, a), abs=1e-12)
    assert r["diff"] == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert r["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert r["z"] == pytest.approx((auc_a - auc_b) / math.sqrt(var), rel=1e-9)
    z = abs(r["z"])
    assert r["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert r["ci_low"] == pytest.approx(r["diff"] - 1.959963984540054 * r["se"], rel=1e-9)
    assert r["ci_high"] == pytest.approx(r["diff"] + 1.959963984540054 * r["se"], rel=1e-9)
    # The per-row placement values themselves, in row order.
    a_auc, v10, v01 = placement_values(y, a)
    np.testing.assert_allclose(v10, out[0][1], atol=1e-12)
    np.testing.assert_allclose(v01, out[0][2], atol=1e-12)
    assert a_auc == pytest.approx(auc_a, abs=1e-12)


def test_delong_variance_close_to_bootstrap():
    rng = np.random.default_rng(5)
    y, a, b = correlated_scores(rng, 3000, shift=0.1, ties=8)
    r = delong_test(y, a, b)
    boot = paired_bootstrap_auc(y, a, b, n_boot=2000, seed=1)
    assert boot["diff"] == pytest.approx(r["diff"], abs=1e-12)
    # The bootstrap standard error has a relative sampling error of about 1/sqrt(2 B) ~ 1.6%.
    assert boot["se"] == pytest.approx(r["se"], rel=0.1)
    assert boot["p_value"] == pytest.approx(r["p_value"], abs=0.05)


def test_delong_identical_and_reversed_scores():
    rng = np.random.default_rng(2)
    y, a, _ = correlated_scores(rng, 50)
    same = delong_test(y, a, a)
    assert same["diff"] == 0 and same["se"] == 0 and same["p_value"] == 1.0
    # A strictly monotone transform (logits vs probabilities) has the same ranking.
    mono = delong_test(y, a, 1 / (1 + np.exp(-a)))
    assert mono["diff"] == 0 and mono["p_value"] == 1.0
    # Scores that reverse the ranking give AUC 1 - AUC: a clear, significant difference.
    y2 = np.r_[np.zeros(30), np.ones(30)]
    good = np.r_[rng.normal(size=30), rng.normal(size=30) + 2.5]
    r = delong_test(y2, good, -good)
    assert r["auc_b"] == pytest.approx(1 - r["auc_a"])
    assert r["diff"] > 0.8 and r["p_value"] < 1e-6 and r["ci_low"] > 0


def test_delong_rejects_bad_input():
    with pytest.raises(ValueError, match="scores_b must have one score per label"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 positives and 2 negatives"):
        delong_test([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, got labels\[1\] = 2.0"):
        delong_test([0, 2, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"scores_a must be finite, got scores_a\[2\] = nan"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, np.nan, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="alpha must be strictly between 0 and 1, got 1.5"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], alpha=1.5)


def test_weighted_auc_equals_auc_of_repeated_rows():
    rng = np.random.default_rng(3)
    y, a, _ = correlated_scores(rng, 45, ties=2)
    counts = rng.integers(0, 4, size=(6, 45))
    got = weighted_auc(y, a, counts)
    for row, g in zip(counts, got):
        assert g == pytest.approx(auc(np.repeat(y, row), np.repeat(a, row)), abs=1e-12)
    assert weighted_auc(y, a, np.ones(45)) == pytest.approx(auc(y, a), abs=1e-12)
    only_neg = (y == 0).astype(float)
    assert math.isnan(weighted_auc(y, a, only_neg))
    with pytest.raises(ValueError, match=r"weights must have shape \(45,\) or \(B, 45\)"):
        weighted_auc(y, a, np.ones(44))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_auc(y, a, -np.ones(45))


def test_paired_bootstrap_replicates_are_row_resamples():
    """The vectorised replicates equal AUCs computed on explicitly resampled rows with the
    same generator draws."""
    rng = np.random.default_rng(4)
    y, a, b = correlated_scores(rng, 60, ties=3)
    r = paired_bootstrap_auc(y, a, b, n_boot=25, seed=7, chunk=10)
    gen = np.random.default_rng(7)
    diffs = []
    for b_size in (10, 10, 5):
        for idx in gen.integers(0, 60, size=(b_size, 60)):
            diffs.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
    d = np.array(diffs)
    d = d[np.isfinite(d)]
    assert r["n_boot"] == d.size
    assert r["se"] == pytest.approx(d.std(ddof=1), rel=1e-9)
    lo, hi = np.quantile(d, [0.025, 0.975])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    k = min((d <= 0).sum(), (d >= 0).sum())
    assert r["p_value"] == pytest.approx(min(1.0, 2 * (k + 1) / (d.size + 1)))
    assert r["diff"] == pytest.approx(auc(y, a) - auc(y, b), abs=1e-12)


def test_paired_bootstrap_detects_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(6)
    y, a, b = correlated_scores(rng, 4000, shift=0.4)
    r = paired_bootstrap_auc(y, a, b, n_boot=400)
    assert r["diff"] > 0 and r["ci_low"] > 0 and r["p_value"] < 0.01
    same = paired_bootstrap_auc(y, b, b, n_boot=100)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["se"] == 0
    with pytest.raises(ValueError, match="n_boot must be >= 1, got 0"):
        paired_bootstrap_auc(y, a, b, n_boot=0)


@pytest.mark.parametrize("df,q", [(1, 12.7062047361747), (2, 4.30265272974946),
                                  (3, 3.18244630528371), (5, 2.57058183563631),
                                  (10, 2.22813885198627), (30, 2.04227245630124)])
def test_t_quantile_known_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-q, rel=1e-9)
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-12)


def test_t_distribution_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2)).
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054)
    assert t_cdf(1.96, 1e9) == pytest.approx(t_cdf(1.96, math.inf), abs=1e-9)
    # Continuous where the huge-df expansion takes over from the beta function.
    assert t_cdf(1.96, 1e6) == pytest.approx(t_cdf(1.96, 1e6 * (1 + 1e-9)), abs=1e-10)
    assert normal_two_sided_p(0.0) == 1.0
    assert normal_two_sided_p(2.5758293035489) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="df must be > 0"):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p must be strictly between 0 and 1, got 1.0"):
        t_quantile(1.0, 3)


def test_t_cdf_keeps_its_digits_near_zero_for_large_df():
    # Near t = 0, F(t) - 1/2 is about t * pdf(0); for large df the beta function's argument
    # df / (df + t^2) rounds to 1 and would lose that difference entirely.
    for df in (1e4, 1e5, 9e5):
        for t in (1e-9, 1e-6, 1e-3):
            expansion = (NormalDist().cdf(t) - NormalDist().pdf(t) * (t ** 3 + t) / (4 * df))
            assert t_cdf(t, df) - 0.5 == pytest.approx(expansion - 0.5, rel=1e-6)
            assert t_cdf(-t, df) - 0.5 == pytest.approx(0.5 - expansion, rel=1e-6)


def seeds_on(y, rows):
    return [{"labels": y, "scores_a": a, "scores_b": b, "seed": i} for i, (a, b) in
            enumerate(rows)]


def test_seed_summary_per_seed_values_and_t_interval():
    rng = np.random.default_rng(8)
    y = (rng.random(300) < 0.4).astype(int)
    rows = []
    for _ in range(3):
        base = rng.normal(size=300) + y
        rows.append((base + rng.normal(scale=0.8, size=300) + 0.2 * y,
                     base + rng.normal(scale=0.8, size=300)))
    s = seed_paired_summary(seeds_on(y, rows))
    d = np.array([auc(y, a) - auc(y, b) for a, b in rows])
    v = np.array([brute_delong(y, a, b)[2] for a, b in rows])
    assert s["k"] == 3 and s["seeds"] == [0, 1, 2] and s["same_rows"] is True
    np.testing.assert_allclose(s["diffs"], d, atol=1e-12)
    np.testing.assert_allclose(s["variances"], v, rtol=1e-9)
    assert s["mean_diff"] == pytest.approx(d.mean())
    half = 4.30265272974946 * d.std(ddof=1) / math.sqrt(3)
    assert s["seed_ci_low"] == pytest.approx(d.mean() - half)
    assert s["seed_ci_high"] == pytest.approx(d.mean() + half)
    # Test-row error of the mean on shared rows: the DeLong variance of the averaged
    # placement differences, brute force: Var(mean_i d_i) = 1' Sigma 1 / 9 with Sigma from
    # the stacked placement values of all six score vectors.
    comps = [brute_delong(y, a, b)[3] for a, b in rows]
    d10 = np.mean([c[0][1] - c[1][1] for c in comps], axis=0)
    d01 = np.mean([c[0][2] - c[1][2] for c in comps], axis=0)
    test_var = d10.var(ddof=1) / d10.size + d01.var(ddof=1) / d01.size
    assert s["test_var"] == pytest.approx(test_var, rel=1e-9)
    assert test_var <= v.mean() + 1e-15  # shared rows: never more than one seed's error
    between = max(0.0, d.var(ddof=1) - 1.5 * (v.mean() - test_var))
    assert s["between_var"] == pytest.approx(between, abs=1e-15)
    assert s["se"] == pytest.approx(math.sqrt(test_var + between / 3), rel=1e-9)
    assert s["significant"] == (s["p_value"] < 0.05)
    assert len(s["per_seed"]) == 3 and s["per_seed"][1]["diff"] == pytest.approx(d[1])


def test_seed_summary_independent_rows_reduces_to_max_rule():
    """On independent test rows the variance of the mean is max(s^2, mean v) / k."""
    rng = np.random.default_rng(9)
    per_seed = []
    for i in range(4):
        y, a, b = correlated_scores(rng, 200 + 10 * i, shift=0.1)
        per_seed.append({"labels": y, "scores_a": a, "scores_b": b})
    s = seed_paired_summary(per_seed)
    assert s["same_rows"] is False
    d, v = np.array(s["diffs"]), np.array(s["variances"])
    assert s["test_var"] == pytest.approx(v.sum() / 16)
    assert s["se"] ** 2 == pytest.approx(max(d.var(ddof=1), v.mean()) / 4, rel=1e-9)


def test_seed_summary_seed_spread_widens_the_interval():
    """Same test rows, the same small gain every seed vs a gain whose sign flips by seed:
    the first is significant, the second (same mean) is not."""
    rng = np.random.default_rng(10)
    y = (rng.random(2000) < 0.5).astype(int)
    base = rng.normal(size=2000) + 1.2 * y

    def run(shifts):
        rows = [(base + rng.normal(scale=0.3, size=2000) + sh * y,
                 base + rng.normal(scale=0.3, size=2000)) for sh in shifts]
        return seed_paired_summary(seeds_on(y, rows))

    steady = run([0.12, 0.12, 0.12, 0.12])
    assert steady["mean_diff"] > 0 and steady["significant"] and steady["ci_low"] > 0
    noisy = run([0.9, -0.66, 0.9, -0.66])
    assert noisy["between_var"] > 0 and math.isfinite(noisy["df"]) and noisy["df"] >= 3
    assert noisy["se"] > 3 * steady["se"] and not noisy["significant"]


def test_seed_summary_one_seed_is_the_delong_test():
    rng = np.random.default_rng(11)
    y, a, b = correlated_scores(rng, 400, shift=0.2)
    s = seed_paired_summary([{"labels": y, "scores_a": a, "scores_b": b}])
    r = delong_test(y, a, b)
    assert s["k"] == 1 and math.isnan(s["seed_ci_low"]) and math.isnan(s["between_var"])
    assert s["se"] == pytest.approx(r["se"]) and s["p_value"] == pytest.approx(r["p_value"])
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((r["ci_low"], r["ci_high"]))


def test_seed_summary_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one seed"):
        seed_paired_summary([])
    with pytest.raises(ValueError, match=r"per_seed\[0\] lacks key\(s\) \['scores_b'\]"):
        seed_paired_summary([{"labels": [0, 1, 0, 1], "scores_a": [1, 2, 3, 4]}])
    y = [0, 1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="same_rows=True but the seeds' labels differ"):
        seed_paired_summary([{"labels": y, "scores_a": np.arange(6), "scores_b": np.ones(6)},
                             {"labels": y[::-1], "scores_a": np.arange(6),
                              "scores_b": np.ones(6)}], same_rows=True)


def test_tail_p_values_keep_their_digits_on_every_path():
    from autoft_fast.train.stats import _t_two_sided_p
    for z in (9.0, 15.0):
        exact = normal_two_sided_p(z)
        assert exact > 0
        assert _t_two_sided_p(z, math.inf) == pytest.approx(exact, rel=1e-12)
        assert _t_two_sided_p(z, 2e6) == pytest.approx(exact, rel=1e-3)
    # One seed: the combined test's p is DeLong's (the same statistic, the normal).
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.5).astype(float)
    a, b = y * 1.3 + rng.normal(size=y.size), y * 0.8 + rng.normal(size=y.size)
    s = seed_paired_summary([{"labels": y, "scores_a": a, "scores_b": b}])
    d = delong_test(y, a, b)
    assert 0 < s["p_value"] == pytest.approx(d["p_value"], rel=1e-9)


def test_weighted_auc_of_a_nan_score_is_undefined_as_auc_is():
    from autoft_fast.train.stats import weighted_auc
    assert math.isnan(weighted_auc([0, 0, 1, 1], [0.1, float("nan"), 0.3, 0.4], [1, 1, 1, 1]))
    got = weighted_auc([0, 0, 1, 1], [0.1, 0.2, float("nan"), 0.4], [[1, 1, 1, 1], [1, 0, 1, 1]])
    assert got.shape == (2,) and np.isnan(got).all()
    assert math.isnan(auc([0, 0, 1, 1], [0.1, 0.2, float("nan"), 0.4]))


@pytest.mark.parametrize("domains", [[0, 0, -1, -1], [0, 0, 1.7, 1.7], [0, 0, 2, 2]])
def test_compute_metrics_refuses_domain_ids_that_name_no_domain(domains):
    from autoft_fast.train.metrics import compute_metrics
    with pytest.raises(ValueError, match="domains must be indices into domain_names"):
        compute_metrics([0, 1, 1, 0], [-1.0, 2.0, 0.5, 0.1], domains, ["a", "b"])
