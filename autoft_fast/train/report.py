"""Turn per-seed results into the comparison table (markdown + CSV), the summary over
several target domains, and the PNG plots.

Significance: a strategy's row carries the mean over seeds of its paired test-AUC difference
against finetune_all, the combined interval and p-value of `stats.seed_paired_summary` (DeLong
on the test rows with the seed spread folded in), and a mark: `*` significantly better, `(-)*`
significantly worse. These need each run's test scores: a run record may hold `test_scores`
(an array of test logits aligned with the test labels) or `test_scores_path` (a .npy file of
them); the labels are an argument. Without scores those columns read n/a.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .progress import LOGGER_NAME
from .stats import seed_paired_summary

log = logging.getLogger(LOGGER_NAME)

__all__ = ["RUN_COLUMNS", "RESULT_COLUMNS", "SUMMARY_COLUMNS", "aggregate",
           "aggregate_by_target", "markdown_table", "write_runs_csv", "write_results_csv",
           "summary_across_targets", "markdown_summary", "write_summary_csv",
           "significance_mark", "load_test_scores", "auc_axis_limits", "plot_auc",
           "plot_policy", "plot_policy_epochs", "policy_epoch_series", "plot_policy_by_frequency",
           "tuned_fraction_by_frequency", "mean_std", "policy_summary", "policy_table",
           "write_policy_csv"]

BASELINE = "finetune_all"

RUN_COLUMNS = ("strategy", "seed", "auc", "logloss", "best_epoch", "epochs_run", "epoch_cap",
               "train_samples_per_s", "train_seconds", "wall_seconds", "target",
               "frequency_threshold", "setting")

RESULT_COLUMNS = ("strategy", "seeds", "auc_runs", "auc_mean", "auc_std", "logloss_mean",
                  "logloss_std", "auc_gain_pct", "train_samples_per_s", "wall_seconds", "paired_seeds",
                  "auc_diff_mean", "auc_diff_ci_low", "auc_diff_ci_high",
                  "auc_diff_seed_ci_low", "auc_diff_seed_ci_high", "p_value", "significant",
                  "mark", "best_epoch_at_cap", "runs_with_cap")

SUMMARY_COLUMNS = ("strategy", "targets", "mean_auc_gain_pct", "mean_auc_diff", "wins",
                   "significant_better", "significant_worse")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaNs ignored.

    Example:
        >>> mean_std([0.70, 0.72])
        (0.71, 0.014142135623730963)
    """
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def load_test_scores(rec: dict) -> np.ndarray | None:
    """A run record's test scores: `test_scores` (array-like) or the .npy at
    `test_scores_path`; None when the record has neither.

    Example:
        >>> load_test_scores({"strategy": "autoft", "seed": 0, "test_scores": [0.2, -1.0]})
        array([ 0.2, -1. ])
    """
    if rec.get("test_scores") is not None:
        return np.asarray(rec["test_scores"], dtype=np.float64).reshape(-1)
    path = rec.get("test_scores_path")
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"test_scores_path of run ({rec.get('strategy')!r}, seed "
                         f"{rec.get('seed')!r}) is not a file: {str(path)!r}")
    try:
        scores = np.load(path)
    except (OSError, ValueError, EOFError) as e:  # truncated, or not a .npy file
        raise ValueError(f"test scores of run ({rec.get('strategy')!r}, seed {rec.get('seed')!r}) "
                         f"could not be read from {str(path)!r} (damaged: {e}); delete it and "
                         "the run's result.json to run it again") from None
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def _labels_for(labels, seed) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        got = labels.get(seed)
        return None if got is None else np.asarray(got, dtype=np.float64).reshape(-1)
    return np.asarray(labels, dtype=np.float64).reshape(-1)


def significance_mark(diff: float | None, p_value: float | None, alpha: float = 0.05) -> str:
    """`*` when the difference is significant (p < alpha) and positive, `(-)*` when significant
    and negative, '' otherwise (also when unknown).

    Example:
        >>> [significance_mark(d, p) for d, p in [(0.004, 0.01), (-0.01, 0.001), (0.01, 0.2)]]
        ['*', '(-)*', '']
    """
    if diff is None or p_value is None or math.isnan(diff) or math.isnan(p_value):
        return ""
    if p_value < alpha and diff > 0:
        return "*"
    if p_value < alpha and diff < 0:
        return "(-)*"
    return ""


def _paired(rs: list[dict], base_rs: list[dict], labels, alpha: float) -> dict | None:
    """`seed_paired_summary` of the strategy's runs against the baseline's, paired by seed,
    over the seeds where both have test scores and labels are known; None when there is none."""
    base_by_seed = {r["seed"]: r for r in base_rs}
    per_seed = []
    for r in rs:
        b = base_by_seed.get(r["seed"])
        y = _labels_for(labels, r["seed"])
        if b is None or y is None:
            continue
        sa, sb = load_test_scores(r), load_test_scores(b)
        if sa is None or sb is None:
            continue
        for rec, sc in ((r, sa), (b, sb)):
            if sc.size != y.size:
                raise ValueError(
                    f"test scores of run ({rec['strategy']!r}, seed {rec['seed']!r}) have "
                    f"{sc.size} values for {y.size} test labels")
        bad = [rec for rec, sc in ((r, sa), (b, sb)) if not np.isfinite(sc).all()]
        if bad:  # a diverged run: no paired test for this seed (its AUC reads NaN)
            log.warning("the test scores of %s are not all finite (a "
                        "diverged run?): seed %r is left out of %s's paired comparison",
                        " and ".join(f"{x['strategy']} seed {x['seed']!r}" for x in bad),
                        r["seed"], r["strategy"])
            continue
        per_seed.append({"labels": y, "scores_a": sa, "scores_b": sb, "seed": r["seed"]})
    return seed_paired_summary(per_seed, alpha=alpha) if per_seed else None


def _check_one_each(runs: list[dict]) -> None:
    targets = {r.get("target") for r in runs}
    if len(targets) > 1:
        raise ValueError(f"runs hold several targets {sorted(map(str, targets))}; aggregate "
                         f"one target's runs at a time (see aggregate_by_target)")
    seen = set()
    for r in runs:
        key = (r["strategy"], r["seed"])
        if key in seen:
            raise ValueError(f"runs hold strategy {r['strategy']!r} seed {r['seed']!r} twice")
        seen.add(key)


def aggregate(runs: Iterable[dict], order: Sequence[str] | None = None, *, labels=None,
              baseline: str = BASELINE, alpha: float = 0.05) -> list[dict]:
    """One summary row per strategy from per-seed run records (of one target).

    The AUC gain is relative to the baseline's (finetune_all's) mean AUC, in percent:
    100 * (auc - auc_finetune_all) / auc_finetune_all (None when finetune_all was not run).

    With `labels` (the test labels: one array when every seed is scored on the same rows, or
    a mapping seed -> array) and test scores in the records (`test_scores` or
    `test_scores_path`), each other strategy also gets the paired comparison against the
    baseline over the seeds both ran (`stats.seed_paired_summary`): `auc_diff_mean`, the
    combined interval `auc_diff_ci_low/high`, the t-interval over seeds
    `auc_diff_seed_ci_low/high`, `p_value`, `significant` and `mark` (see
    `significance_mark`); these are None without scores, and `mark` is 'ref' on the baseline.
    `best_epoch_at_cap` / `runs_with_cap` count the runs whose best validation epoch was the
    last allowed one (`best_epoch` >= `epoch_cap`) among those that record both.

    Example:
        >>> rows = aggregate([{"strategy": "finetune_all", "seed": 0, "auc": 0.7, "logloss": 0.5},
        ...                   {"strategy": "autoft", "seed": 0, "auc": 0.707, "logloss": 0.49}])
        >>> round(rows[1]["auc_gain_pct"], 3), rows[1]["p_value"]
        (1.0, None)
    """
    runs = list(runs)
    _check_one_each(runs)
    names = list(order) if order else []
    for r in runs:
        if r["strategy"] not in names:
            names.append(r["strategy"])
    base_rs = [r for r in runs if r["strategy"] == baseline]
    rows = []
    for s in names:
        rs = [r for r in runs if r["strategy"] == s]
        if not rs:
            continue
        auc_m, auc_s = mean_std([r["auc"] for r in rs])
        ll_m, ll_s = mean_std([r["logloss"] for r in rs])
        sps = mean_std([r.get("train_samples_per_s", float("nan")) for r in rs])[0]
        wall = mean_std([r.get("wall_seconds", float("nan")) for r in rs])[0]
        capped = [r for r in rs if r.get("best_epoch") is not None
                  and r.get("epoch_cap") is not None]
        finite = sum(r.get("auc") is not None and not math.isnan(r["auc"]) for r in rs)
        row = {"strategy": s, "seeds": len(rs), "auc_runs": finite,
               "auc_mean": auc_m, "auc_std": auc_s,
               "logloss_mean": ll_m, "logloss_std": ll_s,
               "train_samples_per_s": sps, "wall_seconds": wall, "alpha": alpha,
               "paired_seeds": 0, "auc_diff_mean": None, "auc_diff_ci_low": None,
               "auc_diff_ci_high": None, "auc_diff_seed_ci_low": None,
               "auc_diff_seed_ci_high": None, "p_value": None, "significant": None,
               "mark": "ref" if s == baseline else "",
               "best_epoch_at_cap": sum(int(r["best_epoch"]) >= int(r["epoch_cap"])
                                        for r in capped) if capped else None,
               "runs_with_cap": len(capped) if capped else None}
        paired = _paired(rs, base_rs, labels, alpha) if s != baseline else None
        if paired is not None:
            row.update(paired_seeds=paired["k"], auc_diff_mean=paired["mean_diff"],
                       auc_diff_ci_low=paired["ci_low"], auc_diff_ci_high=paired["ci_high"],
                       auc_diff_seed_ci_low=_none_if_nan(paired["seed_ci_low"]),
                       auc_diff_seed_ci_high=_none_if_nan(paired["seed_ci_high"]),
                       p_value=paired["p_value"], significant=paired["significant"],
                       mark=significance_mark(paired["mean_diff"], paired["p_value"], alpha))
        rows.append(row)
    base = next((r for r in rows if r["strategy"] == baseline), None)
    for r in rows:
        if (base is None or not base["auc_mean"] or math.isnan(base["auc_mean"])
                or r["auc_mean"] is None or math.isnan(r["auc_mean"])):
            r["auc_gain_pct"] = None
        else:
            r["auc_gain_pct"] = 100.0 * (r["auc_mean"] - base["auc_mean"]) / base["auc_mean"]
    return rows


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def aggregate_by_target(runs: Iterable[dict], order: Sequence[str] | None = None, *,
                        labels: Mapping | None = None, baseline: str = BASELINE,
                        alpha: float = 0.05) -> dict[str, list[dict]]:
    """`aggregate` for each target domain of the records (key `target`; records without one
    form the target None), in order of first appearance. `labels` maps target -> that
    target's test labels (an array, or a mapping seed -> array).

    Example:
        >>> tables = aggregate_by_target(runs, cfg.strategies, labels={"books": y_books})
        >>> print(markdown_summary(summary_across_targets(tables)))   # doctest: +SKIP
    """
    by_target: dict = {}
    for r in runs:
        by_target.setdefault(r.get("target"), []).append(r)
    return {t: aggregate(rs, order, labels=None if labels is None else labels.get(t),
                         baseline=baseline, alpha=alpha)
            for t, rs in by_target.items()}


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def _pct(x: float | None) -> str:
    s = _fmt(x, "+.2f")
    return s if s == "n/a" else s + "%"


def _diff_cell(r: dict) -> str:
    if r.get("mark") == "ref":
        return "ref"
    d = r.get("auc_diff_mean")
    if d is None or math.isnan(d):
        return "n/a"
    return f"{d:+.4f} [{r['auc_diff_ci_low']:+.4f}, {r['auc_diff_ci_high']:+.4f}]"


def _p_cell(p: float | None, alpha: float = 0.05) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    # Near alpha three decimals could show p = 0.050 both with and without the mark.
    return f"{p:.4f}" if f"{p:.3f}" == f"{alpha:.3f}" else f"{p:.3f}"


def _cell(text) -> str:
    """A markdown table cell: a '|' in a name would start a new column."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _auc_cell(r: dict) -> str:
    cell = f"{_fmt(r['auc_mean'], '.4f')} ± {_fmt(r['auc_std'], '.4f')}"
    runs = r.get("auc_runs")
    if runs is not None and 0 < runs < r["seeds"]:
        cell += f" ({runs}/{r['seeds']} seeds)"
    return cell


def _cap_cell(r: dict) -> str:
    if r.get("runs_with_cap") is None:
        return "n/a"
    return f"{r['best_epoch_at_cap']}/{r['runs_with_cap']}"


def markdown_table(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """The comparison table as markdown: strategy, AUC and LogLoss (mean ± std over seeds),
    relative AUC gain over finetune_all, training throughput and wall time per run, then the
    paired test-AUC difference against finetune_all with its 95% interval, its p-value, the
    significance mark, and how many runs had their best epoch at the epoch cap (see
    `aggregate`). Notes under the table explain the marks and total the capped runs.

    Example:
        >>> row = markdown_table(aggregate([{"strategy": "finetune_all", "seed": 0,
        ...                                  "auc": 0.7, "logloss": 0.5}])).splitlines()[2]
        >>> row.split(" | ")[:4]
        ['| finetune_all', '0.7000 ± 0.0000', '0.5000 ± 0.0000', '+0.00%']
        >>> row.split(" | ")[6:]
        ['ref', 'n/a', '', 'n/a |']
    """
    alpha = next((r.get("alpha", 0.05) for r in rows if r.get("auc_diff_mean") is not None),
                 0.05)
    head = (f"| strategy | AUC | LogLoss | AUC gain vs {baseline} | train samples/s | "
            f"time per run (s) | ΔAUC vs {baseline} [{100 * (1 - alpha):g}% CI] | p | sig. | "
            "best epoch = cap |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gain_s = _pct(r.get("auc_gain_pct"))
        mark = "" if r.get("mark") == "ref" else r.get("mark", "")
        lines.append(
            f"| {_cell(r['strategy'])} | {_auc_cell(r)} | "
            f"{_fmt(r['logloss_mean'], '.4f')} ± {_fmt(r['logloss_std'], '.4f')} | {gain_s} | "
            f"{_fmt(r.get('train_samples_per_s'), ',.0f')} | "
            f"{_fmt(r.get('wall_seconds'), '.1f')} | {_diff_cell(r)} | "
            f"{_p_cell(r.get('p_value'), alpha)} | {mark} | {_cap_cell(r)} |")
    notes = []
    partial = [r for r in rows if r.get("auc_runs") and r["auc_runs"] < r["seeds"]]
    if partial:
        notes.append(
            "(k/n seeds): only k of the strategy's n runs ended with a finite test AUC (the "
            "others diverged); the mean, the spread and the paired test use those k alone: "
            + ", ".join(f"{_cell(r['strategy'])} {r['auc_runs']}/{r['seeds']}"
                        for r in partial) + ".")
    if any(r.get("paired_seeds") == 2 for r in rows if r.get("auc_diff_mean") is not None):
        notes.append(
            "With 2 seeds the spread over seeds is estimated from one degree of freedom: "
            "where seeds differ in quality, the paired test is liberal (more than twice the "
            "nominal false-positive rate in simulation); 3 or more seeds are needed for marks "
            "to be trusted.")
    if any(r.get("auc_diff_mean") is not None for r in rows):
        notes.append(
            f"ΔAUC: mean over seeds of the paired test-AUC difference against {baseline} "
            f"(same seed); interval and p from DeLong's test on the test rows with the spread "
            f"over seeds folded in (random effects). `*`: better than {baseline} at "
            f"p < {alpha:g}; `(-)*`: worse at p < {alpha:g}.")
    if rows and not any(r["strategy"] == baseline for r in rows):
        notes.append(f"The AUC gain and ΔAUC columns compare with {baseline}, which this "
                     f"comparison did not run: add it to the strategies to fill them.")
    capped = [r for r in rows if r.get("runs_with_cap") is not None]
    if capped:
        k = sum(r["best_epoch_at_cap"] for r in capped)
        n = sum(r["runs_with_cap"] for r in capped)
        notes.append(f"runs whose best epoch was the last allowed epoch: {k}/{n}"
                     + (" (they may still have been improving)" if k else ""))
    return "\n".join(lines) + ("\n\n" + "\n\n".join(notes) if notes else "")


def summary_across_targets(tables: Mapping[str, Sequence[dict]],
                           order: Sequence[str] | None = None,
                           baseline: str = BASELINE) -> list[dict]:
    """One row per strategy over several target domains, from {target: aggregate rows}:
    `targets` (how many it ran on), `mean_auc_gain_pct` (mean over targets of its relative AUC
    gain over finetune_all), `mean_auc_diff` (mean paired ΔAUC, over the targets that have
    it), `wins` (targets where its mean AUC is the best; a tie at the top is a win for each),
    `significant_better` / `significant_worse` (targets with the `*` / `(-)*` mark).

    Example:
        >>> t = {"a": [{"strategy": "finetune_all", "auc_mean": 0.70, "auc_gain_pct": 0.0},
        ...            {"strategy": "autoft", "auc_mean": 0.71, "auc_gain_pct": 1.43, "mark": "*"}]}
        >>> [(r["strategy"], r["wins"], r["significant_better"]) for r in summary_across_targets(t)]
        [('finetune_all', 0, 0), ('autoft', 1, 1)]
    """
    names = list(order) if order else []
    for rows in tables.values():
        names += [r["strategy"] for r in rows if r["strategy"] not in names]
    acc = {s: {"strategy": s, "targets": 0, "gains": [], "diffs": [], "wins": 0,
               "significant_better": 0, "significant_worse": 0} for s in names}
    for rows in tables.values():
        aucs = [r["auc_mean"] for r in rows
                if r.get("auc_mean") is not None and not math.isnan(r["auc_mean"])]
        best = max(aucs) if aucs else None
        for r in rows:
            a = acc[r["strategy"]]
            a["targets"] += 1
            if _none_if_nan(r.get("auc_gain_pct")) is not None:
                a["gains"].append(r["auc_gain_pct"])
            if _none_if_nan(r.get("auc_diff_mean")) is not None:
                a["diffs"].append(r["auc_diff_mean"])
            if best is not None and r.get("auc_mean") is not None \
                    and r["auc_mean"] >= best - 1e-12:
                a["wins"] += 1
            a["significant_better"] += r.get("mark") == "*"
            a["significant_worse"] += r.get("mark") == "(-)*"
    out = []
    for s in names:
        a = acc[s]
        if not a["targets"]:
            continue
        out.append({"strategy": s, "targets": a["targets"],
                    "mean_auc_gain_pct": float(np.mean(a["gains"])) if a["gains"] else None,
                    "mean_auc_diff": float(np.mean(a["diffs"])) if a["diffs"] else None,
                    "wins": a["wins"], "significant_better": int(a["significant_better"]),
                    "significant_worse": int(a["significant_worse"])})
    return out


def markdown_summary(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """The summary over targets (see `summary_across_targets`) as markdown.

    Example:
        >>> print(markdown_summary([{"strategy": "autoft", "targets": 2, "mean_auc_gain_pct": 0.8,
        ...     "mean_auc_diff": 0.0056, "wins": 2, "significant_better": 1,
        ...     "significant_worse": 0}]).splitlines()[2])
        | autoft | 2 | +0.80% | +0.0056 | 2/2 | 1/2 | 0/2 |
    """
    lines = [f"| strategy | targets | mean AUC gain vs {baseline} | mean ΔAUC | wins | "
             f"significantly better | significantly worse |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        n = r["targets"]
        lines.append(f"| {_cell(r['strategy'])} | {n} | {_pct(r.get('mean_auc_gain_pct'))} | "
                     f"{_fmt(r.get('mean_auc_diff'), '+.4f')} | {r['wins']}/{n} | "
                     f"{r['significant_better']}/{n} | {r['significant_worse']}/{n} |")
    return "\n".join(lines)


def write_summary_csv(rows: Sequence[dict], path: Path) -> Path:
    """The summary over targets (see `summary_across_targets`) as CSV (SUMMARY_COLUMNS).

    Example:
        >>> write_summary_csv(summary_across_targets(tables), Path("summary.csv"))
        PosixPath('summary.csv')
    """
    return _write_csv(rows, SUMMARY_COLUMNS, path)


def _write_csv(rows: Iterable[dict], cols: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    return path


def policy_summary(runs: Iterable[dict]) -> list[dict]:
    """Mean over seeds of the tuned-path fraction, one row per (kind, name) with one value per
    strategy that has a policy: [{'kind': 'field', 'name': 'user_id', 'autoft': 0.31, ...}].

    Example:
        >>> policy_summary([{"strategy": "autoft", "policy_stats":
        ...                  {"field": {"user_id": 0.25}, "layer": {}}}])
        [{'kind': 'field', 'name': 'user_id', 'autoft': 0.25}]
    """
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    order: list[str] = []  # the strategies in the order of the runs (the comparison's)
    for r in runs:
        for kind in ("field", "layer"):
            for name, v in ((r.get("policy_stats") or {}).get(kind) or {}).items():
                acc.setdefault((kind, name), {}).setdefault(r["strategy"], []).append(float(v))
                if r["strategy"] not in order:
                    order.append(r["strategy"])
    # Field rows first, then layer rows, whichever strategy ran first.
    keys = sorted(acc, key=lambda kn: kn[0] != "field")
    return [{"kind": k, "name": n, **{s: float(np.mean(acc[(k, n)][s])) for s in order
                                      if s in acc[(k, n)]}} for k, n in keys]


def _policy_strategies(runs: list[dict]) -> list[str]:
    """The strategies with a policy, in the runs' order (the comparison's)."""
    out: list[str] = []
    for r in runs:
        stats = r.get("policy_stats") or {}
        if (stats.get("field") or stats.get("layer")) and r["strategy"] not in out:
            out.append(r["strategy"])
    return out


def policy_table(runs: Iterable[dict]) -> str:
    """The tuned-path fractions (see `policy_summary`) as markdown; '' when no policy ran.

    Example:
        >>> print(policy_table(runs))   # doctest: +SKIP
        | tuned-path fraction | autoft_field | autoft |
        | --- | --- | --- |
        | field user_id | 0.31 | 0.28 |
    """
    runs = list(runs)
    rows = policy_summary(runs)
    if not rows:
        return ""
    strategies = _policy_strategies(runs)
    lines = ["| tuned-path fraction | " + " | ".join(map(_cell, strategies)) + " |",
             "| --- |" + " --- |" * len(strategies)]
    for r in rows:
        vals = " | ".join(_fmt(r.get(s), ".3f") for s in strategies)
        lines.append(f"| {r['kind']} {_cell(r['name'])} | {vals} |")
    # The frequency rule at k = 0 holds frozen exactly the values the target's training rows
    # never hold: their tuned row never moved, so those "frozen" choices change no prediction.
    at_zero = [r for r in runs if r.get("frequency_threshold") == 0.0]
    rule = [r for r in runs if r.get("frequency_threshold") is not None]
    if at_zero:
        lines.append(
            f"\nField fractions count the lookups the frequency rule holds frozen. In "
            f"{len(at_zero)} of the {len(rule)} runs with the rule it kept k = 0: there those "
            "are the values the target's training rows never hold, whose tuned row the "
            "default fused embedding optimizer (touched rows only) leaves at the pre-trained "
            "one: such choices change no prediction.")
    return "\n".join(lines)


def write_policy_csv(runs: Iterable[dict], path: Path) -> Path | None:
    """`policy_summary` as CSV (kind, name, one column per strategy); None when empty.

    Example:
        >>> write_policy_csv(runs, Path("policy.csv"))
        PosixPath('policy.csv')
    """
    runs = list(runs)
    rows = policy_summary(runs)
    if not rows:
        return None
    cols = ["kind", "name"] + _policy_strategies(runs)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def write_runs_csv(runs: Sequence[dict], path: Path) -> Path:
    """Per-seed rows (RUN_COLUMNS) as CSV.

    Example:
        >>> write_runs_csv([{"strategy": "autoft", "seed": 0, "auc": 0.71}], Path("runs.csv"))
        PosixPath('runs.csv')
    """
    return _write_csv(runs, RUN_COLUMNS, path)


def write_results_csv(rows: Sequence[dict], path: Path) -> Path:
    """Per-strategy summary rows (see `aggregate`) as CSV (RESULT_COLUMNS).

    Example:
        >>> write_results_csv(aggregate(runs, STRATEGIES), Path("results.csv"))
        PosixPath('results.csv')
    """
    return _write_csv(rows, RESULT_COLUMNS, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window; works without a display
    import matplotlib.pyplot as plt
    return plt


def auc_axis_limits(means: Sequence[float], spreads: Sequence[float] | None = None, *,
                    headroom: float = 0.3, min_span: float = 0.01) -> tuple[float, float]:
    """The AUC bar chart's y range: from a little below the lowest mean - spread to above
    the highest mean + spread with `headroom` (a fraction of the data's span) for the
    significance marks; never starting at 0 unless the data reach down there. The span is at
    least `min_span`, so equal means still show a readable axis. NaN means are ignored;
    (0, 1) when none is finite.

    Example:
        >>> lo, hi = auc_axis_limits([0.70, 0.72], [0.004, 0.002])
        >>> round(lo, 4), round(hi, 4)
        (0.6921, 0.7298)
    """
    m = np.asarray(means, dtype=np.float64).reshape(-1)
    sp = (np.zeros_like(m) if spreads is None
          else np.nan_to_num(np.abs(np.asarray(spreads, dtype=np.float64).reshape(-1))))
    if sp.shape != m.shape:
        raise ValueError(f"spreads must have one value per mean, got {sp.size} for {m.size}")
    ok = np.isfinite(m)
    if not ok.any():
        return 0.0, 1.0
    # An AUC lies in [0, 1]: a wide spread does not stretch the data's range past either end
    # (above it only the headroom for the marks).
    lo_data = max(0.0, float((m[ok] - sp[ok]).min()))
    hi_data = min(1.0, float((m[ok] + sp[ok]).max()))
    span = max(hi_data - lo_data, min_span)
    return max(0.0, lo_data - 0.15 * span), hi_data + headroom * span


def _family_color(name: str, baseline: str) -> tuple[str, str]:
    if name == baseline:
        return "tab:gray", "baseline"
    if name.startswith("autoft"):
        return "tab:orange", "AutoFT"
    return "tab:blue", "other strategies"


def _auc_figure(rows: Sequence[dict], title: str | None, baseline: str):
    plt = _pyplot()
    from matplotlib.patches import Patch
    names = [r["strategy"] for r in rows]
    means = np.array([r["auc_mean"] for r in rows], dtype=float)
    stds = np.nan_to_num(np.array([r["auc_std"] for r in rows], dtype=float))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 3.5), 4.2))
    x = np.arange(len(names))
    fam = [_family_color(n, baseline) for n in names]
    ax.bar(x, means, yerr=stds, capsize=4, color=[c for c, _ in fam], zorder=2)
    lo, hi = auc_axis_limits(means, stds)
    ax.set_ylim(lo, hi)
    for xi, m, sd, r in zip(x, means, stds, rows):
        mark = r.get("mark") or ""
        if mark and mark != "ref" and np.isfinite(m):
            ax.text(xi, m + sd + 0.03 * (hi - lo), mark, ha="center", va="bottom",
                    fontsize=11, fontweight="bold")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title or "AUC per strategy")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    seen: dict[str, str] = {}
    for c, label in fam:
        seen.setdefault(label, c)
    handles = [Patch(color=c, label=label) for label, c in seen.items()]
    if any((r.get("mark") or "") not in ("", "ref") for r in rows):
        alpha = next(r.get("alpha", 0.05) for r in rows if r.get("mark") not in ("", "ref"))
        handles += [Patch(color="none", label=f"*  better than {baseline}, p < {alpha:g}"),
                    Patch(color="none", label=f"(-)*  worse than {baseline}, p < {alpha:g}")]
    # Outside the axes, so it can never cover a bar.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=8)
    fig.tight_layout()
    return fig, ax


def plot_auc(rows: Sequence[dict], path: Path, *, title: str | None = None,
             baseline: str = BASELINE) -> Path:
    """Bar chart of mean test AUC per strategy with ±std (over seeds) error bars, the y axis
    from `auc_axis_limits` (not from 0), each row's significance mark (see `aggregate`) above
    its bar, and the legend outside the axes.

    Example:
        >>> plot_auc(aggregate(runs, labels=y_test), Path("auc.png"), title="target books")
        PosixPath('auc.png')
    """
    fig, _ = _auc_figure(rows, title, baseline)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _line_styles(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    return [(cmap(i % 10), styles[(i // 10) % len(styles)]) for i in range(n)]


def policy_epoch_series(history_rows: Sequence[dict], kind: str = "field"
                        ) -> tuple[dict[str, tuple[list[float], list[float]]],
                                   list[tuple[float, str]]]:
    """The lines of `plot_policy_epochs`: {name: (x, mean tuned fraction)} and the stage
    boundaries [(x where the stage starts, stage name)]. Rows with the same epoch and stage
    (several seeds) are averaged. A row's optional 'stage' key (a second training stage of
    the same run, e.g. 'retrain' or 'k=30') puts it after the stages before it on the x axis
    (epoch + the last epoch of the stages before), not on top of the first stage's epochs.

    Example:
        >>> lines, stages = policy_epoch_series([
        ...     {"epoch": 1, "field": {"f": 0.9}}, {"epoch": 2, "field": {"f": 0.7}},
        ...     {"epoch": 1, "field": {"f": 0.5}, "stage": "retrain"}])
        >>> lines["f"], stages
        (([1.0, 2.0, 3.0], [0.9, 0.7, 0.5]), [(2.5, 'retrain')])
    """
    order: list = []
    last: dict = {}
    for i, r in enumerate(history_rows):
        if "epoch" not in r:
            raise ValueError(f"history_rows[{i}] has no 'epoch' key: {sorted(r)}")
        st = r.get("stage")
        if st not in last:
            order.append(st)
            last[st] = float(r["epoch"])
        last[st] = max(last[st], float(r["epoch"]))
    offset, shift, stages = 0.0, {}, []
    for st in order:
        shift[st] = offset
        if offset:
            stages.append((offset + 0.5, str(st)))
        offset += last[st]
    acc: dict[str, dict[float, list[float]]] = {}
    for r in history_rows:
        x = float(r["epoch"]) + shift[r.get("stage")]
        for name, v in (r.get(kind) or {}).items():
            acc.setdefault(name, {}).setdefault(x, []).append(float(v))
    lines = {name: (sorted(by_x), [float(np.mean(by_x[x])) for x in sorted(by_x)])
             for name, by_x in acc.items()}
    return lines, [b for b in stages if any(x > b[0] for xs, _ in lines.values() for x in xs)]


def plot_policy_epochs(history_rows: Sequence[dict], path: Path, *, kind: str = "field",
                       title: str | None = None) -> Path | None:
    """The tuned-path fraction per field (`kind='field'`) or layer over the epochs, one line
    each, from rows like [{'epoch': 1, 'field': {'user_id': 0.3, ...}}, ...]; rows with the
    same epoch (several seeds) are averaged, and a later training stage of the run (rows with
    a 'stage' key) follows the first on the axis after a dashed line (see
    `policy_epoch_series`). Returns None when no row has that kind.

    Example:
        >>> plot_policy_epochs([{"epoch": 1, "field": {"f1": 0.9, "f2": 0.5}},
        ...                     {"epoch": 2, "field": {"f1": 0.7, "f2": 0.4}}], Path("ep.png"))
        PosixPath('ep.png')
    """
    lines, stages = policy_epoch_series(history_rows, kind)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (name, (xs, ys)), (color, style) in zip(lines.items(), _line_styles(len(lines))):
        ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=name)
    for x, name in stages:
        ax.axvline(x, color="0.4", linestyle="--", linewidth=0.8)
        ax.text(x, 1.0, f" {name}", va="top", ha="left", fontsize=8, color="0.3")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch" if not stages else "epoch (the stages of the run in turn)")
    ax.set_ylabel("fraction choosing the tuned path")
    ax.set_title(title or f"Tuned-path fraction per {kind} over the epochs")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8,
              ncol=max(1, math.ceil(len(lines) / 20)))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_policy_by_frequency(rows: Sequence[dict], path: Path, *,
                             bucket_order: Sequence[str] | None = None,
                             title: str | None = None) -> Path | None:
    """Grouped bars: per field, the tuned-path fraction of test instances split by how
    frequent the instance's value is in the target training rows, from rows like
    {'field': 'f1', 'bucket': 'rare', 'tuned_fraction': 0.2, 'count': 123} (see
    `tuned_fraction_by_frequency`). Rows of the same (field, bucket), e.g. from several seeds,
    are combined weighted by `count`. Buckets in `bucket_order` or first-seen order. Returns
    None when `rows` is empty.

    Example:
        >>> plot_policy_by_frequency([{"field": "f1", "bucket": "rare", "tuned_fraction": 0.2,
        ...                            "count": 10}], Path("freq.png"))
        PosixPath('freq.png')
    """
    acc: dict[tuple[str, str], list[float]] = {}
    fields: list[str] = []
    buckets: list[str] = list(bucket_order) if bucket_order else []
    for i, r in enumerate(rows):
        missing = [k for k in ("field", "bucket", "tuned_fraction") if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks key(s) {missing}")
        f, b = str(r["field"]), str(r["bucket"])
        fields += [f] if f not in fields else []
        buckets += [b] if b not in buckets else []
        w = float(r.get("count", 1.0))
        a = acc.setdefault((f, b), [0.0, 0.0])
        a[0] += w * float(r["tuned_fraction"])
        a[1] += w
    if not acc:
        return None
    if not bucket_order:
        buckets = _by_count(buckets)
    plt = _pyplot()
    width = 0.8 / len(buckets)
    # About 0.15 inch a bar, at most 16 inches wide: 22 fields x 4 buckets stay readable.
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.15 * len(fields) * len(buckets) + 3)), 4.2))
    x = np.arange(len(fields))
    cmap = plt.get_cmap("viridis")
    for j, b in enumerate(buckets):
        vals = [acc[(f, b)][0] / acc[(f, b)][1] if (f, b) in acc and acc[(f, b)][1] > 0
                else np.nan for f in fields]
        pos = x + (j - (len(buckets) - 1) / 2) * width
        color = cmap(j / max(1, len(buckets) - 1))
        ax.bar(pos, vals, width, label=b, color=color)
        # A bucket with instances of which none chose the tuned path: a dash on the axis,
        # so that it does not look like a bucket without instances (no bar at all).
        zero = [p for p, v in zip(pos, vals) if v == 0]
        if zero:
            ax.plot(zero, [0.01] * len(zero), linestyle="none", marker="_",
                    markersize=max(4.0, 60 * width), markeredgewidth=2.5, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels(fields, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction choosing the tuned path")
    ax.set_title(title or "Tuned-path fraction by the value's frequency in the target")
    ax.text(1.01, 0.0, "a dash at 0: instances, none tuned;\nno bar: no instances",
            transform=ax.transAxes, fontsize=7, va="bottom", color="0.35")
    ax.legend(title="count in target train", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _by_count(buckets: list[str]) -> list[str]:
    """Frequency buckets named as `_bucket_names` names them ('unseen', '1-4', '7', '>=50')
    in the order of their counts; other names keep their order."""
    def low(name: str) -> int | None:
        if name == "unseen":
            return 0
        text = name[2:] if name.startswith(">=") else name.split("-")[0]
        return int(text) if text.isdigit() else None
    lows = [low(b) for b in buckets]
    if any(v is None for v in lows):
        return buckets
    return [b for _, b in sorted(zip(lows, buckets))]


def _bucket_names(edges: Sequence[int]) -> list[str]:
    names = []
    lo = 0
    for e in edges:
        names.append("unseen" if (lo, e) == (0, 1) else
                     (f"{lo}" if e == lo + 1 else f"{lo}-{e - 1}"))
        lo = e
    names.append(f">={lo}")
    return names


def tuned_fraction_by_frequency(test_values: Mapping[str, Sequence[int]],
                                tuned: Mapping[str, Sequence[float]],
                                train_values: Mapping[str, Sequence[int]],
                                edges: Sequence[int] = (1, 5, 50)) -> list[dict]:
    """Rows for `plot_policy_by_frequency`: per field, the test instances bucketed by how
    often their value occurs in the target training rows, and the mean of `tuned` (each
    instance's tuned-path choice, 0/1 or a probability) in each bucket.

    `edges` are the bucket boundaries on that count: (1, 5, 50) gives 'unseen' (0), '1-4',
    '5-49' and '>=50'. Empty buckets are left out.

    Example:
        >>> tuned_fraction_by_frequency({"f": [1, 1, 2]}, {"f": [1, 0, 1]}, {"f": [1, 1, 1, 1, 1]},
        ...                             edges=(1, 5))   # doctest: +NORMALIZE_WHITESPACE
        [{'field': 'f', 'bucket': 'unseen', 'tuned_fraction': 1.0, 'count': 1},
         {'field': 'f', 'bucket': '>=5', 'tuned_fraction': 0.5, 'count': 2}]
    """
    e = [int(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e, e[1:])) or e[0] < 1:
        raise ValueError(f"edges must be increasing positive counts, got {tuple(edges)!r}")
    names = _bucket_names(e)
    out = []
    for field, vals in test_values.items():
        if field not in tuned:
            raise ValueError(f"tuned has no entry for field {field!r}")
        if field not in train_values:
            raise ValueError(f"train_values has no entry for field {field!r}")
        v = np.asarray(vals).reshape(-1)
        t = np.asarray(tuned[field], dtype=np.float64).reshape(-1)
        if t.size != v.size:
            raise ValueError(f"tuned[{field!r}] has {t.size} values for {v.size} test values")
        uniq, cnt = np.unique(np.asarray(train_values[field]).reshape(-1), return_counts=True)
        if uniq.size:
            pos = np.clip(np.searchsorted(uniq, v), 0, uniq.size - 1)
            freq = np.where(uniq[pos] == v, cnt[pos], 0)
        else:
            freq = np.zeros(v.size, dtype=np.int64)
        bucket = np.searchsorted(np.asarray(e), freq, side="right")
        for j, name in enumerate(names):
            mask = bucket == j
            if mask.any():
                out.append({"field": field, "bucket": name,
                            "tuned_fraction": float(t[mask].mean()), "count": int(mask.sum())})
    return out


def plot_policy(runs: Sequence[dict], kind: str, path: Path) -> Path | None:
    """Grouped bars: fraction of test instances that chose the tuned path, per field
    (`kind='field'`) or per layer (`kind='layer'`), one group per autoft strategy, averaged
    over seeds. Returns None when no run has a policy of that kind.

    Example:
        >>> plot_policy(runs, "field", Path("policy_fields.png"))
        PosixPath('policy_fields.png')
    """
    per_strategy: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        stats = (r.get("policy_stats") or {}).get(kind) or {}
        if not stats:
            continue
        d = per_strategy.setdefault(r["strategy"], {})
        for k, v in stats.items():
            d.setdefault(k, []).append(float(v))
    if not per_strategy:
        return None
    fig, _ = _policy_figure(per_strategy, kind)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _policy_figure(per_strategy: dict[str, dict[str, list[float]]], kind: str):
    plt = _pyplot()
    keys: list[str] = []
    for d in per_strategy.values():
        keys += [k for k in d if k not in keys]
    strategies = list(per_strategy)
    width = 0.8 / len(strategies)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(keys) * len(strategies) + 2), 4))
    x = np.arange(len(keys))
    for i, s in enumerate(strategies):
        vals = [float(np.mean(per_strategy[s][k])) if k in per_strategy[s] else np.nan
                for k in keys]
        ax.bar(x + (i - (len(strategies) - 1) / 2) * width, vals, width, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction choosing the tuned path")
    ax.set_title(f"Tuned-path fraction per {kind} (test set)")
    # Outside the axes: the fractions are often near 1, where a legend inside would sit.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig, ax
