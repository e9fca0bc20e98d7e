"""CSV files without a header line (``data.columns``): the same tensors as the same file with
a header, clear errors where the file and the names disagree, and predictions on files with
or without a header (and without the label) equal to predictions on the frame."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autoft_fast.cli import main
from autoft_fast.data import DataConfig, DataError, load_data_config, prepare_data
from autoft_fast.train.predict import load_run

from test_cli import last_line_run_dir, tiny_experiment
from test_data import base_dict, make_frame, write
from test_pipeline import assert_same
from test_predict import _dataset


def _headerless(path: Path, name: str, drop: str | None = None) -> tuple[Path, list[str]]:
    """A copy of the CSV file at ``path`` without its header line (and without column
    ``drop``), as ``name`` beside it; returns the copy and the original column names."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    names = list(frame.columns)
    if drop is not None:
        frame = frame.drop(columns=[drop])
    out = path.parent / name
    frame.to_csv(out, index=False, header=False)
    return out, names


def test_headerless_file_gives_the_tensors_of_the_file_with_a_header(tmp_path):
    path = write(tmp_path, make_frame(seed=3))
    plain, names = _headerless(path, "data.txt")
    with_header = prepare_data(DataConfig.from_dict(base_dict(), tmp_path), chunk_rows=64)
    cfg = DataConfig.from_dict(base_dict(files=["data.txt"], columns=names), tmp_path)
    without = prepare_data(cfg, chunk_rows=64)
    assert_same(without, with_header)
    assert without.stats["rows_read"] == len(make_frame(seed=3))


def test_a_short_line_of_a_headerless_file_is_malformed(tmp_path):
    # With a header, a short line gets empty values (pandas' rule); in a file of a fixed
    # layout it is a damaged line (a cut download): refused, or skipped and counted.
    path = write(tmp_path, make_frame(seed=3))
    plain, names = _headerless(path, "data.txt")
    lines = plain.read_text().splitlines()
    lines[6] = ",".join(lines[6].split(",")[:5])  # file line 7, cut after 5 of 8 fields
    plain.write_text("\n".join(lines) + "\n")
    cfg = DataConfig.from_dict(base_dict(files=["data.txt"], columns=names), tmp_path)
    with pytest.raises(DataError, match="1 malformed CSV lines .*data.txt: Skipping line 7: "
                                        "expected 8 fields, saw 5"):
        prepare_data(cfg)
    skip = DataConfig.from_dict(base_dict(files=["data.txt"], columns=names, on_bad_rows="skip"),
                                tmp_path)
    with pytest.warns(UserWarning, match="1 malformed CSV lines"):
        bundle = prepare_data(skip)
    assert bundle.stats["rows_read"] == len(make_frame(seed=3)) - 1
    assert bundle.stats["bad_rows_skipped"] == 1


def test_headerless_tsv_with_the_columns_in_another_order(tmp_path):
    frame = make_frame(seed=4)
    write(tmp_path, frame)
    order = list(reversed(frame.columns))
    frame[order].to_csv(tmp_path / "data.tsv", sep="\t", index=False, header=False)
    a = prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    b = prepare_data(DataConfig.from_dict(base_dict(files=["data.tsv"], columns=order), tmp_path))
    assert_same(b, a)


def test_columns_key_is_checked_against_the_config_and_the_file(tmp_path):
    path = write(tmp_path, make_frame())
    plain, names = _headerless(path, "data.txt")
    with pytest.raises(DataError, match=r"column 'item' \(categorical\) is not in data.columns"):
        DataConfig.from_dict(base_dict(files=["data.txt"], columns=[c for c in names if c != "item"]),
                             tmp_path)
    with pytest.raises(DataError, match="data.columns names 'user' twice"):
        DataConfig.from_dict(base_dict(files=["data.txt"], columns=[*names, "user"]), tmp_path)
    # The file with its header, read as header-less: the header line is named, not parsed.
    with pytest.raises(DataError, match="the first line of data.csv looks like a header .* remove the "
                                        "header line, or data.columns"):
        prepare_data(DataConfig.from_dict(base_dict(columns=names), tmp_path))
    with pytest.raises(DataError, match=r"the first line of data.txt has 8 fields \(sep=','\), "
                                        "but data.columns names 9 columns"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.txt"], columns=[*names, "extra"]),
                                          tmp_path))
    with pytest.raises(DataError, match="the first line of data.txt has 1 field \\(sep=';'\\), but data.columns "
                                        "names 8 columns: is the separator"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.txt"], columns=names, csv_sep=";"),
                                          tmp_path))


def test_cache_key_of_a_config_without_columns_is_unchanged(tmp_path):
    write(tmp_path, make_frame())
    d = DataConfig.from_dict(base_dict(), tmp_path).processing_dict()
    assert "columns" not in d  # caches built before the key existed stay valid
    names = list(make_frame().columns)
    d = DataConfig.from_dict(base_dict(columns=names), tmp_path).processing_dict()
    assert d["columns"] == names


@pytest.fixture(scope="module")
def headerless_run(tmp_path_factory):
    """(run directory, data file with a header, its header-less copy, the column names):
    one autoft run trained on the tiny synthetic data set read without its header."""
    root = tmp_path_factory.mktemp("headerless")
    dataset = _dataset(root, dense=False)
    doc = yaml.safe_load(dataset.read_text())
    src = dataset.parent / doc["data"]["files"][0]
    plain, names = _headerless(src, "synthetic.txt")
    doc["data"]["files"] = ["synthetic.txt"]
    doc["data"]["columns"] = names
    dataset.write_text(yaml.safe_dump(doc))
    exp = tiny_experiment(root, {"data": str(dataset)}, finetune={"epochs": 1, "batch_size": 256})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["finetune", "--config", str(exp), "--strategy", "autoft",
                     "--no-progress"]) == 0
    return last_line_run_dir(out.getvalue()), src, plain, names


def test_predict_reads_files_with_or_without_a_header_and_without_the_label(headerless_run,
                                                                            tmp_path):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    assert run.encoder.cfg.columns == tuple(names)
    frame = pd.read_csv(src, dtype=str, keep_default_na=False, na_values=[""])
    want = run.predict(frame).to_numpy()
    label = run.encoder.cfg.label
    unlabelled, _ = _headerless(src, "unlabelled.txt", drop=label)
    for path in (src, plain, unlabelled):
        np.testing.assert_allclose(run.predict(path).to_numpy(), want, rtol=0, atol=1e-12)
    # predict_file on a header-less file keeps its non-feature columns, by their names.
    n = run.predict_file(unlabelled, tmp_path / "preds.csv", keep=["row_id"])
    got = pd.read_csv(tmp_path / "preds.csv", dtype={"row_id": str})
    assert n == len(frame) and list(got.columns) == ["row_id", "probability"]
    from autoft_fast._io import current_umask
    assert (tmp_path / "preds.csv").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert list(got["row_id"]) == list(frame["row_id"])
    np.testing.assert_allclose(got["probability"].to_numpy(), want, rtol=0, atol=1e-8)
    # A file of other width is named, with both counts it could have had.
    bad = tmp_path / "bad.txt"
    bad.write_text("1,2,3\n")
    with pytest.raises(DataError, match=rf"has 3 fields .* names {len(names)} columns, or "
                                        rf"{len(names) - 1} without the label '{label}'"):
        run.predict(bad)


def test_shipped_criteo_config_reads_the_kaggle_file_as_it_is():
    import autoft_fast

    cfg = load_data_config(Path(autoft_fast.__file__).parent / "configs" / "datasets" / "criteo.yaml")
    assert cfg.files[0].name == "train.txt" and cfg.csv_sep == "\t"
    assert cfg.columns == ("label", *[f"I{i}" for i in range(1, 14)],
                           *[f"C{i}" for i in range(1, 27)])


def test_a_header_of_another_order_or_other_names_is_not_read_as_a_row(tmp_path):
    # Read as data, such a line would be one row with every column mislabelled (dropped only
    # because its domain value is no domain): refused, with the reason.
    frame = make_frame(seed=6)
    names = list(frame.columns)
    path = tmp_path / "data.txt"
    frame.to_csv(path, index=False)                      # a header, in the file's order
    shuffled = names[1:] + names[:1]
    with pytest.raises(DataError, match=r"looks like a header \(8 of its 8 fields are column "
                                        "names"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.txt"], columns=shuffled),
                                          tmp_path))
    body = path.read_text().split("\n", 1)[1]
    path.write_text("y,d,u,i,p,a,t,s\n" + body)          # a header of other names
    cfg = DataConfig.from_dict(base_dict(files=["data.txt"], columns=names), tmp_path)
    with pytest.raises(DataError, match=r"looks like a header \(its label field 'click' holds "
                                        "'y', not a number"):
        prepare_data(cfg)
    path.write_text(body)                                # no header: the first line is a row
    assert prepare_data(cfg).stats["rows_read"] == len(frame)


def test_a_missing_column_of_data_columns_gets_a_suggestion(tmp_path):
    names = [c if c != "user" else "usr" for c in make_frame().columns]
    with pytest.raises(DataError, match="column 'user' .categorical. is not in data.columns; "
                                        "did you mean 'usr'"):
        DataConfig.from_dict(base_dict(files=["data.txt"], columns=names), tmp_path)


def test_predict_sep_reads_a_file_of_another_separator(headerless_run, tmp_path, capsys, caplog):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    frame = pd.read_csv(src, dtype=str, keep_default_na=False, na_values=[""])
    want = run.predict(frame).to_numpy()
    tabbed = tmp_path / "rows.txt"   # a .txt file: read with the run's csv_sep (',') by default
    frame.drop(columns=[run.encoder.cfg.label]).to_csv(tabbed, sep="\t", index=False, header=False)
    with pytest.raises(DataError, match=r"has 1 field \(sep=','\)"):
        run.predict(tabbed)
    with caplog.at_level("INFO", logger="autoft_fast"):
        got = run.predict(tabbed, sep="\t").to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert caplog.text.count("rows.txt has no header line and one field fewer than "
                             "data.columns: read as its columns without the label 'click'") == 1
    with pytest.raises(DataError, match="sep must be one character"):
        run.predict(tabbed, sep="\t\t")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run_dir), "--data", str(tabbed), "--out", str(out),
                 "--sep", "\\t", "--keep", "row_id"]) == 0
    np.testing.assert_allclose(pd.read_csv(out)["probability"].to_numpy(), want, rtol=0,
                               atol=1e-8)
    assert main(["predict", "--run", str(run_dir), "--data", str(tabbed), "--out", str(out),
                 "--sep", ";;", "--force"]) == 2
    assert "--sep must be one character" in capsys.readouterr().err


def _gzip(path: Path, name: str) -> Path:
    import gzip
    out = path.parent / name
    with gzip.open(out, "wb") as f:
        f.write(path.read_bytes())
    return out


@pytest.mark.parametrize("short_line", [False, True])
def test_gzip_compressed_files_give_the_tensors_of_the_plain_ones(tmp_path, short_line):
    path = write(tmp_path, make_frame(seed=8))
    if short_line:  # a short line of a file with a header: pandas' reader takes over
        lines = path.read_text().splitlines()
        lines[9] = ",".join(lines[9].split(",")[:-2])
        path.write_text("\n".join(lines) + "\n")
    plain = prepare_data(DataConfig.from_dict(base_dict(), tmp_path), chunk_rows=64)
    _gzip(path, "data.csv.gz")
    _gzip(path, "train.gz")   # a bare .gz, as Avazu's download is named: CSV
    for name in ("data.csv.gz", "train.gz"):
        got = prepare_data(DataConfig.from_dict(base_dict(files=[name]), tmp_path), chunk_rows=64)
        assert_same(got, plain)
    # Header-less and tab-separated, as Criteo's train.txt, compressed.
    frame = make_frame(seed=8)
    txt = tmp_path / "train.txt"
    frame.to_csv(txt, sep="\t", index=False, header=False)
    _gzip(txt, "train.txt.gz")
    cfg = base_dict(files=["train.txt.gz"], columns=list(frame.columns), csv_sep="\t")
    got = prepare_data(DataConfig.from_dict(cfg, tmp_path))
    want = prepare_data(DataConfig.from_dict(dict(cfg, files=["train.txt"]), tmp_path))
    assert_same(got, want)


def test_gzip_content_under_a_plain_name_and_a_compressed_parquet_are_named(tmp_path):
    path = write(tmp_path, make_frame())
    _gzip(path, "hidden.csv")
    with pytest.raises(DataError, match="hidden.csv is gzip-compressed: name it hidden.csv.gz"):
        prepare_data(DataConfig.from_dict(base_dict(files=["hidden.csv"]), tmp_path))
    with pytest.raises(DataError, match="gzip-compressed Parquet file"):
        DataConfig.from_dict(base_dict(files=["data.parquet.gz"]), tmp_path)
    with pytest.raises(DataError, match="cannot tell the format of 'data.json.gz'"):
        DataConfig.from_dict(base_dict(files=["data.json.gz"]), tmp_path)


def test_predict_reads_a_gzip_compressed_file(headerless_run, tmp_path):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    want = run.predict(src).to_numpy()
    for name, source in (("rows.csv.gz", src), ("rows.txt.gz", plain)):
        np.testing.assert_allclose(run.predict(_gzip(source, name)).to_numpy(), want,
                                   rtol=0, atol=1e-12)
    # A short line: pandas' reader takes over, on the compressed stream too.
    lines = src.read_text().splitlines()
    lines[5] = ",".join(lines[5].split(",")[:-1])
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(run.predict(_gzip(short, "short.csv.gz")).to_numpy(),
                               run.predict(short).to_numpy(), rtol=0, atol=1e-12)


def test_predict_file_says_how_many_rows_are_of_other_domains(headerless_run, tmp_path, caplog):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    cfg = run.encoder.cfg
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    others = int((frame[cfg.domain_column] != cfg.target_domain).sum())
    assert 0 < others < len(frame)
    with caplog.at_level("INFO", logger="autoft_fast"):
        n = run.predict_file(src, tmp_path / "p.csv")
    assert n == len(frame)
    assert (f"{others:,} of the {n:,} rows of {src.name} are not of the model's target domain "
            f"'{cfg.target_domain}' (column '{cfg.domain_column}')") in caplog.text
    caplog.clear()
    only = tmp_path / "target.csv"
    frame[frame[cfg.domain_column] == cfg.target_domain].to_csv(only, index=False)
    with caplog.at_level("INFO", logger="autoft_fast"):
        run.predict_file(only, tmp_path / "q.csv")
    assert "not of the model's target domain" not in caplog.text


def test_a_damaged_gzip_file_is_named_in_one_error(tmp_path, headerless_run):
    path = write(tmp_path, make_frame(seed=9, n_source=3000, n_target=1000))
    gz = _gzip(path, "data.csv.gz").read_bytes()
    damaged = {"early.csv.gz": gz[:1000], "cut.csv.gz": gz[: len(gz) // 2],
               "flipped.csv.gz": gz[:len(gz) // 2] + bytes(64) + gz[len(gz) // 2 + 64:]}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"cannot (read|parse) .*{name}"):
            prepare_data(DataConfig.from_dict(base_dict(files=[name]), tmp_path))
    run = load_run(headerless_run[0])
    src = headerless_run[1]
    raw = _gzip(src, "rows.csv.gz").read_bytes()
    (tmp_path / "bad.csv.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot (read|parse) .*bad.csv.gz"):
        run.predict(tmp_path / "bad.csv.gz")


def test_predict_refuses_a_cut_or_long_line_of_a_headerless_file_with_its_line(headerless_run,
                                                                               tmp_path):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    lines = plain.read_text().splitlines()
    cut = tmp_path / "cut.txt"
    cut.write_text("\n".join(lines[:5] + ["1,2,3"] + lines[5:]) + "\n")
    with pytest.raises(DataError, match=rf"cannot score cut.txt, line 6: expected {len(names)} "
                                        r"fields, saw 3 \(a cut line\?\)"):
        run.predict(cut)
    long = tmp_path / "long.txt"
    long.write_text("\n".join(lines[:3] + [lines[3] + ",x"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=rf"long.txt, line 4: expected {len(names)} fields, "
                                        rf"saw {len(names) + 1}"):
        run.predict(long)


def test_predict_warns_when_a_missing_column_shifts_a_headerless_file(headerless_run, tmp_path):
    # One field short because a feature is missing, not the label: read as "without the
    # label", every column after the gap takes its neighbour's values. It cannot be told
    # from the field count; the unknown values show it.
    import warnings
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    # The last feature missing: every feature column after the label's place takes its left
    # neighbour's values (the multi-hot tags get prices, the device item ids).
    last_feature = [c for c in names if c in run.feature_columns][-1]
    shifted = tmp_path / "shifted.txt"
    frame.drop(columns=[last_feature]).to_csv(shifted, index=False, header=False)
    with pytest.warns(UserWarning, match="shifted.txt: most values of column.* are unknown to "
                                         "the model.*if another column is missing instead"):
        run.predict(shifted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right file: no such warning
        run.predict(plain)
        run.predict_file(plain, tmp_path / "ok.csv")
    new_users = frame.copy()
    cat = run.encoder.cfg.categorical[0]
    new_users[cat] = [f"new{i}" for i in range(len(frame))]
    with pytest.warns(UserWarning, match=f"the frame: most values of column.*'{cat}' 100%.*"
                                         "expected for values the model never saw"):
        run.predict(new_users)


def test_predict_hints_name_what_predict_can_change(headerless_run, tmp_path):
    run_dir, src, plain, names = headerless_run
    run = load_run(run_dir)
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    tabbed = tmp_path / "rows.txt"
    frame.to_csv(tabbed, sep="\t", index=False, header=False)
    with pytest.raises(DataError, match=r"--sep sets the separator of a file to score"):
        run.predict(tabbed)
    # A run trained on files with a header: a header-less file to score needs one.
    from test_predict import _dataset
    import contextlib, io
    root = tmp_path / "headed"
    root.mkdir()
    exp = tiny_experiment(root, {"data": str(_dataset(root, dense=False))},
                          finetune={"epochs": 1, "batch_size": 256})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all",
                     "--no-progress"]) == 0
    headed = load_run(last_line_run_dir(out.getvalue()))
    with pytest.raises(DataError, match="give it one with the feature columns' names"):
        headed.predict(plain)
    semi = tmp_path / "semi.csv"
    frame.to_csv(semi, sep=";", index=False)
    with pytest.raises(DataError, match="the run's data.csv_sep unless --sep names another"):
        headed.predict(semi)
