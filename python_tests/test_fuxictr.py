"""Reading FuxiCTR dataset_config / model_config pairs and feature_map.json: Base merging,
feature_cols with list names, sequence features, every unapplied key reported, errors for
what cannot be ignored, and a tiny run of an imported experiment through compare."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autoft_fast.config import ConfigError, load_config, parse_config
from autoft_fast.config.experiment import load_fuxictr
from autoft_fast.config.fuxictr import (FuxiCTRWarning, fuxictr_to_experiment, looks_like_fuxictr,
                                        read_feature_map, read_model_config)

DOMAIN = {"column": "site", "source": ["s1", "s2"], "target": "t"}
N = 1500


def _write_csvs(root: Path) -> None:
    rng = np.random.default_rng(0)
    n = N
    tags = ["^".join(rng.choice(list("abcdefg"), rng.integers(1, 5), replace=False))
            for _ in range(n)]
    df = pd.DataFrame({
        "clk": rng.integers(0, 2, n),
        "userid": rng.integers(0, 40, n), "adgroup_id": rng.integers(0, 30, n),
        "pid": rng.integers(0, 5, n), "price": rng.normal(10, 3, n).round(2),
        "site": rng.choice(["s1", "s2", "t"], n, p=[0.45, 0.3, 0.25]),
        "click_sequence": tags, "unused": rng.integers(0, 3, n)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    df.iloc[:1000].to_csv(root / "data" / "train.csv", index=False)
    df.iloc[1000:1250].to_csv(root / "data" / "valid.csv", index=False)
    df.iloc[1250:].to_csv(root / "data" / "test.csv", index=False)


DATASET_YAML = """
tiny_csv:
    data_root: ./data/
    data_format: csv
    train_data: ./data/train.csv
    valid_data: ./data/valid.csv
    test_data: ./data/test.csv
    min_categr_count: 2
    feature_cols:
        - {name: ["userid", "adgroup_id", "pid"], active: True, dtype: str, type: categorical,
           source: user}
        - {name: price, active: True, dtype: float, type: numeric, normalizer: StandardScaler}
        - {name: site, active: True, dtype: str, type: categorical}
        - {name: click_sequence, active: True, dtype: str, type: sequence, splitter: ^,
           max_len: 4, share_embedding: adgroup_id}
        - {name: unused, active: False, dtype: str, type: categorical}
    label_col: {name: clk, dtype: float}
"""

MODEL_YAML = """
Base:
    model_root: './checkpoints/'
    num_workers: 3
    verbose: 1
    early_stop_patience: 2
    pickle_feature_encoder: True
    save_best_only: True
    eval_steps: null
    debug_mode: False
    group_id: null
    epochs: 7

DeepFM_test:
    model: DeepFM
    dataset_id: tiny_csv
    loss: 'binary_crossentropy'
    metrics: ['logloss', 'AUC']
    task: binary_classification
    optimizer: adam
    hidden_units: [16, 8]
    hidden_activations: relu
    net_regularizer: 0
    embedding_regularizer: 1.e-8
    learning_rate: 2.e-3
    batch_norm: False
    net_dropout: 0
    batch_size: 128
    embedding_dim: 4
    epochs: 1
    shuffle: True
    seed: 2019
    monitor: 'AUC'
    monitor_mode: 'max'

DCNv2_test:
    model: DCNv2
    dataset_id: tiny_csv
    model_structure: stacked
    stacked_dnn_hidden_units: [12]
    parallel_dnn_hidden_units: [99]
    num_cross_layers: 3
    use_low_rank_mixture: True
    low_rank: 8
    dnn_activations: ReLU
    monitor: {'AUC': 1, 'logloss': -1}
    monitor_mode: max
    fancy_new_key: 3
"""


@pytest.fixture
def fuxi(tmp_path):
    """A FuxiCTR-style tree: config/dataset_config.yaml, config/model_config.yaml, data/."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "dataset_config.yaml").write_text(DATASET_YAML)
    (cfg / "model_config.yaml").write_text(MODEL_YAML)
    _write_csvs(tmp_path)
    return tmp_path


def _import(root, exp_id="DeepFM_test", **kw):
    return fuxictr_to_experiment(root / "config", root / "config", exp_id, DOMAIN, root=root, **kw)


def test_base_is_merged_under_the_experiment_and_the_experiment_wins(fuxi):
    params = read_model_config(fuxi / "config" / "model_config.yaml", "DeepFM_test")
    assert params["epochs"] == 1                    # experiment overrides Base
    assert params["early_stop_patience"] == 2       # taken from Base
    assert params["model_root"] == "./checkpoints/"
    dcn = read_model_config(fuxi / "config", "DCNv2_test")
    assert dcn["epochs"] == 7 and dcn["model"] == "DCNv2"
    with pytest.raises(ConfigError, match="experiment_id 'Nope' is not in .*DeepFM_test"):
        read_model_config(fuxi / "config", "Nope")


def test_model_config_folder_of_several_files(tmp_path):
    d = tmp_path / "model_config"
    d.mkdir()
    (d / "a.yaml").write_text("Base: {epochs: 4, learning_rate: 0.01}\n")
    (d / "b.yaml").write_text("X: {model: DNN, dataset_id: ds, learning_rate: 0.1}\n")
    params = read_model_config(tmp_path, "X")
    assert params == {"epochs": 4, "learning_rate": 0.1, "model": "DNN", "dataset_id": "ds"}


def test_deepfm_pair_maps_onto_every_section(fuxi):
    imp = _import(fuxi)
    exp = imp.experiment
    assert exp["model"] == {"name": "deepfm", "embedding_dim": 4, "hidden_units": [16, 8],
                            "activation": "relu", "dropout": 0, "batch_norm": False}
    for stage in ("pretrain", "finetune"):
        assert exp[stage]["lr"] == 2e-3 and exp[stage]["batch_size"] == 128
        assert exp[stage]["epochs"] == 1 and exp[stage]["patience"] == 2
        assert exp[stage]["monitor"] == "auc" and exp[stage]["optimizer"] == "adam"
    assert exp["pretrain"]["seed"] == 2019 and exp["seeds"] == [2019]
    assert exp["run_dir"] == str((fuxi / "checkpoints").resolve())
    data = exp["data"]
    # a list name expands to one column each; the domain column is not a feature; an
    # inactive column is left out, as FuxiCTR does
    assert data["categorical"] == ["userid", "adgroup_id", "pid"]
    assert data["numeric"] == [{"name": "price", "mode": "dense"}]
    assert data["multihot"] == [{"name": "click_sequence", "sep": "^", "max_len": 4}]
    assert data["label"] == "clk" and data["min_count"] == 2 and data["domain"] == DOMAIN
    assert [Path(f).name for f in data["files"]] == ["train.csv", "valid.csv", "test.csv"]
    assert data["cache_dir"] == str((fuxi / "data").resolve())
    cfg = parse_config(exp, fuxi)
    assert cfg.model.name == "deepfm" and cfg.finetune.lr == 2e-3 and cfg.data.min_count == 2
    assert [c.name for c in cfg.data.multihot] == ["click_sequence"]
    assert cfg.data.multihot[0].sep == "^" and cfg.data.multihot[0].max_len == 4


def test_every_key_not_applied_is_reported_by_name(fuxi):
    notes = _import(fuxi).warnings
    text = "\n".join(notes)
    for key in ("embedding_regularizer", "num_workers", "verbose", "pickle_feature_encoder",
                "share_embedding", "source (feature group)", "is the domain column",
                "fixed FuxiCTR split is not kept"):
        assert key in text, key
    # columns sharing a note are named together on one line
    line = next(n for n in notes if "source (feature group)" in n)
    assert "'userid', 'adgroup_id', 'pid'" in line
    # settings that this package applies as they are give no warning
    for key in ("learning_rate", "net_regularizer", "save_best_only", "eval_steps", "shuffle",
                "monitor", "hidden_units"):
        assert not any(f" {key} " in n or f": {key}" in n for n in notes), key

    dcn = _import(fuxi, "DCNv2_test")
    m = dcn.experiment["model"]
    assert m["name"] == "dcnv2" and m["structure"] == "stacked" and m["hidden_units"] == [12]
    assert m["cross_layers"] == 3 and m["activation"] == "relu"
    assert dcn.experiment["finetune"]["monitor"] == "auc"
    text = "\n".join(dcn.warnings)
    assert "use_low_rank_mixture" in text and "fancy_new_key has no counterpart" in text
    assert "weighted sum of metrics" in text


@pytest.mark.parametrize("edit, match", [
    (lambda d, m: d["tiny_csv"]["feature_cols"].append(
        {"name": "hour", "type": "categorical", "preprocess": "convert_hour"}),
     "feature_cols 'hour': preprocess 'convert_hour'"),
    (lambda d, m: d["tiny_csv"].update(data_format="h5"), "data_format 'h5' cannot be read"),
    (lambda d, m: d["tiny_csv"].update(label_col=[{"name": "a"}, {"name": "b"}]),
     "label_col lists 2 labels"),
    (lambda d, m: d["tiny_csv"]["feature_cols"].append({"name": "x", "type": "image"}),
     "feature_cols 'x': type 'image'"),
    (lambda d, m: m["DeepFM_test"].update(model="xDeepFM"), "model 'xDeepFM' has no counterpart"),
    (lambda d, m: m["DeepFM_test"].update(task="regression"), "task 'regression' is not supported"),
    (lambda d, m: m["DeepFM_test"].update(monitor="logloss"), "monitor_mode 'max' does not fit"),
    (lambda d, m: m["DeepFM_test"].update(dataset_id="other"), "dataset_id 'other' is not in"),
])
def test_what_cannot_be_ignored_is_an_error_naming_the_key(fuxi, edit, match):
    ds = yaml.safe_load(DATASET_YAML)
    mc = yaml.safe_load(MODEL_YAML)
    edit(ds, mc)
    (fuxi / "config" / "dataset_config.yaml").write_text(yaml.safe_dump(ds))
    (fuxi / "config" / "model_config.yaml").write_text(yaml.safe_dump(mc))
    with pytest.raises(ConfigError, match=match):
        _import(fuxi)


def test_feature_map_json_gives_max_len_and_is_checked_against_the_config(fuxi):
    ds = yaml.safe_load(DATASET_YAML)
    del ds["tiny_csv"]["feature_cols"][3]["max_len"]
    (fuxi / "config" / "dataset_config.yaml").write_text(yaml.safe_dump(ds))
    # without a feature map: the default max_len, reported
    notes = _import(fuxi).warnings
    assert any("'click_sequence': max_len is not given" in n for n in notes)
    assert _import(fuxi).experiment["data"]["multihot"][0].get("max_len") is None
    # FuxiCTR's layout: data_root/dataset_id/feature_map.json, features as a list
    fm = {"dataset_id": "tiny_csv", "num_fields": 5, "labels": ["clk"], "features": [
        {"userid": {"source": "user", "type": "categorical", "padding_idx": 0, "vocab_size": 42}},
        {"adgroup_id": {"type": "categorical", "padding_idx": 0, "vocab_size": 32}},
        {"pid": {"type": "numeric"}},
        {"old_field": {"type": "categorical", "vocab_size": 3}},
        {"click_sequence": {"type": "sequence", "share_embedding": "adgroup_id",
                            "padding_idx": 0, "vocab_size": 9, "max_len": 3}}]}
    (fuxi / "data" / "tiny_csv").mkdir()
    (fuxi / "data" / "tiny_csv" / "feature_map.json").write_text(json.dumps(fm))
    assert list(read_feature_map(fuxi / "data" / "tiny_csv" / "feature_map.json")["features"]) == \
        ["userid", "adgroup_id", "pid", "old_field", "click_sequence"]
    imp = _import(fuxi)  # found at its default place
    assert imp.experiment["data"]["multihot"][0]["max_len"] == 3
    text = "\n".join(imp.warnings)
    assert "feature 'old_field' is not an active column" in text
    assert "feature 'pid' has type 'numeric'" in text
    assert "max_len is not given" not in text


def test_fuxictr_section_in_an_experiment_file_and_its_overrides(fuxi, monkeypatch):
    exp = {"fuxictr": {"dataset_config": "config/dataset_config.yaml",
                       "model_config": "config", "experiment_id": "DeepFM_test",
                       "domain": DOMAIN, "root": "."},
           "finetune": {"epochs": 3}, "strategies": ["finetune_all", "autoft"]}
    path = fuxi / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(fuxi.parent)  # paths come from the file and fuxictr.root, not the cwd
    with pytest.warns(FuxiCTRWarning, match="embedding_regularizer"):
        cfg = load_config(path)
    assert cfg.name == "exp" and cfg.model.name == "deepfm"
    assert cfg.finetune.epochs == 3 and cfg.finetune.lr == 2e-3   # merged key by key
    assert cfg.strategies == ["finetune_all", "autoft"]
    assert cfg.data.files[0] == (fuxi / "data" / "train.csv").resolve()
    assert parse_config(cfg.to_dict(), cfg.base_dir) == cfg  # plain, and it reloads
    # a FuxiCTR file itself given as the experiment: a pointer to the section
    with pytest.raises(ConfigError, match="is a FuxiCTR model_config; name it in the fuxictr"):
        load_config(fuxi / "config" / "model_config.yaml")
    with pytest.raises(ConfigError, match="is a FuxiCTR dataset_config"):
        load_config(fuxi / "config" / "dataset_config.yaml")
    bad = dict(exp, fuxictr=dict(exp["fuxictr"], experimentid="x"))
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="unknown key 'experimentid' in fuxictr"):
        load_config(path)
    assert looks_like_fuxictr({"model": {"name": "dnn"}, "seeds": [0]}) is None


def test_root_defaults_to_the_working_directory(fuxi, monkeypatch):
    monkeypatch.chdir(fuxi)
    imp = fuxictr_to_experiment(fuxi / "config", fuxi / "config", "DeepFM_test", DOMAIN)
    assert Path(imp.experiment["data"]["files"][0]) == (fuxi / "data" / "train.csv").resolve()


def test_imported_experiment_runs_through_compare(fuxi):
    from autoft_fast.train.runner import compare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imp = load_fuxictr(fuxi / "config", fuxi / "config", "DeepFM_test", DOMAIN, root=fuxi,
                           overrides={"data": {"cache": False},
                                      "autoft": {"backend": "reference"},
                                      "strategies": ["finetune_all", "autoft"],
                                      "run_dir": str(fuxi / "runs"),
                                      "cache_dir": str(fuxi / "cache")}, warn=True)
    assert {str(w.message) for w in caught if w.category is FuxiCTRWarning} == set(imp.warnings)
    cfg = imp.config
    assert cfg.model.name == "deepfm" and cfg.finetune.epochs == 1 and cfg.seeds == [2019]
    table, rows, runs = compare(cfg, fuxi / "out", progress=False)
    assert {r["strategy"] for r in rows} == {"finetune_all", "autoft"}
    assert "| finetune_all |" in table and "| autoft |" in table
    for r in runs:
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0.0, r


def _edited(fuxi, edit):
    ds, mc = yaml.safe_load(DATASET_YAML), yaml.safe_load(MODEL_YAML)
    edit(ds, mc)
    (fuxi / "config" / "dataset_config.yaml").write_text(yaml.safe_dump(ds))
    (fuxi / "config" / "model_config.yaml").write_text(yaml.safe_dump(mc))


@pytest.mark.parametrize("monitor, mode, want", [
    ({"logloss": -1}, "max", "logloss"), ({"logloss": 1}, "min", "logloss"),
    ({"AUC": 0, "logloss": -1}, "max", "logloss"), ({"AUC": 1, "logloss": -1}, "max", "auc"),
    ({"AUC": 1}, None, "auc"), ({"AUC": -1, "logloss": 1}, "min", "auc"),
])
def test_a_weighted_monitor_follows_its_signs_and_the_mode(fuxi, monitor, mode, want):
    _edited(fuxi, lambda d, m: m["DeepFM_test"].update(monitor=monitor, monitor_mode=mode))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FuxiCTRWarning)
        exp = _import(fuxi).experiment
    assert exp["pretrain"]["monitor"] == want and exp["finetune"]["monitor"] == want


@pytest.mark.parametrize("monitor, mode", [({"logloss": 1}, "max"), ({"AUC": 1}, "min")])
def test_a_weighted_monitor_that_prefers_worse_models_is_an_error(fuxi, monitor, mode):
    _edited(fuxi, lambda d, m: m["DeepFM_test"].update(monitor=monitor, monitor_mode=mode))
    with pytest.raises(ConfigError, match="prefer a worse model"):
        _import(fuxi)


def test_dataset_level_sep_and_num_buckets_are_applied(fuxi):
    def edit(d, m):
        d["tiny_csv"].update(sep="\t", num_buckets=20)
        d["tiny_csv"]["feature_cols"][1] = {"name": "price", "active": True, "type": "categorical",
                                            "category_processor": "quantile_bucket"}
    _edited(fuxi, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FuxiCTRWarning)
        imp = _import(fuxi)
    data = imp.experiment["data"]
    assert data["csv_sep"] == "\t" and data["num_buckets"] == 20
    said = " ".join(str(w.message) for w in caught)
    assert "sep has no counterpart" not in said and "num_buckets has no counterpart" not in said


@pytest.mark.parametrize("train_data", ["./data/parts", "./data/parts/*.csv",
                                        "./data/parts/a.csv.gz"])
def test_train_data_as_a_folder_a_glob_or_gzip_csv_as_fuxictr_reads_it(fuxi, train_data):
    import gzip
    parts = fuxi / "data" / "parts"
    parts.mkdir()
    text = (fuxi / "data" / "train.csv").read_text()
    (parts / "b.csv").write_text(text)
    (parts / "a.csv").write_text(text)
    with gzip.open(parts / "a.csv.gz", "wt") as f:
        f.write(text)
    _edited(fuxi, lambda d, m: d["tiny_csv"].update(train_data=train_data, valid_data=None,
                                                     test_data=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FuxiCTRWarning)
        files = _import(fuxi).experiment["data"]["files"]
    want = {"./data/parts": ["a.csv", "b.csv"], "./data/parts/*.csv": ["a.csv", "b.csv"],
            "./data/parts/a.csv.gz": ["a.csv.gz"]}[train_data]
    assert [Path(f).name for f in files] == want


@pytest.mark.parametrize("train_data, match", [
    ("./data/none/*.csv", "the pattern matches no file"),
    ("./data", "is a folder without \\*.parquet files"),
    ("./data/train.csv", "'train.csv' is named as a csv file"),
])
def test_train_data_that_names_no_file_of_the_format_says_which(fuxi, train_data, match):
    _edited(fuxi, lambda d, m: d["tiny_csv"].update(
        train_data=train_data, valid_data=None, test_data=None,
        data_format="parquet" if "none" not in train_data else "csv"))
    with pytest.raises(ConfigError, match=match):
        _import(fuxi)


def test_the_documented_fuxictr_section_loads_as_written():
    # Its domain values must reach the data as the strings the pid column holds.
    import re
    doc = (Path(__file__).resolve().parents[1] / "docs" / "fuxictr.md").read_text()
    line = re.search(r"^  domain: (\{.*\})$", doc, re.M).group(1)
    domain = yaml.safe_load(line)
    assert domain["source"] == ["430548_1007", "430549_1007"]
    assert domain["target"] == "430539_1007"
