"""The data pipeline on small files written by each test: config checks, vocabulary, splits,
bucketing, cache, every bad input, and batching."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from autoft_fast.data import (
    SPLIT_NAMES, DataConfig, DataError, FeatureMap, TensorData, cache_key, iterate_batches,
    load_data_config, prepare_data,
)
from autoft_fast.data import pipeline


def make_frame(n_source: int = 400, n_target: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_source + n_target
    dom = np.array(["s1", "s2"] * (n_source // 2) + ["t"] * n_target)
    return pd.DataFrame({
        "click": rng.integers(0, 2, n),
        "dom": dom,
        "user": rng.choice(["u0", "u1", "u2", "u3"], n),
        "item": rng.integers(0, 6, n).astype(str),
        "price": np.round(rng.lognormal(2.0, 1.0, n), 2),
        "age": rng.integers(18, 70, n).astype(float),
        "tags": ["|".join(rng.choice(list("abcde"), k, replace=False)) for k in rng.integers(0, 4, n)],
        "ts": np.arange(n)[::-1] * 10,  # reversed so that a time split differs from file order
    })


def base_dict(**over) -> dict:
    d = {
        "files": ["data.csv"],
        "label": "click",
        "categorical": ["user", "item"],
        "numeric": ["price", {"name": "age", "mode": "dense"}],
        "multihot": [{"name": "tags", "sep": "|", "max_len": 3}],
        "domain": {"column": "dom", "source": ["s1", "s2"], "target": "t"},
        "split": {"target": {"valid": 0.2, "test": 0.3, "seed": 1}, "source": {"valid": 0.1, "seed": 1}},
        "min_count": 1,
        "num_buckets": 4,
        "cache": False,
    }
    d.update(over)
    return d


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def prepare(tmp_path: Path, frame: pd.DataFrame | None = None, **over):
    write(tmp_path, make_frame() if frame is None else frame)
    return prepare_data(DataConfig.from_dict(base_dict(**over), tmp_path))


# ---------------------------------------------------------------------------- config
def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(DataError, match="unknown key 'lable' in data"):
        DataConfig.from_dict(base_dict(lable="x"), tmp_path)
    d = base_dict()
    d["split"]["target"]["vaild"] = 0.1
    with pytest.raises(DataError, match="unknown key 'vaild' in data.split.target"):
        DataConfig.from_dict(d, tmp_path)
    d = base_dict(multihot=[{"name": "tags", "maxlen": 3}])
    with pytest.raises(DataError, match="unknown key 'maxlen'"):
        DataConfig.from_dict(d, tmp_path)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"min_count": 0}, "data.min_count"),
        ({"on_bad_rows": "ignore"}, "data.on_bad_rows"),
        ({"split": {"target": {"valid": 0.5, "test": 0.5}}}, "valid .* test"),
        ({"split": {"target": {"method": "time"}}}, "time_column"),
        ({"split": {"source": {"valid": 0}}}, "data.split.source.valid"),
        ({"numeric": [{"name": "price", "mode": "log"}]}, "mode must be one of"),
        ({"categorical": ["user", "click"]}, "column 'click' is used twice"),
        ({"domain": {"column": "dom", "source": ["s1"], "target": "s1"}}, "also listed"),
        ({"files": ["data.xlsx"]}, "cannot tell the format"),
        ({"categorical": [], "numeric": [], "multihot": []}, "no feature columns"),
    ],
)
def test_bad_config_values(tmp_path, over, message):
    with pytest.raises(DataError, match=message):
        DataConfig.from_dict(base_dict(**over), tmp_path)


def test_missing_required_key(tmp_path):
    d = base_dict()
    del d["label"]
    with pytest.raises(DataError, match="required key 'label'"):
        DataConfig.from_dict(d, tmp_path)


def test_config_round_trip_and_yaml_forms(tmp_path):
    cfg = DataConfig.from_dict(base_dict(), tmp_path)
    assert DataConfig.from_dict(cfg.to_dict(), Path("/elsewhere")) == cfg
    assert cfg.files == (tmp_path / "data.csv",)
    # Integer domain values in YAML are compared as text, as the column is read.
    assert DataConfig.from_dict(base_dict(domain={"column": "d", "source": [1], "target": 2}), tmp_path).source_domains == ("1",)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"data": base_dict(), "model": {}}))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(base_dict()))
    assert load_data_config(tmp_path / "exp.yaml") == cfg == load_data_config(tmp_path / "data.yaml")
    # The usual experiment form, data: naming a dataset YAML (relative to the experiment).
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "exp2.yaml").write_text(yaml.safe_dump({"data": "../data.yaml",
                                                               "model": {}}))
    assert load_data_config(tmp_path / "sub" / "exp2.yaml") == cfg
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump({"synthetic": {}, "model": {}}))
    with pytest.raises(DataError, match="whose data are generated .*load_config"):
        load_data_config(tmp_path / "gen.yaml")


# ---------------------------------------------------------------------------- vocabulary
def test_shapes_splits_and_feature_map(tmp_path):
    b = prepare(tmp_path)
    fm = b.feature_map
    assert fm.single_fields == ["user", "item", "price"]
    assert fm.multihot_fields == ["tags"] and fm.multihot_max_len == 3
    assert fm.dense_fields == ["age"]
    assert fm.domain_values == ["s1", "s2", "t"]
    assert [f.kind for f in fm.fields] == ["categorical", "categorical", "numeric_bucket", "multihot"]
    assert fm.num_rows == sum(f.vocab_size for f in fm.fields)
    assert FeatureMap.from_dict(fm.to_dict()) == fm
    sizes = {k: len(v) for k, v in b.splits.items()}
    assert sizes == {"source_train": 360, "source_valid": 40, "target_train": 100, "target_valid": 40, "target_test": 60}
    for name, d in b.splits.items():
        # ids are int32 whenever the table has fewer than 2^31 rows
        assert d.sparse.dtype == torch.int32 and d.sparse.shape == (len(d), 3)
        assert d.multihot.dtype == torch.int32 and d.multihot.shape == (len(d), 1, 3)
        assert d.dense.shape == (len(d), 1)
        assert set(d.label.unique().tolist()) <= {0.0, 1.0}
        want = {2} if name.startswith("target") else {0, 1}
        assert set(d.domain.unique().tolist()) == want
        # every id lies in its own field's range, and PAD never appears in single fields
        for j, f in enumerate(fm.single_fields):
            info = fm.field(f)
            col = d.sparse[:, j]
            assert (col > info.pad_id).all() and (col <= info.oov_id).all()


def _source_train_rows(n_source: int, valid: float, seed: int) -> set[int]:
    # The pipeline's rule: a seeded permutation of the source rows, the first `valid` part
    # goes to source_valid (rows of make_frame: sources first, in file order).
    perm = np.random.default_rng(seed).permutation(n_source)
    return set(perm[int(round(valid * n_source)):].tolist())


def test_vocabulary_pad_oov_min_count_and_train_only(tmp_path):
    n_s, n_t = 400, 200
    frame = make_frame(n_s, n_t)
    train = _source_train_rows(n_s, 0.1, 1)
    in_train = sorted(train)
    frame["user"] = "common"
    frame.loc[in_train[0], "user"] = "once"              # rarer than min_count=2 -> OOV
    frame.loc[in_train[1:3], "user"] = "twice"           # exactly min_count -> kept
    b = prepare(tmp_path, frame, min_count=2)
    vocab = b.vocabularies["user"]
    assert vocab == ["common", "twice"]                   # most frequent first
    user = b.feature_map.field("user")
    assert user.vocab_size == 4 and user.oov_id == user.offset + 3
    src = b.splits["source_train"].sparse[:, 0]
    assert int((src == user.offset + 1).sum()) == len(train) - 3
    assert int((src == user.offset + 2).sum()) == 2
    assert int((src == user.oov_id).sum()) == 1
    assert not (src == user.pad_id).any()


def test_values_only_outside_training_rows_are_oov(tmp_path):
    frame = make_frame()
    b0 = prepare(tmp_path, frame)
    # Find which target rows went to test with this seed, then give them an unseen item.
    tgt_rows = np.flatnonzero(frame["dom"].to_numpy() == "t")
    perm = np.random.default_rng(1).permutation(len(tgt_rows))
    test_rows = tgt_rows[perm[: len(b0.splits["target_test"])]]
    frame.loc[test_rows, "item"] = "only_in_test"
    b = prepare(tmp_path, frame)
    assert "only_in_test" not in b.vocabularies["item"]
    item = b.feature_map.field("item")
    assert (b.splits["target_test"].sparse[:, 1] == item.oov_id).all()
    assert not (b.splits["target_train"].sparse[:, 1] == item.oov_id).any()


def test_source_and_target_share_ids(tmp_path):
    frame = make_frame()
    b = prepare(tmp_path, frame)
    fm = b.feature_map
    user = fm.field("user")
    for split in ("source_train", "target_train"):
        d = b.splits[split]
        ids = d.sparse[:, 0]
        assert set(ids.tolist()) == {user.offset + 1 + i for i in range(4)}
    # the same value has the same global id whichever domain it comes from
    vocab = b.vocabularies["user"]
    src_ids = b.splits["source_train"].sparse[:, 0]
    tgt_ids = b.splits["target_train"].sparse[:, 0]
    for i, v in enumerate(vocab):
        assert (src_ids == user.offset + 1 + i).any() and (tgt_ids == user.offset + 1 + i).any()


def test_multihot_padding_truncation_and_empty_tokens(tmp_path):
    frame = make_frame()
    frame.loc[:, "tags"] = "a|b"
    frame.loc[0, "tags"] = "a|b|c|d|e"     # more than max_len = 3
    frame.loc[1, "tags"] = ""               # no tags
    frame.loc[2, "tags"] = "a||b"           # an empty token is dropped
    b = prepare(tmp_path, frame, split={"target": {"valid": 0.2, "test": 0.3}, "source": {"valid": 0.01, "seed": 5}})
    assert {0, 1, 2} <= _source_train_rows(400, 0.01, 5)  # so they are the first rows of source_train
    tags = b.feature_map.field("tags")
    assert b.stats["multihot_rows_truncated"]["tags"] == 1
    src = b.splits["source_train"]
    # rows 0..2 are source rows; find them by their first-file order within source_train
    m = src.multihot[:, 0, :]
    a, bb = tags.offset + 1 + b.vocabularies["tags"].index("a"), tags.offset + 1 + b.vocabularies["tags"].index("b")
    first_rows = m[:3].tolist()
    assert first_rows[0][:2] == [a, bb] and first_rows[0][2] != tags.pad_id
    assert first_rows[1] == [tags.pad_id] * 3
    assert first_rows[2] == [a, bb, tags.pad_id]
    assert b.feature_map.multihot_pad_ids().tolist() == [tags.pad_id]


def test_numeric_buckets_are_train_quantiles(tmp_path):
    frame = make_frame()
    rng = np.random.default_rng(3)
    frame["price"] = rng.permutation(len(frame)).astype(float)  # distinct: equal-mass buckets
    frame.loc[5, "price"] = np.nan
    frame["age"] = frame["price"]  # the same values as a dense column, to read them back
    b = prepare(tmp_path, frame)
    price = b.feature_map.field("price")
    edges = np.asarray(b.feature_map.extra["bucket_edges"]["price"])
    assert len(edges) == 3 and price.vocab_size == len(edges) + 4  # PAD, missing, 4 buckets, OOV
    train = torch.cat([b.splits["source_train"].sparse[:, 2], b.splits["target_train"].sparse[:, 2]]) - price.offset
    counts = torch.bincount(train, minlength=price.vocab_size).tolist()
    assert counts[0] == 0 and counts[1] == 1 and counts[-1] == 0  # no PAD, one missing, no OOV
    assert max(counts[2:6]) - min(counts[2:6]) <= 2                # quantiles of the train rows
    mean, std = b.feature_map.extra["dense_mean_std"]["age"]
    for d in b.splits.values():
        ids = (d.sparse[:, 2] - price.offset).numpy()
        value = d.dense[:, 0].double().numpy() * std + mean
        present = ids != 1
        # bucket = number of edges <= value, so larger values never get lower ids
        assert np.array_equal(ids[present], np.searchsorted(edges, np.round(value[present]), side="right") + 2)
    train_vals = np.sort(frame["price"].to_numpy())  # edges lie inside the data range
    assert train_vals[0] < edges[0] < edges[-1] < np.nanmax(train_vals)


def test_dense_values_are_standardised_on_train_rows(tmp_path):
    b = prepare(tmp_path)
    train = torch.cat([b.splits["source_train"].dense, b.splits["target_train"].dense])
    assert abs(float(train.mean())) < 1e-5
    assert abs(float(train.std(unbiased=False)) - 1.0) < 1e-4


def test_parquet_gives_the_same_tensors_as_csv(tmp_path):
    frame = make_frame()
    b_csv = prepare(tmp_path, frame)
    write(tmp_path, frame, "data.parquet")
    b_pq = prepare_data(DataConfig.from_dict(base_dict(files=["data.parquet"]), tmp_path))
    assert b_csv.feature_map == b_pq.feature_map
    for name in SPLIT_NAMES:
        for k, v in b_csv.splits[name].to_dict().items():
            assert torch.equal(v, b_pq.splits[name].to_dict()[k]), (name, k)


def test_several_files_are_concatenated(tmp_path):
    frame = make_frame()
    write(tmp_path, frame.iloc[:300], "a.csv")
    write(tmp_path, frame.iloc[300:], "b.csv")
    write(tmp_path, frame, "data.csv")
    one = prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    two = prepare_data(DataConfig.from_dict(base_dict(files=["a.csv", "b.csv"]), tmp_path))
    for name in SPLIT_NAMES:
        assert torch.equal(one.splits[name].sparse, two.splits[name].sparse)


# ---------------------------------------------------------------------------- splits
@pytest.mark.parametrize("method", ["random", "time"])
def test_splits_partition_the_rows(tmp_path, method):
    frame = make_frame()
    frame["age"] = np.arange(len(frame), dtype=float)  # the row number, read back from dense
    split = {"target": {"method": method, "valid": 0.2, "test": 0.3}, "source": {"valid": 0.1}}
    if method == "time":
        split["target"]["time_column"] = "ts"
    b = prepare(tmp_path, frame, split=split)
    mean, std = b.feature_map.extra["dense_mean_std"]["age"]
    rows = {k: np.round(d.dense[:, 0].double().numpy() * std + mean).astype(int) for k, d in b.splits.items()}
    every = np.concatenate(list(rows.values()))
    assert sorted(every.tolist()) == list(range(len(frame)))  # each row in exactly one split
    assert (rows["source_train"] < 400).all() and (rows["target_test"] >= 400).all()


def test_tsv_files_are_tab_separated(tmp_path):
    frame = make_frame()
    frame.to_csv(tmp_path / "data.tsv", sep="\t", index=False)
    write(tmp_path, frame)
    a = prepare_data(DataConfig.from_dict(base_dict(files=["data.tsv"]), tmp_path))
    b = prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    assert torch.equal(a.splits["target_test"].sparse, b.splits["target_test"].sparse)


def test_random_split_is_seeded(tmp_path):
    a = prepare(tmp_path)
    b = prepare(tmp_path)
    c = prepare(tmp_path, split={"target": {"valid": 0.2, "test": 0.3, "seed": 2}, "source": {"valid": 0.1, "seed": 1}})
    assert torch.equal(a.splits["target_test"].dense, b.splits["target_test"].dense)
    assert not torch.equal(a.splits["target_test"].dense, c.splits["target_test"].dense)


@pytest.mark.parametrize("as_dates", [False, True])
def test_time_split_orders_target_rows(tmp_path, as_dates):
    frame = make_frame()
    frame["age"] = frame["ts"].astype(float)  # carry the time into a dense column we can read back
    if as_dates:
        frame["ts"] = pd.to_datetime(frame["ts"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    split = {"target": {"method": "time", "time_column": "ts", "valid": 0.2, "test": 0.3}}
    b = prepare(tmp_path, frame, split=split)
    mean, std = b.feature_map.extra["dense_mean_std"]["age"]
    times = {k: b.splits[k].dense[:, 0].double() * std + mean for k in ("target_train", "target_valid", "target_test")}
    assert times["target_train"].max() < times["target_valid"].min()
    assert times["target_valid"].max() < times["target_test"].min()
    assert [len(times[k]) for k in times] == [100, 40, 60]


# ---------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        prepare_data(DataConfig.from_dict(base_dict(files=["nothere.csv"]), tmp_path))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_is_named(tmp_path, fmt):
    frame = make_frame().rename(columns={"price": "Price"})
    write(tmp_path, frame, f"data.{fmt}")
    cfg = DataConfig.from_dict(base_dict(files=[f"data.{fmt}"]), tmp_path)
    with pytest.raises(DataError, match=r"column 'price' \(numeric\) not found in data.%s; did you mean 'Price'" % fmt):
        prepare_data(cfg)


@pytest.mark.parametrize("role", ["source", "target"])
def test_domain_value_with_no_rows(tmp_path, role):
    dom = {"column": "dom", "source": ["s1", "s2"], "target": "t"}
    if role == "source":
        dom["source"] = ["s1", "s9"]
    else:
        dom["target"] = "T"
    with pytest.raises(DataError, match=f"{role} domain value '{dom['source'][1] if role == 'source' else 'T'}' matches no rows of column 'dom'"):
        prepare(tmp_path, domain=dom)


def test_a_misspelled_domain_value_gets_a_suggestion(tmp_path):
    dom = {"column": "dom", "source": ["s1", "s2"], "target": "tt"}
    with pytest.raises(DataError, match="target domain value 'tt' matches no rows of column "
                                        "'dom'; .*; did you mean 't'"):
        prepare(tmp_path, domain=dom)


def test_a_domain_number_spelled_otherwise_in_the_column_gets_its_spelling(tmp_path):
    # The column holds '1.0' and '2.5'; `target: 1` is the same number, spelled otherwise.
    frame = make_frame()
    frame["dom"] = frame["dom"].map({"s1": "2.5", "s2": "s2", "t": "1.0"})
    dom = yaml.safe_load("{column: dom, source: ['2.5', s2], target: 1}")
    with pytest.raises(DataError, match="target domain value '1' matches no rows.*the column "
                                        "spells that number '1.0'.*write '1.0' \\(quoted\\)") as e:
        prepare(tmp_path, frame, domain=dom)
    assert "e.g. '010'" not in str(e.value)  # not the advice for 010 read as 8
    dom["target"] = "1.0"
    assert len(prepare(tmp_path, frame, domain=dom).splits["target_test"]) > 0


def test_a_domain_value_differing_only_in_unicode_normalization_is_shown_encoded(tmp_path):
    import unicodedata
    frame = make_frame()
    nfd = unicodedata.normalize("NFD", "café")  # e + combining accent, as macOS writes it
    frame["dom"] = frame["dom"].replace({"t": nfd})
    with pytest.raises(DataError, match=r"target domain value 'café' matches no rows.*differs "
                                        r"from it only in how its accented letters are encoded"
                                        r".*'cafe\\u0301', the YAML 'caf\\xe9'") as e:
        prepare(tmp_path, frame, domain={"column": "dom", "source": ["s1", "s2"],
                                         "target": unicodedata.normalize("NFC", "café")})
    assert "did you mean" not in str(e.value)
    with pytest.raises(DataError) as e:  # a case difference is no encoding difference
        prepare(tmp_path, frame.assign(dom=frame["dom"].replace({nfd: "T"})),
                domain={"column": "dom", "source": ["s1", "s2"], "target": "t"})
    assert "encoded" not in str(e.value)


def test_a_yaml_number_as_domain_value_gets_the_quoting_hint(tmp_path):
    # YAML reads `target: 010` as 8: the hint says to quote it.
    dom = yaml.safe_load("{column: dom, source: [s1, s2], target: 010}")
    assert dom["target"] == 8
    with pytest.raises(DataError, match="target domain value '8' matches no rows.*quote it in "
                                        "the YAML, e.g. '010'"):
        prepare(tmp_path, domain=dom)
    with pytest.raises(DataError) as e:  # a name gets no such hint
        prepare(tmp_path, domain={"column": "dom", "source": ["s1", "s9"], "target": "t"})
    assert "quote" not in str(e.value)


def test_rows_of_other_domains_are_dropped(tmp_path):
    b = prepare(tmp_path, domain={"column": "dom", "source": ["s1"], "target": "t"})
    assert b.stats["rows_other_domains"] == 200
    assert sum(len(d) for d in b.splits.values()) == 400


def test_empty_split(tmp_path):
    frame = make_frame(400, 3)
    with pytest.raises(DataError, match="split 'target_valid' is empty: the target domain 't' has 3 rows"):
        prepare(tmp_path, frame, split={"target": {"valid": 0.1, "test": 0.3}})


def test_label_not_zero_one(tmp_path):
    frame = make_frame()
    frame.loc[[3, 7, 9], "click"] = 2
    with pytest.raises(DataError, match=r"label column 'click' must hold 0 or 1, but 3 rows hold other values \(e.g. '2'"):
        prepare(tmp_path, frame)


def _bad_frame() -> pd.DataFrame:
    frame = make_frame()
    frame["click"] = frame["click"].astype(object)
    frame["price"] = frame["price"].astype(object)
    frame.loc[4, "click"] = "yes"
    frame.loc[5, "click"] = None
    frame.loc[[6, 8], "price"] = "cheap"
    frame.loc[10, "price"] = "NA"  # missing, not bad
    return frame


def test_bad_rows_fail_with_counts(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(tmp_path, _bad_frame(), on_bad_rows="fail")
    msg = str(err.value)
    assert "2 rows with label 'click' missing or not a number" in msg
    assert "2 rows with numeric column 'price' not a number (e.g. 'cheap'" in msg
    assert "on_bad_rows: skip" in msg


def test_bad_rows_skip_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="skipping bad rows: 2 rows with label"):
        b = prepare(tmp_path, _bad_frame(), on_bad_rows="skip")
    assert b.stats["bad_rows_skipped"] == 4
    assert sum(len(d) for d in b.splits.values()) == 600 - 4
    price = b.feature_map.field("price")
    missing = torch.cat([d.sparse[:, 2] for d in b.splits.values()]) == price.offset + 1
    assert int(missing.sum()) == 1  # the "NA"


def test_malformed_csv_lines(tmp_path):
    frame = make_frame()
    path = write(tmp_path, frame)
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ",extra,fields"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig.from_dict(base_dict(), tmp_path)
    with pytest.raises(DataError, match="1 malformed CSV lines"):
        prepare_data(cfg)
    cfg = DataConfig.from_dict(base_dict(on_bad_rows="skip"), tmp_path)
    with pytest.warns(UserWarning, match="1 malformed CSV lines"):
        b = prepare_data(cfg)
    assert sum(len(d) for d in b.splits.values()) == 599


def test_time_split_with_unparseable_time(tmp_path):
    frame = make_frame()
    frame["ts"] = frame["ts"].astype(object)
    frame.loc[len(frame) - 1, "ts"] = "soon"   # a target row
    frame.loc[0, "ts"] = "whenever"            # a source row: not used by the time split
    split = {"target": {"method": "time", "time_column": "ts"}}
    with pytest.raises(DataError, match=r"1 rows with time column 'ts' missing or unparseable"):
        prepare(tmp_path, frame, split=split)


# ---------------------------------------------------------------------------- cache
def test_cache_hit_skips_preprocessing(tmp_path, monkeypatch):
    write(tmp_path, make_frame())
    cfg = DataConfig.from_dict(base_dict(cache=True), tmp_path)
    first = prepare_data(cfg)
    files = list((tmp_path / ".autoft_cache").iterdir())
    # one complete cache folder, no temp folder left behind
    assert len(files) == 1 and files[0].name == f"data-{cache_key(cfg)[:20]}" and files[0].is_dir()
    assert (files[0] / "meta.json").is_file() and (files[0] / "target_test" / "sparse.npy").is_file()

    def boom(*a, **k):
        raise AssertionError("preprocessing ran on a cache hit")

    monkeypatch.setattr(pipeline, "_preprocess", boom)
    second = prepare_data(cfg)
    assert second.feature_map == first.feature_map
    for name in SPLIT_NAMES:
        for k, v in first.splits[name].to_dict().items():
            assert torch.equal(v, second.splits[name].to_dict()[k])


def test_cache_key_follows_content_and_config(tmp_path):
    frame = make_frame()
    path = write(tmp_path, frame)
    cfg = DataConfig.from_dict(base_dict(), tmp_path)
    k1 = cache_key(cfg)
    os.utime(path, (1, 1))  # touching a file does not change the key
    assert cache_key(cfg) == k1
    assert cache_key(DataConfig.from_dict(base_dict(min_count=2), tmp_path)) != k1
    frame.loc[0, "user"] = "u9"
    write(tmp_path, frame)
    assert cache_key(cfg) != k1


def test_edited_file_is_preprocessed_again_and_bad_cache_rebuilt(tmp_path, monkeypatch):
    frame = make_frame()
    write(tmp_path, frame)
    cfg = DataConfig.from_dict(base_dict(cache=True), tmp_path)
    prepare_data(cfg)
    calls = []
    real = pipeline._preprocess
    monkeypatch.setattr(pipeline, "_preprocess", lambda *a: calls.append(1) or real(*a))
    frame.loc[0, "user"] = "brand_new"
    write(tmp_path, frame)
    prepare_data(cfg)
    assert calls == [1]
    cache_file = tmp_path / ".autoft_cache" / f"data-{cache_key(cfg)[:20]}" / "meta.json"
    cache_file.write_bytes(b"not a json file")
    with pytest.warns(UserWarning, match="ignoring unreadable data cache"):
        prepare_data(cfg)
    assert calls == [1, 1]
    prepare_data(cfg)
    assert calls == [1, 1]


def test_unwritable_cache_is_a_warning(tmp_path):
    write(tmp_path, make_frame())
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    cfg = DataConfig.from_dict(base_dict(cache=True, cache_dir="blocker"), tmp_path)
    with pytest.warns(UserWarning, match="could not write the data cache"):
        b = prepare_data(cfg)
    assert len(b.splits["target_test"]) == 60


# ---------------------------------------------------------------------------- batches
def _toy(n: int) -> TensorData:
    return TensorData(
        sparse=torch.arange(n).repeat(2, 1).T.contiguous(),
        multihot=torch.arange(n).view(n, 1, 1).expand(n, 1, 2).contiguous(),
        dense=None,
        label=(torch.arange(n) % 2).float(),
        domain=torch.zeros(n, dtype=torch.long),
    )


@pytest.mark.parametrize("n, bs", [(10, 3), (4096 * 2 + 5, 4096), (1, 4), (0, 4)])
def test_shuffled_batches_cover_every_row_once(n, bs):
    data = _toy(n)
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(data, bs, shuffle=True, generator=g))
    assert [len(b) for b in batches] == [min(bs, n - i) for i in range(0, n, bs)]
    seen = torch.cat([b.sparse[:, 0] for b in batches]) if batches else torch.zeros(0, dtype=torch.long)
    assert sorted(seen.tolist()) == list(range(n))
    for b in batches:  # rows stay whole: every tensor was cut with the same index
        assert torch.equal(b.sparse[:, 1], b.sparse[:, 0]) and torch.equal(b.multihot[:, 0, 0], b.sparse[:, 0])
        assert torch.equal(b.label, (b.sparse[:, 0] % 2).float())
    if n > bs:
        again = list(iterate_batches(data, bs, shuffle=True, generator=torch.Generator().manual_seed(0)))
        assert torch.equal(again[0].sparse, batches[0].sparse)
        assert not torch.equal(batches[0].sparse[:, 0], torch.arange(bs))


@pytest.mark.parametrize("n, bs, drop_last, min_last", [
    (100, 7, False, 1), (100, 7, True, 1), (100, 7, False, 5), (28, 7, False, 1), (3, 7, False, 1)])
def test_shuffled_batches_are_gathered_a_chunk_at_a_time_in_the_permutation_order(
        monkeypatch, n, bs, drop_last, min_last):
    # The oracle: the whole split gathered in the permutation's order, then cut into batches.
    # Gathered a chunk of whole batches at a time (here 3 batches), the batches are the same
    # rows in the same order, and no batch holds more than its chunk's copy.
    from autoft_fast.data import tensors
    monkeypatch.setattr(tensors, "GATHER_ROWS", 3 * bs)
    data = _toy(n)
    got = list(iterate_batches(data, bs, shuffle=True, generator=torch.Generator().manual_seed(4),
                               drop_last=drop_last, min_last=min_last))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    whole = data.index(perm)
    stop = n - n % bs if drop_last else n
    starts = list(range(0, stop, bs))
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()
    ends = [min(s + bs, n) for s in starts[:-1]] + ([stop] if starts else [])
    want = [whole.slice(s, e) for s, e in zip(starts, ends)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.sparse, b.sparse) and torch.equal(a.label, b.label)
        assert a.label.untyped_storage().nbytes() <= 4 * (3 * bs + bs)  # a chunk, not the split


def test_unshuffled_batches_are_in_order_and_drop_last():
    data = _toy(10)
    got = [b.sparse[:, 0].tolist() for b in iterate_batches(data, 4, shuffle=False)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(iterate_batches(data, 4, shuffle=False, drop_last=True))) == 2
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(data, 0, shuffle=False))


def test_a_short_last_batch_joins_the_one_before_it_with_min_last():
    data = _toy(10)
    got = [b.sparse[:, 0].tolist() for b in iterate_batches(data, 4, shuffle=False, min_last=3)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    got = [len(b) for b in iterate_batches(data, 4, shuffle=False, min_last=2)]
    assert got == [4, 4, 2]  # a last batch of 2 rows is long enough
    assert [len(b) for b in iterate_batches(_toy(3), 4, shuffle=False, min_last=5)] == [3]
    shuffled = list(iterate_batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(0),
                                    min_last=2))
    assert [len(b) for b in shuffled] == [3, 3, 4]
    assert sorted(torch.cat([b.sparse[:, 0] for b in shuffled]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="min_last"):
        list(iterate_batches(data, 4, shuffle=False, min_last=0))


def test_tensor_data_helpers():
    data = _toy(6)
    data.domain[3:] = 1
    assert data.select_domain(1).sparse[:, 0].tolist() == [3, 4, 5]
    assert len(data.index(torch.tensor([0, 0, 5]))) == 3
    with pytest.raises(ValueError, match="rows"):
        TensorData(torch.zeros(3, 1, dtype=torch.long), None, None, torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_id_dtype_is_int32_until_the_table_needs_int64():
    from autoft_fast.data.store import id_dtype

    assert id_dtype(1) == np.int32 and id_dtype(2**31 - 1) == np.int32
    assert id_dtype(2**31) == np.int64


def test_a_float_categorical_has_one_text_form_across_files_and_at_predict(tmp_path):
    from autoft_fast.data.encode import RowEncoder
    frame = make_frame()
    frame["item"] = np.array([1.0, 2.0, 3.0, 2.5])[np.arange(len(frame)) % 4]
    # 2.5 only in the first file: the second file alone is integral.
    half = len(frame) // 2
    a, b = frame.iloc[:half].copy(), frame.iloc[half:].copy()
    b["item"] = np.where(b["item"] == 2.5, 3.0, b["item"])
    a.to_parquet(tmp_path / "a.parquet", index=False)
    b.to_parquet(tmp_path / "b.parquet", index=False)
    bundle = prepare_data(DataConfig.from_dict(base_dict(files=["a.parquet", "b.parquet"]),
                                               tmp_path))
    assert sorted(bundle.vocabularies["item"]) == ["1.0", "2.0", "2.5", "3.0"]
    assert bundle.feature_map.extra["float_text_integral"] == {"item": False}
    enc = RowEncoder(DataConfig.from_dict(base_dict(files=["a.parquet"]), tmp_path),
                     bundle.feature_map, bundle.vocabularies)
    # New rows whose floats happen to be integral: the training form, not the unknown value.
    rows = b.head(8).reset_index(drop=True)
    oov = bundle.feature_map.fields[1].vocab_size - 1 + bundle.feature_map.fields[1].offset
    got = enc.encode(rows).sparse[:, 1]
    assert not bool((got == oov).any())
    texted = rows.assign(item=rows["item"].map(lambda v: f"{v:.1f}"))
    assert torch.equal(enc.encode(texted).sparse, enc.encode(rows).sparse)
    # A pandas categorical with a missing value (a Parquet dictionary column) encodes too.
    cat = rows.assign(user=pd.Categorical(rows["user"].where(rows.index != 3)))
    plain = rows.assign(user=rows["user"].where(rows.index != 3))
    assert torch.equal(enc.encode(cat).sparse, enc.encode(plain).sparse)


def test_a_boolean_numeric_column_reads_as_0_and_1_from_parquet_csv_and_at_predict(tmp_path):
    from autoft_fast.data.encode import RowEncoder
    rng = np.random.default_rng(4)
    frame = make_frame()
    flags = rng.integers(0, 2, len(frame)).astype(bool)
    as_bool, as_int = frame.assign(age=flags, price=~flags), frame.assign(age=flags.astype(int),
                                                                             price=(~flags).astype(int))
    as_bool.to_parquet(tmp_path / "b.parquet", index=False)  # a Parquet boolean column
    as_bool.to_csv(tmp_path / "b.csv", index=False)           # ... written as True / False
    as_int.to_csv(tmp_path / "i.csv", index=False)
    got = {f: prepare_data(DataConfig.from_dict(base_dict(files=[f]), tmp_path))
           for f in ("b.parquet", "b.csv", "i.csv")}
    for f in ("b.parquet", "b.csv"):  # age dense, price bucketed: both as from 0 / 1
        for name in SPLIT_NAMES:
            assert torch.equal(got[f].splits[name].dense, got["i.csv"].splits[name].dense), (f, name)
            assert torch.equal(got[f].splits[name].sparse, got["i.csv"].splits[name].sparse), (f, name)
    bundle = got["b.parquet"]
    enc = RowEncoder(DataConfig.from_dict(base_dict(files=["b.parquet"]), tmp_path),
                     bundle.feature_map, bundle.vocabularies)
    rows = as_bool.head(20).reset_index(drop=True)
    ints = as_int.head(20).reset_index(drop=True)
    assert torch.equal(enc.encode(rows).dense, enc.encode(ints).dense)
    assert enc.encode(rows).dense.std() > 0.5


def test_a_numeric_column_meeting_zero_padded_values_is_warned_about(tmp_path):
    from autoft_fast.data.encode import RowEncoder
    frame = make_frame()
    frame["item"] = frame["item"].map(lambda v: f"00{v}")
    write(tmp_path, frame)
    cfg = DataConfig.from_dict(base_dict(), tmp_path)
    bundle = prepare_data(cfg)
    enc = RowEncoder(cfg, bundle.feature_map, bundle.vocabularies)
    rows = frame.head(5).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(rows)  # text: nothing to say
    numeric = rows.assign(item=rows["item"].astype(int))
    with pytest.warns(UserWarning, match=r"column 'item' of the new rows holds numbers \(int64\)"
                                         r".*leading zeros \(e.g. '00"):
        enc.encode(numeric)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(numeric)  # once per column


def test_a_file_without_a_header_line_is_named_as_such(tmp_path):
    frame = make_frame()
    (tmp_path / "data.csv").write_text(frame.to_csv(index=False, header=False).replace(
        ",", ",,", 3))
    with pytest.raises(DataError, match="column 'click' .* not found .* seems to have no header"):
        prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    write(tmp_path, frame.rename(columns={"click": "clicked"}))
    with pytest.raises(DataError) as e:  # a real header that lacks a column: no such hint
        prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    assert "did you mean 'clicked'" in str(e.value) and "no header" not in str(e.value)


def test_a_file_listed_twice_is_an_error_and_a_copy_a_warning(tmp_path):
    # Both used to be read twice: every row duplicated, in train and in test.
    write(tmp_path, make_frame())
    with pytest.raises(DataError, match=r"data.files lists one file twice: .*data.csv' and "
                                        r"'.*data.csv' are both '.*data.csv'; its rows would be "
                                        r"read twice"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.csv", "./data.csv"]), tmp_path))
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "data.csv", tmp_path / "sub" / "link.csv")
    with pytest.raises(DataError, match="lists one file twice"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.csv", "sub/link.csv"]), tmp_path))
    write(tmp_path, make_frame(), "copy.csv")
    with pytest.warns(UserWarning, match=r"data.files: '.*data.csv' and '.*copy.csv' have the "
                                         r"same content"):
        bundle = prepare_data(DataConfig.from_dict(base_dict(files=["data.csv", "copy.csv"]),
                                                   tmp_path))
    assert bundle.stats["rows_read"] == 2 * len(make_frame())


def test_cache_key_follows_the_format_and_separator_a_file_is_read_with(tmp_path):
    # A CSV renamed .parquet (or .csv -> .tsv) trained from the old cache entry.
    write(tmp_path, make_frame())
    prepare_data(DataConfig.from_dict(base_dict(cache=True), tmp_path))  # the CSV's entry
    k_csv = cache_key(DataConfig.from_dict(base_dict(), tmp_path))
    (tmp_path / "data.csv").rename(tmp_path / "data.tsv")
    k_tsv = cache_key(DataConfig.from_dict(base_dict(files=["data.tsv"]), tmp_path))
    (tmp_path / "data.tsv").rename(tmp_path / "data.parquet")
    k_pq = cache_key(DataConfig.from_dict(base_dict(files=["data.parquet"]), tmp_path))
    (tmp_path / "data.parquet").rename(tmp_path / "data.txt")
    k_txt = cache_key(DataConfig.from_dict(base_dict(files=["data.txt"]), tmp_path))
    assert len({k_csv, k_tsv, k_pq}) == 3
    assert k_txt == k_csv  # .txt is read as .csv is: the same input
    (tmp_path / "data.txt").rename(tmp_path / "data.parquet")
    with pytest.raises(DataError, match="cannot read .*data.parquet as Parquet"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.parquet"], cache=True),
                                          tmp_path))


def test_a_max_len_far_beyond_the_longest_list_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PADDING_WARN_BYTES", 1 << 20)  # the tables here are small
    frame = make_frame()  # tags: at most 3 tokens a row
    with pytest.warns(UserWarning, match="multihot column 'tags': max_len 2,000 pads every row "
                                         ".* the longest list in the data has 3 tokens.*set "
                                         "max_len to 3"):
        b = prepare(tmp_path, frame, multihot=[{"name": "tags", "sep": "|", "max_len": 2000}])
    assert b.splits["target_train"].multihot.shape[2] == 2000  # a warning, nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(tmp_path, frame, multihot=[{"name": "tags", "sep": "|", "max_len": 6}])


def test_parquet_19_digit_ids_with_nulls_keep_every_digit(tmp_path):
    # pandas reads an int64 Parquet column with nulls as float64, which merged all these ids.
    frame = make_frame()
    ids = 1_700_000_000_000_000_000 + np.arange(len(frame)) % 30
    frame["item"] = pd.array(ids, dtype="Int64")
    frame.loc[::20, "item"] = pd.NA
    frame.to_parquet(tmp_path / "ids.parquet", index=False)
    frame.to_csv(tmp_path / "ids.csv", index=False)
    a = prepare_data(DataConfig.from_dict(base_dict(files=["ids.parquet"]), tmp_path))
    b = prepare_data(DataConfig.from_dict(base_dict(files=["ids.csv"]), tmp_path))
    assert len(a.vocabularies["item"]) == 31 and "1700000000000000029" in a.vocabularies["item"]
    assert a.vocabularies["item"] == b.vocabularies["item"]
    for name in SPLIT_NAMES:
        assert torch.equal(a.splits[name].sparse, b.splits[name].sparse)


def test_a_float_parquet_id_column_holding_inf_trains_with_inf_as_a_value(tmp_path):
    frame = make_frame()
    frame["item"] = frame["item"].astype(np.float64)
    frame.loc[5, "item"] = np.inf
    frame.to_parquet(tmp_path / "f.parquet", index=False)  # raised OverflowError
    b = prepare_data(DataConfig.from_dict(base_dict(files=["f.parquet"]), tmp_path))
    assert "inf" in b.vocabularies["item"] and "3" in b.vocabularies["item"]
    assert "3.0" not in b.vocabularies["item"]  # the integral ids keep their integer form


def test_a_null_element_of_a_parquet_list_drops_only_itself(tmp_path):
    frame = make_frame()
    lists = [[t for t in s.split("|") if t] for s in frame["tags"]]
    holed = [x + [None] if i % 3 == 0 else ([None] + x if i % 3 == 1 else x)
             for i, x in enumerate(lists)]
    frame.assign(tags=lists).to_parquet(tmp_path / "clean.parquet", index=False)
    frame.assign(tags=holed).to_parquet(tmp_path / "holed.parquet", index=False)
    a = prepare_data(DataConfig.from_dict(base_dict(files=["clean.parquet"]), tmp_path))
    b = prepare_data(DataConfig.from_dict(base_dict(files=["holed.parquet"]), tmp_path))
    assert a.vocabularies["tags"] == b.vocabularies["tags"]
    for name in SPLIT_NAMES:  # a row with a null element kept its tokens (it lost them all)
        assert torch.equal(a.splits[name].multihot, b.splits[name].multihot), name
    from autoft_fast.data.encode import RowEncoder
    from autoft_fast.train.predict import _as_frame
    import pyarrow as pa
    enc = RowEncoder(DataConfig.from_dict(base_dict(files=["holed.parquet"]), tmp_path),
                     b.feature_map, b.vocabularies)
    rows = frame.head(12).assign(tags=holed[:12])
    batch = pa.RecordBatch.from_pandas(rows, preserve_index=False)
    got = enc.encode(_as_frame(batch, {"tags": "|"}, tmp_path / "holed.parquet"))
    want = enc.encode(frame.head(12).assign(tags=["|".join(x) for x in lists[:12]]))
    assert torch.equal(got.multihot, want.multihot)


def test_multihot_rows_cut_to_max_len_are_counted_in_a_warning(tmp_path, caplog):
    frame = make_frame()  # tags: 0-3 tokens a row
    n_long = int((frame["tags"].str.count(r"\|") >= 1).sum())  # rows of 2 or 3 tokens
    with pytest.warns(UserWarning, match=rf"multihot column 'tags': {n_long:,} of 600 rows hold "
                                         r"more than max_len 1 tokens .*longest list has 3"):
        prepare(tmp_path, frame, multihot=[{"name": "tags", "sep": "|", "max_len": 1}])
    frame["tags"] = np.where(np.arange(len(frame)) == 0, "a|b|c|d", frame["tags"])
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, "autoft_fast.data"):
        warnings.simplefilter("error")  # one row of 600 cut: a log line, no warning
        prepare(tmp_path, frame, multihot=[{"name": "tags", "sep": "|", "max_len": 3}])
    assert "multihot column 'tags': 1 of 600 rows hold more than max_len 3" in caplog.text


def test_a_data_set_of_multi_hot_fields_only_prepares(tmp_path):
    # Its single-valued id table has no columns: writing it raised memoryview's "cannot cast
    # view with zeros in shape or strides" as a traceback.
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({
        "click": rng.integers(0, 2, n), "dom": rng.choice(["s1", "s2", "t"], n),
        "tags": ["|".join(map(str, rng.integers(0, 9, rng.integers(1, 4)))) for _ in range(n)]})
    write(tmp_path, frame)
    cfg = DataConfig.from_dict(base_dict(categorical=[], numeric=[], cache=True), tmp_path)
    bundle = prepare_data(cfg, cache_dir=tmp_path / "cache")
    train = bundle.splits["target_train"]
    assert train.sparse.shape[1] == 0 and train.multihot.shape[0] == len(train.label) > 0
    again = prepare_data(cfg, cache_dir=tmp_path / "cache")  # read back from the cache
    assert torch.equal(again.splits["target_train"].multihot, train.multihot)
