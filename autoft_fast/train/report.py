"""Turn per-seed results into the comparison table (markdown + CSV) and the PNG plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["RUN_COLUMNS", "aggregate", "markdown_table", "write_runs_csv", "write_results_csv",
           "plot_auc", "plot_policy", "mean_std", "policy_summary", "policy_table",
           "write_policy_csv"]

BASELINE = "finetune_all"

RUN_COLUMNS = ("strategy", "seed", "auc", "logloss", "best_epoch", "epochs_run",
               "train_samples_per_s", "train_seconds", "wall_seconds")


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


def aggregate(runs: Iterable[dict], order: Sequence[str] | None = None) -> list[dict]:
    """One summary row per strategy from per-seed run records.

    The AUC gain is relative to finetune_all's mean AUC, in percent:
    100 * (auc - auc_finetune_all) / auc_finetune_all (None when finetune_all was not run).

    Example:
        >>> rows = aggregate([{"strategy": "finetune_all", "seed": 0, "auc": 0.7, "logloss": 0.5},
        ...                   {"strategy": "autoft", "seed": 0, "auc": 0.707, "logloss": 0.49}])
        >>> round(rows[1]["auc_gain_pct"], 3)
        1.0
    """
    runs = list(runs)
    names = list(order) if order else []
    for r in runs:
        if r["strategy"] not in names:
            names.append(r["strategy"])
    rows = []
    for s in names:
        rs = [r for r in runs if r["strategy"] == s]
        if not rs:
            continue
        auc_m, auc_s = mean_std([r["auc"] for r in rs])
        ll_m, ll_s = mean_std([r["logloss"] for r in rs])
        sps = mean_std([r.get("train_samples_per_s", float("nan")) for r in rs])[0]
        wall = mean_std([r.get("wall_seconds", float("nan")) for r in rs])[0]
        rows.append({"strategy": s, "seeds": len(rs), "auc_mean": auc_m, "auc_std": auc_s,
                     "logloss_mean": ll_m, "logloss_std": ll_s,
                     "train_samples_per_s": sps, "wall_seconds": wall})
    base = next((r for r in rows if r["strategy"] == BASELINE), None)
    for r in rows:
        if base is None or not base["auc_mean"] or math.isnan(base["auc_mean"]):
            r["auc_gain_pct"] = None
        else:
            r["auc_gain_pct"] = 100.0 * (r["auc_mean"] - base["auc_mean"]) / base["auc_mean"]
    return rows


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison table as markdown: strategy, AUC and LogLoss (mean ± std over seeds),
    relative AUC gain over finetune_all, training throughput and wall time per run.

    Example:
        >>> print(markdown_table(aggregate([{"strategy": "finetune_all", "seed": 0,
        ...                                  "auc": 0.7, "logloss": 0.5}])).splitlines()[2])
        | finetune_all | 0.7000 ± 0.0000 | 0.5000 ± 0.0000 | +0.00% | n/a | n/a |
    """
    head = ("| strategy | AUC | LogLoss | AUC gain vs finetune_all | train samples/s | "
            "time per run (s) |")
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gain = r.get("auc_gain_pct")
        gain_s = "n/a" if gain is None else f"{gain:+.2f}%"
        lines.append(
            f"| {r['strategy']} | {_fmt(r['auc_mean'], '.4f')} ± {_fmt(r['auc_std'], '.4f')} | "
            f"{_fmt(r['logloss_mean'], '.4f')} ± {_fmt(r['logloss_std'], '.4f')} | {gain_s} | "
            f"{_fmt(r.get('train_samples_per_s'), ',.0f')} | "
            f"{_fmt(r.get('wall_seconds'), '.1f')} |")
    return "\n".join(lines)


def policy_summary(runs: Iterable[dict]) -> list[dict]:
    """Mean over seeds of the tuned-path fraction, one row per (kind, name) with one value per
    strategy that has a policy: [{'kind': 'field', 'name': 'user_id', 'autoft': 0.31, ...}].

    Example:
        >>> policy_summary([{"strategy": "autoft", "policy_stats":
        ...                  {"field": {"user_id": 0.25}, "layer": {}}}])
        [{'kind': 'field', 'name': 'user_id', 'autoft': 0.25}]
    """
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in runs:
        for kind in ("field", "layer"):
            for name, v in ((r.get("policy_stats") or {}).get(kind) or {}).items():
                acc.setdefault((kind, name), {}).setdefault(r["strategy"], []).append(float(v))
    return [{"kind": k, "name": n, **{s: float(np.mean(v)) for s, v in d.items()}}
            for (k, n), d in acc.items()]


def policy_table(runs: Iterable[dict]) -> str:
    """The tuned-path fractions (see `policy_summary`) as markdown; '' when no policy ran.

    Example:
        >>> print(policy_table(runs))   # doctest: +SKIP
        | tuned-path fraction | autoft_field | autoft |
        | --- | --- | --- |
        | field user_id | 0.31 | 0.28 |
    """
    rows = policy_summary(runs)
    if not rows:
        return ""
    strategies: list[str] = []
    for r in rows:
        strategies += [k for k in r if k not in ("kind", "name") and k not in strategies]
    lines = ["| tuned-path fraction | " + " | ".join(strategies) + " |",
             "| --- |" + " --- |" * len(strategies)]
    for r in rows:
        vals = " | ".join(_fmt(r.get(s), ".3f") for s in strategies)
        lines.append(f"| {r['kind']} {r['name']} | {vals} |")
    return "\n".join(lines)


def write_policy_csv(runs: Iterable[dict], path: Path) -> Path | None:
    """`policy_summary` as CSV (kind, name, one column per strategy); None when empty.

    Example:
        >>> write_policy_csv(runs, Path("policy.csv"))
        PosixPath('policy.csv')
    """
    rows = policy_summary(runs)
    if not rows:
        return None
    cols = ["kind", "name"]
    for r in rows:
        cols += [k for k in r if k not in cols]
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
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(RUN_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: r.get(k) for k in RUN_COLUMNS})
    return path


def write_results_csv(rows: Sequence[dict], path: Path) -> Path:
    """Per-strategy summary rows (see `aggregate`) as CSV.

    Example:
        >>> write_results_csv(aggregate(runs, STRATEGIES), Path("results.csv"))
        PosixPath('results.csv')
    """
    cols = ["strategy", "seeds", "auc_mean", "auc_std", "logloss_mean", "logloss_std",
            "auc_gain_pct", "train_samples_per_s", "wall_seconds"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window; works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_auc(rows: Sequence[dict], path: Path) -> Path:
    """Bar chart of mean test AUC per strategy with ±std error bars.

    Example:
        >>> plot_auc(aggregate(runs), Path("auc.png"))
        PosixPath('auc.png')
    """
    plt = _pyplot()
    names = [r["strategy"] for r in rows]
    means = np.array([r["auc_mean"] for r in rows], dtype=float)
    stds = np.nan_to_num(np.array([r["auc_std"] for r in rows], dtype=float))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    x = np.arange(len(names))
    colors = ["tab:orange" if n.startswith("autoft") else "tab:blue" for n in names]
    ax.bar(x, means, yerr=stds, capsize=4, color=colors)
    finite = means[np.isfinite(means)]
    if finite.size:
        lo = float(finite.min() - 3 * max(stds.max(), 0.002))
        hi = float(finite.max() + 3 * max(stds.max(), 0.002))
        ax.set_ylim(max(0.0, lo), min(1.0, hi))
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("AUC per strategy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction choosing the tuned path")
    ax.set_title(f"Tuned-path fraction per {kind} (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
