"""The chunked pipeline against the implementation it replaced (kept below, verbatim apart
from its name, as the oracle): the same tensors for the same input, whatever the chunk size;
plus the cases the old one got wrong (a 1e200 dense value, Parquet list columns) and the
bounded-memory property (slow)."""

from __future__ import annotations

import difflib
import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autoft_fast.data import SPLIT_NAMES, DataConfig, DataError, prepare_data
from autoft_fast.data.config import FILE_SUFFIXES
from autoft_fast.data.feature_map import FeatureMap, FieldInfo
from autoft_fast.data.tensors import DataBundle, TensorData
from autoft_fast.data.store import id_dtype

from test_data import base_dict, make_frame, write

log = logging.getLogger("oracle")
MISSING_TEXT = ("", "na", "n/a", "nan", "null", "none")


# ============================================================================ the oracle
# ---------------------------------------------------------------------------- reading
def _read_file(path: Path, cfg: DataConfig, stats: dict) -> pd.DataFrame:
    """One file -> a frame of the required columns as text (missing = NaN)."""
    fmt = FILE_SUFFIXES[path.suffix.lower()]
    required = cfg.required_columns()
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else cfg.csv_sep
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            try:
                # No usecols: with usecols pandas stops reporting lines with too many fields.
                df = pd.read_csv(
                    path, sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                    on_bad_lines="warn", engine="c",
                )
            except pd.errors.EmptyDataError:
                raise DataError(f"data file {path} is empty (no header line)") from None
            except pd.errors.ParserError as exc:
                raise DataError(f"cannot parse {path} as CSV (sep={sep!r}): {exc}") from None
        lines = []
        for w in caught:
            if issubclass(w.category, pd.errors.ParserWarning):
                lines += [m.strip() for m in str(w.message).split("\n") if m.strip()]
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if lines:
            stats.setdefault("malformed_lines", []).extend(f"{path.name}: {m}" for m in lines)
    else:
        import pyarrow.parquet as pq

        try:
            present = pq.read_schema(path).names
        except Exception as exc:
            raise DataError(f"cannot read {path} as Parquet: {exc}") from None
        _check_columns(required, present, path)
        df = pd.read_parquet(path, columns=list(dict.fromkeys(c for c, _ in required)))
    _check_columns(required, list(df.columns), path)
    out = pd.DataFrame({c: _as_text(df[c]) for c in dict.fromkeys(c for c, _ in required)})
    out["__file__"] = path.name
    out["__row__"] = np.arange(len(out))
    return out


def _check_columns(required: list[tuple[str, str]], present: list[str], path: Path) -> None:
    for col, role in required:
        if col not in present:
            hint = difflib.get_close_matches(col, [str(p) for p in present], n=1)
            shown = ", ".join(map(str, present[:30])) + (" ..." if len(present) > 30 else "")
            raise DataError(
                f"column '{col}' ({role}) not found in {path.name}"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" Columns present: {shown}"
            )


def _as_text(s: pd.Series) -> pd.Series:
    """Any column -> text with NaN for missing; integral floats print as integers so that a
    Parquet ``1.0`` and a CSV ``1`` are the same value."""
    if pd.api.types.is_string_dtype(s) and not pd.api.types.is_object_dtype(s):
        return s
    if pd.api.types.is_float_dtype(s):
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(vals)
        if np.all(vals[finite] == np.round(vals[finite])) and np.all(np.abs(vals[finite]) < 2**62):
            s = pd.Series(vals, index=s.index).astype("Int64")
    missing = s.isna().to_numpy()
    text = s.astype(str)
    if missing.any():
        text = text.mask(missing)
    return text.astype("str")


def _parse_numbers(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Text -> float64 values (NaN when missing) and a mask of unparseable (bad) entries."""
    vals = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    nan = np.isnan(vals)
    bad = np.zeros(len(vals), dtype=bool)
    if nan.any():
        lowered = text[nan].fillna("").str.strip().str.lower()
        bad[nan] = ~lowered.isin(MISSING_TEXT).to_numpy()
    return vals, bad


def _parse_times(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Text -> sortable float64 (numbers as they are, dates as nanoseconds) and a bad mask
    (missing or unparseable: a row without a time cannot be placed in a time split)."""
    vals, bad = _parse_numbers(text)
    present = text.notna().to_numpy()
    if present.any() and np.all(bad[present]):
        # Not numbers at all: dates ("2024-01-31 12:00:00").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dt = pd.to_datetime(text, errors="coerce", format="mixed")
        vals = dt.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
        vals[dt.isna().to_numpy()] = np.nan
    return vals, np.isnan(vals)


# ---------------------------------------------------------------------------- the pipeline
def old_preprocess(cfg: DataConfig) -> DataBundle:
    t0 = time.perf_counter()
    stats: dict = {}
    frames = [_read_file(p, cfg, stats) for p in cfg.files]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    stats["rows_read"] = int(len(df))

    # --- domains
    domain_values = [*cfg.source_domains, cfg.target_domain]
    dom_text = df[cfg.domain_column]
    dom_idx = pd.Index(domain_values).get_indexer(dom_text.fillna(""))
    counts = np.bincount(dom_idx[dom_idx >= 0], minlength=len(domain_values))
    for value, n in zip(domain_values, counts):
        if n == 0:
            role = "target" if value == cfg.target_domain else "source"
            seen = dom_text.dropna().value_counts().index[:10].tolist()
            raise DataError(
                f"{role} domain value '{value}' matches no rows of column '{cfg.domain_column}'; "
                f"most common values there: {', '.join(map(repr, seen))}"
            )
    keep = dom_idx >= 0
    stats["rows_other_domains"] = int((~keep).sum())
    if not keep.all():
        log.info("dropping %d rows whose %s is not a configured domain", (~keep).sum(), cfg.domain_column)
        df = df.loc[keep].reset_index(drop=True)
        dom_idx = dom_idx[keep]
    target_index = len(domain_values) - 1

    # --- bad rows
    bad: dict[str, np.ndarray] = {}
    label_text = df[cfg.label]
    label, label_bad = _parse_numbers(label_text)
    bad[f"label '{cfg.label}' missing or not a number"] = label_bad | np.isnan(label)
    numeric_vals = {}
    for col in cfg.numeric:
        numeric_vals[col.name], b = _parse_numbers(df[col.name])
        bad[f"numeric column '{col.name}' not a number"] = b
    time_vals = None
    if cfg.target_split.method == "time":
        time_vals, b = _parse_times(df[cfg.target_split.time_column])
        # Only the target is split by time; a source row without a time is fine.
        bad[f"time column '{cfg.target_split.time_column}' missing or unparseable (target rows)"] = b & (
            dom_idx == target_index
        )
    malformed = stats.get("malformed_lines", [])
    any_bad = np.zeros(len(df), dtype=bool)
    for m in bad.values():
        any_bad |= m
    if malformed or any_bad.any():
        parts = []
        if malformed:
            parts.append(f"{len(malformed)} malformed CSV lines (wrong number of fields, e.g. {malformed[0]})")
        for reason, m in bad.items():
            if m.any():
                i = int(np.flatnonzero(m)[0])
                col = _reason_column(reason)
                parts.append(
                    f"{int(m.sum())} rows with {reason} (e.g. {df.at[i, col]!r} in {df.at[i, '__file__']}, "
                    f"data row {int(df.at[i, '__row__']) + 1})"
                )
        msg = "; ".join(parts)
        if cfg.on_bad_rows == "fail":
            raise DataError(f"bad rows in the data: {msg}. Fix them, or set data.on_bad_rows: skip")
        warnings.warn(f"skipping bad rows: {msg}", stacklevel=2)
        stats["bad_rows_skipped"] = int(any_bad.sum()) + len(malformed)
        if any_bad.any():
            good = ~any_bad
            df = df.loc[good].reset_index(drop=True)
            dom_idx, label = dom_idx[good], label[good]
            numeric_vals = {k: v[good] for k, v in numeric_vals.items()}
            time_vals = None if time_vals is None else time_vals[good]

    not01 = (label != 0) & (label != 1)
    if not01.any():
        i = int(np.flatnonzero(not01)[0])
        raise DataError(
            f"label column '{cfg.label}' must hold 0 or 1, but {int(not01.sum())} rows hold other values "
            f"(e.g. {df.at[i, cfg.label]!r} in {df.at[i, '__file__']}, data row {int(df.at[i, '__row__']) + 1})"
        )

    # --- splits
    rows = _split_rows(cfg, dom_idx, target_index, time_vals)
    fit = np.zeros(len(df), dtype=bool)
    fit[rows["source_train"]] = True
    fit[rows["target_train"]] = True

    # --- vocabulary and encoding
    n = len(df)
    fields: list[FieldInfo] = []
    vocabularies: dict[str, list[str]] = {}
    single_cols: list[np.ndarray] = []
    offset = 0
    for col in cfg.categorical:
        local, vocab = _encode_categorical(df[col], fit, cfg.min_count)
        fields.append(FieldInfo(col, "categorical", len(vocab) + 2, offset))
        vocabularies[col] = vocab
        single_cols.append(local + offset)
        offset += len(vocab) + 2
    bucket_edges: dict[str, list[float]] = {}
    dense_cols: list[np.ndarray] = []
    dense_stats: dict[str, list[float]] = {}
    for col in cfg.numeric:
        vals = numeric_vals[col.name]
        if col.mode == "bucket":
            local, edges = _bucketise(vals, fit, cfg.num_buckets)
            size = len(edges) + 4  # PAD, missing, len(edges)+1 buckets, OOV
            fields.append(FieldInfo(col.name, "numeric_bucket", size, offset))
            bucket_edges[col.name] = edges.tolist()
            vocabularies[col.name] = _bucket_names(edges)
            single_cols.append(local + offset)
            offset += size
        else:
            z, mean, std = _standardise(vals, fit)
            dense_cols.append(z)
            dense_stats[col.name] = [mean, std]
    multihot_cols: list[np.ndarray] = []
    for col in cfg.multihot:
        local, vocab, truncated = _encode_multihot(df[col.name], col.sep, col.max_len, fit, cfg.min_count)
        fields.append(FieldInfo(col.name, "multihot", len(vocab) + 2, offset))
        vocabularies[col.name] = vocab
        multihot_cols.append(local + offset)
        stats.setdefault("multihot_rows_truncated", {})[col.name] = int(truncated)
        offset += len(vocab) + 2

    single_fields = [*cfg.categorical, *(c.name for c in cfg.numeric if c.mode == "bucket")]
    dense_fields = [c.name for c in cfg.numeric if c.mode == "dense"]
    multihot_fields = [c.name for c in cfg.multihot]
    max_len = max((c.max_len for c in cfg.multihot), default=0)
    feature_map = FeatureMap(
        fields=fields,
        single_fields=single_fields,
        multihot_fields=multihot_fields,
        multihot_max_len=max_len,
        dense_fields=dense_fields,
        domain_values=domain_values,
        extra={
            "source_domains": list(cfg.source_domains),
            "target_domain": cfg.target_domain,
            "min_count": cfg.min_count,
            "bucket_edges": bucket_edges,
            "dense_mean_std": dense_stats,
        },
    )
    feature_map.check()

    sparse_all = np.stack(single_cols, axis=1) if single_cols else np.zeros((n, 0), dtype=np.int64)
    multihot_all = None
    if multihot_cols:
        # Fields with a shorter max_len are padded with their own PAD id up to the longest.
        multihot_all = np.empty((n, len(multihot_cols), max_len), dtype=np.int64)
        for j, (m, f) in enumerate(zip(multihot_cols, fields[len(single_fields):])):
            multihot_all[:, j, :] = f.pad_id
            multihot_all[:, j, : m.shape[1]] = m
    dense_all = np.stack(dense_cols, axis=1).astype(np.float32) if dense_cols else None
    label_all = label.astype(np.float32)
    dom_all = dom_idx.astype(np.int64)

    splits = {}
    for name in SPLIT_NAMES:
        r = rows[name]
        splits[name] = TensorData(
            sparse=torch.from_numpy(np.ascontiguousarray(sparse_all[r])),
            multihot=None if multihot_all is None else torch.from_numpy(np.ascontiguousarray(multihot_all[r])),
            dense=None if dense_all is None else torch.from_numpy(np.ascontiguousarray(dense_all[r])),
            label=torch.from_numpy(label_all[r]),
            domain=torch.from_numpy(dom_all[r]),
        )
        stats[f"rows_{name}"] = int(len(r))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "preprocessed %d rows in %.1fs: %s", n, stats["seconds"],
        ", ".join(f"{k}={len(v)}" for k, v in rows.items()),
    )
    return DataBundle(feature_map=feature_map, splits=splits, vocabularies=vocabularies, stats=stats)


def _reason_column(reason: str) -> str:
    # Every reason names its column between the first pair of quotes.
    return reason.split("'")[1]


def _split_rows(cfg: DataConfig, dom_idx: np.ndarray, target_index: int, time_vals: np.ndarray | None) -> dict:
    src = np.flatnonzero(dom_idx != target_index)
    tgt = np.flatnonzero(dom_idx == target_index)
    rows: dict[str, np.ndarray] = {}

    ss = cfg.source_split
    perm = np.random.default_rng(ss.seed).permutation(len(src))
    n_valid = int(round(ss.valid * len(src)))
    rows["source_train"] = np.sort(src[perm[n_valid:]])
    rows["source_valid"] = np.sort(src[perm[:n_valid]])

    ts = cfg.target_split
    n_test = int(round(ts.test * len(tgt)))
    n_valid = int(round(ts.valid * len(tgt)))
    n_train = len(tgt) - n_test - n_valid
    if ts.method == "random":
        perm = np.random.default_rng(ts.seed).permutation(len(tgt))
        rows["target_train"] = np.sort(tgt[perm[n_test + n_valid:]])
        rows["target_valid"] = np.sort(tgt[perm[n_test: n_test + n_valid]])
        rows["target_test"] = np.sort(tgt[perm[:n_test]])
    else:
        # Stable: rows with equal times keep file order.
        ordered = tgt[np.argsort(time_vals[tgt], kind="stable")]
        rows["target_train"] = ordered[:n_train]
        rows["target_valid"] = ordered[n_train: n_train + n_valid]
        rows["target_test"] = ordered[n_train + n_valid:]

    for name in ("source_train", "source_valid", "target_train", "target_valid", "target_test"):
        if len(rows[name]) == 0:
            if name.startswith("source"):
                n_dom, what = len(src), f"source domains {list(cfg.source_domains)} have"
                frac = "data.split.source.valid" + f" = {ss.valid}"
            else:
                n_dom, what = len(tgt), f"target domain '{cfg.target_domain}' has"
                part = name.split("_")[1]
                frac = f"data.split.target.{part} = {getattr(ts, part, None)}" if part != "train" else (
                    f"data.split.target.valid + test = {ts.valid + ts.test}"
                )
            raise DataError(
                f"split '{name}' is empty: the {what} {n_dom} rows and {frac}; "
                "add rows or change the fractions"
            )
    return rows


def _encode_categorical(text: pd.Series, fit: np.ndarray, min_count: int) -> tuple[np.ndarray, list[str]]:
    """Local ids (1..K for kept values, K+1 = OOV) and the kept values in id order."""
    tokens = text.fillna("")
    vocab = _fit_vocab(tokens[fit], min_count)
    codes = pd.Index(vocab, dtype=object).get_indexer(tokens) if vocab else np.full(len(tokens), -1)
    local = np.where(codes >= 0, codes + 1, len(vocab) + 1).astype(np.int64)
    return local, vocab


def _fit_vocab(tokens: pd.Series, min_count: int) -> list[str]:
    counts = tokens.value_counts()
    counts = counts[counts >= min_count]
    # Most frequent first, ties by value: ids are deterministic and stable across runs.
    frame = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
    frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="stable")
    return frame["value"].tolist()


def _encode_multihot(
    text: pd.Series, sep: str, max_len: int, fit: np.ndarray, min_count: int
) -> tuple[np.ndarray, list[str], int]:
    """[N, max_len] local ids (0 = PAD in empty slots), the vocabulary, and how many rows had
    more than max_len tokens (only the first max_len are kept). Empty tokens ("a||b") are
    dropped. Arrow's split does the string work, so there is no per-row Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(text)
    lists = pc.split_pattern(pa.array(text.fillna("").to_numpy(dtype=object), type=pa.string()), sep)
    flat = pc.list_flatten(lists)
    row = pc.list_parent_indices(lists).to_numpy()
    keep_tok = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    row = row[keep_tok]
    tok = pd.Series(flat.filter(pa.array(keep_tok)).to_numpy(zero_copy_only=False), dtype=object)
    # Position within its row: rows come in order, so it is the distance to the row's first token.
    pos = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    truncated = int(np.unique(row[pos >= max_len]).size)
    vocab = _fit_vocab(tok[fit[row]], min_count)
    codes = pd.Index(vocab, dtype=object).get_indexer(tok) if vocab else np.full(len(tok), -1)
    local_tok = np.where(codes >= 0, codes + 1, len(vocab) + 1)
    out = np.zeros((n, max_len), dtype=np.int64)
    keep = pos < max_len
    out[row[keep], pos[keep]] = local_tok[keep]
    return out, vocab, truncated


def _bucketise(vals: np.ndarray, fit: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Local ids: 1 = missing, 2.. = quantile buckets of the training rows (see docs/data.md)."""
    train = vals[fit]
    train = train[np.isfinite(train)]
    if train.size:
        edges = np.unique(np.quantile(train, np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]))
    else:
        edges = np.zeros(0)
    bucket = np.searchsorted(edges, vals, side="right")
    local = np.where(np.isnan(vals), 1, bucket + 2).astype(np.int64)
    return local, edges


def _bucket_names(edges: np.ndarray) -> list[str]:
    bounds = [-np.inf, *edges.tolist(), np.inf]
    return ["<missing>"] + [f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]


def _standardise(vals: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, float, float]:
    train = vals[fit]
    train = train[np.isfinite(train)]
    mean = float(train.mean()) if train.size else 0.0
    std = float(train.std()) if train.size else 1.0
    std = std if std > 0 else 1.0
    z = (vals - mean) / std
    z[~np.isfinite(z)] = 0.0  # missing or infinite -> the training mean
    return z, mean, std


# ============================================================================ the tests
def assert_same(new: DataBundle, old: DataBundle) -> None:
    fa, fb = new.feature_map.to_dict(), old.feature_map.to_dict()
    ma, mb = fa["extra"].pop("dense_mean_std"), fb["extra"].pop("dense_mean_std")
    # The text form of Parquet float columns, kept for the encoder of new rows: the old
    # pipeline did not record it (the vocabularies below show the form it used).
    integral = fa["extra"].pop("float_text_integral", None)
    assert integral is None or all(isinstance(v, bool) for v in integral.values())
    assert fa == fb  # fields, ids, bucket edges to the last bit
    assert ma.keys() == mb.keys()
    for k in ma:  # chunked sums: equal to float64 rounding
        assert ma[k] == pytest.approx(mb[k], rel=1e-12), k
    assert new.vocabularies == old.vocabularies
    for name in SPLIT_NAMES:
        a, b = new.splits[name], old.splits[name]
        for k in ("sparse", "multihot", "label", "domain"):
            x, y = getattr(a, k), getattr(b, k)
            assert (x is None) == (y is None), (name, k)
            if x is not None:
                # The old pipeline stored int64 ids; ids are now int32 where the table fits.
                want = y.dtype
                if k in ("sparse", "multihot"):
                    want = torch.from_numpy(np.zeros(0, id_dtype(new.feature_map.num_rows))).dtype
                assert x.dtype == want, (name, k, x.dtype)
                assert torch.equal(x.to(y.dtype), y), (name, k)
        if b.dense is None:
            assert a.dense is None
        else:
            # The mean and std are now summed chunk by chunk: the same to float64 rounding.
            assert a.dense.dtype == b.dense.dtype
            torch.testing.assert_close(a.dense, b.dense, rtol=1e-6, atol=1e-6)
    for k in ("rows_read", "rows_other_domains", "multihot_rows_truncated", "bad_rows_skipped"):
        assert new.stats.get(k) == old.stats.get(k), k


def frames():
    f1 = make_frame(seed=1)
    f2 = make_frame(300, 150, seed=2)
    f2.loc[::7, "item"] = "rare_" + f2.index[::7].astype(str)        # many OOV values
    f2.loc[::5, "price"] = np.nan
    f2.loc[3, "price"] = np.inf
    f2["age"] = f2["age"] * 1e6 + 0.125
    f3 = make_frame(seed=3)
    f3["tags"] = ["|".join(["x", "y", "z", "w"][: i % 5]) for i in range(len(f3))]  # truncated rows
    return {"basic": f1, "oov_missing_inf": f2, "truncation": f3}


@pytest.mark.parametrize("name", ["basic", "oov_missing_inf", "truncation"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("split", ["random", "time"])
def test_same_tensors_as_the_old_pipeline(tmp_path, name, fmt, split):
    frame = frames()[name]
    write(tmp_path, frame, f"data.{fmt}")
    sp = {"target": {"method": split, "valid": 0.2, "test": 0.3, "seed": 1}, "source": {"valid": 0.1, "seed": 1}}
    if split == "time":
        sp["target"]["time_column"] = "ts"
    cfg = DataConfig.from_dict(base_dict(files=[f"data.{fmt}"], split=sp, min_count=2), tmp_path)
    old = old_preprocess(cfg)
    for chunk_rows in (37, 1000):  # many chunks, one chunk
        assert_same(prepare_data(cfg, chunk_rows=chunk_rows), old)


def test_same_tensors_for_several_files_other_domains_and_skipped_rows(tmp_path):
    frame = make_frame(seed=4)
    frame["click"] = frame["click"].astype(object)
    frame["price"] = frame["price"].astype(object)
    frame.loc[[4, 250], "click"] = "yes"
    frame.loc[[6, 480], "price"] = "cheap"
    frame.loc[::9, "dom"] = "elsewhere"
    write(tmp_path, frame.iloc[:250], "a.csv")
    write(tmp_path, frame.iloc[250:].astype({"click": str, "price": str}), "b.parquet")
    cfg = DataConfig.from_dict(base_dict(files=["a.csv", "b.parquet"], on_bad_rows="skip"), tmp_path)
    with pytest.warns(UserWarning, match="skipping bad rows"):
        old = old_preprocess(cfg)
    with pytest.warns(UserWarning, match="skipping bad rows") as got:
        new = prepare_data(cfg, chunk_rows=50)
    assert_same(new, old)
    assert new.stats["bad_rows_skipped"] == 4 and new.stats["rows_other_domains"] > 0
    assert "data row 5" in str(got[0].message)  # 1-based, as the malformed-line numbers


def test_numbers_parse_as_pandas_parses_them():
    # Arrow's fast cast for plain numbers, pandas' rules as soon as any other text appears.
    from autoft_fast.data.pipeline import _parse_numbers

    cases = [
        ["1", "2.5", "-3e4", "inf", "-inf", "0.1", "1.7976931348623157e308", "4.9e-324", None],
        ["1", " 2", "NA", "nan", "n/a", "", None, "abc", "3.25"],
        [None, None],
    ]
    for texts in cases:
        text = pd.Series(texts, dtype="str")
        vals, bad = _parse_numbers(text)
        want = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        np.testing.assert_array_equal(vals, want)
        lowered = text.fillna("").str.strip().str.lower()
        np.testing.assert_array_equal(bad, np.isnan(want) & ~lowered.isin(MISSING_TEXT).to_numpy())
    assert _parse_numbers(pd.Series(["1", "x", "NA"], dtype="str"))[1].tolist() == [False, True, False]


@pytest.mark.parametrize("fails", [False, True])
def test_the_spill_is_removed_after_preprocessing(tmp_path, fails):
    frame = make_frame(seed=6)
    if fails:
        frame["click"] = frame["click"].astype(object)
        frame.loc[7, "click"] = "yes"  # on_bad_rows: fail
    write(tmp_path, frame)
    cfg = DataConfig.from_dict(base_dict(), tmp_path)
    cache = tmp_path / "cache"
    if fails:
        with pytest.raises(DataError, match="click"):
            prepare_data(cfg, cache_dir=cache, chunk_rows=64)
    else:
        prepare_data(cfg, cache_dir=cache, chunk_rows=64)
    left = [p for p in cache.rglob("*") if ".spill" in p.parts or p.suffix == ".arrow"]
    assert left == []
    assert len(list(cache.iterdir())) == (0 if fails else 1)


def test_short_and_long_csv_lines_as_before(tmp_path):
    # A line with fewer fields gets empty values (pandas' rule), one with more is malformed.
    path = write(tmp_path, make_frame(seed=5))
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ",extra"
    lines[10] = ",".join(lines[10].split(",")[:-2])  # tags and ts missing
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig.from_dict(base_dict(on_bad_rows="skip"), tmp_path)
    with pytest.warns(UserWarning, match="1 malformed CSV lines"):
        old = old_preprocess(cfg)
    with pytest.warns(UserWarning, match="1 malformed CSV lines") as got:
        new = prepare_data(cfg, chunk_rows=64)
    assert_same(new, old)
    assert "Skipping line 4" in str(got[0].message)


def test_tensors_are_memory_mapped_and_batches_work(tmp_path):
    write(tmp_path, make_frame())
    cfg = DataConfig.from_dict(base_dict(cache=True), tmp_path)
    b = prepare_data(cfg, chunk_rows=100)
    from autoft_fast.data import iterate_batches

    d = b.splits["source_train"]
    maps = Path("/proc/self/maps").read_text()
    assert "source_train/sparse.npy" in maps and "target_test/label.npy" in maps
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([x.sparse for x in iterate_batches(d, 64, shuffle=True, generator=g)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, d.sparse.tolist()))
    d.sparse[0, 0] = -5  # copy-on-write: memory changes, the cache file does not
    again = prepare_data(cfg)
    assert int(again.splits["source_train"].sparse[0, 0]) != -5


def test_huge_dense_value_keeps_its_column(tmp_path):
    frame = make_frame()
    frame["age"] = np.arange(len(frame), dtype=float)
    frame.loc[7, "age"] = 1e200
    b = prepare_data(DataConfig.from_dict(base_dict(split={"target": {"valid": 0.2, "test": 0.3}, "source": {"valid": 0.01, "seed": 5}}), _w(tmp_path, frame)))
    mean, std = b.feature_map.extra["dense_mean_std"]["age"]
    assert np.isfinite(mean) and np.isfinite(std) and std > 1e190
    train = torch.cat([b.splits["source_train"].dense, b.splits["target_train"].dense])[:, 0].double()
    assert torch.isfinite(train).all()
    assert float(train.max()) > 10  # the huge value stands out ...
    assert int((train != train[0]).sum()) > 0  # ... and the column is not all zeros
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std(unbiased=False)) - 1) < 1e-3


def test_dense_column_of_tiny_values_is_standardised_not_flattened(tmp_path):
    # Squares of values near 1e-200 underflow to 0 in float64: without a matching scale the
    # column's std was 0, replaced by 1.0, and every standardised value was 0.
    frame = make_frame()
    frame["age"] = (np.arange(len(frame)) % 7 + 1) * 1e-200
    b = prepare_data(DataConfig.from_dict(base_dict(), _w(tmp_path, frame)))
    mean, std = b.feature_map.extra["dense_mean_std"]["age"]
    assert 1e-201 < std < 1e-199 and 1e-200 < mean < 7e-200
    train = torch.cat([b.splits["source_train"].dense, b.splits["target_train"].dense])[:, 0].double()
    assert len(set(train.tolist())) == 7  # seven distinct values stay seven
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std(unbiased=False)) - 1) < 1e-3


def test_dense_column_at_float64_limit_standardises(tmp_path):
    frame = make_frame()
    frame["age"] = np.where(np.arange(len(frame)) % 2, 1.7e308, -1.7e308)
    b = prepare_data(DataConfig.from_dict(base_dict(), _w(tmp_path, frame)))
    for d in b.splits.values():
        assert torch.allclose(d.dense[:, 0].abs(), torch.ones(len(d)), atol=0.1)


def _w(tmp_path: Path, frame: pd.DataFrame) -> Path:
    write(tmp_path, frame)
    return tmp_path


def test_parquet_list_column_is_multihot(tmp_path):
    frame = make_frame()
    as_text = frame.copy()
    frame["tags"] = [[t for t in s.split("|") if t] for s in frame["tags"]]
    frame.to_parquet(tmp_path / "lists.parquet", index=False)
    write(tmp_path, as_text)
    a = prepare_data(DataConfig.from_dict(base_dict(files=["lists.parquet"]), tmp_path))
    b = prepare_data(DataConfig.from_dict(base_dict(), tmp_path))
    assert a.vocabularies["tags"] == b.vocabularies["tags"]
    for name in SPLIT_NAMES:
        assert torch.equal(a.splits[name].multihot, b.splits[name].multihot)


def test_parquet_list_column_elsewhere_is_an_error_naming_it(tmp_path):
    frame = make_frame()
    frame["user"] = [[u] for u in frame["user"]]
    frame.to_parquet(tmp_path / "data.parquet", index=False)
    with pytest.raises(DataError, match="column 'user' \\(categorical\\) in data.parquet is a Parquet list column"):
        prepare_data(DataConfig.from_dict(base_dict(files=["data.parquet"]), tmp_path))


@pytest.mark.parametrize("end", ["\n", ""])
def test_header_only_file_says_so(tmp_path, end):
    (tmp_path / "data.csv").write_text(",".join(make_frame().columns) + end)
    with pytest.raises(DataError, match="matches no rows of column 'dom'; the files have no data rows"):
        prepare_data(DataConfig.from_dict(base_dict(), tmp_path))


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from autoft_fast.data import DataConfig, prepare_data
    cfg = DataConfig.from_dict({
        "files": [sys.argv[1]], "label": "click", "categorical": ["user", "item", "site"],
        "numeric": ["price", {"name": "age", "mode": "dense"}],
        "multihot": [{"name": "tags", "max_len": 3}],
        "domain": {"column": "dom", "source": ["s1", "s2"], "target": "t"}, "cache": False,
    }, Path("."))
    b = prepare_data(cfg, chunk_rows=1 << 17)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sum(len(d) for d in b.splits.values()))
""")


def _write_big_csv(path: Path, n_rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write("click,dom,user,item,site,price,age,tags\n")
        for start in range(0, n_rows, 500_000):
            n = min(500_000, n_rows - start)
            df = pd.DataFrame({
                "click": rng.integers(0, 2, n), "dom": rng.choice(["s1", "s2", "t"], n, p=[.5, .4, .1]),
                "user": rng.integers(0, 50_000, n), "item": rng.integers(0, 5_000, n),
                "site": rng.choice(["alpha.example.com", "beta.example.org", "gamma.example.net"], n),
                "price": np.round(rng.lognormal(2.0, 1.0, n), 2), "age": rng.integers(18, 70, n),
                "tags": rng.choice(["a|b", "c", "d|e|f|g", ""], n),
            })
            df.to_csv(f, header=False, index=False)


@pytest.mark.slow
def test_peak_memory_does_not_follow_the_file_size(tmp_path):
    peaks = []
    for n_rows in (3_000_000, 6_000_000):
        path = tmp_path / f"big{n_rows}.csv"
        _write_big_csv(path, n_rows)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rss_kb, rows = map(int, out.stdout.split())
        assert rows == n_rows
        peaks.append(rss_kb)
        print(f"{path.stat().st_size / 1e6:.0f} MB CSV -> peak RSS {rss_kb / 1e3:.0f} MB")
        path.unlink()
    assert peaks[1] < 1.2 * peaks[0], peaks


def test_int32_permutation_is_the_int64_one():
    # The split stage shuffles an int32 range to save memory; the splits must not change.
    from autoft_fast.data.pipeline import _permutation

    for n in (0, 1, 7, 1000, 123_457):
        for seed in (0, 2024):
            want = np.random.default_rng(seed).permutation(n)
            got = _permutation(seed, n, np.int32)
            assert got.dtype == np.int32 and np.array_equal(got, want), (n, seed)
