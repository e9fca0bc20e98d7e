"""The shipped dataset configs (autoft_fast/configs/datasets/*.yaml) on small generated files
with the same columns: each one parses, preprocesses, and runs a tiny pretrain + fine-tune,
so that a config cannot drift from the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import autoft_fast
from autoft_fast.cli import main
from autoft_fast.data import load_data_config, prepare_data
from autoft_fast.data.movielens import join_movielens_1m, join_movielens_100k

DATASETS = Path(autoft_fast.__file__).parent / "configs" / "datasets"
N = 2000


def _hex(rng, n, k, prefix=""):
    return [f"{prefix}{v:08x}" for v in rng.integers(0, k, n) * 2654435761 % (1 << 32)]


def _criteo(tmp: Path, dom: dict) -> None:
    rng = np.random.default_rng(0)
    cols = {"label": rng.integers(0, 2, N)}
    for i in range(1, 14):
        v = rng.poisson(3, N).astype(object)
        v[rng.random(N) < 0.1] = ""  # Criteo has many empty counts
        cols[f"I{i}"] = v
    for i in range(1, 27):
        cols[f"C{i}"] = _hex(rng, N, 30)
    cols["C20"] = rng.choice([*dom["source"], dom["target"]], N)
    # The Kaggle file's layout: tab-separated, no header line.
    pd.DataFrame(cols).to_csv(tmp / "train.txt", sep="\t", index=False, header=False)


def _avazu(tmp: Path, dom: dict) -> None:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"id": np.arange(N), "click": rng.integers(0, 2, N),
                       "hour": 14102100 + rng.integers(0, 10, N) * 100 + rng.integers(0, 24, N)})
    for c in ["C1", "banner_pos", "device_type", "device_conn_type", "C15", "C16", "C18"]:
        df[c] = rng.integers(0, 5, N)
    for c in ["site_id", "site_domain", "app_id", "app_domain", "app_category", "device_id",
              "device_ip", "device_model"]:
        df[c] = _hex(rng, N, 40)
    for c in ["C14", "C17", "C19", "C20", "C21"]:
        df[c] = rng.integers(0, 200, N)
    df["site_category"] = rng.choice([*dom["source"], dom["target"]], N)
    order = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
             "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
             "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
    df[order].to_csv(tmp / "train.csv", index=False)


def _movielens(tmp: Path, dom: dict) -> None:
    # The three GroupLens tables, then the documented join.
    rng = np.random.default_rng(2)
    n_users, n_movies = 210, 80
    codes = [int(v) for v in [*dom["source"], dom["target"]]]
    occ = [codes[u % len(codes)] for u in range(n_users)]  # every configured domain has users
    users = [f"{u + 1}::{rng.choice(['M', 'F'])}::{rng.choice([1, 18, 25, 35])}::{occ[u]}::{rng.integers(10000, 10100)}"
             for u in range(n_users)]
    genres = ["Action", "Comedy", "Drama", "Children's", "Sci-Fi"]
    movies = [f"{m + 1}::Title {m} (1995)::{'|'.join(rng.choice(genres, rng.integers(1, 4), replace=False))}"
              for m in range(n_movies)]
    ratings = [f"{rng.integers(1, n_users + 1)}::{rng.integers(1, n_movies + 1)}::{rng.integers(1, 6)}::{978300000 + i}"
               for i in range(N)]
    for name, lines in (("users.dat", users), ("movies.dat", movies), ("ratings.dat", ratings)):
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    join_movielens_1m(tmp, tmp / "ml1m.csv")


GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _movielens100k(tmp: Path, dom: dict) -> None:
    # The four GroupLens files of ml-100k, then the documented join.
    rng = np.random.default_rng(3)
    n_users, n_movies = 300, 90
    occ = [*dom["source"], dom["target"]]
    users = [f"{u + 1}|{rng.integers(7, 74)}|{rng.choice(['M', 'F'])}|{occ[u % len(occ)]}|"
             f"{rng.integers(10000, 10100)}" for u in range(n_users)]
    movies = []
    for m in range(n_movies):
        flags = (rng.random(len(GENRES_100K)) < 0.15).astype(int)
        date = "" if m == 0 else f"01-Jan-{rng.integers(1930, 1999)}"  # one movie has none
        movies.append(f"{m + 1}|Title {m} ({date[-4:]})|{date}||http://x/{m}|"
                      + "|".join(map(str, flags)))
    ratings = [f"{rng.integers(1, n_users + 1)}\t{rng.integers(1, n_movies + 1)}\t"
               f"{rng.integers(1, 6)}\t{880000000 + i}" for i in range(N)]
    genre = [f"{g}|{i}" for i, g in enumerate(GENRES_100K)] + [""]
    for name, lines in (("u.user", users), ("u.item", movies), ("u.data", ratings),
                        ("u.genre", genre)):
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    join_movielens_100k(tmp, tmp / "ml100k.csv")


MAKERS = {"criteo": _criteo, "avazu": _avazu, "movielens1m": _movielens,
          "movielens100k": _movielens100k}


def test_every_shipped_dataset_config_is_tested():
    assert sorted(p.stem for p in DATASETS.glob("*.yaml")) == sorted(MAKERS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_dataset_config_on_a_generated_file(tmp_path, name, capsys):
    doc = yaml.safe_load((DATASETS / f"{name}.yaml").read_text())
    MAKERS[name](tmp_path, doc["data"]["domain"])
    doc["data"]["cache"] = False
    doc["data"]["min_count"] = 2  # 2,000 rows: keep the ids a real file's min_count would keep
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))   # beside the data, as the YAML's comments say
    cfg = load_data_config(cfg_path)
    bundle = prepare_data(cfg)
    fm = bundle.feature_map
    assert fm.domain_values[-1] == str(doc["data"]["domain"]["target"])
    assert all(len(bundle.splits[s]) > 0 for s in bundle.splits)
    for f in fm.fields:  # every feature has real values, not only PAD / OOV
        assert f.vocab_size > 2, f.name
    assert sum(len(d) for d in bundle.splits.values()) == bundle.stats["rows_read"] - bundle.stats["rows_other_domains"]

    exp = {
        "name": f"tiny-{name}", "data": str(cfg_path),
        "model": {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]},
        "pretrain": {"epochs": 1, "batch_size": 256}, "finetune": {"epochs": 1, "batch_size": 256},
        "autoft": {"backend": "reference"}, "strategies": ["finetune_all", "autoft"], "seeds": [0],
        "run_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    capsys.readouterr()
    assert main(["compare", "--config", str(tmp_path / "exp.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| finetune_all |" in out and "| autoft |" in out


def test_movielens_join_keeps_every_rating_and_derives_the_label(tmp_path):
    _movielens(tmp_path, yaml.safe_load((DATASETS / "movielens1m.yaml").read_text())["data"]["domain"])
    df = pd.read_csv(tmp_path / "ml1m.csv", dtype=str)
    ratings = pd.read_csv(tmp_path / "ratings.dat", sep="::", engine="python", header=None, dtype=str)
    assert len(df) == len(ratings) and df["genres"].notna().all() and df["occupation"].notna().all()
    assert (df["click"].astype(int) == (ratings[2].astype(int) >= 4).astype(int)).all()
    assert list(df["timestamp"]) == list(ratings[3])
    before = (tmp_path / "movies.dat").read_bytes()
    with pytest.raises(ValueError, match="is the input file movies.dat"):
        join_movielens_1m(tmp_path, tmp_path / "movies.dat")
    assert (tmp_path / "movies.dat").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="users.dat"):
        (tmp_path / "users.dat").unlink()
        join_movielens_1m(tmp_path, tmp_path / "x.csv")


def test_movielens_100k_join_keeps_every_rating_with_its_genres_and_year(tmp_path):
    _movielens100k(tmp_path, yaml.safe_load((DATASETS / "movielens100k.yaml").read_text())
                   ["data"]["domain"])
    df = pd.read_csv(tmp_path / "ml100k.csv", dtype=str, keep_default_na=False)
    ratings = pd.read_csv(tmp_path / "u.data", sep="\t", header=None, dtype=str)
    items = pd.read_csv(tmp_path / "u.item", sep="|", header=None, dtype=str,
                        keep_default_na=False).set_index(0)
    assert len(df) == len(ratings) and list(df["timestamp"]) == list(ratings[3])
    assert (df["click"].astype(int) == (ratings[2].astype(int) >= 4).astype(int)).all()
    for _, row in df.head(200).iterrows():  # genres and year from the movie's own line
        item = items.loc[row["movie_id"]]
        assert row["genres"] == "|".join(g for g, f in zip(GENRES_100K, item.loc[5:]) if f == "1")
        assert row["release_year"] == item[2][-4:]
    assert (df["occupation"] != "").all() and (df["release_year"] == "").any()
    with pytest.raises(ValueError, match="is the input file u.data"):
        join_movielens_100k(tmp_path, tmp_path / "u.data")
    (tmp_path / "u.data").write_text("999\t1\t5\t880000000\n")
    with pytest.raises(ValueError, match="ratings of 1 user id.*not in u.user"):
        join_movielens_100k(tmp_path, tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()


def test_movielens_100k_join_refuses_files_that_would_shift_or_lose_values(tmp_path):
    # A line of another width, a table of another width (pandas would take the extra field
    # as an index and shift every column), bad ratings, unknown movies, an empty file, and a
    # folder as out_csv: each a ValueError naming the file (and line), nothing written.
    _movielens100k(tmp_path, yaml.safe_load((DATASETS / "movielens100k.yaml").read_text())
                   ["data"]["domain"])
    good = (tmp_path / "u.data").read_text().splitlines()
    out = tmp_path / "out.csv"

    def refused(lines, match):
        (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            join_movielens_100k(tmp_path, out)
        assert not out.exists() and not list(tmp_path.glob(".*.tmp"))

    refused([ln + "\t7" for ln in good], "u.data has 5 fields per line where MovieLens-100k's "
                                        r"u.data has 4 \(user_id, movie_id, rating, timestamp\)")
    refused(good[:2] + [good[2] + "\t7"] + good[3:], "cannot read .*u.data.*line 3")
    refused(good[:4] + ["1\t1\t4.5\t880000000"] + good[5:], r"u.data, line 5: rating '4.5' is "
                                                            "not an integer from 1 to 5")
    refused(good[:1] + ["1\t1\t3\t"] + good[2:], "u.data, line 2: the timestamp is empty")
    refused(good + ["1\t99999\t3\t880000000"], "ratings of 1 movie id.*not in u.item")
    (tmp_path / "u.data").write_text("")
    with pytest.raises(ValueError, match="u.data is empty"):
        join_movielens_100k(tmp_path, out)
    (tmp_path / "u.data").write_text("\n".join(good) + "\n")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="out_csv .*folder' is a folder: give a file name"):
        join_movielens_100k(tmp_path, tmp_path / "folder")
    assert not list(tmp_path.glob(".*.tmp"))
    assert join_movielens_100k(tmp_path, out) == out and out.is_file()


def test_movielens_1m_join_refuses_a_ratings_file_of_another_width(tmp_path):
    _movielens(tmp_path, yaml.safe_load((DATASETS / "movielens1m.yaml").read_text())["data"]["domain"])
    lines = (tmp_path / "ratings.dat").read_text(encoding="latin-1").splitlines()
    (tmp_path / "ratings.dat").write_text("\n".join(ln + "::x" for ln in lines) + "\n")
    with pytest.raises(ValueError, match="ratings.dat has 5 fields per line where "
                                         "MovieLens-1M's ratings.dat has 4"):
        join_movielens_1m(tmp_path, tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()
