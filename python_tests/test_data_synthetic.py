"""The synthetic generator: determinism, its premises in the ground truth and in the rows,
and that the pipeline reads what it writes."""

from __future__ import annotations

import numpy as np
import pytest

from autoft_fast.data import (
    DataError, SyntheticConfig, SyntheticField, build_synthetic, generate_synthetic,
    load_data_config, prepare_data,
)
from autoft_fast.data.synthetic import DEFAULT_FIELDS

SMALL = SyntheticConfig(n_source_rows=20_000, n_target_rows=2_000)


@pytest.fixture(scope="module")
def small():
    return build_synthetic(SMALL)


def test_same_seed_gives_byte_identical_files(tmp_path):
    cfg = SyntheticConfig(n_source_rows=3_000, n_target_rows=300, seed=5)
    a = generate_synthetic(cfg, tmp_path / "a")
    b = generate_synthetic(cfg, tmp_path / "b")
    c = generate_synthetic(SyntheticConfig(n_source_rows=3_000, n_target_rows=300, seed=6), tmp_path / "c")
    for name in ("synthetic.csv", "dataset.yaml", "ground_truth.json"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    assert (a.parent / "synthetic.csv").read_bytes() != (c.parent / "synthetic.csv").read_bytes()


def test_parquet_output_is_deterministic_too(tmp_path):
    cfg = SyntheticConfig(n_source_rows=2_000, n_target_rows=200, format="parquet")
    a = generate_synthetic(cfg, tmp_path / "a")
    b = generate_synthetic(cfg, tmp_path / "b")
    assert (a.parent / "synthetic.parquet").read_bytes() == (b.parent / "synthetic.parquet").read_bytes()


def test_pipeline_reads_the_generated_data(tmp_path):
    path = generate_synthetic(SyntheticConfig(n_source_rows=4_000, n_target_rows=1_000), tmp_path)
    bundle = prepare_data(load_data_config(path), cache_dir=None)
    fm = bundle.feature_map
    kinds = {f.kind for f in fm.fields}
    assert kinds == {"categorical", "numeric_bucket", "multihot"}  # every kind is exercised
    assert fm.domain_values == ["src_a", "src_b", "src_c", "tgt"]
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    assert sizes == {"source_train": 3_800, "source_valid": 200, "target_train": 600, "target_valid": 100,
                     "target_test": 300}
    # some rows have no tags at all: the multi-hot padding is used
    pad = fm.multihot_pad_ids()[None, :, None]
    empty = (bundle.splits["source_train"].multihot == pad).all(-1)
    assert 0 < float(empty.float().mean()) < 0.5


def test_premise_large_source_small_target_and_ctr(small):
    frame, truth, prob = small
    dom = frame["domain"].to_numpy()
    n_tgt = int((dom == "tgt").sum())
    assert n_tgt == 2_000 and (dom != "tgt").sum() == 20_000
    want = dict(zip([*SMALL.source_domains, SMALL.target_domain], [*SMALL.source_ctr, SMALL.target_ctr]))
    for name, ctr in want.items():
        m = dom == name
        assert abs(prob[m].mean() - ctr) < 1e-6          # the bias was solved for it
        assert 0.05 <= frame["click"].to_numpy()[m].mean() <= 0.2
    assert np.all(np.diff(frame["ts"].to_numpy()) >= 0)  # rows are in time order


def test_premise_shifted_fields_change_in_the_target_only(small):
    _, truth, _ = small
    t = len(truth.domains) - 1
    for f in DEFAULT_FIELDS:
        w_src, w_tgt = truth.main[f.name][0], truth.main[f.name][t]
        v_src, v_tgt = truth.latent[f.name][0].ravel(), truth.latent[f.name][t].ravel()
        if f.effect == "stable":
            assert np.array_equal(w_src, w_tgt) and np.array_equal(v_src, v_tgt)
            assert np.array_equal(truth.latent[f.name][1], truth.latent[f.name][0])
        else:
            corr_t = np.corrcoef(v_src, v_tgt)[0, 1]
            corr_s = np.corrcoef(v_src, truth.latent[f.name][1].ravel())[0, 1]
            # sources stay close to each other, the target moves away (about 0.9*0.3 vs 0.9*0.9)
            assert corr_t < 0.5 < corr_s, (f.name, corr_t, corr_s)


def test_premise_ids_common_in_the_target_are_rare_in_the_source(small):
    frame, _, _ = small
    src = frame[frame["domain"] != "tgt"]
    tgt = frame[frame["domain"] == "tgt"]
    for f in DEFAULT_FIELDS:
        if f.kind != "categorical" or f.cardinality < 100:
            continue
        top_tgt = tgt[f.name].value_counts().index[:5]
        top_src = src[f.name].value_counts().index[:5]
        src_counts = src[f.name].value_counts()
        share = src_counts.reindex(top_tgt).fillna(0).sum() / src_counts.reindex(top_src).sum()
        if f.frequency == "shifted":
            assert share < 0.2, (f.name, share)
        else:
            assert share > 0.5, (f.name, share)


def test_premise_frequency_differs_per_instance(small):
    # Within a frequency-shifted field some target rows still carry ids that are common in the
    # source (reuse is right for them) and most carry ids the source rarely saw: the right
    # choice differs per instance, not only per field.
    frame, _, _ = small
    src = frame[frame["domain"] != "tgt"]
    tgt = frame[frame["domain"] == "tgt"]
    for f in DEFAULT_FIELDS:
        if f.kind != "categorical":
            continue
        src_share = (src[f.name].value_counts() / len(src)).reindex(tgt[f.name]).fillna(0).to_numpy()
        tgt_share = (tgt[f.name].value_counts() / len(tgt)).reindex(tgt[f.name]).to_numpy()
        covered = float((src_share >= tgt_share / 4).mean())
        if f.frequency == "shifted":
            assert 0.03 < covered < 0.6, (f.name, covered)
        else:
            assert covered > 0.9, (f.name, covered)


def test_premise_price_moves_up_in_the_target(small):
    frame, _, _ = small
    is_t = frame["domain"] == "tgt"
    gap = np.log(frame.loc[is_t, "price"]).mean() - np.log(frame.loc[~is_t, "price"]).mean()
    assert abs(gap - SMALL.price_shift) < 0.1


def test_ground_truth_has_signal_and_interactions(small):
    frame, truth, prob = small
    from autoft_fast.data.synthetic import _auc

    y = frame["click"].to_numpy()
    m = frame["domain"].to_numpy() == "tgt"
    assert _auc(y[m], prob[m]) > 0.6  # learnable, but far from separable
    assert truth.scale_interaction > 0 and truth.scale_main > 0
    # turning the interactions off changes the probabilities: they are part of the truth
    no_int = build_synthetic(SyntheticConfig(n_source_rows=20_000, n_target_rows=2_000, interaction_std=0.0))[2]
    assert np.abs(no_int - prob).max() > 0.05


def test_row_counts_do_not_change_the_ground_truth(small):
    _, truth, _ = small
    _, other, _ = build_synthetic(SyntheticConfig(n_source_rows=5_000, n_target_rows=500))
    for f in DEFAULT_FIELDS:
        assert np.array_equal(truth.main[f.name][-1], other.main[f.name][-1])


@pytest.mark.parametrize(
    "d, message",
    [
        ({"n_sourec_rows": 5}, "unknown key 'n_sourec_rows' in synthetic config"),
        ({"n_target_rows": 5}, "synthetic.n_target_rows"),
        ({"source_ctr": [0.1, 0.2]}, "synthetic.source_ctr"),
        ({"target_domain": "src_a"}, "synthetic.target_domain"),
        ({"format": "json"}, "synthetic.format"),
        ({"fields": [{"name": "a", "kind": "tree"}]}, "kind must be one of"),
        ({"fields": [{"name": "a", "colour": 1}]}, "unknown key 'colour' in synthetic.fields 'a'"),
        ({"extra_targets": ["tgt_b,c"]}, "synthetic.extra_targets must be names without commas"),
        ({"source_domains": ['s"a', "s_b", "s_c"]}, "synthetic.source_domains must be names wi"),
        ({"fields": [{"name": "a\nb"}]}, "synthetic.fields must be names without commas"),
    ],
)
def test_bad_synthetic_config(d, message):
    with pytest.raises(DataError, match=message):
        SyntheticConfig.from_dict(d)


def test_a_config_built_in_code_is_checked_like_yaml(tmp_path):
    # Field dicts become fields; bad values are the same named errors as from YAML.
    cfg = SyntheticConfig(fields=[{"name": "a", "cardinality": 10}], n_source_rows=1_000,
                          n_target_rows=200)
    path = generate_synthetic(cfg, tmp_path / "ok")
    assert (tmp_path / "ok" / "synthetic.csv").read_text().splitlines()[0] == "ts,domain,click,a"
    assert path.name == "dataset.yaml"
    with pytest.raises(DataError, match="synthetic.n_source_rows must be >= 10, got -3"):
        generate_synthetic(SyntheticConfig(n_source_rows=-3), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_synthetic_config_round_trip():
    cfg = SyntheticConfig.from_dict({"seed": 3, "fields": [{"name": "a", "cardinality": 10}]})
    assert cfg.fields == (SyntheticField("a", cardinality=10),)
    assert SyntheticConfig.from_dict(cfg.to_dict()) == cfg
    assert SyntheticConfig.from_dict(None) == SyntheticConfig()


def test_a_wide_logit_spread_still_gets_each_domains_click_rate(tmp_path):
    # The bias search stopped at -30: with main_effect_std 20 every domain clicked about
    # twice as often as configured, and nothing said so.
    import json
    cfg = SyntheticConfig.from_dict({"n_source_rows": 20000, "n_target_rows": 5000,
                                     "main_effect_std": 20, "interaction_std": 20})
    out = tmp_path / "wide"
    generate_synthetic(cfg, out)
    truth = json.loads((out / "ground_truth.json").read_text())["domains"]
    want = dict(zip(cfg.source_domains, cfg.source_ctr)) | {cfg.target_domain: cfg.target_ctr}
    for name, ctr in want.items():
        assert truth[name]["bias"] < -30
        assert truth[name]["ctr"] == pytest.approx(ctr, abs=0.02), name


@pytest.mark.parametrize("over, match", [
    ({"fields": [{"name": "a", "zipf": 60}, {"name": "b", "zipf": 60}]}, "hardly vary"),
    ({"fields": [{"name": "tags", "kind": "multihot"}]}, "every field is multi-hot"),
    ({"fields": [{"name": ""}, {"name": "b"}]}, "fields: a name must not be empty"),
    ({"extra_targets": [""]}, "extra_targets: a name must not be empty"),
    ({"source_weights": [1, 1, 0.0001]}, "a source domain would get 0 rows"),
    ({"fields": [{"name": "a"}, {"name": "a"}]}, "the name 'a' is given to more than one"),
    ({"fields": [{"name": "a"}, {"name": "click"}]}, "'click' is the name of a column"),
])
def test_settings_the_generator_cannot_honour_are_refused_by_name(tmp_path, over, match):
    with pytest.raises(DataError, match=match):
        cfg = SyntheticConfig.from_dict({"n_source_rows": 2000, "n_target_rows": 500, **over})
        generate_synthetic(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.yaml").exists()


def test_ground_truth_json_is_standard_json_when_a_metric_is_undefined(tmp_path):
    import json
    cfg = SyntheticConfig.from_dict({"n_source_rows": 1000, "n_target_rows": 20})
    generate_synthetic(cfg, tmp_path / "small")

    def refuse(name):
        raise ValueError(f"non-standard JSON number {name}")
    truth = json.loads((tmp_path / "small" / "ground_truth.json").read_text(),
                       parse_constant=refuse)
    assert any(d["oracle_auc"] is None for d in truth["domains"].values())


@pytest.mark.parametrize("over, match", [({"price_shift": 1000}, "price_shift must be >= -50"),
                                         ({"days": 10 ** 15}, "days must be >= 1 and <= 36500")])
def test_generator_settings_that_would_overflow_are_refused(over, match):
    # price_shift 1000 wrote inf prices; days 1e15 overflowed the timestamps to negatives.
    with pytest.raises(DataError, match=match):
        SyntheticConfig.from_dict(over)


def test_an_empty_synthetic_section_means_the_defaults():
    from autoft_fast.config import parse_config
    assert parse_config({"synthetic": None}).synthetic == SyntheticConfig()
