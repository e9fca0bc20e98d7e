"""Comparison tables, significance columns, the summary over targets and the plots
(autoft_fast.train.report)."""
import csv
import math

import numpy as np
import pytest

from autoft_fast.train.metrics import auc
from autoft_fast.train.report import (_auc_figure, aggregate, aggregate_by_target,
                                      auc_axis_limits, markdown_summary, markdown_table,
                                      plot_auc, plot_policy, plot_policy_by_frequency,
                                      plot_policy_epochs,
                                      policy_epoch_series,
                                      significance_mark, summary_across_targets,
                                      tuned_fraction_by_frequency, write_results_csv)
from autoft_fast.train.stats import seed_paired_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_runs(rng, y, gains, seeds=3, noise=0.6):
    """Run records with test scores: per seed a shared base signal, and each strategy its own
    noise plus `gains[strategy]` extra signal on the positives."""
    runs = []
    for seed in range(seeds):
        base = rng.normal(size=y.size) + 1.0 * y
        for s, g in gains.items():
            sc = base + rng.normal(scale=noise, size=y.size) + g * y
            runs.append({"strategy": s, "seed": seed, "auc": auc(y, sc), "logloss": 0.5,
                         "best_epoch": 3, "epochs_run": 5, "epoch_cap": 5,
                         "test_scores": sc})
    return runs


@pytest.fixture
def labels():
    return (np.random.default_rng(0).random(1500) < 0.4).astype(int)


def test_aggregate_without_scores_keeps_the_old_columns():
    rows = aggregate([{"strategy": "finetune_all", "seed": 0, "auc": 0.70, "logloss": 0.5},
                      {"strategy": "finetune_all", "seed": 1, "auc": 0.72, "logloss": 0.4},
                      {"strategy": "autoft", "seed": 0, "auc": 0.707, "logloss": 0.49}])
    assert [r["strategy"] for r in rows] == ["finetune_all", "autoft"]
    assert rows[0]["auc_mean"] == pytest.approx(0.71) and rows[0]["seeds"] == 2
    assert rows[1]["auc_gain_pct"] == pytest.approx(100 * (0.707 - 0.71) / 0.71)
    assert rows[1]["p_value"] is None and rows[1]["mark"] == "" and rows[0]["mark"] == "ref"
    assert rows[1]["runs_with_cap"] is None
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4  # no notes without significance or epoch-cap information
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "autoft" and cells[3] == "-0.42%"
    assert cells[6:] == ["n/a", "n/a", "", "n/a"]
    assert [c.strip() for c in lines[2].strip("|").split("|")][6] == "ref"
    alone = markdown_table(aggregate([{"strategy": "autoft", "seed": 0, "auc": 0.7,
                                       "logloss": 0.5}]))
    assert "which this comparison did not run" in alone
    assert "did not run" not in markdown_table(rows)


def test_a_strategy_without_a_finite_auc_reads_n_a_not_nan():
    nan = float("nan")
    rows = aggregate([{"strategy": "finetune_all", "seed": 0, "auc": 0.70, "logloss": 0.5},
                      {"strategy": "autoft", "seed": 0, "auc": nan, "logloss": nan}])
    assert rows[1]["auc_gain_pct"] is None
    cells = [c.strip() for c in markdown_table(rows).splitlines()[3].strip("|").split("|")]
    assert cells[1:4] == ["n/a ± n/a", "n/a ± n/a", "n/a"]
    assert "nan" not in markdown_table(rows)
    summary = summary_across_targets({"t": rows, "u": [dict(rows[0]), dict(rows[1],
                                                                     auc_diff_mean=nan)]})
    auto = next(r for r in summary if r["strategy"] == "autoft")
    assert auto["mean_auc_gain_pct"] is None and auto["mean_auc_diff"] is None
    assert auto["wins"] == 0
    assert "nan" not in markdown_summary(summary)


def test_a_diverged_run_leaves_its_seed_out_of_the_paired_test(labels, caplog):
    rng = np.random.default_rng(5)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.3}, seeds=3)
    diverged = next(r for r in runs if r["strategy"] == "autoft" and r["seed"] == 1)
    diverged["test_scores"] = np.full(labels.size, np.nan)
    diverged["auc"] = float("nan")
    rows = aggregate(runs, labels=labels)
    auto = next(r for r in rows if r["strategy"] == "autoft")
    assert auto["paired_seeds"] == 2 and auto["p_value"] is not None
    assert "autoft seed 1" in caplog.text and "not all finite" in caplog.text
    # Every seed diverged: no paired columns, the table still written.
    for r in runs:
        if r["strategy"] == "autoft":
            r["test_scores"] = np.full(labels.size, np.nan)
    auto = next(r for r in aggregate(runs, labels=labels) if r["strategy"] == "autoft")
    assert auto["auc_diff_mean"] is None and auto["mark"] == ""
    assert "n/a" in markdown_table(aggregate(runs, labels=labels))


def test_aggregate_paired_columns_match_an_independent_computation(labels, tmp_path):
    rng = np.random.default_rng(1)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.5, "l2sp": -0.5,
                                   "freeze_dnn": 0.0})
    # One run stores its scores as a .npy file instead of in the record.
    r0 = next(r for r in runs if r["strategy"] == "autoft" and r["seed"] == 1)
    np.save(tmp_path / "s.npy", r0.pop("test_scores"))
    r0["test_scores_path"] = str(tmp_path / "s.npy")
    rows = {r["strategy"]: r for r in aggregate(runs, labels=labels)}
    by = {(r["strategy"], r["seed"]): r for r in runs}
    for s in ("autoft", "l2sp", "freeze_dnn"):
        per_seed = [{"labels": labels,
                     "scores_a": by[(s, k)].get("test_scores",
                                                np.load(tmp_path / "s.npy")),
                     "scores_b": by[("finetune_all", k)]["test_scores"]} for k in range(3)]
        want = seed_paired_summary(per_seed)
        row = rows[s]
        diffs = [auc(labels, p["scores_a"]) - auc(labels, p["scores_b"]) for p in per_seed]
        assert row["auc_diff_mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert row["paired_seeds"] == 3
        assert row["p_value"] == pytest.approx(want["p_value"])
        assert (row["auc_diff_ci_low"], row["auc_diff_ci_high"]) == pytest.approx(
            (want["ci_low"], want["ci_high"]))
        assert row["auc_diff_seed_ci_low"] == pytest.approx(want["seed_ci_low"])
    assert rows["autoft"]["mark"] == "*" and rows["autoft"]["significant"] is True
    assert rows["l2sp"]["mark"] == "(-)*"
    assert rows["finetune_all"]["auc_diff_mean"] is None
    table = markdown_table(list(rows.values()))
    autoft_line = next(line for line in table.splitlines() if line.startswith("| autoft |"))
    cells = [c.strip() for c in autoft_line.strip("|").split("|")]
    assert cells[6].startswith(f"{rows['autoft']['auc_diff_mean']:+.4f} [")
    assert cells[8] == "*" and cells[9] == "0/3"
    assert "`*`: better than finetune_all at p < 0.05" in table
    assert "runs whose best epoch was the last allowed epoch: 0/12" in table


def test_aggregate_labels_per_seed_and_missing_scores(labels):
    rng = np.random.default_rng(2)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.3}, seeds=2)
    del next(r for r in runs if r["strategy"] == "autoft" and r["seed"] == 1)["test_scores"]
    rows = aggregate(runs, labels={0: labels, 1: labels})
    assert rows[1]["paired_seeds"] == 1  # only seed 0 has both strategies' scores
    d0 = auc(labels, runs[1]["test_scores"]) - auc(labels, runs[0]["test_scores"])
    assert rows[1]["auc_diff_mean"] == pytest.approx(d0)
    assert rows[1]["auc_diff_seed_ci_low"] is None  # no interval over a single seed


def test_aggregate_counts_best_epoch_at_the_cap(labels):
    runs = [{"strategy": "finetune_all", "seed": k, "auc": 0.7, "logloss": 0.5,
             "best_epoch": b, "epoch_cap": 5} for k, b in enumerate([5, 3, 5])]
    runs += [{"strategy": "autoft", "seed": 0, "auc": 0.7, "logloss": 0.5, "best_epoch": 2,
              "epoch_cap": 5},
             {"strategy": "autoft", "seed": 1, "auc": 0.7, "logloss": 0.5, "best_epoch": 4}]
    rows = aggregate(runs)
    assert (rows[0]["best_epoch_at_cap"], rows[0]["runs_with_cap"]) == (2, 3)
    assert (rows[1]["best_epoch_at_cap"], rows[1]["runs_with_cap"]) == (0, 1)
    table = markdown_table(rows)
    assert "| 2/3 |" in table and "| 0/1 |" in table
    assert "runs whose best epoch was the last allowed epoch: 2/4" in table


def test_aggregate_rejects_bad_records(labels, tmp_path):
    rng = np.random.default_rng(3)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.3}, seeds=1)
    with pytest.raises(ValueError, match=r"run \('autoft', seed 0\) have 1500 values for 10"):
        aggregate(runs, labels=labels[:10])
    runs[1]["test_scores_path"] = str(tmp_path / "missing.npy")
    del runs[1]["test_scores"]
    with pytest.raises(ValueError, match="test_scores_path of run .* is not a file"):
        aggregate(runs, labels=labels)
    with pytest.raises(ValueError, match="several targets"):
        aggregate([{"strategy": "a", "seed": 0, "auc": .7, "logloss": .5, "target": "x"},
                   {"strategy": "a", "seed": 1, "auc": .7, "logloss": .5, "target": "y"}])
    with pytest.raises(ValueError, match="strategy 'a' seed 0 twice"):
        aggregate([{"strategy": "a", "seed": 0, "auc": .7, "logloss": .5}] * 2)


def test_results_csv_has_the_significance_columns(labels, tmp_path):
    rng = np.random.default_rng(4)
    rows = aggregate(make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.5}),
                     labels=labels)
    write_results_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        got = list(csv.DictReader(f))
    assert float(got[1]["auc_diff_mean"]) == pytest.approx(rows[1]["auc_diff_mean"])
    assert float(got[1]["p_value"]) == pytest.approx(rows[1]["p_value"])
    assert got[1]["mark"] == "*" and got[1]["best_epoch_at_cap"] == "0"


def test_significance_mark():
    assert significance_mark(0.01, 0.049) == "*"
    assert significance_mark(0.01, 0.05) == ""
    assert significance_mark(-0.01, 0.01) == "(-)*"
    assert significance_mark(0.01, 0.02, alpha=0.01) == ""
    assert significance_mark(None, None) == "" and significance_mark(0.1, float("nan")) == ""


def test_summary_across_targets_counts_wins_and_significance():
    tables = {
        "books": [{"strategy": "finetune_all", "auc_mean": 0.70, "auc_gain_pct": 0.0,
                   "mark": "ref"},
                  {"strategy": "autoft", "auc_mean": 0.72, "auc_gain_pct": 2.0,
                   "auc_diff_mean": 0.02, "mark": "*"},
                  {"strategy": "l2sp", "auc_mean": 0.69, "auc_gain_pct": -1.0,
                   "auc_diff_mean": -0.01, "mark": "(-)*"}],
        "music": [{"strategy": "finetune_all", "auc_mean": 0.65, "auc_gain_pct": 0.0,
                   "mark": "ref"},
                  {"strategy": "autoft", "auc_mean": 0.65, "auc_gain_pct": 0.0,
                   "auc_diff_mean": 0.0, "mark": ""},
                  {"strategy": "l2sp", "auc_mean": 0.64, "auc_gain_pct": -1.5,
                   "mark": ""}],
        "films": [{"strategy": "finetune_all", "auc_mean": 0.60, "auc_gain_pct": 0.0},
                  {"strategy": "autoft", "auc_mean": 0.61, "auc_gain_pct": 1.0,
                   "auc_diff_mean": 0.01, "mark": ""}],
    }
    rows = {r["strategy"]: r for r in summary_across_targets(tables)}
    assert list(rows) == ["finetune_all", "autoft", "l2sp"]
    a, b, l2 = rows["autoft"], rows["finetune_all"], rows["l2sp"]
    assert a["targets"] == 3 and a["mean_auc_gain_pct"] == pytest.approx(1.0)
    assert a["mean_auc_diff"] == pytest.approx(0.01)
    assert a["wins"] == 3 and b["wins"] == 1  # the tie on music counts for both
    assert a["significant_better"] == 1 and a["significant_worse"] == 0
    assert l2["targets"] == 2 and l2["wins"] == 0 and l2["significant_worse"] == 1
    assert l2["mean_auc_gain_pct"] == pytest.approx(-1.25)
    assert l2["mean_auc_diff"] == pytest.approx(-0.01)  # music had no paired difference
    md = markdown_summary(list(rows.values())).splitlines()
    assert md[0].startswith("| strategy | targets | mean AUC gain vs finetune_all |")
    assert md[3] == "| autoft | 3 | +1.00% | +0.0100 | 3/3 | 1/3 | 0/3 |"
    assert md[4] == "| l2sp | 2 | -1.25% | -0.0100 | 0/2 | 0/2 | 1/2 |"


def test_aggregate_by_target_then_summary(labels):
    rng = np.random.default_rng(5)
    runs = []
    for target, gain in (("books", 0.6), ("music", 0.5)):
        for r in make_runs(rng, labels, {"finetune_all": 0.0, "autoft": gain}, seeds=2):
            runs.append(dict(r, target=target))
    tables = aggregate_by_target(runs, labels={"books": labels, "music": labels})
    assert list(tables) == ["books", "music"]
    assert all(t[1]["mark"] == "*" for t in tables.values())
    summary = {r["strategy"]: r for r in summary_across_targets(tables)}
    assert summary["autoft"]["wins"] == 2 and summary["autoft"]["significant_better"] == 2
    assert summary["autoft"]["mean_auc_diff"] == pytest.approx(
        np.mean([t[1]["auc_diff_mean"] for t in tables.values()]))


@pytest.mark.parametrize("means,spreads", [([0.70, 0.72, 0.69], [0.004, 0.002, 0.01]),
                                           ([0.62, 0.62], [0.0, 0.0]),
                                           ([0.55, float("nan"), 0.80], [0.02, 0.0, 0.03])])
def test_auc_axis_limits_frame_the_bars(means, spreads):
    lo, hi = auc_axis_limits(means, spreads)
    m, sp = np.array(means), np.array(spreads)
    ok = np.isfinite(m)
    assert 0.0 < lo < float((m[ok] - sp[ok]).min())  # below every error bar, but not at 0
    assert hi > float((m[ok] + sp[ok]).max())
    span = float((m[ok] + sp[ok]).max() - (m[ok] - sp[ok]).min())
    assert hi - lo <= 1.5 * max(span, 0.01) + 1e-12  # tight enough to show the differences
    # Room above the tallest error bar for the significance marks.
    assert hi - float((m[ok] + sp[ok]).max()) >= 0.25 * max(span, 0.01)


def test_auc_axis_limits_edge_cases():
    assert auc_axis_limits([float("nan")]) == (0.0, 1.0)
    lo, _ = auc_axis_limits([0.02], [0.05])  # data reaching 0: clip, never negative
    assert lo == 0.0
    with pytest.raises(ValueError, match="spreads must have one value per mean, got 1 for 2"):
        auc_axis_limits([0.7, 0.8], [0.01])


def test_plot_auc_png_limits_marks_and_legend_outside(labels, tmp_path):
    rng = np.random.default_rng(6)
    rows = aggregate(make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.5,
                                             "autoft_layer": 0.1, "l2sp": -0.5}),
                     labels=labels)
    out = plot_auc(rows, tmp_path / "auc.png", title="books")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    fig, ax = _auc_figure(rows, None, "finetune_all")
    fig.canvas.draw()
    assert ax.get_ylim() == pytest.approx(auc_axis_limits([r["auc_mean"] for r in rows],
                                                          [r["auc_std"] for r in rows]))
    texts = [t.get_text() for t in ax.texts]
    assert sorted(texts) == sorted(r["mark"] for r in rows if r["mark"] not in ("", "ref"))
    assert "*" in texts and "(-)*" in texts
    renderer = fig.canvas.get_renderer()
    legend_box = ax.get_legend().get_window_extent(renderer)
    for bar in ax.patches:
        assert not legend_box.overlaps(bar.get_window_extent(renderer))
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_policy_legend_leaves_the_bars_free(tmp_path):
    from autoft_fast.train.report import _policy_figure
    per = {s: {f"f{i}": [0.97, 0.99] for i in range(6)} for s in ("autoft_field", "autoft")}
    fig, ax = _policy_figure(per, "field")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = ax.get_legend().get_window_extent(renderer)
    assert len(ax.patches) == 12
    for bar in ax.patches:
        assert not legend_box.overlaps(bar.get_window_extent(renderer))
    import matplotlib.pyplot as plt
    plt.close(fig)
    runs = [{"strategy": "autoft", "seed": 0, "policy_stats": {"field": {"f": 0.5}}}]
    assert plot_policy(runs, "field", tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    assert plot_policy(runs, "layer", tmp_path / "l.png") is None


def test_plot_policy_epochs(tmp_path):
    hist = [{"epoch": e, "field": {f"f{i}": (0.9 - 0.1 * e + 0.03 * i) for i in range(22)},
             "layer": {"mlp_0": 0.5}} for e in range(1, 6)]
    hist += [{"epoch": 1, "field": {"f0": 0.1}}]  # a second seed's epoch 1 is averaged in
    out = plot_policy_epochs(hist, tmp_path / "ep.png")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    assert plot_policy_epochs(hist, tmp_path / "layers.png", kind="layer").is_file()
    assert plot_policy_epochs([{"epoch": 1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match=r"history_rows\[0\] has no 'epoch' key"):
        plot_policy_epochs([{"field": {"f": 0.1}}], tmp_path / "bad.png")


def test_policy_epoch_series_puts_a_second_stage_after_the_first():
    hist = [{"epoch": e, "field": {"f": 0.1 * e}} for e in (1, 2, 3)]
    hist += [{"epoch": 1, "field": {"f": 0.2}}]  # another seed's epoch 1: averaged in
    hist += [{"epoch": e, "field": {"f": 0.9}, "stage": "k=30"} for e in (1, 2)]
    lines, stages = policy_epoch_series(hist)
    assert lines["f"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert lines["f"][1] == pytest.approx([0.15, 0.2, 0.3, 0.9, 0.9])
    assert stages == [(3.5, "k=30")]
    assert policy_epoch_series(hist, "layer") == ({}, [])


def test_the_policy_epochs_plot_leaves_out_a_discarded_stage(tmp_path, monkeypatch):
    from autoft_fast.train import runner
    seen = []
    monkeypatch.setattr(runner, "plot_policy_epochs",
                        lambda rows, path, **kw: seen.append((rows, kw["title"])))
    hist = [{"epoch": 1, "policy": {"field": {"f": 0.5}}},
            {"epoch": 1, "policy": {"field": {"f": 0.1}}, "stage": "k=10"}]
    run = {"strategy": "autoft", "seed": 2, "auc": 0.7, "logloss": 0.5, "history": hist,
           "policy_by_frequency": [{"field": "f", "bucket": "rare", "tuned_fraction": 0.5,
                                    "count": 3}]}
    for kept, stages in ((False, [None]), (True, [None, "k=10"])):
        seen.clear()
        runner.write_outputs(tmp_path / str(kept), [dict(run, frequency_retrained=kept)],
                             ["autoft"])
        rows, title = seen[0]
        assert [r.get("stage") for r in rows] == stages
        assert title.endswith("(autoft, seed 2)")
    # A later start of the folder without a policy leaves no policy file of the earlier one.
    folder = tmp_path / "True"
    assert (folder / "policy_by_frequency.png").is_file()
    (folder / "policy.csv").write_text("kind,name\n")
    plain = {"strategy": "finetune_all", "seed": 0, "auc": 0.7, "logloss": 0.5}
    runner.write_outputs(folder, [plain], ["finetune_all"])
    assert not list(folder.glob("policy*")) and (folder / "results.md").is_file()


def test_plot_policy_by_frequency(tmp_path):
    rows = [{"field": f, "bucket": b, "tuned_fraction": v, "count": 10}
            for f in ("user_id", "item_id", "device")
            for b, v in (("unseen", 0.2), ("1-4", 0.5), (">=50", 0.9))]
    out = plot_policy_by_frequency(rows, tmp_path / "freq.png",
                                   bucket_order=["unseen", "1-4", "5-49", ">=50"])
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    assert plot_policy_by_frequency([], tmp_path / "none.png") is None
    with pytest.raises(ValueError, match=r"rows\[0\] lacks key\(s\) \['tuned_fraction'\]"):
        plot_policy_by_frequency([{"field": "f", "bucket": "b"}], tmp_path / "bad.png")


def test_a_bucket_where_no_instance_chose_tuned_is_marked(tmp_path, monkeypatch):
    # A 0-height bar would look like a bucket without instances: it gets a dash on the axis.
    import matplotlib.axes
    dashes = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: dashes.append(list(a[0])) or real(self, *a, **k))
    rows = [{"field": f, "bucket": b, "tuned_fraction": v, "count": 10}
            for f in ("user_id", "item_id") for b, v in (("unseen", 0.0), (">=50", 0.9))]
    rows.pop(2)  # item_id has no unseen instances: no bar and no dash there
    plot_policy_by_frequency(rows, tmp_path / "zero.png")
    assert len(dashes) == 1 and len(dashes[0]) == 1  # user_id's unseen bucket only


def test_tuned_fraction_by_frequency_against_a_loop():
    rng = np.random.default_rng(7)
    train = {"f1": rng.integers(0, 30, 400), "f2": rng.integers(0, 5, 50)}
    test = {"f1": rng.integers(0, 60, 300), "f2": rng.integers(0, 8, 300)}
    tuned = {"f1": rng.random(300) < 0.5, "f2": rng.random(300)}
    edges = (1, 5, 20)
    rows = tuned_fraction_by_frequency(test, tuned, train, edges=edges)
    names = ["unseen", "1-4", "5-19", ">=20"]
    want = []
    for f in ("f1", "f2"):
        counts = {v: int((train[f] == v).sum()) for v in set(test[f].tolist())}
        bucket = []
        for v in test[f]:
            c = counts[int(v)]
            bucket.append(0 if c < 1 else 1 if c < 5 else 2 if c < 20 else 3)
        bucket = np.array(bucket)
        for j, name in enumerate(names):
            mask = bucket == j
            if mask.any():
                want.append((f, name, float(np.asarray(tuned[f], float)[mask].mean()),
                             int(mask.sum())))
    got = [(r["field"], r["bucket"], r["tuned_fraction"], r["count"]) for r in rows]
    assert [g[:2] + (g[3],) for g in got] == [w[:2] + (w[3],) for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want])
    assert sum(r["count"] for r in rows if r["field"] == "f1") == 300
    with pytest.raises(ValueError, match="edges must be increasing positive counts"):
        tuned_fraction_by_frequency(test, tuned, train, edges=(5, 5))
    with pytest.raises(ValueError, match="tuned has no entry for field 'f2'"):
        tuned_fraction_by_frequency(test, {"f1": tuned["f1"]}, train)
    assert math.isclose(sum(r["tuned_fraction"] * r["count"] for r in rows
                            if r["field"] == "f2") / 300, float(tuned["f2"].mean()))


def test_policy_table_says_when_frozen_choices_at_k0_change_nothing():
    from autoft_fast.train.report import policy_table
    stats = {"field": {"user_id": 0.9}, "layer": {}}
    runs = [{"strategy": "autoft", "policy_stats": stats, "frequency_threshold": 0.0},
            {"strategy": "autoft", "policy_stats": stats, "frequency_threshold": 10.0},
            {"strategy": "autoft_layer", "policy_stats": {"field": {}, "layer": {"mlp_0": 1.0}}}]
    text = policy_table(runs)
    assert "| field user_id | 0.900 |" in text
    assert "In 1 of the 2 runs with the rule it kept k = 0" in text
    assert "change no prediction" not in policy_table(runs[1:])


def test_frequency_buckets_are_plotted_in_the_order_of_their_counts():
    from autoft_fast.train.report import _by_count
    assert _by_count([">=50", "unseen", "1-4", "5-49"]) == ["unseen", "1-4", "5-49", ">=50"]
    assert _by_count(["7", ">=8", "unseen"]) == ["unseen", "7", ">=8"]
    assert _by_count(["rare", "common"]) == ["rare", "common"]  # other names: as given


def test_a_strategy_with_most_seeds_diverged_says_how_many_it_rests_on(labels):
    rng = np.random.default_rng(3)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.4}, seeds=3)
    for r in runs:
        if r["strategy"] == "autoft" and r["seed"] > 0:
            r["test_scores"] = np.full(labels.size, np.nan)
            r["auc"] = float("nan")
    rows = aggregate(runs, labels=labels)
    auto = next(r for r in rows if r["strategy"] == "autoft")
    assert auto["auc_runs"] == 1 and auto["seeds"] == 3 and auto["paired_seeds"] == 1
    table = markdown_table(rows)
    cells = [c.strip() for c in table.splitlines()[3].strip("|").split("|")]
    assert cells[1].endswith("(1/3 seeds)")
    assert "only k of the strategy's n runs" in table and "autoft 1/3" in table
    base = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert "seeds)" not in base[1]  # every finetune_all run finished


def test_two_seeds_are_flagged_and_the_interval_header_follows_alpha(labels):
    rng = np.random.default_rng(4)
    runs = make_runs(rng, labels, {"finetune_all": 0.0, "autoft": 0.2}, seeds=2)
    table = markdown_table(aggregate(runs, labels=labels))
    assert "With 2 seeds" in table and "[95% CI]" in table
    table = markdown_table(aggregate(make_runs(rng, labels, {"finetune_all": 0.0,
                                                             "autoft": 0.2}, seeds=3),
                                     labels=labels, alpha=0.1))
    assert "[90% CI]" in table and "With 2 seeds" not in table


@pytest.mark.parametrize("p, shown", [(0.0496, "0.0496"), (0.0504, "0.0504"), (0.2, "0.200"),
                                      (0.0004, "<0.001")])
def test_a_p_value_next_to_alpha_shows_the_digit_that_decides_the_mark(p, shown):
    from autoft_fast.train.report import _p_cell
    assert _p_cell(p, 0.05) == shown


def test_a_pipe_in_a_name_does_not_shift_the_columns():
    rows = aggregate([{"strategy": "finetune_all", "seed": 0, "auc": 0.70, "logloss": 0.5},
                      {"strategy": "autoft|v2", "seed": 0, "auc": 0.71, "logloss": 0.5}])
    table = markdown_table(rows).splitlines()
    count = lambda line: line.replace("\\|", "").count("|")
    assert count(table[3]) == count(table[0]) and "autoft\\|v2" in table[3]
    summary = markdown_summary(summary_across_targets({"t": rows})).splitlines()
    assert count(summary[3]) == count(summary[0])


def test_the_auc_axis_stops_near_one_however_wide_the_spread():
    lo, hi = auc_axis_limits([0.7], [0.6])
    assert lo == 0.0 and hi <= 1.3
    lo, hi = auc_axis_limits([0.995, 0.999], [0.004, 0.003])
    assert hi <= 1.0 + 0.3 * (1.0 - lo) and lo < 0.991


def test_the_policy_table_follows_the_comparisons_strategy_order(tmp_path):
    from autoft_fast.train.report import policy_table, write_policy_csv
    runs = [{"strategy": "autoft_layer", "policy_stats": {"field": {}, "layer": {"mlp_0": 0.4}}},
            {"strategy": "autoft_field", "policy_stats": {"field": {"user": 0.9}, "layer": {}}},
            {"strategy": "autoft", "policy_stats": {"field": {"user": 0.8},
                                                    "layer": {"mlp_0": 0.7}}}]
    lines = policy_table(runs).splitlines()
    assert lines[0] == "| tuned-path fraction | autoft_layer | autoft_field | autoft |"
    assert lines[2] == "| field user | n/a | 0.900 | 0.800 |"  # field rows first
    assert lines[3] == "| layer mlp_0 | 0.400 | n/a | 0.700 |"
    path = write_policy_csv(iter(runs), tmp_path / "policy.csv")
    with open(path) as f:
        assert next(csv.reader(f)) == ["kind", "name", "autoft_layer", "autoft_field", "autoft"]
