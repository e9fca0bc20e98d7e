"""From CSV / Parquet files to cached tensors, in bounded memory: read, check, split, build
the vocabulary, encode.

The files are read in chunks (``reading.py``, the next one by a background thread) and
parsed once, as Arrow tables; no stage holds more than two chunks of text. What stays in
memory between stages is a few bytes per row (domain, bad-row flag and label during the
scan, then one byte: the row's split) and the vocabularies. ``docs/data.md`` explains each rule.

1. :func:`_scan` reads every chunk's domain, label, numeric and time columns: which rows
   belong to a configured domain, which are bad (malformed CSV lines, a missing or
   non-numeric label, a non-numeric value in a numeric column, an unparseable time), the
   target rows' times, and each dense column's largest value; it spills each chunk's
   feature columns, label and domain in compact form to disk (:class:`_Spill`: dictionary
   codes, numbers);
2. :func:`_check_rows` fails on bad rows or skips them with a warning, as ``on_bad_rows``
   says, then checks that every label is 0 or 1;
3. :func:`_assign_splits`: source -> train / valid at random, target -> train / valid /
   test at random or by time; each kept row gets its split (a random split keeps file
   order, so a row's place in it is counted while encoding; a time split stores the target
   rows' places);
4. :func:`_fit` (over the spill) counts the vocabulary and gathers the numeric bucket
   quantiles and the dense means on the training rows of source and target only, so nothing
   is learnt from validation or test rows;
5. :func:`_encode` (over the spill) turns every kept row into global ids of the one shared
   table and writes it at its place in its split's ``.npy`` files (``store.py``), which
   training memory-maps.

The result is cached on disk as a folder, keyed by the config and the input files' contents.
Peak memory depends on the chunk size and the vocabulary, not on the file size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import current_umask
from ..config.data import file_format
from .config import DataConfig, DataError
from .feature_map import FeatureMap, FieldInfo
from .reading import (CHUNK_ROWS, FileInfo, LineBreakCheck, _csv_sep, _ShortLine, inspect_file,
                      integer_spelling_pairs, iter_chunks, prefetched)
from .stats import (MeanStd, QuantileSketch, ValueCounter, clip_dense, fit_vocab,
                    power_of_two_above, quantile_edges)
from .store import SplitWriter, id_dtype, load_store, write_meta
from .tensors import SPLIT_NAMES, DataBundle

log = logging.getLogger("autoft_fast.data")

# Bump when the processing rules or the cache layout change, so old caches are not reused.
PIPELINE_VERSION = 5

# Text that means "no value" in a numeric, label or time column (compared lower-cased,
# stripped). Categorical columns keep such text as an ordinary value (it may be a real one,
# e.g. "NA" for North America).
MISSING_TEXT = ("", "na", "n/a", "nan", "null", "none")

# Malformed-line descriptions kept in bundle.stats (all are counted).
MAX_MALFORMED_KEPT = 100

_TRAIN_CODES = (SPLIT_NAMES.index("source_train"), SPLIT_NAMES.index("target_train"))


# ---------------------------------------------------------------------------- public entry
def prepare_data(cfg: DataConfig, cache_dir: Path | str | None = None, *,
                 chunk_rows: int | None = None) -> DataBundle:
    """Read, check, split and encode the data that ``cfg`` describes; cached on disk.

    ``cache_dir`` overrides the config's ``cache_dir``; when both are absent (or the config
    says ``cache: false`` and no ``cache_dir`` is passed) nothing is kept (the encoded splits
    go to a temporary folder that is removed once they are mapped). The cache is the folder
    ``<cache_dir>/<name>-<key>`` where ``key`` hashes the processing config and the SHA-256
    of every input file's content, so editing a file or the config rebuilds, and moving or
    touching a file does not. The bundle's tensors are memory-mapped from that folder.

    ``chunk_rows`` (default ``reading.CHUNK_ROWS``) is how many rows are parsed at a time:
    peak memory grows with it, the tensors do not depend on it.

    Example::

        cfg = DataConfig.from_dict(yaml.safe_load(open("exp.yaml"))["data"], Path("."))
        bundle = prepare_data(cfg)
        bundle.splits["target_train"].sparse.shape   # [N, F_single]
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"prepare_data: cfg must be a DataConfig, got {type(cfg).__name__}")
    if chunk_rows is None:
        chunk_rows = CHUNK_ROWS
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"prepare_data: chunk_rows must be a positive integer, got {chunk_rows!r}")
    for path in cfg.files:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    _check_distinct_files(cfg.files)
    if cache_dir is None and cfg.cache:
        cache_dir = cfg.cache_dir
    if cache_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="autoft-data-"))
        try:
            _preprocess(cfg, tmp, chunk_rows)
            # The maps stay valid after the files are unlinked; the space is freed with them.
            return load_store(tmp, None, PIPELINE_VERSION)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    key = cache_key(cfg)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{cfg.name}-{key[:20]}"
    if final.exists():
        try:
            bundle = load_store(final, key, PIPELINE_VERSION)
            log.info("loaded processed data from cache %s", final)
            return bundle
        except Exception as exc:  # a cache is never worth failing for: rebuild it
            warnings.warn(f"ignoring unreadable data cache {final} ({exc}); preprocessing again")
            _remove(final)
    _remove_stale_builds(cache_dir, final.name)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=cache_dir))
        os.chmod(build, 0o777 & ~current_umask())  # mkdtemp's 0700: a shared cache as any folder
    except OSError as exc:  # e.g. a read-only data folder: the data are fine, only uncached
        warnings.warn(f"could not write the data cache {final} ({exc}); continuing without it")
        return prepare_data(dataclasses.replace(cfg, cache=False), chunk_rows=chunk_rows)
    try:
        _preprocess(cfg, build, chunk_rows, key)
        try:
            os.rename(build, final)  # atomic: a folder named `final` is always complete
        except OSError:
            if not final.exists():
                raise
            _remove(build)  # another process finished the same cache first: use theirs
    except BaseException:
        _remove(build)
        raise
    log.info("cached processed data in %s", final)
    return load_store(final, key, PIPELINE_VERSION)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _remove_stale_builds(cache_dir: Path, name: str) -> None:
    """Delete the half-built folders that a killed run left for the same cache entry."""
    if not cache_dir.is_dir():
        return
    for p in cache_dir.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name[len(f".{name}.tmp-"):].split("-")[0])
            os.kill(pid, 0)  # still running: leave it
        except (ValueError, ProcessLookupError):
            _remove(p)
        except PermissionError:
            pass


def cache_key(cfg: DataConfig) -> str:
    """Hex SHA-256 of the pipeline version, the processing config and, per file, its
    content hash and how it is read (format, gzip, CSV separator): a CSV renamed .parquet,
    or .csv renamed .tsv (tab-separated), is another input, not the cached one."""
    payload = {
        "version": PIPELINE_VERSION,
        "config": cfg.processing_dict(),
        "files": [[file_sha256(p), *_read_as(p, cfg)] for p in cfg.files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_as(path: Path, cfg: DataConfig) -> tuple[str, bool, str | None]:
    """(format, gzip, CSV separator or None) that ``path`` is read with."""
    fmt, gz = file_format(path)
    return fmt, gz, (_csv_sep(path, cfg) if fmt == "csv" else None)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (about 0.6 GB/s: small next to preprocessing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest would need Python 3.11
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_distinct_files(files) -> None:
    """A file listed twice (``data.csv`` and ``./data.csv``, or a link to it) is a
    DataError: its rows would be read twice, duplicated across train and test. Two files
    with the same content are a warning (a copy listed by mistake, or data that repeats);
    only files of equal size are hashed for it."""
    first: dict[tuple[int, int], Path] = {}
    for p in files:
        st = os.stat(p)
        ident = (st.st_dev, st.st_ino)
        if ident in first:
            raise DataError(f"data.files lists one file twice: {str(first[ident])!r} and "
                            f"{str(p)!r} are both {str(Path(p).resolve())!r}; its rows would "
                            "be read twice (duplicated in train and test): list it once")
        first[ident] = p
    by_size: dict[int, list[Path]] = {}
    for p in files:
        by_size.setdefault(os.stat(p).st_size, []).append(p)
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, Path] = {}
        for p in same_size:
            h = file_sha256(p)
            if h in by_hash:
                warnings.warn(f"data.files: {str(by_hash[h])!r} and {str(p)!r} have the same "
                              "content, so every row of it is read twice (duplicated in train "
                              "and test); list one of them if that is not meant",
                              UserWarning, stacklevel=3)
            else:
                by_hash[h] = p


# ---------------------------------------------------------------------------- parsing helpers
def _parse_numbers(text, truth_words: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Text (a pandas Series or an Arrow array) -> float64 values (NaN when missing) and a
    mask of unparseable (bad) entries; with ``truth_words``, ``true`` / ``false`` are 1 / 0
    (a Parquet boolean column, or its CSV export: see :func:`truth_as_digits`).

    Arrow's cast parses a column of plain numbers about 20x faster than ``pd.to_numeric``
    (both round correctly, so the values are the same); a column with any text the cast
    rejects (spaces, "NA", a typo) takes pandas' rules, which say which entries are bad."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _arrow_text(text)
    try:
        vals = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if truth_words:  # only where the fast cast failed: a column of numbers pays nothing
            return _parse_numbers(truth_as_digits(arr), truth_words=False)
        vals = pd.to_numeric(_text_series(arr), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    nan = np.isnan(vals)
    bad = np.zeros(len(vals), dtype=bool)
    if nan.any():
        lowered = _text_series(arr.filter(pa.array(nan))).fillna("").str.strip().str.lower()
        bad[nan] = ~lowered.isin(MISSING_TEXT).to_numpy()
    return vals, bad


def truth_as_digits(text):
    """Text with ``true`` / ``false`` (any case, spaces around) as ``1`` / ``0``: the label
    and the numeric columns, so that a Parquet boolean column reads as 0 / 1 and its CSV
    export (which says True / False) reads the same."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _arrow_text(text)
    if not len(arr) or pa.types.is_null(arr.type):
        return arr
    word = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
    arr = pc.if_else(pc.equal(word, "true"), pa.scalar("1", arr.type), arr)
    return pc.if_else(pc.equal(word, "false"), pa.scalar("0", arr.type), arr)


def _arrow_text(text):
    """A text column as one Arrow string array (nulls where missing)."""
    import pyarrow as pa

    if isinstance(text, pa.ChunkedArray):
        return text.combine_chunks() if text.num_chunks != 1 else text.chunk(0)
    if isinstance(text, pa.Array):
        return text
    return pa.array(text, type=pa.large_string(), from_pandas=True)


def _text_series(arr) -> pd.Series:
    """An Arrow text array as the pandas text the readers gave before (missing = NaN)."""
    return pd.Series(arr.to_numpy(zero_copy_only=False), dtype="str")


def _value_at(table, col: str, i: int):
    """The text of row ``i`` of ``col`` (NaN when missing), for messages."""
    v = table.column(col)[i].as_py()
    return np.nan if v is None else v


def _parse_dates(text, fmt: dict | None = None, column: str = "time") -> np.ndarray:
    """Text -> nanoseconds as float64 (NaN when missing or unparseable).

    One format for the whole column: ``fmt["format"]`` when it holds one (the config's
    ``time_format``, or what an earlier chunk settled on); else ISO 8601 when it reads every
    value some format reads; else pandas' per-value parser when reading day-first or
    month-first changes no value; else the one strict format, day-first or month-first,
    that reads every value (both, e.g. with every day <= 12, or neither: a DataError).
    What a chunk settles on is kept in ``fmt`` for the next.

    Times with a UTC offset (``+01:00``, ``Z``) are compared in UTC, so offsets may differ
    from value to value; times with an offset and times without one in the same column are
    a DataError (the zone of the latter is unknown)."""
    if not isinstance(text, pd.Series):
        text = _text_series(_arrow_text(text))
    fmt = {} if fmt is None else fmt

    def parse(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return pd.to_datetime(text, errors="coerce", **kw)
            except ValueError as exc:  # "Mixed timezones detected": offsets differ
                if "timezone" not in str(exc):
                    raise
                dt = pd.to_datetime(text, errors="coerce", utc=True, **kw)
        offset = text.str.contains(_UTC_OFFSET, na=False) & dt.notna()
        naive = dt.notna() & ~offset
        if bool(naive.any()) and bool(offset.any()):
            _mixed_zones(column, text[offset].iloc[0], text[naive].iloc[0])
        return dt

    if fmt.get("format"):
        dt = parse(format=fmt["format"])
    else:
        dt = parse(format="ISO8601")
        unread = text.notna() & (text.str.strip() != "") & dt.isna()
        readable = dt.notna()
        if bool(unread.any()):
            month_first = parse(format="mixed", dayfirst=False)
            day_first = parse(format="mixed", dayfirst=True)
            readable = readable | month_first.notna() | day_first.notna()
        if not bool((unread & readable).any()):
            # What no format reads is a bad row, whatever the column's format.
            if bool(dt.notna().any()):
                fmt["format"] = "ISO8601"
        else:
            differ = (month_first != day_first) & month_first.notna() & day_first.notna()
            dt = month_first
            if bool(differ.any()):
                fmt["format"] = _one_date_format(str(text[differ].iloc[0]), parse, readable,
                                                 column)
                dt = parse(format=fmt["format"])
    if bool(dt.notna().any()):
        # One kind of time for the whole column: an earlier chunk's times with offsets and
        # this one's without (or the other way round) are as mixed as in one chunk.
        first = str(text[dt.notna()].iloc[0])
        has_zone = isinstance(dt.dtype, pd.DatetimeTZDtype)
        seen = fmt.setdefault("zone", (has_zone, first))
        if seen[0] != has_zone:
            _mixed_zones(column, *((seen[1], first) if seen[0] else (first, seen[1])))
    # A time with an offset is given in UTC (to_numpy of a zone-aware column converts).
    vals = dt.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
    vals[dt.isna().to_numpy()] = np.nan
    return vals


# A time's UTC offset as ISO 8601 writes it after the time of day: Z, +01, +0100, +01:00.
_UTC_OFFSET = r"\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)\s*$"


def _mixed_zones(column: str, with_offset: str, without: str) -> None:
    raise DataError(
        f"time column '{column}' holds times with a UTC offset (e.g. {with_offset!r}) and "
        f"times without one (e.g. {without!r}): in which zone the latter are is unknown. "
        "Write every time with its offset (times with offsets are compared in UTC, so they "
        "may differ) or every time without one; data.split.target.time_format can name the "
        "one form (e.g. '%Y-%m-%dT%H:%M:%S%z': times of another form are then bad rows)")


def _one_date_format(sample: str, parse, readable, column: str) -> str:
    """The strict format, day-first or month-first as guessed from ``sample``, that reads
    every ``readable`` value; a DataError when both do or neither does."""
    from pandas.tseries.api import guess_datetime_format

    formats = dict.fromkeys(f for f in (guess_datetime_format(sample, dayfirst=False),
                                        guess_datetime_format(sample, dayfirst=True)) if f)
    fits = [f for f in formats if not bool((readable & parse(format=f).isna()).any())]
    if len(fits) == 1:
        return fits[0]
    raise DataError(
        f"time column '{column}': a date such as {sample!r} reads differently day-first and "
        "month-first, and " + (f"both {' and '.join(fits)} read every value" if fits else
                               "no one format reads every value")
        + "; write ISO 8601 dates (2024-01-05) or set data.split.target.time_format "
        "(e.g. '%d/%m/%Y')")


def _chunks(infos: list[FileInfo], cfg: DataConfig, chunk_rows: int, malformed=None):
    """(file index, file name, first row of the chunk within its file, Arrow table) in read order."""
    for k, info in enumerate(infos):
        r0 = 0
        try:
            for df in iter_chunks(info, cfg, chunk_rows, malformed):
                yield k, info.path.name, r0, df
                r0 += df.num_rows
        except _ShortLine:
            raise _ShortLine(k) from None


# ---------------------------------------------------------------------------- the spill
class _Spill:
    """What the fit and encode stages need of each chunk, written by the scan so that the
    files are parsed once: every categorical column and multi-hot token column dictionary-
    encoded (the chunk's distinct values once, an int32 code per row or token), every numeric
    column as the float64 values the scan parsed. One Arrow IPC file per chunk, about
    4 bytes per categorical value and 8 per number, removed when preprocessing ends.

    Example::

        spill = _Spill(out / ".spill", cfg)
        spill.write(df, {"price": values})
        for chunk in spill.chunks():
            values, codes = chunk.categories("user")
    """

    def __init__(self, folder: Path, cfg: DataConfig) -> None:
        self.folder, self.cfg, self.sizes = folder, cfg, []
        self.longest = {m.name: 0 for m in cfg.multihot}  # tokens in a multi-hot row, at most

    def reset(self) -> None:
        self.remove()
        self.folder.mkdir(parents=True)
        self.sizes = []
        self.longest = {m.name: 0 for m in self.cfg.multihot}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, df, numbers: dict[str, np.ndarray], label: np.ndarray,
              domain: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        cols = {"label": pa.array(label), "domain": pa.array(domain)}
        for c in self.cfg.categorical:
            cols[f"c:{c}"] = pc.dictionary_encode(pc.fill_null(_arrow_text(df.column(c)), ""))
        for c, vals in numbers.items():
            cols[f"n:{c}"] = pa.array(vals, type=pa.float64())
        k = len(self.sizes)
        self._save(f"{k}.arrow", pa.table(cols))
        for m in self.cfg.multihot:
            tok, row, pos = _token_arrays(df.column(m.name), m.sep)
            if pos.size:
                self.longest[m.name] = max(self.longest[m.name], int(pos.max()) + 1)
            self._save(f"{k}.{self.cfg.multihot.index(m)}.arrow", pa.table({
                "tok": pc.dictionary_encode(tok), "row": pa.array(row.astype(np.int32)),
                "pos": pa.array(pos.astype(np.int32))}))
        self.sizes.append(df.num_rows)

    def _save(self, name: str, table) -> None:
        import pyarrow as pa

        if table is None:
            return
        with pa.OSFile(str(self.folder / name), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)

    def chunks(self):
        """The chunks in read order, as :class:`_SpilledChunk`, each loaded while the one
        before is processed."""
        def load():
            for k, n in enumerate(self.sizes):
                yield _SpilledChunk(self, k, n)
                _release_memory()
        return prefetched(load())


class _SpilledChunk:
    def __init__(self, spill: _Spill, k: int, n: int) -> None:
        self.n, self.spill, self.k = n, spill, k
        path = spill.folder / f"{k}.arrow"
        self.table = _load_table(path)
        self.numbers = {c.name: self.table[f"n:{c.name}"].to_numpy() for c in spill.cfg.numeric}
        self.label = self.table["label"].to_numpy()     # int8: 0, 1, or -1 (not 0 / 1)
        self.domain = self.table["domain"].to_numpy()   # int16: index of the domain, -1 other

    def categories(self, col: str) -> tuple[pd.Index, np.ndarray]:
        """(the chunk's distinct values of ``col``, each row's code into them)."""
        return _decode(self.table[f"c:{col}"])

    def value_counts(self, col: str, rows: np.ndarray) -> pd.Series:
        """How often each value of ``col`` occurs in the rows where ``rows`` (bool) is set."""
        values, codes = self.categories(col)
        return _count_codes(values, codes[rows])

    def tokens(self, col: str) -> tuple[pd.Index, np.ndarray, np.ndarray, np.ndarray]:
        """(distinct tokens, each token's code, its row, its position in the row)."""
        j = [m.name for m in self.spill.cfg.multihot].index(col)
        t = _load_table(self.spill.folder / f"{self.k}.{j}.arrow")
        values, codes = _decode(t["tok"])
        return values, codes, t["row"].to_numpy(), t["pos"].to_numpy()

    def token_counts(self, col: str, rows: np.ndarray) -> pd.Series:
        values, codes, row, _ = self.tokens(col)
        return _count_codes(values, codes[rows[row]])


def _load_table(path: Path):
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_file(f).read_all()


def _decode(column) -> tuple[pd.Index, np.ndarray]:
    import pyarrow as pa

    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not isinstance(arr, pa.DictionaryArray):  # an empty chunk
        return pd.Index([], dtype=object), np.zeros(0, dtype=np.int64)
    return pd.Index(arr.dictionary.to_pandas()), arr.indices.to_numpy()


def _count_codes(values: pd.Index, codes: np.ndarray) -> pd.Series:
    counts = np.bincount(codes, minlength=len(values))
    seen = counts > 0
    return pd.Series(counts[seen], index=values[seen])


# ---------------------------------------------------------------------------- 1. scan
@dataclass
class _Scan:
    """What the first read learns; a few bytes per row read."""

    infos: list[FileInfo]
    n_read: int = 0
    dom_idx: np.ndarray = None            # int16 [n_read], -1 = another domain
    bad: np.ndarray = None                # bool  [n_read]
    label: np.ndarray = None              # int8  [n_read], -1 unless 0 / 1
    tgt_rows: np.ndarray = None           # int32 (int64 past 2^31): read rows of the target domain
    tgt_times: np.ndarray | None = None   # float64, aligned with tgt_rows (time split only)
    domain_counts: pd.Series = None       # value -> rows, for the "matches no rows" message
    reasons: dict = field(default_factory=dict)   # reason -> [count, example (value, file, row)]
    malformed: list = field(default_factory=list)
    dense_scale: dict = field(default_factory=dict)
    spill: "_Spill" = None


def _scan(cfg: DataConfig, chunk_rows: int, spill: "_Spill") -> _Scan:
    infos = [inspect_file(p, cfg, chunk_rows) for p in cfg.files]
    # One text form per Parquet float column over all files: a value that is '1' in one
    # file and '1.0' in another would be two vocabulary entries (the encoder of new rows
    # reuses this decision, see float_text_integral).
    together = float_text_integral(infos)
    for info in infos:
        info.integral.update({c: together[c] for c in info.integral})
    while True:
        try:
            spill.reset()
            return _scan_once(cfg, infos, chunk_rows, spill)
        except _ShortLine as exc:
            # pandas' reader gives such a line empty values: read that file with it.
            infos[exc.args[0]].engine = "pandas"


def float_text_integral(infos: list[FileInfo]) -> dict[str, bool]:
    """Per Parquet float column: whether its values are integral in every file that holds
    it as floats (then 1.0 is the text '1', else '1.0'; see reading.as_text)."""
    out: dict[str, bool] = {}
    for info in infos:
        for c, integral in info.integral.items():
            out[c] = out.get(c, True) and bool(integral)
    return out


def _scan_once(cfg: DataConfig, infos: list[FileInfo], chunk_rows: int, spill: "_Spill") -> _Scan:
    sc = _Scan(infos, spill=spill)
    domain_values = [*cfg.source_domains, cfg.target_domain]
    target_index = len(domain_values) - 1
    import pyarrow as pa
    import pyarrow.compute as pc

    dom_set = pa.array([str(v) for v in domain_values], type=pa.string())
    dom_counter = ValueCounter()
    numeric = [c.name for c in cfg.numeric]
    dense = [c.name for c in cfg.numeric if c.mode == "dense"]
    max_abs = {c: 0.0 for c in dense}
    time_col = cfg.target_split.time_column if cfg.target_split.method == "time" else None
    # The date format of the time column: the config's, else settled by the first chunk.
    date_format = {"format": cfg.target_split.time_format}
    time_reason = f"time column '{time_col}' missing or unparseable (target rows)"
    label_reason = f"label '{cfg.label}' missing or not a number"
    reasons = [label_reason] + [f"numeric column '{c}' not a number" for c in numeric]
    if time_col is not None:
        reasons.append(time_reason)
    sc.reasons = {r: [0, None] for r in reasons}
    dom_parts, bad_parts, label_parts, time_parts = [], [], [], []
    # Target rows whose time is a number, and those whose time is other text (a date): the
    # column is numbers when most target times are, else dates; a time of the other kind is
    # then a bad row. Source rows' times are never used, so they do not decide it.
    n_time_numbers = n_time_dates = 0
    line_breaks = LineBreakCheck(dict(reversed(cfg.required_columns())))
    g0 = 0
    # closing(): the reader thread ends with the loop, also when the loop raises
    with contextlib.closing(prefetched(_chunks(infos, cfg, chunk_rows, sc.malformed))) as chunks:
        for k, fname, r0, df in chunks:
            n = df.num_rows
            if infos[k].engine != "parquet":
                line_breaks.check(df, fname, r0, _csv_sep(infos[k].path, cfg), infos[k].n_fields,
                                  lambda r, f=fname: _file_row(sc.malformed, f, r))
            dom_text = _arrow_text(df.column(cfg.domain_column))
            vc = pc.value_counts(pc.drop_null(dom_text))
            dom_counter.add_counts(pd.Series(vc.field("counts").to_numpy(),
                                             index=pd.Index(vc.field("values").to_numpy(zero_copy_only=False), dtype="str")))
            dom = pc.fill_null(pc.index_in(pc.fill_null(dom_text, ""), value_set=dom_set), -1).to_numpy()
            keep = dom >= 0
            masks = {}
            label, label_bad = _parse_numbers(df.column(cfg.label))
            masks[label_reason] = (label_bad | np.isnan(label)) & keep
            numbers = {}
            for c in numeric:
                vals, b = _parse_numbers(df.column(c))
                numbers[c] = vals
                masks[f"numeric column '{c}' not a number"] = b & keep
                if c in max_abs:
                    v = np.abs(vals[keep & ~b])
                    v = v[np.isfinite(v)]
                    if v.size:
                        max_abs[c] = max(max_abs[c], float(v.max()))
            tgt = np.flatnonzero(dom == target_index)
            if time_col is not None:
                text = _arrow_text(df.column(time_col)).take(pa.array(tgt))
                tvals, tbad = _parse_numbers(text, truth_words=False)
                # Per target row: its number, or its date (ns) when it is not a number
                # (dates are parsed only for those), NaN when missing; and which kind it is.
                is_num = ~np.isnan(tvals)
                n_time_numbers += int(is_num.sum())
                n_time_dates += int(tbad.sum())
                times = np.where(is_num, tvals, np.nan)
                if tbad.any():
                    at = np.flatnonzero(tbad)
                    times[at] = _parse_dates(text.take(pa.array(at)), date_format, time_col)
                time_parts.append((times, is_num))
            any_bad = np.zeros(n, dtype=bool)
            for reason, m in masks.items():
                _count(sc.reasons[reason], m, df, _reason_column(reason), fname, r0)
                any_bad |= m
            ok_label = np.where((label == 0) | (label == 1), label, -1).astype(np.int8)
            dom_i16 = dom.astype(np.int16)
            dom_parts.append(dom_i16)
            bad_parts.append(any_bad)
            label_parts.append(ok_label)
            spill.write(df, numbers, ok_label, dom_i16)
            g0 += n
            del df, masks, numbers
            _release_memory()
    sc.n_read = g0
    line_breaks.warn(stacklevel=4)
    # One array at a time, each list emptied once joined: the parts and the whole never
    # coexist for more than one of them.
    sc.dom_idx = _join(dom_parts, np.int16)
    sc.bad = _join(bad_parts, bool)
    sc.label = _join(label_parts, np.int8)
    sc.tgt_rows = _rows_where(sc.dom_idx == target_index)  # the chunks' `tgt`, joined
    sc.domain_counts = dom_counter.counts()
    if time_col is not None:
        times = np.concatenate([t for t, _ in time_parts]) if time_parts else np.zeros(0)
        is_num = np.concatenate([m for _, m in time_parts]) if time_parts else np.zeros(0, bool)
        time_parts.clear()
        # The minority kind is the odd one out: its rows are bad, quoting their own value.
        times[~is_num if n_time_numbers > n_time_dates else is_num] = np.nan
        del is_num
        sc.tgt_times = times
        # A target row without a usable time cannot be placed in a time split.
        bad_t = np.isnan(times)
        _count_rows(sc.reasons[time_reason], sc.tgt_rows[bad_t])
        sc.bad[sc.tgt_rows[bad_t]] = True
    sc.dense_scale = {c: power_of_two_above(v) for c, v in max_abs.items()}
    return sc


def _same_number(value: str, present: list) -> list:
    """The values of ``present`` that spell the number ``value`` otherwise (1 and '1.0'):
    domains are matched as text, so the YAML's spelling must be the column's."""
    try:
        x = float(value)
    except ValueError:
        return []
    out = []
    for v in present:
        try:
            if float(v) == x:
                out.append(v)
        except ValueError:
            pass
    return out


def _same_once_normalised(value: str, present: list) -> list:
    """The values of ``present`` equal to ``value`` once both are Unicode NFC (an accent as
    one code point, not a letter and a combining mark) and not before: a difference that
    prints the same, so a message must show both encodings."""
    def nfc(v: str) -> str:
        return unicodedata.normalize("NFC", v)
    return [v for v in present if v != value and nfc(v).casefold() == nfc(value).casefold()
            and (nfc(v) != v or nfc(value) != value)]


def _release_memory() -> None:
    """Hand the memory that freed chunks leave in the allocators back to the system.

    Measured on 12.3M rows: after the scan, Arrow's pool and glibc's heap held 0.9 GB of
    freed chunk buffers (RSS 1.47 GB, 0.55 GB once released); the per-row arrays of the
    later stages come from fresh pages, so they added to that instead of reusing it."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _join(parts: list, dtype) -> np.ndarray:
    out = np.concatenate(parts) if parts else np.zeros(0, dtype)
    parts.clear()
    return out


def _count(slot: list, mask: np.ndarray, df, col: str, fname: str, r0: int) -> None:
    """Add the rows of ``mask`` to a [count, example] slot; the example is the first one."""
    hits = np.flatnonzero(mask)
    if hits.size:
        if slot[1] is None:
            i = int(hits[0])
            slot[1] = (_value_at(df, col, i), fname, r0 + i)
        slot[0] += int(hits.size)


def _count_rows(slot: list, rows: np.ndarray) -> None:
    # Time-split problems are found after the scan: the example row is described later.
    slot[0] += int(rows.size)
    if rows.size and slot[1] is None:
        slot[1] = ("row", int(rows[0]))


# ---------------------------------------------------------------------------- 2. check
def _check_rows(cfg: DataConfig, sc: _Scan, stats: dict) -> np.ndarray:
    """Raise or warn about bad rows and labels; a mask of the read rows that are kept."""
    domain_values = [*cfg.source_domains, cfg.target_domain]
    # Counted per value: bincount would first widen the whole column to int64.
    counts = [int(np.count_nonzero(sc.dom_idx == k)) for k in range(len(domain_values))]
    for reason, slot in sc.reasons.items():
        if slot[0] and slot[1][0] == "row":
            slot[1] = _describe_row(cfg, sc, slot[1][1], _reason_column(reason))
    n_malformed = len(sc.malformed)
    for value, n in zip(domain_values, counts):
        if n == 0:
            role = "target" if value == cfg.target_domain else "source"
            if n_malformed:
                # Lines skipped as malformed (e.g. every line ends with a separator the
                # header lacks) explain an empty domain, which then says nothing useful.
                raise DataError(f"bad rows in the data: {_bad_rows_text(sc)}; no rows of the "
                                f"{role} domain '{value}' (column '{cfg.domain_column}') are "
                                "left. Fix the lines")
            seen = sc.domain_counts.sort_values(ascending=False, kind="stable").index[:10].tolist()
            where = (f"most common values there: {', '.join(map(repr, seen))}" if seen
                     else "the files have no data rows")
            hint = ""
            import difflib
            present = [str(v) for v in sc.domain_counts.index]
            close = ([v for v in present if v.strip().casefold() == value.strip().casefold()]
                     or difflib.get_close_matches(str(value), present, n=1))
            number = _same_number(str(value), present)
            look_alike = _same_once_normalised(str(value), present)
            if look_alike:
                hint = (f"; the column's {look_alike[0]!r} differs from it only in how its "
                        f"accented letters are encoded (Unicode normalization: the file has "
                        f"{ascii(look_alike[0])}, the YAML {ascii(str(value))}); write the "
                        f"value as the file does, or normalise the file (NFC)")
            elif number:
                hint = (f"; the column spells that number '{number[0]}': domain values are "
                        f"matched as text, so write '{number[0]}' (quoted) in the YAML")
            elif close:
                hint = f"; did you mean '{close[0]}'?"
            elif str(value).lstrip("-").isdigit():
                # YAML reads 010 as 8 and 0x1f as 31: the written form is gone by now.
                hint = ("; a domain value YAML reads as a number loses how it was written "
                        "(010, 0x1f, 1_000): quote it in the YAML, e.g. '010'")
            raise DataError(
                f"{role} domain value '{value}' matches no rows of column "
                f"'{cfg.domain_column}'; {where}{hint}"
            )
    keep = sc.dom_idx >= 0
    stats["rows_other_domains"] = int((~keep).sum())
    if not keep.all():
        _report_other_domains(cfg, sc, int((~keep).sum()))
    if n_malformed or any(slot[0] for slot in sc.reasons.values()):
        msg = _bad_rows_text(sc)
        if cfg.on_bad_rows == "fail":
            # When skipping would leave a domain without rows, skipping is not the fix.
            ok = keep & ~sc.bad
            empty = [v for k, v in enumerate(domain_values)
                     if not np.count_nonzero(ok & (sc.dom_idx == k))]
            if empty:
                raise DataError(f"bad rows in the data: {msg}. Fix them: every row of the "
                                f"domain '{empty[0]}' is bad, so data.on_bad_rows: skip would "
                                "leave it without rows")
            raise DataError(f"bad rows in the data: {msg}. Fix them, or set data.on_bad_rows: skip")
        warnings.warn(f"skipping bad rows: {msg}", stacklevel=3)
        stats["bad_rows_skipped"] = int((sc.bad & keep).sum()) + n_malformed
    stats["malformed_lines"] = sc.malformed[:MAX_MALFORMED_KEPT]
    not01 = np.flatnonzero(keep & ~sc.bad & (sc.label < 0))
    if not01.size:
        count, ex = int(not01.size), _describe_row(cfg, sc, int(not01[0]), cfg.label)
        raise DataError(
            f"label column '{cfg.label}' must hold 0 or 1, but {count} rows hold other values "
            f"(e.g. {ex[0]!r} in {ex[1]}, data row {_file_row(sc.malformed, ex[1], ex[2]) + 1})"
        )
    keep &= ~sc.bad
    return keep


def _bad_rows_text(sc: _Scan) -> str:
    """The bad rows by kind, each counted with one example (the message's body)."""
    parts = []
    if sc.malformed:
        first = sc.malformed[:MAX_MALFORMED_KEPT]
        extra = re.compile(r"expected (\d+) fields, saw (\d+)")
        seen = [extra.search(m) for m in first]
        # A separator at the end of every data line but not of the header: one field more.
        trailing = all(m and int(m.group(2)) == int(m.group(1)) + 1 for m in seen)
        parts.append(f"{len(sc.malformed)} malformed CSV lines (wrong number of fields, e.g. "
                     f"{sc.malformed[0]}"
                     + ("; do the data lines end with a separator that the header line lacks?"
                        if trailing else "") + ")")
    for reason, (count, ex) in sc.reasons.items():
        if count:
            row = _file_row(sc.malformed, ex[1], ex[2])
            parts.append(f"{count} rows with {reason} (e.g. {ex[0]!r} in {ex[1]}, "
                         f"data row {row + 1})")
    return "; ".join(parts)


def _report_other_domains(cfg: DataConfig, sc: _Scan, n: int) -> None:
    """Log the rows of other domains, or warn when some of their values look like a
    configured one but for case or spaces ('SRC1', 'src1 '): probably the same domain."""
    configured = {v.strip().casefold(): v for v in [*cfg.source_domains, cfg.target_domain]}
    counts = sc.domain_counts
    values = pd.Index(counts.index.astype(str))
    like = pd.Series(values.str.strip().str.casefold().map(configured), dtype=object)
    alike = like.notna().to_numpy() & ~values.isin(list(configured.values()))
    if not alike.any():
        log.info("dropping %d rows whose %s is not a configured domain", n, cfg.domain_column)
        return
    shown = counts[alike].sort_values(ascending=False, kind="stable")
    examples = ", ".join(f"{v!r} ({int(c):,} rows) looks like {configured[v.strip().casefold()]!r}"
                         for v, c in list(shown.items())[:3])
    warnings.warn(
        f"dropping {n:,} rows whose {cfg.domain_column} is not a configured domain, "
        f"{int(shown.sum()):,} of them with a value that differs from a configured one only in "
        f"case or spaces: {examples}{' ...' if len(shown) > 3 else ''}. Domain values are "
        "compared exactly: fix them in the files, or list them in data.domain",
        UserWarning, stacklevel=4)


def _rows_where(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask)`` as int32 when that holds every index: the split stage keeps
    a few such arrays of one entry per row, the largest memory that grows with the file."""
    if mask.size >= 2**31:
        return np.flatnonzero(mask)
    return np.arange(mask.size, dtype=np.int32)[mask]  # no int64 array on the way


def _file_row(malformed: list[str], fname: str, row: int) -> int:
    """The 0-based data row of the file ``fname`` that its ``row``-th parsed row is: the
    malformed lines skipped before it count too (both readers describe them as
    "<file>: Skipping line N: ...", N 1-based with the header as line 1)."""
    skipped = sorted(int(m.group(1)) - 2 for m in (
        re.match(rf"{re.escape(fname)}: Skipping line (\d+)", d) for d in malformed) if m)
    for s in skipped:
        if s <= row:
            row += 1
    return row


def _describe_row(cfg: DataConfig, sc: _Scan, row: int, col: str) -> tuple:
    """(value of ``col``, file name, data row) of read row ``row``: one more read of the
    chunk that holds it (only for an error message)."""
    g0 = 0
    for _, fname, r0, df in _chunks(sc.infos, cfg, CHUNK_ROWS):
        if row < g0 + df.num_rows:
            return _value_at(df, col, row - g0), fname, r0 + row - g0
        g0 += df.num_rows
    return None, "?", row


# ---------------------------------------------------------------------------- 3. splits
@dataclass
class _Splits:
    """Where each read row goes, in one byte per row: ``code`` is its split's index in
    SPLIT_NAMES (-1 = dropped). A split made at random keeps file order, so a row's place in
    it is the count of its split's rows before it, which the encode stage counts as it goes;
    only the target rows of a time split need their place stored (``tgt_pos``, aligned with
    the kept target rows in read order)."""

    code: np.ndarray                  # int8 [n_read]
    sizes: dict                       # split name -> rows
    tgt_pos: np.ndarray | None = None


def _assign_splits(cfg: DataConfig, sc: _Scan, kept: np.ndarray) -> _Splits:
    """The split of every read row; ``kept`` (the mask of kept read rows) is used up.
    Frees the scan's per-row arrays as soon as they are not needed: this stage holds the
    permutation of the source rows (4 bytes each), the largest memory that grows with rows."""
    target_index = len(cfg.source_domains)
    times = None
    if sc.tgt_times is not None:
        times = sc.tgt_times[~sc.bad[sc.tgt_rows]]  # aligned with the kept target rows
    sc.bad = sc.label = sc.tgt_rows = sc.tgt_times = None
    tgt_mask = kept & (sc.dom_idx == target_index)
    sc.dom_idx = None
    src_mask = kept
    src_mask &= ~tgt_mask
    src_code, tgt_code, tgt_pos, sizes = _split_codes(
        cfg, int(np.count_nonzero(src_mask)), int(np.count_nonzero(tgt_mask)), times)
    del times
    code = np.full(src_mask.size, -1, dtype=np.int8)
    code[src_mask] = src_code
    del src_mask, kept, src_code
    code[tgt_mask] = tgt_code
    return _Splits(code, sizes, tgt_pos)


# ---------------------------------------------------------------------------- 4. fit
@dataclass
class _Fitted:
    feature_map: FeatureMap
    vocabularies: dict
    lookups: dict          # field -> pd.Index of its vocabulary (categorical, multi-hot)
    edges: dict            # bucket field -> edges
    dense: dict            # dense field -> (MeanStd, mean, std)


def _fit(cfg: DataConfig, sc: _Scan, code: np.ndarray, chunk_rows: int) -> _Fitted:
    counters = {c: ValueCounter() for c in [*cfg.categorical, *(m.name for m in cfg.multihot)]}
    sketches = {c.name: QuantileSketch() for c in cfg.numeric if c.mode == "bucket"}
    moments = {c.name: MeanStd(sc.dense_scale[c.name]) for c in cfg.numeric if c.mode == "dense"}
    g0 = 0
    with contextlib.closing(sc.spill.chunks()) as chunks:
        for chunk in chunks:
            fit = np.isin(code[g0: g0 + chunk.n], _TRAIN_CODES)
            g0 += chunk.n
            if not fit.any():
                continue
            for c in cfg.categorical:
                counters[c].add_counts(chunk.value_counts(c, fit))
            for c in cfg.numeric:
                (sketches if c.mode == "bucket" else moments)[c.name].add(chunk.numbers[c.name][fit])
            for m in cfg.multihot:
                counters[m.name].add_counts(chunk.token_counts(m.name, fit))

    fields: list[FieldInfo] = []
    vocabularies: dict[str, list[str]] = {}
    lookups: dict[str, pd.Index] = {}
    edges_of: dict[str, np.ndarray] = {}
    dense: dict = {}
    offset = 0
    for c, role in [*((c, "categorical") for c in cfg.categorical),
                    *((m.name, "multihot") for m in cfg.multihot)]:
        _warn_integer_spellings(c, role, counters[c].counts().index)
    for c in cfg.categorical:
        vocab = fit_vocab(counters[c].counts(), cfg.min_count)
        fields.append(FieldInfo(c, "categorical", len(vocab) + 2, offset))
        vocabularies[c], lookups[c] = vocab, pd.Index(vocab, dtype=object)
        offset += len(vocab) + 2
    for c in cfg.numeric:
        if c.mode == "bucket":
            edges = quantile_edges(sketches[c.name], cfg.num_buckets)
            size = len(edges) + 4  # PAD, missing, len(edges)+1 buckets, OOV
            fields.append(FieldInfo(c.name, "numeric_bucket", size, offset))
            edges_of[c.name] = edges
            vocabularies[c.name] = _bucket_names(edges)
            offset += size
        else:
            mean, std = moments[c.name].mean_std(c.name)
            dense[c.name] = (moments[c.name], mean, std)
    for m in cfg.multihot:
        vocab = fit_vocab(counters[m.name].counts(), cfg.min_count)
        fields.append(FieldInfo(m.name, "multihot", len(vocab) + 2, offset))
        vocabularies[m.name], lookups[m.name] = vocab, pd.Index(vocab, dtype=object)
        offset += len(vocab) + 2

    texts = {c: v for c, v in float_text_integral(sc.infos).items() if c in cfg.categorical}
    feature_map = FeatureMap(
        fields=fields,
        single_fields=[*cfg.categorical, *(c.name for c in cfg.numeric if c.mode == "bucket")],
        multihot_fields=[c.name for c in cfg.multihot],
        multihot_max_len=max((c.max_len for c in cfg.multihot), default=0),
        dense_fields=[c.name for c in cfg.numeric if c.mode == "dense"],
        domain_values=[*cfg.source_domains, cfg.target_domain],
        extra={
            "source_domains": list(cfg.source_domains),
            "target_domain": cfg.target_domain,
            "min_count": cfg.min_count,
            "bucket_edges": {k: v.tolist() for k, v in edges_of.items()},
            "dense_mean_std": {k: [v[1], v[2]] for k, v in dense.items()},
            # Only where a categorical column is a Parquet float column (the key is absent
            # otherwise, so the feature maps of other data keep their fingerprints).
            **({"float_text_integral": texts} if texts else {}),
        },
    )
    feature_map.check()
    return _Fitted(feature_map, vocabularies, lookups, edges_of, dense)


# A multi-hot tensor this much larger than its longest list needs is worth a warning.
PADDING_WARN_BYTES = 1 << 30


def _warn_padding(cfg: DataConfig, longest: dict, n_rows: int, id_bytes: int) -> None:
    """Warn when ``max_len`` pads every row far beyond the longest list in the data: each row
    stores ``max_len`` ids per multi-hot column (the widest column's ``max_len`` for all of
    them), and a cap of 100,000 for lists of 10 makes the tensors 10,000 times larger and
    every batch that much slower."""
    width = max((m.max_len for m in cfg.multihot), default=0)
    need = max(longest.values(), default=0)
    padded = n_rows * len(cfg.multihot) * width * id_bytes
    if width > 2 * max(need, 1) and padded > PADDING_WARN_BYTES:
        widest = max(cfg.multihot, key=lambda m: m.max_len)
        warnings.warn(
            f"multihot column '{widest.name}': max_len {widest.max_len:,} pads every row of "
            f"every multi-hot column to {widest.max_len:,} slots, but the longest list in the "
            f"data has {need:,} token{'s' if need != 1 else ''}: the multi-hot tensor takes "
            f"about {padded / 2**30:,.1f} GB and every batch reads it; set max_len to "
            f"{max(need, 1):,} (max_len only caps a list's length)", UserWarning, stacklevel=5)


# Rows cut to max_len above this share of the rows are warned about (below it, logged).
TRUNCATION_WARN_SHARE = 0.01


def _report_truncation(cfg: DataConfig, truncated: dict, longest: dict, n_rows: int) -> None:
    """Say how many rows of each multi-hot column lost tokens past ``max_len``: a warning
    when that is more than TRUNCATION_WARN_SHARE of the rows (a max_len below the lists'
    usual length), else a log line."""
    for m in cfg.multihot:
        k = int(truncated.get(m.name, 0))
        if not k:
            continue
        text = (f"multihot column '{m.name}': {k:,} of {n_rows:,} rows hold more than max_len "
                f"{m.max_len:,} tokens and keep only their first {m.max_len:,} (the longest "
                f"list has {longest.get(m.name, 0):,})")
        if k > TRUNCATION_WARN_SHARE * n_rows:
            warnings.warn(f"{text}; raise max_len to keep more", UserWarning, stacklevel=5)
        else:
            log.info("%s", text)


def _warn_integer_spellings(column: str, role: str, values: pd.Index) -> None:
    """Warn when the training values of ``column`` spell some integers both 'N' and 'N.0':
    two vocabulary entries (two embedding rows) for one id."""
    n, example = integer_spelling_pairs(values)
    if n:
        warnings.warn(
            f"column '{column}' ({role}) holds {n} integer value{'s' if n > 1 else ''} in two "
            f"spellings, 'N' and 'N.0' (e.g. '{example}' and '{example}.0'), which are two "
            "vocabulary entries for one id: a CSV written from a float column (pandas writes "
            "an integer column with missing values as floats) spells ids 'N.0', a Parquet "
            "file or an integer column 'N'. Write the ids one way in every file (e.g. "
            f"df['{column}'].astype('Int64') before to_csv)", UserWarning, stacklevel=6)


def _tokens(text: pd.Series, sep: str) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """A multi-hot column's non-empty tokens, the row of each and its position in the row.
    Arrow's split does the string work, so there is no per-row Python."""
    tok, row, pos = _token_arrays(text, sep)
    return pd.Series(tok.to_numpy(zero_copy_only=False), dtype=object), row, pos


def _token_arrays(text: pd.Series, sep: str):
    """:func:`_tokens` with the tokens left as an Arrow array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.fill_null(_arrow_text(text), "")
    lists = pc.split_pattern(text, sep)
    flat = pc.list_flatten(lists)
    row = pc.list_parent_indices(lists).to_numpy()
    keep_tok = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    row = row[keep_tok]
    # Position within its row: rows come in order, so it is the distance to the row's first
    # token, whose index is the count of the tokens of the rows before.
    per_row = np.bincount(row, minlength=len(text))
    first = np.cumsum(per_row) - per_row
    pos = np.arange(len(row)) - first[row]
    return flat.filter(pa.array(keep_tok)), row, pos


def _bucket_names(edges: np.ndarray) -> list[str]:
    bounds = [-np.inf, *edges.tolist(), np.inf]
    return ["<missing>"] + [f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------- 5. encode
def _encode(cfg: DataConfig, sc: _Scan, splits: _Splits, fitted: _Fitted, out: Path, stats: dict) -> None:
    fm = fitted.feature_map
    ids = id_dtype(fm.num_rows)
    by_name = {f.name: f for f in fm.fields}
    n_single, n_multi, n_dense = len(fm.single_fields), len(fm.multihot_fields), len(fm.dense_fields)
    max_len = fm.multihot_max_len
    target_index = len(cfg.source_domains)
    writers = {}
    for k, name in enumerate(SPLIT_NAMES):
        n = splits.sizes[name]
        shapes = {"sparse": ((n, n_single), ids), "label": ((n,), np.float32), "domain": ((n,), np.int64)}
        if n_multi:
            shapes["multihot"] = ((n, n_multi, max_len), ids)
        if n_dense:
            shapes["dense"] = ((n, n_dense), np.float32)
        writers[k] = SplitWriter(out / name, shapes)
    # Each vocabulary lookup once per chunk and distinct value, then gathered per row.
    luts = {f: _lookup(fitted.lookups[f], by_name[f], ids) for f in [*cfg.categorical, *(m.name for m in cfg.multihot)]}
    timed = {SPLIT_NAMES.index(n) for n in ("target_train", "target_valid", "target_test")} \
        if splits.tgt_pos is not None else set()
    filled = np.zeros(len(SPLIT_NAMES), dtype=np.int64)  # rows written so far per random split
    truncated = {m.name: 0 for m in cfg.multihot}
    try:
        g0, t0 = 0, 0
        with contextlib.closing(sc.spill.chunks()) as chunks:
            for chunk in chunks:
                c = splits.code[g0: g0 + chunk.n]
                g0 += chunk.n
                sel = np.flatnonzero(c >= 0)
                if sel.size == 0:
                    continue
                # The chunk's kept rows grouped by split, in read order within each (a stable sort
                # of int8 codes is a radix sort); a time split's groups are then put in time order.
                cs = c[sel]
                order = np.argsort(cs, kind="stable")
                sel, cs = sel[order], cs[order]
                bounds = np.searchsorted(cs, np.arange(len(SPLIT_NAMES) + 1))
                pos = None
                if timed:
                    tgt_here = np.flatnonzero((c >= 0) & (chunk.domain == target_index))
                    at = np.empty(chunk.n, dtype=splits.tgt_pos.dtype)
                    at[tgt_here] = splits.tgt_pos[t0: t0 + tgt_here.size]
                    t0 += tgt_here.size
                    pos = at[sel]
                    for k in timed:
                        a, b = bounds[k], bounds[k + 1]
                        o = np.argsort(pos[a:b], kind="stable")
                        sel[a:b], pos[a:b] = sel[a:b][o], pos[a:b][o]
                n = sel.size
                sparse = np.empty((n, n_single), dtype=ids)
                for j, f in enumerate(cfg.categorical):
                    values, codes = chunk.categories(f)
                    sparse[:, j] = luts[f](values)[codes[sel]]
                j = len(cfg.categorical)
                dense = np.empty((n, n_dense), dtype=np.float32) if n_dense else None
                jd = 0
                for col in cfg.numeric:
                    vals = chunk.numbers[col.name][sel]
                    if col.mode == "bucket":
                        bucket = np.searchsorted(fitted.edges[col.name], vals, side="right")
                        sparse[:, j] = np.where(np.isnan(vals), 1, bucket + 2) + by_name[col.name].offset
                        j += 1
                    else:
                        ms, mean, std = fitted.dense[col.name]
                        with np.errstate(over="ignore", invalid="ignore"):
                            z = (vals - mean) / std
                        overflow = ~np.isfinite(z) & np.isfinite(vals)
                        if overflow.any():  # huge values: the same formula on scaled numbers
                            z[overflow] = ms.standardise(vals[overflow], mean, std)
                        z[~np.isfinite(z)] = 0.0  # missing or infinite -> the training mean
                        dense[:, jd] = clip_dense(z)
                        jd += 1
                multihot = None
                if n_multi:
                    multihot = np.empty((n, n_multi, max_len), dtype=ids)
                    at = np.full(chunk.n, -1, dtype=np.int64)
                    at[sel] = np.arange(n)
                    for jm, m in enumerate(cfg.multihot):
                        multihot[:, jm, :] = by_name[m.name].pad_id
                        values, tcodes, row, tpos = chunk.tokens(m.name)
                        # Only the kept rows' tokens, renumbered to their place among the kept rows.
                        row = at[row]
                        mine = row >= 0
                        tcodes, row, tpos = tcodes[mine], row[mine], tpos[mine]
                        truncated[m.name] += int(np.unique(row[tpos >= m.max_len]).size)
                        keep = tpos < m.max_len
                        multihot[row[keep], jm, tpos[keep]] = luts[m.name](values)[tcodes[keep]]
                label = chunk.label[sel].astype(np.float32)
                domain = chunk.domain[sel].astype(np.int64)
                for k, w in writers.items():
                    a, b = int(bounds[k]), int(bounds[k + 1])
                    if a == b:
                        continue
                    if k in timed:
                        at_k = pos[a:b]
                    else:
                        at_k = np.arange(filled[k], filled[k] + (b - a))
                        filled[k] += b - a
                    w.write("sparse", at_k, sparse[a:b])
                    w.write("label", at_k, label[a:b])
                    w.write("domain", at_k, domain[a:b])
                    if multihot is not None:
                        w.write("multihot", at_k, multihot[a:b])
                    if dense is not None:
                        w.write("dense", at_k, dense[a:b])
    finally:
        for w in writers.values():
            w.close()
    if cfg.multihot:
        stats["multihot_rows_truncated"] = truncated


def _lookup(vocab: pd.Index, info: FieldInfo, ids: np.dtype):
    """A function: a chunk's distinct values -> their global ids (OOV for the unknown)."""
    def global_ids(values: pd.Index) -> np.ndarray:
        known = vocab.get_indexer(values) if len(vocab) else np.full(len(values), -1)
        return (np.where(known >= 0, known + 1, info.vocab_size - 1) + info.offset).astype(ids)
    return global_ids


# ---------------------------------------------------------------------------- the stages
def _preprocess(cfg: DataConfig, out: Path, chunk_rows: int = CHUNK_ROWS, key: str | None = None) -> None:
    """Run the five stages (module docstring) and write the store folder ``out``."""
    t0 = time.perf_counter()
    stats: dict = {}
    spill = _Spill(out / ".spill", cfg)
    try:
        feature_map, vocabularies = _stages(cfg, out, chunk_rows, spill, stats)
    finally:
        spill.remove()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    sizes = {name: stats[f"rows_{name}"] for name in SPLIT_NAMES}
    log.info("preprocessed %d rows in %.1fs: %s", sum(sizes.values()), stats["seconds"],
             ", ".join(f"{k}={v}" for k, v in sizes.items()))
    write_meta(out, {
        "version": PIPELINE_VERSION,
        "key": key,
        "feature_map": feature_map,
        "vocabularies": vocabularies,
        "stats": stats,
    })


def _stages(cfg: DataConfig, out: Path, chunk_rows: int, spill: "_Spill", stats: dict) -> tuple[dict, dict]:
    """Scan, check, split, fit, encode; the feature map (as a dict) and the vocabularies."""
    sc = _scan(cfg, chunk_rows, spill)
    stats["rows_read"] = int(sc.n_read)
    kept = _check_rows(cfg, sc, stats)
    splits = _assign_splits(cfg, sc, kept)
    del kept  # _assign_splits freed the scan's per-row arrays (label and domain are spilled)
    fitted = _fit(cfg, sc, splits.code, chunk_rows)
    _warn_padding(cfg, spill.longest, sum(int(v) for v in splits.sizes.values()),
                  np.dtype(id_dtype(fitted.feature_map.num_rows)).itemsize)
    _encode(cfg, sc, splits, fitted, out, stats)
    _report_truncation(cfg, stats.get("multihot_rows_truncated", {}), spill.longest,
                       sum(int(v) for v in splits.sizes.values()))
    for name in SPLIT_NAMES:
        stats[f"rows_{name}"] = int(splits.sizes[name])
    return fitted.feature_map.to_dict(), fitted.vocabularies


def _reason_column(reason: str) -> str:
    # Every reason names its column between the first pair of quotes.
    return reason.split("'")[1]


def _permutation(seed: int, n: int, dtype) -> np.ndarray:
    """``default_rng(seed).permutation(n)`` in ``dtype``: shuffling an int32 range draws the
    same numbers as ``permutation(n)`` does for its int64 one, so the order is the same."""
    return np.random.default_rng(seed).permutation(np.arange(n, dtype=dtype))


def _split_codes(cfg: DataConfig, n_src: int, n_tgt: int, tgt_times: np.ndarray | None):
    """The split of each kept source row and each kept target row (both in read order, as
    SPLIT_NAMES indices, int8), the target rows' places in their splits for a time split
    (else None) and the split sizes. ``tgt_times``: the kept target rows' times (time split).

    A random split takes the rows at ``perm[a:b]`` of ``default_rng(seed).permutation(n)``
    over the rows in read order, and keeps them in read order."""
    code_of = {name: SPLIT_NAMES.index(name) for name in SPLIT_NAMES}
    idx_dtype = np.int32 if max(n_src, n_tgt) < 2**31 else np.int64
    sizes: dict[str, int] = {}

    ss = cfg.source_split
    n_valid = int(round(ss.valid * n_src))
    src_code = np.full(n_src, code_of["source_train"], dtype=np.int8)
    src_code[_permutation(ss.seed, n_src, idx_dtype)[:n_valid]] = code_of["source_valid"]
    sizes["source_train"], sizes["source_valid"] = n_src - n_valid, n_valid

    ts = cfg.target_split
    n_test = int(round(ts.test * n_tgt))
    n_valid = int(round(ts.valid * n_tgt))
    n_train = n_tgt - n_test - n_valid
    tgt_code = np.empty(n_tgt, dtype=np.int8)
    tgt_pos = None
    if ts.method == "random":
        perm = _permutation(ts.seed, n_tgt, idx_dtype)
        tgt_code[perm[n_test + n_valid:]] = code_of["target_train"]
        tgt_code[perm[n_test: n_test + n_valid]] = code_of["target_valid"]
        tgt_code[perm[:n_test]] = code_of["target_test"]
        del perm
    else:
        # Stable: rows with equal times keep file order; each split is in time order.
        ordered = np.argsort(tgt_times, kind="stable")
        tgt_pos = np.empty(n_tgt, dtype=idx_dtype)
        for name, a, b in (("target_train", 0, n_train), ("target_valid", n_train, n_train + n_valid),
                           ("target_test", n_train + n_valid, n_tgt)):
            tgt_code[ordered[a:b]] = code_of[name]
            tgt_pos[ordered[a:b]] = np.arange(b - a, dtype=idx_dtype)
        del ordered
    sizes.update(target_train=n_train, target_valid=n_valid, target_test=n_test)

    for name in SPLIT_NAMES:
        if sizes[name] == 0:
            if name.startswith("source"):
                n_dom, what = n_src, f"source domains {list(cfg.source_domains)} have"
                frac = "data.split.source.valid" + f" = {ss.valid}"
            else:
                n_dom, what = n_tgt, f"target domain '{cfg.target_domain}' has"
                part = name.split("_")[1]
                frac = f"data.split.target.{part} = {getattr(ts, part, None)}" if part != "train" else (
                    f"data.split.target.valid + test = {ts.valid + ts.test}"
                )
            raise DataError(
                f"split '{name}' is empty: the {what} {n_dom} rows and {frac}; "
                "add rows or change the fractions"
            )
    return src_code, tgt_code, tgt_pos, sizes
