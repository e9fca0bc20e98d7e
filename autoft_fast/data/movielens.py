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
    if Path(out_csv).is_dir():
        raise ValueError(f"out_csv {str(out_csv)!r} is a folder: give a file name (e.g. "
                         f"{Path(out_csv) / example})")


def _read(path: Path, sep: str, cols: list[str] | None, release: str,
          fields: int | None = None) -> pd.DataFrame:
    """A GroupLens table (no header, Latin-1) as text, every line with the file's field
    count (``len(cols)``, or ``fields``) or a ValueError naming the file: a line of another
    width must not shift the columns of the rest."""
    want = len(cols) if cols is not None else fields
    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, encoding="latin-1",
                         keep_default_na=False, index_col=False,
                         engine="python" if len(sep) > 1 else "c")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: is it {release}'s {path.name}?") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"cannot read {path} as {release}'s {path.name}: "
                         f"{str(exc).splitlines()[0]}") from None
    if df.shape[1] != want:
        shown = f" ({', '.join(cols)})" if cols is not None else ""
        raise ValueError(f"{path} has {df.shape[1]} fields per line where {release}'s "
                         f"{path.name} has {want}{shown}: is it that file?")
    if cols is not None:
        df.columns = cols
    return df


def _check_ratings(ratings: pd.DataFrame, path: Path) -> None:
    """Every rating an integer 1..5 and every id and timestamp present, or a ValueError
    naming the first bad line."""
    for col in ("user_id", "movie_id", "timestamp"):
        empty = (ratings[col].str.strip() == "").to_numpy()
        if empty.any():
            line = int(empty.argmax()) + 1
            raise ValueError(f"{path}, line {line}: the {col} is empty")
    ok = ratings["rating"].isin(["1", "2", "3", "4", "5"]).to_numpy()
    if not ok.all():
        line = int((~ok).argmax())
        raise ValueError(f"{path}, line {line + 1}: rating {ratings['rating'].iloc[line]!r} is "
                         "not an integer from 1 to 5")


def _check_known(ratings: pd.DataFrame, table: pd.DataFrame, col: str, path: Path,
                 table_name: str) -> None:
    unknown = set(ratings[col]) - set(table[col])
    if unknown:
        raise ValueError(f"{path} has ratings of {len(unknown)} {col.replace('_', ' ')}(s) not "
                         f"in {table_name} (e.g. {sorted(unknown)[0]!r}): are the files of one "
                         "release?")


def _write(df: pd.DataFrame, cols, out_csv) -> Path:
    out = Path(out_csv)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        df[cols].to_csv(tmp, index=False)
        tmp.replace(out)  # written whole, or not at all
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
        return _read(src / name, "::", cols, "MovieLens-1M")

    ratings = read("ratings.dat", ["user_id", "movie_id", "rating", "timestamp"])
    users = read("users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    movies = read("movies.dat", ["movie_id", "title", "genres"])
    _check_ratings(ratings, src / "ratings.dat")
    _check_known(ratings, users, "user_id", src / "ratings.dat", "users.dat")
    _check_known(ratings, movies, "movie_id", src / "ratings.dat", "movies.dat")
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

    def read(name, sep, cols=None, fields=None):
        return _read(src / name, sep, cols, "MovieLens-100k", fields)

    genre_table = read("u.genre", "|", ["genre", "code"])
    genres = list(genre_table.loc[genre_table["genre"] != "", "genre"])
    ratings = read("u.data", "\t", ["user_id", "movie_id", "rating", "timestamp"])
    users = read("u.user", "|", ["user_id", "age", "gender", "occupation", "zip"])
    movies = read("u.item", "|", fields=5 + len(genres))  # 5, then a flag per genre
    flags = movies.iloc[:, 5:].to_numpy() == "1"
    movies = pd.DataFrame({
        "movie_id": movies[0],
        "genres": ["|".join(g for g, on in zip(genres, row) if on) for row in flags],
        # "01-Jan-1995" -> "1995"; one movie has no date (empty)
        "release_year": movies[2].str[-4:],
    })
    _check_ratings(ratings, src / "u.data")
    _check_known(ratings, users, "user_id", src / "u.data", "u.user")
    _check_known(ratings, movies, "movie_id", src / "u.data", "u.item")
    df = ratings.merge(users, on="user_id", how="left").merge(movies, on="movie_id", how="left")
    df["click"] = (df["rating"].astype(int) >= LIKED_RATING).astype(int)
    cols = ["user_id", "movie_id", "timestamp", "age", "gender", "occupation", "zip", "genres",
            "release_year", "click"]
    return _write(df, cols, out_csv)
