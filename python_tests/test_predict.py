"""Predicting with a saved run: self-contained run folders, new rows encoded with the saved
feature map, probabilities equal to the training code's, ids carried through."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from autoft_fast.cli import main
from autoft_fast.config import load_config
from autoft_fast.data import DataConfig, prepare_data
from autoft_fast.data.config import DataError
from autoft_fast.data.encode import RowEncoder
from autoft_fast.train.predict import find_model_dir, load_run
from autoft_fast.train.runner import load_data

from test_cli import TINY_SYNTHETIC, last_line_run_dir, tiny_experiment


def _dataset(root: Path, dense: bool) -> Path:
    """The tiny synthetic data set, with `price` dense when asked, and a row_id column."""
    exp = tiny_experiment(root, {"synthetic": TINY_SYNTHETIC})
    assert main(["generate", "--config", str(exp), "--out", str(root / "data")]) == 0
    doc = yaml.safe_load((root / "data" / "dataset.yaml").read_text())
    frame = pd.read_csv(root / "data" / "synthetic.csv", dtype=str)
    frame.insert(0, "row_id", [f"r{i}" for i in range(len(frame))])
    frame.to_csv(root / "data" / "synthetic.csv", index=False)
    if dense:
        doc["data"]["numeric"] = [{"name": "price", "mode": "dense"}]
    (root / "data" / "dataset.yaml").write_text(yaml.safe_dump(doc))
    return root / "data" / "dataset.yaml"


@pytest.fixture(scope="module", params=["bucket", "dense"])
def finetuned(request, tmp_path_factory):
    """(experiment YAML, run directory) of one `finetune --strategy autoft` run whose
    policy also reads value frequencies (a buffer that must travel with the weights)."""
    root = tmp_path_factory.mktemp(f"predict-{request.param}")
    dataset = _dataset(root, dense=request.param == "dense")
    exp = tiny_experiment(root, {"data": str(dataset)},
                          autoft={"backend": "reference", "policy_input": "frozen+freq"},
                          finetune={"epochs": 2, "batch_size": 256})
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["finetune", "--config", str(exp), "--strategy", "autoft",
                     "--no-progress"]) == 0
    return exp, last_line_run_dir(out.getvalue())


def _rows_of(split, encoded) -> np.ndarray:
    """For each row of `split`, the index of an identical encoded row of the file."""
    def key(d, i):
        parts = [d.sparse[i].numpy().tobytes()]
        if d.multihot is not None:
            parts.append(d.multihot[i].numpy().tobytes())
        if d.dense is not None:
            parts.append(d.dense[i].numpy().tobytes())
        return b"|".join(parts)
    where = {}
    for i in range(len(encoded)):
        where.setdefault(key(encoded, i), i)
    return np.array([where[key(split, i)] for i in range(len(split))])


def test_saved_run_is_self_contained(finetuned):
    _, run_dir = finetuned
    folder = find_model_dir(run_dir)
    assert folder == run_dir / "run"
    assert (folder / "model.pt").is_file() and (folder / "model.json").is_file()
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["autoft"]["backend"] == "reference"  # the effective config, resolved


def test_predictions_equal_the_training_code(finetuned, tmp_path):
    exp, run_dir = finetuned
    bundle = load_data(load_config(exp))
    test = bundle.splits["target_test"]
    # The training run's own test logits (written by run_strategy from the trained model).
    logits = np.load(run_dir / "run" / "test_scores.npy")
    # Move the run away from the config and the data cache: loading needs neither.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    run = load_run(moved)
    data_file = Path(bundle.data_config.files[0])
    frame = pd.read_csv(data_file, dtype=str, keep_default_na=False, na_values=[""])
    encoded = run.encoder.encode(frame)
    idx = _rows_of(test, encoded)  # every test row is encoded exactly as training did
    probs = run.predict(data_file).to_numpy()
    assert len(probs) == len(frame)
    np.testing.assert_allclose(probs[idx], 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-6)
    # A DataFrame gives the same numbers as the file.
    np.testing.assert_allclose(run.predict(frame).to_numpy(), probs, rtol=0, atol=1e-12)


def test_unseen_values_go_to_oov_and_buckets_follow_the_trained_edges(finetuned):
    _, run_dir = finetuned
    run = load_run(run_dir)
    fm = run.encoder.fm
    frame = pd.DataFrame({"user_id": ["never-seen"], "item_id": [None], "device": ["d0"],
                          "price": ["1e9"], "tags": ["nope|also-new"]})
    enc = run.encoder.encode(frame)
    user = fm.field("user_id")
    assert int(enc.sparse[0, 0]) == user.oov_id
    assert int(enc.sparse[0, 1]) == fm.field("item_id").oov_id  # missing text "" is unseen
    tags = fm.field("tags")
    assert enc.multihot[0, 0, :2].tolist() == [tags.oov_id, tags.oov_id]
    assert enc.multihot[0, 0, 2:].eq(tags.pad_id).all()
    if "price" in fm.single_fields:
        edges = fm.extra["bucket_edges"]["price"]
        price = fm.field("price")
        # above every edge: the last value bucket (PAD 0, missing 1, buckets 2..)
        assert int(enc.sparse[0, fm.single_fields.index("price")]) == price.offset + 2 + len(edges)
    else:
        from autoft_fast.data.stats import DENSE_LIMIT
        mean, std = fm.extra["dense_mean_std"]["price"]
        # standardised, and clipped where that is over a million deviations out
        assert enc.dense[0, 0].item() == pytest.approx(min((1e9 - mean) / std, DENSE_LIMIT),
                                                       rel=1e-6)
    assert 0.0 <= run.predict(frame).iloc[0] <= 1.0


@pytest.mark.parametrize("x", [[str(float(i)) for i in range(59)] + ["1e200"],
                               [f"{i % 5 + 1}e-200" for i in range(60)]],
                         ids=["one-1e200", "all-near-1e-200"])
def test_encoder_matches_the_pipeline_on_extreme_dense_values(tmp_path, x):
    n = 60
    frame = pd.DataFrame({"d": ["s", "t"] * (n // 2), "y": ["0", "0", "1", "1"] * (n // 4),
                          "a": [f"v{i % 3}" for i in range(n)], "x": x})
    frame.to_csv(tmp_path / "f.csv", index=False)
    cfg = DataConfig.from_dict({"files": ["f.csv"], "label": "y", "categorical": ["a"],
                                "numeric": [{"name": "x", "mode": "dense"}],
                                "domain": {"column": "d", "source": ["s"], "target": "t"},
                                "split": {"target": {"valid": 0.2, "test": 0.2}, "source": {"valid": 0.2}},
                                "cache": False}, tmp_path)
    bundle = prepare_data(cfg)
    enc = RowEncoder(cfg, bundle.feature_map, bundle.vocabularies).encode(frame)
    for name, split in bundle.splits.items():
        idx = _rows_of(split, enc)
        torch.testing.assert_close(enc.dense[idx], split.dense, rtol=0, atol=0, msg=name)
    assert enc.dense.std() > 0.5  # neither the huge nor the tiny values zeroed the column


def test_cli_predict_keeps_ids_and_refuses_to_overwrite(finetuned, tmp_path, capsys):
    _, run_dir = finetuned
    frame = pd.read_csv(load_run(run_dir).info["data"]["files"][0], dtype=str)
    new = frame.head(300)
    new.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run_dir), "--data", str(tmp_path / "new.csv"),
                 "--out", str(out)]) == 0
    got = pd.read_csv(out, dtype={"row_id": str})
    # default: every column that is neither a feature nor the label, then the probability
    assert got.columns.tolist() == ["row_id", "ts", "domain", "probability"]
    assert got["row_id"].tolist() == new["row_id"].tolist()
    assert got["probability"].between(0, 1).all()
    np.testing.assert_allclose(got["probability"].to_numpy(),
                               load_run(run_dir).predict(tmp_path / "new.csv").to_numpy(),
                               rtol=0, atol=1e-8)
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["predict", "--run", str(run_dir), "--data", str(tmp_path / "new.csv"),
                 "--out", str(out), "--keep", "row_id"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("autoft-fast: error:")]
    assert len(errors) == 1 and "exists; pass --force" in errors[0] and "Traceback" not in err
    assert out.read_bytes() == before
    assert main(["predict", "--run", str(run_dir), "--data", str(tmp_path / "new.csv"),
                 "--out", str(out), "--keep", "row_id", "--force"]) == 0
    assert pd.read_csv(out).columns.tolist() == ["row_id", "probability"]
    assert main(["predict", "--run", str(run_dir), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p2.csv"), "--keep", "nope"]) == 2
    assert "--keep column(s) ['nope']" in capsys.readouterr().err
    assert not list(tmp_path.glob(".p2.csv.*"))  # no temp file left behind


def test_predict_parquet_with_a_list_column(finetuned, tmp_path):
    _, run_dir = finetuned
    run = load_run(run_dir)
    frame = pd.read_csv(run.info["data"]["files"][0], dtype=str).head(50)
    listed = frame.copy()
    listed["tags"] = [t.split("|") if isinstance(t, str) else [] for t in frame["tags"]]
    listed.to_parquet(tmp_path / "new.parquet")
    np.testing.assert_allclose(run.predict(tmp_path / "new.parquet").to_numpy(),
                               run.predict(frame).to_numpy(), rtol=0, atol=1e-12)


def test_predict_of_a_frame_with_list_cells_reads_them_as_the_file_does(finetuned, tmp_path):
    # pd.read_parquet gives numpy arrays in a list column, str.split lists: each cell was
    # read as one unknown token, every tag to OOV.
    _, run_dir = finetuned
    run = load_run(run_dir)
    frame = pd.read_csv(run.info["data"]["files"][0], dtype=str).head(50)
    want = run.predict(frame).to_numpy()
    listed = frame.copy()
    listed["tags"] = [t.split("|") if isinstance(t, str) else [] for t in frame["tags"]]
    listed.to_parquet(tmp_path / "new.parquet")
    back = pd.read_parquet(tmp_path / "new.parquet")
    assert isinstance(back["tags"].iloc[0], np.ndarray)
    kept = back.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "most values ... are unknown" warning
        got_arrays = run.predict(back).to_numpy()
    np.testing.assert_allclose(got_arrays, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(run.predict(listed).to_numpy(), want, rtol=0, atol=1e-12)
    assert all(np.array_equal(a, b) for a, b in zip(back["tags"], kept["tags"]))  # untouched
    bad = frame.copy()
    bad["device"] = [["a"]] * len(bad)
    with pytest.raises(DataError, match="column 'device' of the frame holds lists"):
        run.predict(bad)


def test_damaged_saved_model_is_a_one_line_error(finetuned, tmp_path, capsys):
    _, run_dir = finetuned
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "run" / "model.pt").write_bytes(b"garbage")
    (tmp_path / "new.csv").write_text("user_id\nu1\n")
    assert main(["predict", "--run", str(broken), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.pt" in err and "could not be read" in err
    assert "delete it" not in err and "fine-tune the run again" in err
    # A model.pt of another model: what does not fit is named, not cut off at a colon.
    torch.save({"not_a_weight": torch.zeros(2)}, broken / "run" / "model.pt")
    with pytest.raises(ValueError, match=r"do not fit the model .*not_a_weight"):
        load_run(broken)
    (broken / "run" / "model.json").write_text("{")
    with pytest.raises(ValueError, match="model.json.*could not be read"):
        load_run(broken)


def test_compare_keep_models_and_choosing_one(tmp_path, capsys):
    dataset = _dataset(tmp_path, dense=False)
    exp = tiny_experiment(tmp_path, {"data": str(dataset)})
    assert main(["compare", "--config", str(exp), "--no-progress", "--keep-models"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    folders = sorted(p.parent.name for p in run_dir.rglob("model.json"))
    assert folders == ["autoft-seed0", "finetune_all-seed0"]
    with pytest.raises(ValueError, match="holds 2 saved models"):
        load_run(run_dir)
    run = load_run(run_dir / "runs" / "finetune_all-seed0")
    assert run.strategy == "finetune_all"
    logits = np.load(run_dir / "runs" / "finetune_all-seed0" / "test_scores.npy")
    bundle = load_data(load_config(exp))
    frame = pd.read_csv(dataset.parent / "synthetic.csv", dtype=str)
    idx = _rows_of(bundle.splits["target_test"], run.encoder.encode(frame))
    np.testing.assert_allclose(run.predict(frame).to_numpy()[idx], 1 / (1 + np.exp(-logits)),
                               rtol=0, atol=1e-6)


def test_predict_backend_option(finetuned, tmp_path, capsys):
    _, run_dir = finetuned
    frame = pd.read_csv(load_run(run_dir).info["data"]["files"][0], dtype=str).head(20)
    ref = load_run(run_dir, backend="reference").predict(frame).to_numpy()
    np.testing.assert_allclose(load_run(run_dir).predict(frame).to_numpy(), ref,
                               rtol=0, atol=1e-6)  # auto: the fastest backend, same numbers
    frame.to_csv(tmp_path / "n.csv", index=False)
    assert main(["predict", "--run", str(run_dir), "--data", str(tmp_path / "n.csv"),
                 "--out", str(tmp_path / "p.csv"), "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "autoft.backend" in err and "could not be read" not in err


def test_run_without_saved_model_says_so(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved model.*--keep-models"):
        find_model_dir(tmp_path / "r")


def test_predict_never_writes_over_its_input_and_a_header_only_file_gets_a_line(
        finetuned, tmp_path, capsys):
    _, run_dir = finetuned
    frame = pd.read_csv(load_run(run_dir).info["data"]["files"][0], dtype=str)
    new = tmp_path / "new.csv"
    frame.head(20).to_csv(new, index=False)
    before = new.read_bytes()
    assert main(["predict", "--run", str(run_dir), "--data", str(new), "--out", str(new),
                 "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert new.read_bytes() == before
    empty = tmp_path / "empty.csv"
    frame.head(0).to_csv(empty, index=False)
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run_dir), "--data", str(empty), "--out", str(out),
                 "--keep", "row_id"]) == 0
    assert out.read_text() == "row_id,probability\n"
    # An --out under a file, or in a folder that cannot be written: named, one line.
    assert main(["predict", "--run", str(run_dir), "--data", str(new), "--out",
                 str(new / "x.csv")]) == 2
    assert f"{str(new)!r} is a file, not a folder" in capsys.readouterr().err
    assert main(["predict", "--run", str(run_dir), "--data", str(new), "--out",
                 "/proc/x.csv"]) == 2
    err = capsys.readouterr().err
    assert "--out '/proc/x.csv' cannot be written in '/proc'" in err and ".tmp" not in err
    # The header without a final line break is the same file of no rows.
    empty.write_text(empty.read_text().rstrip("\n"))
    out.unlink()
    assert main(["predict", "--run", str(run_dir), "--data", str(empty), "--out", str(out),
                 "--keep", "row_id"]) == 0
    assert out.read_text() == "row_id,probability\n"


def test_a_run_with_sampled_evaluation_gates_warns_that_predictions_are_draws(finetuned):
    import json as _json
    import shutil
    _, run_dir = finetuned
    model = next(p.parent for p in Path(run_dir).rglob("model.json"))
    copy = Path(str(model) + "-sample")
    shutil.copytree(model, copy)
    info = _json.loads((copy / "model.json").read_text())
    info["autoft"]["eval_gates"] = "sample"
    (copy / "model.json").write_text(_json.dumps(info))
    with pytest.warns(UserWarning, match="eval_gates: sample"):
        load_run(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(model)  # argmax gates: no warning


def test_predict_copies_parquet_columns_exactly_and_ignores_unused_list_columns(finetuned,
                                                                                tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    _, run_dir = finetuned
    run = load_run(run_dir / "run")
    frame = pd.read_csv(run.info["data"]["files"][0], dtype=str).head(4)
    table = pa.Table.from_pandas(frame.drop(columns=["row_id"]), preserve_index=False)
    table = table.append_column("rid", pa.array([10000000001, 123456789012345, None, 7],
                                                pa.int64()))
    table = table.append_column("amount", pa.array([1234.56789012, 0.1, 3.0, 1e-12]))
    table = table.append_column("history", pa.array([[1, 2], [3], None, []]))
    pq.write_table(table, tmp_path / "ids.parquet")
    # A list column that is no feature does not stop predict(path) ...
    probs = run.predict(tmp_path / "ids.parquet")
    np.testing.assert_allclose(probs.to_numpy(), run.predict(frame).to_numpy(), atol=1e-12)
    # ... and predict_file copies the other columns as stored, every digit kept.
    run.predict_file(tmp_path / "ids.parquet", tmp_path / "out.csv")
    out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert out["rid"].tolist() == ["10000000001", "123456789012345", "", "7"]
    assert out["amount"].tolist() == ["1234.56789012", "0.1", "3", "1e-12"]
    assert out["history"].tolist() == ["[1, 2]", "[3]", "", "[]"]
    np.testing.assert_allclose(out["probability"].astype(float), probs, rtol=1e-8)


def test_stored_text_of_columns_arrow_cannot_cast():
    import pyarrow as pa
    from autoft_fast.train.predict import _stored_text
    col = pa.array([{"a": 1}, None, {"a": 20000000000000001}])
    assert _stored_text(col).tolist() == ["{'a': 1}", None, "{'a': 20000000000000001}"]
    ids = pa.array(["x", None, "x"]).dictionary_encode()
    assert _stored_text(ids).tolist() == ["x", None, "x"]


@pytest.mark.parametrize("last", ["null", "7.5", "inf"])
def test_a_parquet_id_column_predicts_row_by_row_whatever_its_dtype(finetuned, tmp_path, last):
    # Trained on CSV text ids. A Parquet copy of the rows with the ids as nullable integers
    # (one null) or floats (one 7.5 or inf): one odd value in the last row changes no other
    # row (a null made pandas read the ids as float64, a 7.5 turned every id into '834.0',
    # an inf raised OverflowError).
    _, run_dir = finetuned
    run = load_run(run_dir / "run")  # (a test above adds a second saved model)
    frame = pd.read_csv(run.info["data"]["files"][0], dtype=str).head(40)
    base = run.predict(frame).to_numpy()
    new = frame.copy()
    if last == "null":
        new["item_id"] = pd.array(frame["item_id"].astype(np.int64), dtype="Int64")
        new.loc[39, "item_id"] = pd.NA
        unknown = frame.assign(item_id=frame["item_id"].where(frame.index != 39))
    else:
        new["item_id"] = frame["item_id"].astype(np.float64)
        new.loc[39, "item_id"] = float(last)
        unknown = frame.assign(item_id=frame["item_id"].where(frame.index != 39, "never-seen"))
    new.to_parquet(tmp_path / "new.parquet", index=False)
    got = run.predict(tmp_path / "new.parquet").to_numpy()
    np.testing.assert_array_equal(got[:39], base[:39])
    np.testing.assert_array_equal(got[39:], run.predict(unknown).to_numpy()[39:])
    assert got[39] != base[39]


def test_predictions_are_written_in_the_format_the_out_name_says(finetuned, tmp_path):
    _, run_dir = finetuned
    run = load_run(run_dir / "run")
    frame = pd.read_csv(run.info["data"]["files"][0], dtype=str).head(300)
    frame.to_csv(tmp_path / "new.csv", index=False)
    paths = {k: tmp_path / f"p.{k}" for k in ("csv", "parquet", "csv.gz", "tsv", "tsv.gz")}
    for p in paths.values():
        assert run.predict_file(tmp_path / "new.csv", p, keep=["row_id", "ts"]) == 300
    want = pd.read_csv(paths["csv"], dtype={"row_id": str, "ts": str})
    got = {"parquet": pd.read_parquet(paths["parquet"]),
           "csv.gz": pd.read_csv(paths["csv.gz"], dtype={"row_id": str, "ts": str}),
           "tsv": pd.read_csv(paths["tsv"], sep="\t", dtype={"row_id": str, "ts": str}),
           "tsv.gz": pd.read_csv(paths["tsv.gz"], sep="\t", dtype={"row_id": str, "ts": str})}
    assert paths["parquet"].read_bytes()[:4] == b"PAR1"
    assert paths["csv.gz"].read_bytes()[:2] == b"\x1f\x8b"
    for k, g in got.items():
        assert g.columns.tolist() == ["row_id", "ts", "probability"], k
        assert g["row_id"].tolist() == want["row_id"].tolist(), k
        np.testing.assert_allclose(g["probability"].to_numpy(), want["probability"].to_numpy(),
                                   rtol=1e-8, err_msg=k)
    # No rows: the header alone (Parquet: the schema), never an empty or broken file.
    frame.head(0).to_csv(tmp_path / "none.csv", index=False)
    run.predict_file(tmp_path / "none.csv", tmp_path / "none.parquet", keep=["row_id"])
    empty = pd.read_parquet(tmp_path / "none.parquet")
    assert empty.columns.tolist() == ["row_id", "probability"] and len(empty) == 0
    assert not list(tmp_path.glob(".*.tmp"))  # no partial file left behind
