"""What a user's files and configs can get wrong, and what the library then does: repeated
column names, a column missing from new rows, a comma file named .tsv, day-first dates,
dense values beyond float32, a split with one label, a list of targets with a bad one, a
resumed comparison of another shape, number settings YAML 1.1 would read as text, a stray
quote that swallows rows, numbers and UTC offsets in a time column, ids spelled 'N' and
'N.0', lines with an extra field, domain values of another case, true/false labels, a
single-quoted '\t' and a repeated column predict does not read."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autoft_fast.cli import main
from autoft_fast.config import DataConfig, DataError
from autoft_fast.data import prepare_data
from autoft_fast.data.encode import RowEncoder
from autoft_fast.data.pipeline import _parse_dates
from autoft_fast.data.reading import check_columns, csv_header
from autoft_fast.data.stats import DENSE_LIMIT

from test_cli import TINY_SYNTHETIC, tiny_experiment


def _frame(n=80, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"d": ["s", "t"] * (n // 2),
                         "y": [str(v) for v in rng.integers(0, 2, n)],
                         "a": [f"v{v}" for v in rng.integers(0, 5, n)],
                         "x": [str(float(v)) for v in rng.normal(size=n)]})


def _config(tmp_path, files="f.csv", **split) -> DataConfig:
    return DataConfig.from_dict(
        {"files": [files], "label": "y", "categorical": ["a"],
         "numeric": [{"name": "x", "mode": "dense"}],
         "domain": {"column": "d", "source": ["s"], "target": "t"},
         "split": {"target": {"valid": 0.2, "test": 0.2, **split}, "source": {"valid": 0.2}},
         "cache": False}, tmp_path)


# ------------------------------------------------------------------------- columns

def test_a_repeated_column_name_is_an_error_in_csv_and_parquet(tmp_path):
    frame = _frame()
    text = frame.to_csv(index=False).splitlines()
    # A second column 'a' at the end: pandas would rename it 'a.1' and train on the first.
    (tmp_path / "f.csv").write_text("\n".join([text[0] + ",a"] + [r + ",zz" for r in text[1:]]) + "\n")
    assert csv_header(tmp_path / "f.csv", ",")[-2:] == ["x", "a"]
    with pytest.raises(DataError, match=r"column 'a' \(categorical\) appears 2 times in the "
                                        r"header of f.csv"):
        prepare_data(_config(tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column("a", pa.array(["zz"] * len(frame)))
    pq.write_table(table, tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"column 'a' \(categorical\) appears 2 times"):
        prepare_data(_config(tmp_path, files="f.parquet"))


def test_a_missing_column_suggests_another_case_and_names_a_wrong_separator(tmp_path):
    with pytest.raises(DataError, match=r"column 'P' \(feature\) not found in f.csv; did you "
                                        r"mean 'p'\?; columns present: a, p"):
        check_columns([("P", "feature")], ["a", "p"], Path("f.csv"))
    with pytest.raises(DataError, match=r"one column holding ','"):
        check_columns([("u", "feature")], ["id,u,c"], Path("f.tsv"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finetune_all run on a tiny data set with a dense column, and that data set."""
    root = tmp_path_factory.mktemp("inputs")
    frame = _frame(400, seed=1)
    frame.insert(0, "row_id", [f"r{i}" for i in range(len(frame))])
    frame.to_csv(root / "f.csv", index=False)
    doc = {"data": {"files": ["f.csv"], "label": "y", "categorical": ["a"],
                    "numeric": [{"name": "x", "mode": "dense"}],
                    "domain": {"column": "d", "source": ["s"], "target": "t"},
                    "split": {"target": {"valid": 0.2, "test": 0.2}, "source": {"valid": 0.2}},
                    "cache": False},
           "model": {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]},
           "pretrain": {"epochs": 1}, "finetune": {"epochs": 1}, "seeds": [0],
           "run_dir": str(root / "runs"), "device": "cpu"}
    (root / "exp.yaml").write_text(yaml.safe_dump(doc))
    assert main(["finetune", "-c", str(root / "exp.yaml"), "-s", "finetune_all",
                 "--no-progress", "--threads", "1"]) == 0
    run = next((root / "runs").glob("*-finetune-*"))
    return root, frame, run


def _predict(run, data, out, *extra):
    return main(["predict", "--run", str(run), "--data", str(data), "--out", str(out),
                 "--threads", "1", *extra])


def test_predict_names_a_missing_or_repeated_feature_column(saved_run, tmp_path, capsys):
    _, frame, run = saved_run
    frame.drop(columns=["x"]).to_csv(tmp_path / "no_x.csv", index=False)
    assert _predict(run, tmp_path / "no_x.csv", tmp_path / "p.csv") == 2
    assert "column 'x' (feature) not found in no_x.csv" in capsys.readouterr().err
    text = frame.to_csv(index=False).splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([text[0] + ",a"] + [r + ",zz" for r in text[1:]]) + "\n")
    assert _predict(run, tmp_path / "dup.csv", tmp_path / "p.csv") == 2
    assert "column 'a' (feature) appears 2 times" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_a_probability_column_says_what_to_do(saved_run, tmp_path, capsys):
    _, frame, run = saved_run
    frame.assign(probability="0.5").to_csv(tmp_path / "withp.csv", index=False)
    assert _predict(run, tmp_path / "withp.csv", tmp_path / "p.csv") == 2
    assert "give --keep with the columns to copy" in capsys.readouterr().err
    assert _predict(run, tmp_path / "withp.csv", tmp_path / "p.csv", "--keep", "row_id") == 0
    assert pd.read_csv(tmp_path / "p.csv").columns.tolist() == ["row_id", "probability"]


def test_dense_values_beyond_float32_are_clipped_alike_in_training_and_predict(saved_run, tmp_path):
    root, frame, run = saved_run
    from autoft_fast.train.predict import load_run
    loaded = load_run(run)
    extreme = frame.head(4).copy()
    extreme["x"] = ["1e40", "-1e308", "1e6", "0.5"]
    probs = loaded.predict(extreme)
    assert np.isfinite(probs.to_numpy()).all()
    enc = loaded.encoder.encode(extreme)
    assert enc.dense[:2, 0].abs().tolist() == [DENSE_LIMIT, DENSE_LIMIT]
    # The training pipeline clips the same way: a huge value in a row the moments were not
    # fitted on (the latest target row, in the test split of a time split).
    big = frame.copy()
    big["ts"] = np.arange(len(big))
    big.loc[big.index[big["d"] == "t"][-1], "x"] = "1e40"
    big.to_csv(tmp_path / "f.csv", index=False)
    bundle = prepare_data(_config(tmp_path, method="time", time_column="ts"))
    test = bundle.splits["target_test"].dense.numpy()
    assert np.isfinite(test).all() and np.abs(test).max() == np.float32(DENSE_LIMIT)


# ------------------------------------------------------------------------- dates

def _dates(values, fmt=None):
    state = {} if fmt is None else {"format": fmt}
    vals = _parse_dates(pd.Series(values), state, "ts")
    return [None if np.isnan(v) else str(pd.Timestamp(int(v)).date()) for v in vals], state


def test_dates_are_read_in_one_format_for_the_column():
    got, state = _dates(["05/01/2024", "13/01/2024", "x", None])
    assert got == ["2024-01-05", "2024-01-13", None, None] and state["format"] == "%d/%m/%Y"
    got, state = _dates(["05/01/2024", "01/13/2024"])
    assert got == ["2024-05-01", "2024-01-13"] and state["format"] == "%m/%d/%Y"
    got, state = _dates(["2024-05-01", "2024-01-13", "garbage"])
    assert got == ["2024-05-01", "2024-01-13", None] and state["format"] == "ISO8601"
    # A later chunk reads with the format an earlier one settled on.
    assert _dates(["06/02/2024"], "%d/%m/%Y")[0] == ["2024-02-06"]
    with pytest.raises(DataError, match=r"time column 'ts': a date such as '05/01/2024' reads "
                                        r"differently day-first and month-first.*time_format"):
        _dates(["05/01/2024", "03/02/2024"])
    assert _dates(["05/01/2024", "03/02/2024"], "%d/%m/%Y")[0] == ["2024-01-05", "2024-02-03"]


def test_a_time_split_of_day_first_dates_is_in_time_order(tmp_path):
    frame = _frame(200)
    days = pd.date_range("2024-01-01", periods=100, freq="D").repeat(2)
    frame["ts"] = days.strftime("%d/%m/%Y")
    frame.to_csv(tmp_path / "f.csv", index=False)
    bundle = prepare_data(_config(tmp_path, method="time", time_column="ts"))
    order = {k: bundle.splits[k] for k in ("target_train", "target_valid", "target_test")}
    assert all(len(v) for v in order.values())
    # The test split holds the latest target rows: every row of the file's last 20 % of
    # target days (file order is time order here, so row position says it).
    t_rows = frame.index[frame["d"] == "t"]
    n_test = int(round(0.2 * len(t_rows)))
    latest = frame.loc[t_rows[-n_test:], "x"].astype(float).to_numpy(np.float32)
    mean, std = bundle.feature_map.extra["dense_mean_std"]["x"]
    got = order["target_test"].dense[:, 0].numpy() * np.float32(std) + np.float32(mean)
    np.testing.assert_allclose(np.sort(got), np.sort(latest), rtol=1e-5, atol=1e-5)


def test_times_with_different_utc_offsets_are_compared_in_utc(tmp_path):
    # pandas' own "Mixed timezones detected. Pass utc=True ..." ValueError came through.
    state = {}
    vals = _parse_dates(pd.Series(["2024-01-05T04:00:00+01:00", "2024-01-05T03:30:00Z",
                                   "2024-01-05T04:00:00-0130"]), state, "ts")
    utc = pd.to_datetime(vals.astype(np.int64)).strftime("%H:%M").tolist()
    assert utc == ["03:00", "03:30", "05:30"]
    # A later chunk of times with offsets is fine; one without is as mixed as in one chunk.
    _parse_dates(pd.Series(["2024-01-06T00:00:00Z"]), state, "ts")
    with pytest.raises(DataError, match=r"time column 'ts' holds times with a UTC offset \(e.g. "
                                        r"'2024-01-05T04:00:00\+01:00'\) and times without one "
                                        r"\(e.g. '2024-01-06T01:00:00'\).*time_format"):
        _parse_dates(pd.Series(["2024-01-06T01:00:00"]), state, "ts")
    with pytest.raises(DataError, match=r"times without one \(e.g. '2024-01-05 04:02'\)"):
        _parse_dates(pd.Series(["2024-01-05T04:00:00+01:00", "2024-01-05 04:02"]), {}, "ts")
    # A time split of such a file: the offsets move rows, so UTC order is not file order.
    frame = _frame(200)
    local = pd.date_range("2024-01-01", periods=200, freq="h")
    frame["ts"] = [t.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if i % 4 else "+05:00")
                   for i, t in enumerate(local)]
    frame.to_csv(tmp_path / "f.csv", index=False)
    bundle = prepare_data(_config(tmp_path, method="time", time_column="ts"))
    assert sum(len(bundle.splits[k]) for k in ("target_train", "target_valid",
                                               "target_test")) == 100


def test_a_number_in_a_date_column_is_a_bad_value_not_the_column_s_format(tmp_path):
    # One number in a source row (whose time is never used) used to make the column
    # "numbers", so every target date was unparseable and `skip` dropped every target row.
    frame = _frame(200)
    frame["ts"] = pd.date_range("2024-01-01", periods=200, freq="h").strftime("%Y-%m-%d %H:%M")
    frame.loc[0, "ts"] = "0"                       # a source row
    frame.to_csv(tmp_path / "f.csv", index=False)
    bundle = prepare_data(_config(tmp_path, method="time", time_column="ts"))
    assert sum(len(bundle.splits[k]) for k in ("target_train", "target_valid",
                                               "target_test")) == 100
    frame.loc[5, "ts"] = "12345"                   # a target row: that row is the bad one
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"1 rows with time column 'ts' missing or unparseable "
                                        r"\(target rows\) \(e.g. '12345' in f.csv, data row 6\)"):
        prepare_data(_config(tmp_path, method="time", time_column="ts"))
    cfg = dataclasses.replace(_config(tmp_path, method="time", time_column="ts"),
                              on_bad_rows="skip")
    with pytest.warns(UserWarning, match="skipping bad rows: 1 rows with time column 'ts'"):
        bundle = prepare_data(cfg)
    assert sum(len(bundle.splits[k]) for k in ("target_train", "target_valid",
                                               "target_test")) == 99
    # A column of numbers with one date among the target rows: the date is the odd one.
    frame["ts"] = [str(i) for i in range(200)]
    frame.loc[7, "ts"] = "2024-01-01"
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"\(e.g. '2024-01-01' in f.csv, data row 8\)"):
        prepare_data(_config(tmp_path, method="time", time_column="ts"))


def test_time_format_needs_a_time_column(tmp_path):
    with pytest.raises(DataError, match="time_format is set but .*time_column is not"):
        _config(tmp_path, time_format="%d/%m/%Y")


# ------------------------------------------------------------------------- labels, targets

def test_a_split_with_one_label_fails_before_training(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["generate", "--config", str(exp), "--out", str(tmp_path / "data")]) == 0
    csv = tmp_path / "data" / "synthetic.csv"
    frame = pd.read_csv(csv, dtype=str)
    doc = yaml.safe_load((tmp_path / "data" / "dataset.yaml").read_text())
    target = doc["data"]["domain"]["target"]
    frame.loc[frame[doc["data"]["domain"]["column"]] == target, doc["data"]["label"]] = "1"
    frame.to_csv(csv, index=False)
    exp2 = tiny_experiment(tmp_path, {"data": str(tmp_path / "data" / "dataset.yaml")})
    assert main(["finetune", "-c", str(exp2), "-s", "finetune_all", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"split 'target_train' of target domain '{target}' holds only label 1" in err
    assert not list((tmp_path / "runs").glob("*/runs/*/checkpoint*"))


def test_a_test_split_needs_two_rows_of_each_label():
    from types import SimpleNamespace as NS
    from autoft_fast.train.runner import check_label_classes
    data_cfg = NS(label="click", domain=NS(target="tgt", source=["src"]))

    def bundle(test_labels):
        splits = {"target_train": [0, 1], "target_test": list(test_labels)}
        return NS(splits={k: _Split(v) for k, v in splits.items()})

    check_label_classes(bundle([0, 1, 0, 1]), data_cfg)
    for labels, counts in (([0, 0, 0, 1], "1 row of label 1 and 3 of label 0"),
                           ([1, 1, 1, 0], "3 rows of label 1 and 1 of label 0")):
        with pytest.raises(DataError, match=f"split 'target_test' of target domain 'tgt' "
                                            f"holds {counts}: an AUC from fewer than 2 of "
                                            f"each says next to nothing, and compare's paired"):
            check_label_classes(bundle(labels), data_cfg)


class _Split:
    def __init__(self, labels):
        import torch
        self.label = torch.tensor(labels, dtype=torch.float32)

    def __len__(self):
        return len(self.label)


def test_every_target_is_checked_before_any_training(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["compare", "-c", str(exp), "--targets", "tgt,nowhere",
                 "--strategies", "finetune_all", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "targets: with" in err and "'nowhere'" in err and "matches no rows" in err
    # Nothing was trained: no pre-trained model, no fine-tuning run.
    assert not list(Path(tmp_path).rglob("pretrain.json"))
    assert not list(Path(tmp_path).rglob("runs.csv"))


# ------------------------------------------------------------------------- resume, YAML

def test_resume_refuses_a_comparison_of_other_targets(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all", "--no-progress"]) == 0
    run = next(Path(tmp_path / "runs").glob("*-compare-*"))
    meta = json.loads((run / "run.json").read_text())
    assert meta["targets"] is None and meta["tune"] is False
    before = (run / "runs.csv").read_bytes()
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all", "--tune",
                 "--resume", str(run), "--no-progress"]) == 2
    assert "ran tune off, not on; leave out --tune" in capsys.readouterr().err
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all", "--targets",
                 "tgt,src_a", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ran targets none, not tgt,src_a; leave out --targets" in err
    assert "pass the run's --targets" not in err
    # The same with --resume alone (the newest run): the refusal names what differs and
    # the run it looked at, not only "no earlier run has this config".
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all", "--tune",
                 "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ran tune off, not on; leave out --tune" in err and run.name in err
    assert (run / "runs.csv").read_bytes() == before
    # A run.json from before targets were recorded: the folder says what it ran. This one
    # is a single-target run, so a resume with two targets is refused ...
    del meta["targets"], meta["tune"]
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all", "--targets",
                 "tgt,src_a", "--resume", str(run), "--no-progress"]) == 2
    assert "ran targets none, not tgt,src_a" in capsys.readouterr().err
    # ... and a folder of a target's own (here made by hand) marks a run of several.
    (run / "tgt" / "runs").mkdir(parents=True)
    assert main(["compare", "-c", str(exp), "--strategies", "finetune_all",
                 "--resume", str(run), "--no-progress"]) == 2
    assert "ran targets several (see the run folder), not none" in capsys.readouterr().err


def test_resume_refuses_a_run_whose_data_file_changed(tmp_path, capsys):
    from autoft_fast.data import generate_synthetic
    from autoft_fast.config import SyntheticConfig
    yaml_path = generate_synthetic(SyntheticConfig.from_dict(TINY_SYNTHETIC), tmp_path / "gen")
    data = yaml.safe_load(yaml_path.read_text())["data"]
    data["files"] = [str(tmp_path / "gen" / f) for f in data["files"]]
    data["cache"] = False
    exp = tiny_experiment(tmp_path, {"data": data})
    argv = ["finetune", "-c", str(exp), "-s", "finetune_all", "--no-progress"]
    assert main(argv) == 0
    run = next(Path(tmp_path / "runs").glob("*-finetune-*"))
    recorded = json.loads((run / "data.json").read_text())
    assert recorded["rows"]["target_train"] > 0
    assert main([*argv, "--resume", str(run)]) == 0  # the same data: resumes
    capsys.readouterr()
    csv = Path(data["files"][0])
    original = csv.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    csv.write_text("".join(lines[: len(lines) // 2]))  # another file under the same name
    assert main([*argv, "--resume", str(run)]) == 2
    assert "--resume: the data differ from those the run in" in capsys.readouterr().err
    assert json.loads((run / "data.json").read_text()) == recorded
    csv.write_bytes(original)
    assert main([*argv, "--resume", str(run)]) == 0


def test_a_number_setting_takes_an_exponent_without_a_dot(tmp_path):
    from autoft_fast.config import load_config
    (tmp_path / "e.yaml").write_text(
        "synthetic: {}\nfinetune: {lr: 1e-3, epochs: 1e1}\nsearch: {lr: [3e-4, 1E-2]}\n")
    cfg = load_config(tmp_path / "e.yaml")
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # what YAML 1.1 gives
    assert (cfg.finetune.lr, cfg.finetune.epochs, cfg.search.lr) == (1e-3, 10, [3e-4, 1e-2])
    # A text setting keeps such a value as text: hashed ids look like numbers.
    cfg = DataConfig.from_dict({"files": ["f.csv"], "label": "y", "categorical": ["a"],
                                "domain": {"column": "d", "source": ["3e814130"],
                                           "target": "50e219e0"}}, tmp_path)
    assert cfg.domain.source == ("3e814130",) and cfg.domain.target == "50e219e0"
    with pytest.raises(Exception, match="finetune.lr must be a finite number, got 'fast'"):
        (tmp_path / "e.yaml").write_text("synthetic: {}\nfinetune: {lr: fast}\n")
        load_config(tmp_path / "e.yaml")


def test_predict_fills_a_short_line_as_training_does(saved_run, tmp_path):
    _, frame, run = saved_run
    frame.to_csv(tmp_path / "full.csv", index=False)
    lines = (tmp_path / "full.csv").read_text().splitlines()
    # Data row 301 loses its last two fields (x, then nothing: the row ends after 'a').
    cols = lines[0].split(",")
    assert cols[-2:] == ["a", "x"]
    lines[301] = ",".join(lines[301].split(",")[:-1])
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    filled = frame.copy()
    filled.loc[filled.index[300], "x"] = np.nan
    filled.to_csv(tmp_path / "filled.csv", index=False)
    for name in ("short", "filled"):
        assert _predict(run, tmp_path / f"{name}.csv", tmp_path / f"p_{name}.csv") == 0
    a, b = (pd.read_csv(tmp_path / f"p_{n}.csv") for n in ("short", "filled"))
    assert len(a) == len(frame) and a.equals(b)


def test_a_boolean_parquet_label_is_read_as_0_and_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    frame = _frame(200)
    frame.to_csv(tmp_path / "f.csv", index=False)
    as_bool = frame.assign(y=frame["y"] == "1")
    pq.write_table(pa.Table.from_pandas(as_bool, preserve_index=False), tmp_path / "f.parquet")
    a, b = prepare_data(_config(tmp_path)), prepare_data(_config(tmp_path, files="f.parquet"))
    for name in a.splits:
        assert a.splits[name].label.tolist() == b.splits[name].label.tolist()


def test_config_slips_get_their_own_words(tmp_path, capsys):
    with pytest.raises(DataError, match="column 'a' is listed twice in categorical"):
        DataConfig.from_dict({"files": ["f.csv"], "label": "y", "categorical": ["a", "a"],
                              "domain": {"column": "d", "source": ["s"], "target": "t"}}, tmp_path)
    with pytest.raises(DataError, match="csv_sep must be one character"):
        DataConfig.from_dict({"files": ["f.csv"], "label": "y", "categorical": ["a"],
                              "csv_sep": ";;",
                              "domain": {"column": "d", "source": ["s"], "target": "t"}}, tmp_path)
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["compare", "-c", str(exp), "--strategies", " , ", "--no-progress"]) == 2
    assert "--strategies ' , ' names no strategy" in capsys.readouterr().err


def test_the_package_warnings_are_one_line_on_the_command_line(tmp_path, capsys):
    frame = _frame(200)
    frame.loc[5, "y"] = "maybe"
    frame.to_csv(tmp_path / "f.csv", index=False)
    doc = {"data": {"files": ["f.csv"], "label": "y", "categorical": ["a"],
                    "domain": {"column": "d", "source": ["s"], "target": "t"},
                    "split": {"target": {"valid": 0.2, "test": 0.2}, "source": {"valid": 0.2}},
                    "on_bad_rows": "skip", "cache": False},
           "model": {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]},
           "pretrain": {"epochs": 1}, "finetune": {"epochs": 1}, "seeds": [0],
           "run_dir": str(tmp_path / "runs"), "device": "cpu"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    assert main(["pretrain", "-c", str(tmp_path / "exp.yaml"), "--no-progress",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert ("autoft-fast: warning: skipping bad rows: 1 rows with label 'y' missing or not a "
            "number (e.g. 'maybe' in f.csv, data row 6)") in err
    assert "UserWarning" not in err and "pipeline.py" not in err


def test_invalid_yaml_says_where(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: x\nsynthetic: {}\nfinetune: {lr: 0.1\n  epochs: 2\n")
    assert main(["finetune", "-c", str(tmp_path / "bad.yaml"), "-s", "finetune_all"]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML: while parsing a flow mapping (line 3, column 11): expected ',' " \
           "or '}', but got ':' (line 4, column 9)" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_backend_the_device_lacks_fails_before_any_data_is_read(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "-c", str(exp), "-s", "autoft", "--backend", "cuda",
                 "--no-progress"]) == 2
    assert "backend = 'cuda' is not available for tensors on cpu" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_predict_names_a_bad_number_by_its_row_in_the_file(saved_run, tmp_path, monkeypatch):
    import autoft_fast.train.predict as predict_module
    from autoft_fast.train.predict import load_run
    _, frame, run = saved_run
    bad = frame.copy()
    bad.loc[bad.index[349], "x"] = "twelve"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    monkeypatch.setattr(predict_module, "PREDICT_CHUNK_ROWS", 100)  # the row is in chunk 4
    loaded = load_run(run)
    with pytest.raises(DataError, match=r"'twelve' in data row 350\)"):
        loaded.predict(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"'twelve' in data row 350\)"):
        loaded.predict_file(tmp_path / "bad.csv", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(DataError, match=r"'twelve' in row 349 of the frame\)"):
        loaded.predict(bad)


def test_predict_reads_on_after_a_short_line_by_rows_not_lines(saved_run, tmp_path, monkeypatch):
    # A quoted field with a line break before the short line: rows and file lines differ, and
    # the rows read after the fallback must continue where the first reader stopped.
    import autoft_fast.train.predict as predict_module
    _, frame, run = saved_run
    quoted = frame.copy()
    quoted.loc[quoted.index[10], "row_id"] = "two\nlines"
    quoted.to_csv(tmp_path / "full.csv", index=False)
    text = (tmp_path / "full.csv").read_text()
    lines = text.split("\n")
    last = len(lines) - 2  # the file's last row (after the final newline, an empty string)
    lines[last] = ",".join(lines[last].split(",")[:-1])  # short: no x
    (tmp_path / "short.csv").write_text("\n".join(lines))
    filled = quoted.copy()
    filled.loc[filled.index[-1], "x"] = np.nan
    filled.to_csv(tmp_path / "filled.csv", index=False)
    monkeypatch.setattr(predict_module, "PREDICT_CHUNK_ROWS", 50)  # rows read before the fallback
    from autoft_fast.train.predict import load_run
    loaded = load_run(run)
    a = loaded.predict(tmp_path / "short.csv")
    b = loaded.predict(tmp_path / "filled.csv")
    assert len(a) == len(frame) and a.equals(b)


@pytest.mark.parametrize("monitor", ["auc", "logloss"])
def test_tune_picks_the_best_validation_score_of_the_monitored_metric(monitor, monkeypatch):
    # Each setting's runs report valid_best in the monitor's own units: with logloss the
    # lowest is the best, with auc the highest.
    from autoft_fast.config import parse_config
    import autoft_fast.train.runner as runner
    cfg = parse_config({"synthetic": {}, "finetune": {"monitor": monitor},
                        "search": {"lr": [1e-3, 1e-2, 1e-1]}, "seeds": [0]})
    scores = {1e-3: 0.55, 1e-2: 0.30, 1e-1: 0.20}

    def fake_run(c, bundle, state, strategy, seed, out, **kw):
        return {"valid_best": scores[c.finetune.lr], "auc": 0.6}

    monkeypatch.setattr(runner, "run_strategy", fake_run)
    picked, rows = runner.tune_strategy(cfg, None, None, "finetune_all", Path("/nonexistent"))
    chosen = [r for r in rows if r["picked"]]
    assert len(chosen) == 1
    assert chosen[0][f"valid_{monitor}"] == (0.55 if monitor == "auc" else 0.20)


def test_tune_does_not_pick_a_setting_that_lost_a_seed(monkeypatch, caplog):
    # lr 1e-2 diverged on seed 1: its mean over the surviving seed (0.70) beats lr 1e-3's
    # over both (0.60), but a half-diverged setting must not win.
    from autoft_fast.config import parse_config
    import autoft_fast.train.runner as runner
    nan = float("nan")
    cfg = parse_config({"synthetic": {}, "search": {"lr": [1e-3, 1e-2]}, "seeds": [0, 1]})
    scores = {(1e-3, 0): 0.60, (1e-3, 1): 0.60, (1e-2, 0): 0.70, (1e-2, 1): nan}

    def fake_run(c, bundle, state, strategy, seed, out, **kw):
        v = scores[(c.finetune.lr, seed)]
        return {"valid_best": None if math.isnan(v) else v, "auc": v - 0.05}

    monkeypatch.setattr(runner, "run_strategy", fake_run)
    picked, rows = runner.tune_strategy(cfg, None, None, "finetune_all", Path("/nonexistent"))
    by_lr = {r["finetune.lr"]: r for r in rows}
    assert by_lr[1e-3]["picked"] and not by_lr[1e-2]["picked"]
    assert by_lr[1e-2]["valid_runs"] == 1 and by_lr[1e-3]["valid_runs"] == 2
    # grid.csv's test mean follows results.csv's rule: over the runs that ended with a score.
    assert by_lr[1e-2]["test_auc"] == pytest.approx(0.65) and by_lr[1e-2]["test_runs"] == 1
    assert "lr=0.01 lost a seed" in caplog.text
    # When every setting lost a seed, the best survivor is still picked.
    scores[(1e-3, 1)] = nan
    picked, rows = runner.tune_strategy(cfg, None, None, "finetune_all", Path("/nonexistent"))
    assert next(r for r in rows if r["picked"])["finetune.lr"] == 1e-2


def test_written_files_get_the_umask_mode_not_mkstemp_s_0600(tmp_path):
    import os
    import stat

    from autoft_fast._io import save_atomic, write_text_atomic
    old = os.umask(0o027)
    try:
        a = write_text_atomic("x", tmp_path / "a.json")
        b = save_atomic({"k": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o640 and stat.S_IMODE(b.stat().st_mode) == 0o640
    os.umask(0o022)
    try:
        assert stat.S_IMODE(write_text_atomic("y", tmp_path / "c.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_the_data_cache_folder_gets_the_umask_mode(tmp_path):
    import os
    import stat

    from autoft_fast.data import DataConfig, prepare_data

    from test_data import base_dict, make_frame, write
    write(tmp_path, make_frame())
    old = os.umask(0o002)
    try:
        prepare_data(DataConfig.from_dict(base_dict(cache=True, cache_dir="cache"), tmp_path))
    finally:
        os.umask(old)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775


def test_an_implicit_resume_names_what_differs_backend_and_strategy_included(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, autoft={"backend": "auto"})
    assert main(["finetune", "-c", str(exp), "--strategy", "autoft_field", "--backend",
                 "reference", "--no-progress"]) == 0
    capsys.readouterr()
    import autoft_fast
    if "cpu" in autoft_fast.available_backends("cpu"):  # 'auto' resolves to another backend
        assert main(["finetune", "-c", str(exp), "--strategy", "autoft_field", "--resume",
                     "--no-progress"]) == 2
        assert "autoft.backend 'reference' -> 'cpu'" in capsys.readouterr().err
    assert main(["finetune", "-c", str(exp), "--strategy", "autoft", "--backend", "reference",
                 "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the newest" in err and "strategy 'autoft_field' -> 'autoft'" in err


# ------------------------------------------------------------------------- line breaks in values

def _lines_with_stray_quote(frame: pd.DataFrame, at: int, close_at: int | None = None) -> str:
    """``frame`` as CSV text, with a stray '"' opening the last field of data row ``at``
    (1-based) and, with ``close_at``, a stray '"' closing the last field of that row."""
    lines = frame.to_csv(index=False).splitlines()
    lines[at] = lines[at].rsplit(",", 1)[0] + ',"' + lines[at].rsplit(",", 1)[1]
    if close_at is not None:
        lines[close_at] += '"'
    return "\n".join(lines) + "\n"


# (pandas' reader refuses an unterminated quote itself: 'EOF inside string')
@pytest.mark.parametrize("close_at, short_line", [(None, False), (330, False), (330, True)])
def test_a_stray_quote_that_swallows_rows_is_an_error(tmp_path, close_at, short_line):
    # Without the check, every row after the quote (or up to the closing one) vanished into
    # one value of x with no message. A short line makes pandas' reader read the file.
    frame = _frame(400)
    text = _lines_with_stray_quote(frame, 30, close_at)
    if short_line:
        lines = text.splitlines()
        lines[5] = lines[5].rsplit(",", 1)[0]
        text = "\n".join(lines) + "\n"
    (tmp_path / "f.csv").write_text(text)
    n = (close_at or 401) - 30
    with pytest.raises(DataError, match=rf"f.csv, data row 30: the value of column 'x' "
                                        rf"\(numeric\) holds {n} line breaks and \d+ ',' "
                                        r"separators.*a stray quote\?"):
        prepare_data(_config(tmp_path))


def test_a_quoted_line_break_in_a_used_column_is_a_warning_and_kept(tmp_path):
    frame = _frame(400)
    frame["note"] = "plain"
    frame.loc[3, "note"] = "two\nlines, unused"
    frame.loc[7, "a"] = "v1\nv2"       # a used column: kept, with a warning
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.warns(UserWarning, match=r"1 value of the columns in use holds a line break "
                                         r"\(e.g. column 'a' \(categorical\) in f.csv, data "
                                         r"row 8: 'v1\\nv2'\)"):
        bundle = prepare_data(dataclasses.replace(_config(tmp_path), min_count=1))
    assert sum(bundle.splits[s].label.shape[0] for s in bundle.splits) == 400
    assert "v1\nv2" in bundle.vocabularies["a"]
    frame.loc[7, "a"] = "v1"           # only the unused column holds one: no warning
    frame.to_csv(tmp_path / "f.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_data(_config(tmp_path))


def test_predict_refuses_a_stray_quote_that_swallows_rows(saved_run, tmp_path):
    from autoft_fast.train.predict import load_run
    _, frame, run = saved_run
    (tmp_path / "new.csv").write_text(_lines_with_stray_quote(frame, 50))
    loaded = load_run(run)
    with pytest.raises(DataError, match=r"new.csv, data row 50: the value of column 'x' "
                                        r"\(feature\) holds 351 line breaks.*a stray quote\?"):
        loaded.predict(tmp_path / "new.csv")
    with pytest.raises(DataError, match=r"new.csv, data row 50: .*a stray quote\?"):
        loaded.predict_file(tmp_path / "new.csv", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------------- 'N' and 'N.0'

def test_integer_ids_spelled_n_and_n_0_are_warned_about_in_training_and_predict(tmp_path):
    # An id column with missing values, as pandas writes it to CSV ('26.0'), and the same
    # data as Parquet ('26'): two vocabulary entries for one id, silently.
    from autoft_fast.data.reading import integer_spelling_pairs, other_integer_spelling
    from autoft_fast.train.predict import SavedRun
    assert other_integer_spelling(["26", "-3.0", "2.5", "u1"]).tolist() == ["26.0", "-3", None, None]
    assert integer_spelling_pairs(["26", "26.0", "7", "8.0", "u1"]) == (1, "26")
    frame = _frame(400)
    frame["a"] = pd.Series(np.arange(400) % 7, dtype="Int64").astype("float64")
    frame.loc[3, "a"] = np.nan
    frame.iloc[:200].to_csv(tmp_path / "f.csv", index=False)          # '3.0'
    frame.iloc[200:].to_parquet(tmp_path / "f.parquet", index=False)  # '3'
    cfg = _config(tmp_path)
    cfg = dataclasses.replace(cfg, files=(tmp_path / "f.csv", tmp_path / "f.parquet"))
    with pytest.warns(UserWarning, match=r"column 'a' \(categorical\) holds 7 integer values in "
                                         r"two spellings, 'N' and 'N.0' \(e.g. '\d' and '\d.0'\)"
                                         r".*a CSV written from a float column"):
        bundle = prepare_data(cfg)
    assert {"3", "3.0"} <= set(bundle.vocabularies["a"])
    # The Parquet file alone: one spelling, no warning; new rows spelled 'N.0' are unknown,
    # and the warning about them says why.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundle = prepare_data(dataclasses.replace(cfg, files=(tmp_path / "f.parquet",)))
    enc = RowEncoder(cfg, bundle.feature_map, bundle.vocabularies)
    enc.encode(pd.read_csv(tmp_path / "f.csv", dtype=str), 0)
    with pytest.warns(UserWarning, match=r"f.csv: most values of column\(s\) 'a' 100% are "
                                         r"unknown.*of the unknown values of 'a' are integers "
                                         r"the model knows in the other spelling \(e.g. "
                                         r"'0.0' here, '0' in training\)"):
        SavedRun(None, enc, {}, tmp_path, None, 1)._warn_unknown("f.csv")
    enc.reset_counts()
    enc.encode(pd.DataFrame({"a": ["u9"] * 50, "x": ["1"] * 50}), 0)
    with pytest.warns(UserWarning, match="most values") as caught:
        SavedRun(None, enc, {}, tmp_path, None, 1)._warn_unknown("g.csv")
    assert "other spelling" not in str(caught[0].message)


# ------------------------------------------------------------------------- lines, domains, labels

def test_lines_with_an_extra_field_are_reported_before_an_empty_domain(tmp_path):
    # Every data line ends with a separator the header lacks: all are skipped as malformed,
    # and the message used to be "source domain value 's' matches no rows ...; the files
    # have no data rows".
    lines = _frame(80).to_csv(index=False).splitlines()
    (tmp_path / "f.csv").write_text("\n".join([lines[0]] + [x + "," for x in lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"bad rows in the data: 80 malformed CSV lines \(wrong "
                                        r"number of fields, e.g. f.csv: Skipping line 2: "
                                        r"expected 4 fields, saw 5; do the data lines end with "
                                        r"a separator that the header line lacks\?\); no rows "
                                        r"of the source domain 's' \(column 'd'\) are left"):
        prepare_data(_config(tmp_path))


def test_domain_values_that_differ_in_case_or_spaces_are_named(tmp_path):
    frame = _frame(400)
    frame.loc[frame.index[:40], "d"] = "S"        # 40 rows: 20 were 's', 20 't'
    frame.loc[frame.index[40:50], "d"] = " t "
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.warns(UserWarning, match=r"dropping 50 rows whose d is not a configured domain, "
                                         r"50 of them with a value that differs from a "
                                         r"configured one only in case or spaces: 'S' \(40 "
                                         r"rows\) looks like 's', ' t ' \(10 rows\) looks like "
                                         r"'t'"):
        bundle = prepare_data(_config(tmp_path))
    assert bundle.stats["rows_other_domains"] == 50
    cfg = DataConfig.from_dict({**_config(tmp_path).to_dict(),
                                "domain": {"column": "d", "source": ["s"], "target": "T"}})
    frame["d"] = ["s", "t"] * 200
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"target domain value 'T' matches no rows of column "
                                        r"'d'; most common values there: .*; did you mean 't'\?"):
        prepare_data(cfg)


def test_csv_labels_true_and_false_read_as_1_and_0(tmp_path):
    # They were "missing or not a number", while a Parquet boolean label was accepted.
    frame = _frame(400)
    frame.to_csv(tmp_path / "num.csv", index=False)
    spell = np.array([["false", "true"], ["False", "True"], [" FALSE ", "TRUE"]], dtype=object)
    frame["y"] = spell[np.arange(400) % 3, frame["y"].astype(int)]
    frame.to_csv(tmp_path / "f.csv", index=False)
    words = prepare_data(_config(tmp_path))
    numbers = prepare_data(dataclasses.replace(_config(tmp_path), files=(tmp_path / "num.csv",)))
    for name in words.splits:
        assert bool((words.splits[name].label == numbers.splits[name].label).all())
    assert float(words.splits["source_train"].label.sum()) > 0


def test_when_every_row_of_a_domain_is_bad_skip_is_not_offered(tmp_path):
    frame = _frame(80)
    frame.loc[frame["d"] == "t", "y"] = "yes"
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"40 rows with label 'y' missing or not a number.*Fix "
                                        r"them: every row of the domain 't' is bad, so "
                                        r"data.on_bad_rows: skip would leave it without rows$"):
        prepare_data(_config(tmp_path))
    frame.loc[5, "y"] = "1"                    # one good target row: skipping is an option
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"Fix them, or set data.on_bad_rows: skip$"):
        prepare_data(_config(tmp_path))


def test_a_tab_separator_in_single_quotes_says_to_write_it_double_quoted(tmp_path):
    # YAML keeps '\t' in single quotes as a backslash and a t.
    (tmp_path / "d.yaml").write_text("files: f.csv\nlabel: y\ncategorical: [a]\n"
                                     "domain: {column: d, source: [s], target: t}\n"
                                     "csv_sep: '\\t'\n")
    from autoft_fast.data import load_data_config
    with pytest.raises(DataError, match=r"data.csv_sep is the two characters \\t \(a backslash "
                                        r"and 't'\), not a tab: .* write it double-quoted, "
                                        r'"\\t"'):
        load_data_config(tmp_path / "d.yaml")
    (tmp_path / "d.yaml").write_text((tmp_path / "d.yaml").read_text().replace("'\\t'", '"\\t"'))
    assert load_data_config(tmp_path / "d.yaml").csv_sep == "\t"
    with pytest.raises(DataError, match=r"data.csv_sep must be one character \(e.g. ',' or "
                                        r"'\\t'\), got ';;'"):
        DataConfig.from_dict({**_config(tmp_path).to_dict(), "csv_sep": ";;"})


def test_predict_ignores_a_repeated_column_it_neither_reads_nor_is_told_to_keep(saved_run,
                                                                                  tmp_path):
    # It refused with "column 'row_id' (--keep) appears 2 times" though no --keep was given.
    from autoft_fast.train.predict import load_run
    _, frame, run = saved_run
    text = frame.to_csv(index=False).splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([text[0] + ",row_id"] +
                                                [r + ",again" for r in text[1:]]) + "\n")
    loaded = load_run(run)
    want = loaded.predict(tmp_path / "dup.csv")
    with pytest.warns(UserWarning, match=r"dup.csv: column\(s\) \['row_id'\] appear more than "
                                         r"once in the header, so they are not copied"):
        assert loaded.predict_file(tmp_path / "dup.csv", tmp_path / "p.csv") == len(frame)
    out = pd.read_csv(tmp_path / "p.csv")
    assert out.columns.tolist() == ["d", "probability"]
    np.testing.assert_allclose(out["probability"].to_numpy(), want.to_numpy(), atol=1e-8)
    with pytest.raises(DataError, match=r"column 'row_id' \(--keep\) appears 2 times"):
        loaded.predict_file(tmp_path / "dup.csv", tmp_path / "q.csv", keep=["row_id"])
