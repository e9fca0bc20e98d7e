"""From CSV / Parquet files to cached tensors: read, check, split, build the vocabulary, encode.

The steps, in order (``docs/data.md`` explains each rule):

1. read every file as text (so ``"007"`` stays ``"007"`` and CSV and Parquet agree), check that
   every configured column exists;
2. keep the rows of the configured domains, check that each domain value matches rows;
3. find bad rows (malformed CSV lines, a missing or non-numeric label, a non-numeric value in a
   numeric column, an unparseable time), then skip them with a warning or fail, as
   ``on_bad_rows`` says; then check that every label is 0 or 1;
4. split: source -> train / valid at random, target -> train / valid / test at random or by time;
5. fit the vocabulary (and the numeric bucket edges, and the dense means) on the training rows
   of source and target only, so nothing is learnt from validation or test rows;
6. encode every row into global ids of the one shared table, and cut the splits.

The result is cached on disk, keyed by the config and the input files' contents.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._io import save_atomic
from .config import FILE_SUFFIXES, DataConfig, DataError
from .feature_map import FeatureMap, FieldInfo
from .tensors import SPLIT_NAMES, DataBundle, TensorData

log = logging.getLogger("autoft_fast.data")

# Bump when the processing rules change, so that old cache files are not reused.
PIPELINE_VERSION = 1

# Text that means "no value" in a numeric, label or time column (compared lower-cased,
# stripped). Categorical columns keep such text as an ordinary value (it may be a real one,
# e.g. "NA" for North America).
MISSING_TEXT = ("", "na", "n/a", "nan", "null", "none")


# ---------------------------------------------------------------------------- public entry
def prepare_data(cfg: DataConfig, cache_dir: Path | str | None = None) -> DataBundle:
    """Read, check, split and encode the data that ``cfg`` describes; cached on disk.

    ``cache_dir`` overrides the config's ``cache_dir``; when both are absent (or the config
    says ``cache: false`` and no ``cache_dir`` is passed) nothing is cached. The cache file is
    ``<cache_dir>/<name>-<key>.pt`` where ``key`` hashes the processing config and the SHA-256
    of every input file's content, so editing a file or the config rebuilds, and moving or
    touching a file does not.

    Example::

        cfg = DataConfig.from_dict(yaml.safe_load(open("exp.yaml"))["data"], Path("."))
        bundle = prepare_data(cfg)
        bundle.splits["target_train"].sparse.shape   # [N, F_single]
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"prepare_data: cfg must be a DataConfig, got {type(cfg).__name__}")
    for path in cfg.files:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    if cache_dir is None and cfg.cache:
        cache_dir = cfg.cache_dir
    if cache_dir is None:
        return _preprocess(cfg)

    key = cache_key(cfg)
    path = Path(cache_dir) / f"{cfg.name}-{key[:20]}.pt"
    if path.is_file():
        try:
            bundle = _load_bundle(path, key)
            log.info("loaded processed data from cache %s", path)
            return bundle
        except Exception as exc:  # a cache is never worth failing for: rebuild it
            warnings.warn(f"ignoring unreadable data cache {path} ({exc}); preprocessing again")
    bundle = _preprocess(cfg)
    try:
        _save_bundle(bundle, path, key)
        log.info("cached processed data in %s", path)
    except OSError as exc:  # e.g. a read-only data folder: the data are fine, only uncached
        warnings.warn(f"could not write the data cache {path} ({exc}); continuing without it")
    return bundle


def cache_key(cfg: DataConfig) -> str:
    """Hex SHA-256 of the pipeline version, the processing config and each file's content hash."""
    payload = {
        "version": PIPELINE_VERSION,
        "config": cfg.processing_dict(),
        "files": [file_sha256(p) for p in cfg.files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (about 0.6 GB/s: small next to preprocessing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest would need Python 3.11
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- cache I/O
def _save_bundle(bundle: DataBundle, path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": PIPELINE_VERSION,
        "key": key,
        "feature_map": bundle.feature_map.to_dict(),
        "splits": {name: data.to_dict() for name, data in bundle.splits.items()},
        "vocabularies": bundle.vocabularies,
        "stats": bundle.stats,
    }
    # A kill mid-write leaves either the old state or the complete new file, never a
    # truncated cache that a later run trusts.
    save_atomic(payload, path)


def _load_bundle(path: Path, key: str) -> DataBundle:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != PIPELINE_VERSION or payload.get("key") != key:
        raise ValueError("cache key or version mismatch")
    return DataBundle(
        feature_map=FeatureMap.from_dict(payload["feature_map"]),
        splits={name: TensorData.from_dict(payload["splits"][name]) for name in SPLIT_NAMES},
        vocabularies=payload["vocabularies"],
        stats=payload["stats"],
    )


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
def _preprocess(cfg: DataConfig) -> DataBundle:
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
                    f"data row {int(df.at[i, '__row__'])})"
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
            f"(e.g. {df.at[i, cfg.label]!r} in {df.at[i, '__file__']}, data row {int(df.at[i, '__row__'])})"
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
