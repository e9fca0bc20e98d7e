"""Joining MovieLens-1M's three ``.dat`` tables into the one CSV that
``configs/datasets/movielens1m.yaml`` describes (the pipeline reads one table).

Example::

    from autoft_fast.data.movielens import join_movielens_1m
    join_movielens_1m("ml-1m", "ml-1m/ml1m.csv")    # then: data: ml-1m/movielens1m.yaml
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# rating >= this is a click: ratings 4 and 5 are the "liked" ones.
LIKED_RATING = 4


def join_movielens_1m(src_dir: Path | str, out_csv: Path | str) -> Path:
    """Read ``ratings.dat``, ``users.dat`` and ``movies.dat`` from ``src_dir`` ('::'-separated,
    no header, Latin-1 as GroupLens ships them), join the user and movie columns onto every
    rating, add ``click = rating >= 4``, drop the rating and the title, and write ``out_csv``
    (rows in the ratings file's order; an existing file of that name is replaced, never one
    of the inputs). Returns ``out_csv``."""
    src = Path(src_dir)
    for name in ("ratings.dat", "users.dat", "movies.dat"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"MovieLens-1M file not found: {src / name}")
        if Path(out_csv).exists() and (src / name).samefile(out_csv):
            raise ValueError(f"out_csv {str(out_csv)!r} is the input file {name}: give "
                             "another name (e.g. ml1m.csv)")

    def read(name, cols):
        return pd.read_csv(src / name, sep="::", engine="python", header=None, names=cols,
                           dtype=str, encoding="latin-1")

    ratings = read("ratings.dat", ["user_id", "movie_id", "rating", "timestamp"])
    users = read("users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    movies = read("movies.dat", ["movie_id", "title", "genres"])
    df = ratings.merge(users, on="user_id", how="left").merge(movies, on="movie_id", how="left")
    df["click"] = (df["rating"].astype(int) >= LIKED_RATING).astype(int)
    cols = ["user_id", "movie_id", "timestamp", "gender", "age", "occupation", "zip", "genres", "click"]
    out = Path(out_csv)
    tmp = out.with_name(f".{out.name}.tmp")
    df[cols].to_csv(tmp, index=False)
    tmp.replace(out)  # written whole, or not at all
    return out
