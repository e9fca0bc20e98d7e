"""Joining MovieLens' tables into the one CSV that ``configs/datasets/movielens1m.yaml`` or
``configs/datasets/movielens100k.yaml`` describes (the pipeline reads one table).

Example::

    from autoft_fast.data.movielens import join_movielens_1m, join_movielens_100k
    join_movielens_1m("ml-1m", "ml-1m/ml1m.csv")           # then: data: ml-1m/movielens1m.yaml
    join_movielens_100k("ml-100k", "ml-100k/ml100k.csv")   # data: ml-100k/movielens100k.yaml
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# rating >= this is a click: ratings 4 and 5 are the "liked" ones.
LIKED_RATING = 4


def _check_inputs(src: Path, names, out_csv, release: str, example: str) -> None:
    for name in names:
        if not (src / name).is_file():
            raise FileNotFoundError(f"{release} file not found: {src / name}")
        if Path(out_csv).exists() and (src / name).samefile(out_csv):
            raise ValueError(f"out_csv {str(out_csv)!r} is the input file {name}: give "
                             f"another name (e.g. {example})")


def _write(df: pd.DataFrame, cols, out_csv) -> Path:
    out = Path(out_csv)
    tmp = out.with_name(f".{out.name}.tmp")
    df[cols].to_csv(tmp, index=False)
    tmp.replace(out)  # written whole, or not at all
    return out


def join_movielens_1m(src_dir: Path | str, out_csv: Path | str) -> Path:
    """Read ``ratings.dat``, ``users.dat`` and ``movies.dat`` from ``src_dir`` ('::'-separated,
    no header, Latin-1 as GroupLens ships them), join the user and movie columns onto every
    rating, add ``click = rating >= 4``, drop the rating and the title, and write ``out_csv``
    (rows in the ratings file's order; an existing file of that name is replaced, never one
    of the inputs). Returns ``out_csv``."""
    src = Path(src_dir)
    _check_inputs(src, ("ratings.dat", "users.dat", "movies.dat"), out_csv, "MovieLens-1M",
                  "ml1m.csv")

    def read(name, cols):
        return pd.read_csv(src / name, sep="::", engine="python", header=None, names=cols,
                           dtype=str, encoding="latin-1")

    ratings = read("ratings.dat", ["user_id", "movie_id", "rating", "timestamp"])
    users = read("users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    movies = read("movies.dat", ["movie_id", "title", "genres"])
    df = ratings.merge(users, on="user_id", how="left").merge(movies, on="movie_id", how="left")
    df["click"] = (df["rating"].astype(int) >= LIKED_RATING).astype(int)
    cols = ["user_id", "movie_id", "timestamp", "gender", "age", "occupation", "zip", "genres", "click"]
    return _write(df, cols, out_csv)


def join_movielens_100k(src_dir: Path | str, out_csv: Path | str) -> Path:
    """Read ``u.data`` (tab-separated: user, movie, rating, timestamp), ``u.user`` and
    ``u.item`` ('|'-separated; ``u.item`` ends in one 0/1 flag per genre, in the order of
    ``u.genre``), all without a header and Latin-1 as GroupLens ships them. Joins the user
    columns and the movie's genres (``Action|Comedy``) and release year onto every rating,
    adds ``click = rating >= 4``, drops the rating, and writes ``out_csv`` (rows in the ratings
    file's order; written whole or not at all, never over an input). Returns ``out_csv``.

    Example::

        join_movielens_100k("ml-100k", "ml-100k/ml100k.csv")
    """
    src = Path(src_dir)
    _check_inputs(src, ("u.data", "u.user", "u.item", "u.genre"), out_csv, "MovieLens-100k",
                  "ml100k.csv")

    def read(name, sep, cols=None):
        try:
            return pd.read_csv(src / name, sep=sep, header=None, names=cols, dtype=str,
                               encoding="latin-1", keep_default_na=False)
        except pd.errors.ParserError as exc:
            raise ValueError(f"cannot read {src / name} as MovieLens-100k's "
                             f"{name}: {str(exc).splitlines()[0]}") from None

    genre_table = read("u.genre", "|", ["genre", "code"])
    genres = list(genre_table.loc[genre_table["genre"] != "", "genre"])
    ratings = read("u.data", "\t", ["user_id", "movie_id", "rating", "timestamp"])
    users = read("u.user", "|", ["user_id", "age", "gender", "occupation", "zip"])
    movies = read("u.item", "|")
    if movies.shape[1] != 5 + len(genres):
        raise ValueError(f"{src / 'u.item'} has {movies.shape[1]} columns; MovieLens-100k's "
                         f"has 5 and one flag per genre of u.genre ({len(genres)})")
    flags = movies.iloc[:, 5:].to_numpy() == "1"
    movies = pd.DataFrame({
        "movie_id": movies[0],
        "genres": ["|".join(g for g, on in zip(genres, row) if on) for row in flags],
        # "01-Jan-1995" -> "1995"; one movie has no date (empty)
        "release_year": movies[2].str[-4:],
    })
    unknown = set(ratings["user_id"]) - set(users["user_id"])
    if unknown:
        raise ValueError(f"{src / 'u.data'} has ratings of {len(unknown)} user id(s) not in "
                         f"u.user (e.g. {sorted(unknown)[0]!r}): is it MovieLens-100k's u.data?")
    df = ratings.merge(users, on="user_id", how="left").merge(movies, on="movie_id", how="left")
    df["click"] = (df["rating"].astype(int) >= LIKED_RATING).astype(int)
    cols = ["user_id", "movie_id", "timestamp", "age", "gender", "occupation", "zip", "genres",
            "release_year", "click"]
    return _write(df, cols, out_csv)
