"""Reading the data files in chunks, as text, with the malformed lines counted.

Why pyarrow: its streaming CSV reader (``pyarrow.csv.open_csv``) parses one block of
``block_size`` bytes at a time in C++, checks every line's field count even for the columns
it does not convert (so only the used columns are materialised and malformed lines are still
found), and ``ParquetFile.iter_batches`` does the same for Parquet. Both are already
dependencies; an out-of-core engine (DuckDB, Polars) would add a large dependency for what
one streaming pass does here.

One rule pyarrow does not share with pandas, which read the files before: a CSV line with
*fewer* fields than the header gets empty values (pandas), where pyarrow can only skip it.
A file with such a line is read with pandas' chunked reader instead (same rules, slower),
so the tensors do not depend on which reader ran.
"""

from __future__ import annotations

import csv
import difflib
from collections import Counter
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..config.data import file_format, file_suffix
from .config import DataConfig, DataError

# Rows per chunk: peak memory grows with it (a few hundred bytes per row and used column).
CHUNK_ROWS = 1 << 18


@dataclass
class FileInfo:
    """What the first read of a file found out, reused by the later passes: which reader
    to use, and for Parquet float columns whether every value is integral (a Parquet
    ``1.0`` is then the text ``1``, as the same file as CSV would say; the pipeline then
    makes that decision one for all files, see pipeline.float_text_integral)."""

    path: Path
    engine: str                      # "arrow" or "pandas" (CSV) or "parquet"
    integral: dict[str, bool] = field(default_factory=dict)
    list_seps: dict[str, str] = field(default_factory=dict)   # list column -> multi-hot sep
    n_fields: int = 0                # CSV: fields per line (the header's, or data.columns')


class _ShortLine(Exception):
    """A CSV line with fewer fields than the header: pandas' reader has to take over."""


def inspect_file(path: Path, cfg: DataConfig, chunk_rows: int) -> FileInfo:
    """Check the file's columns and decide how to read it (see :class:`FileInfo`)."""
    fmt, _ = file_format(path)
    required = cfg.required_columns()
    if fmt == "csv":
        present, _ = csv_layout(path, _csv_sep(path, cfg), cfg.columns, label=cfg.label)
        check_columns(required, present, path)
        return FileInfo(path, "arrow", n_fields=len(present))
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"cannot read {path} as Parquet: {exc}") from None
    schema = pf.schema_arrow
    check_columns(required, schema.names, path)
    roles = dict(reversed(required))
    seps = {c.name: c.sep for c in cfg.multihot}
    lists = {}
    for col in dict.fromkeys(c for c, _ in required):
        t = schema.field(col).type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            if roles[col] != "multihot":
                raise DataError(
                    f"column '{col}' ({roles[col]}) in {path.name} is a Parquet list column; "
                    "only multihot columns may hold lists"
                )
            lists[col] = seps[col]
    floats = [c for c in dict.fromkeys(c for c, _ in required)
              if pa.types.is_floating(schema.field(c).type)]
    integral = {c: True for c in floats}
    if floats:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=floats):
            for c in floats:
                if integral[c]:
                    v = batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                    v = v[np.isfinite(v)]
                    integral[c] = bool(np.all(v == np.round(v)) and np.all(np.abs(v) < 2**62))
    return FileInfo(path, "parquet", integral, lists)


def _csv_sep(path: Path, cfg: DataConfig) -> str:
    return "\t" if file_suffix(path)[0] == ".tsv" else cfg.csv_sep


GZIP_MAGIC = b"\x1f\x8b"


def open_bytes(path: Path):
    """A binary file object of ``path``'s content: decompressed for a ``*.gz`` file. A
    gzip-compressed file under another name is an error that says so (its bytes would
    otherwise reach the CSV reader as garbage)."""
    path = Path(path)
    if file_suffix(path)[1]:
        import gzip
        return gzip.open(path, "rb")
    f = open(path, "rb")
    if f.read(2) == GZIP_MAGIC:
        f.close()
        raise DataError(f"{path} is gzip-compressed: name it {path.name}.gz (it is then read as "
                        "gzip), or gunzip it")
    f.seek(0)
    return f


def open_text(path: Path):
    """``path``'s content as text for the csv module (UTF-8, a byte-order mark dropped, line
    ends as written), through gzip for a ``*.gz`` file."""
    import io
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8-sig", newline="")


def read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path``'s content (decompressed), or a DataError naming the
    file when its gzip stream is damaged or cut."""
    import zlib
    try:
        with open_bytes(path) as f:
            return f.read(n)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc} (a damaged or cut file?)") from None


def arrow_source(path: Path):
    """What pyarrow's CSV reader opens for ``path``: the path, or a gzip stream."""
    if file_suffix(path)[1]:
        import pyarrow as pa
        return pa.input_stream(str(path), compression="gzip")
    return path


def pandas_compression(path: Path):
    return "gzip" if file_suffix(path)[1] else None


def csv_layout(path: Path, sep: str, columns=(), *, label: str | None = None,
               features=None) -> tuple[list[str], bool]:
    """``(names, header)``: a CSV file's column names, and whether its first line holds them.

    Without ``columns`` the first line is the header. With ``columns`` (``data.columns``: files
    without a header line) the names are ``columns``, and a first line that looks like a header
    (half of its fields are column names, or its ``label`` field is not a number) or has
    another field count is refused: read as data, a header of another order would be a row
    with the columns mislabelled and silently dropped. ``features`` is for
    files to score, which may come with a header or without one: a first line holding every
    feature column is a header; otherwise the file has the names of ``columns``, or of
    ``columns`` without ``label`` when it is one field short (a file to score need not have
    the label, like Criteo's test.txt).

    Example::

        csv_layout(Path("train.txt"), "\t", ["label", "I1", "C1"])   # (['label', 'I1', 'C1'], False)
    """
    first = csv_header(path, sep)
    if not columns:
        return first, True
    names = list(columns)
    if features is not None:
        if set(features) <= set(first):
            return first, True
        if label in names and len(first) == len(names) - 1:
            return [c for c in names if c != label], False
    else:
        stripped = [c.strip() for c in first]
        named = sum(c in names for c in stripped)
        value = stripped[names.index(label)] if label in names and len(first) == len(names) else ""
        if named >= max(2, len(names) // 2) or (value and not _is_number(value)):
            why = (f"{named} of its {len(first)} fields are column names" if named
                   else f"its label field '{label}' holds {value!r}, not a number")
            raise DataError(f"the first line of {path.name} looks like a header ({why}: "
                            f"{', '.join(first[:8])}{' ...' if len(first) > 8 else ''}), but "
                            "data.columns says the files have none: remove the header line, "
                            "or data.columns")
    if len(first) != len(names):
        short = (f", or {len(names) - 1} without the label '{label}'"
                 if features is not None and label in names else "")
        fields = f"{len(first)} field{'' if len(first) == 1 else 's'}"
        listed = f"{len(names)} column{'' if len(names) == 1 else 's'}"
        raise DataError(f"the first line of {path.name} has {fields} (sep={sep!r}), but "
                        f"data.columns names {listed}{short}: is the separator or the column "
                        "list wrong?" + (" (--sep sets the separator of a file to score)"
                                         if features is not None else ""))
    return names, False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_header(path: Path, sep: str) -> list[str]:
    """The column names of a CSV file's header line as written (a repeated name stays
    repeated: pandas would rename the second 'u' to 'u.1'). A UTF-8 byte-order mark is
    dropped."""
    try:
        with open_text(path) as f:
            row = next(csv.reader(f, delimiter=sep), None)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, EOFError, __import__("zlib").error) as exc:  # a damaged gzip stream
        raise DataError(f"cannot read {path}: {exc} (a damaged or cut file?)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"cannot parse the header line of {path} as CSV (sep={sep!r}): {exc}") from None
    if row is None or not any(c.strip() for c in row):
        raise DataError(f"data file {path} is empty (no header line)")
    return row


def check_columns(required: list[tuple[str, str]], present: list[str], path: Path,
                  scoring: bool = False) -> None:
    """Every required column is there exactly once, or an error naming it (a missing one
    with the closest match, a different case first)."""
    present = [str(p) for p in present]
    counts = Counter(present)
    for col, role in required:
        if counts[col] > 1:
            raise DataError(f"column '{col}' ({role}) appears {counts[col]} times in the header "
                            f"of {path.name}; every column name must be unique")
        if col not in counts:
            same_case = [p for p in present if p.lower() == col.lower()]
            hint = same_case or difflib.get_close_matches(col, present, n=1)
            shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
            seps = [c for c in ",;\t|" if len(present) == 1 and c in present[0]]
            # A first line of numbers and empty fields is data, not names.
            looks_like_data = len(present) > 1 and sum(
                p.strip() == "" or p.strip().lstrip("+-").replace(".", "", 1).isdigit()
                for p in present) >= 0.5 * len(present)
            raise DataError(
                f"column '{col}' ({role}) not found in {path.name}"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f"; columns present: {shown}"
                + (f" (the header is one column holding {seps[0]!r}: is the file separated "
                   "by another character than the one it is read with? A .tsv file is read "
                   "as tab-separated, any other CSV with "
                   + ("the run's data.csv_sep unless --sep names another)" if scoring
                      else "data.csv_sep)") if seps else "")
                + ((" (the first line holds numbers and empty fields: the file seems to have "
                    "no header line; give it one with the feature columns' names, as the "
                    "files the model was trained on had)" if scoring else
                    " (the first line holds numbers and empty fields: the file seems to have "
                    "no header line; name its columns in file order with data.columns, as "
                    "the Criteo config does, or add a header line)")
                   if looks_like_data and not seps else "")
            )


class LineBreakCheck:
    """Finds the values of the used columns of a CSV file that hold a line break.

    A quoted field may hold line breaks, but in a column the model reads one is rarely
    meant, and a stray ``"`` opening a field makes the reader take everything up to the
    next ``"`` (or the end of the file) as that one value: the rows in between vanish into
    it. Such a value holds the text of whole lines of the file, so it is told apart by its
    separators: a value that holds at least ``fields - 1`` separators (a line's worth) per
    line break, not counting one line break for the partial lines at its ends (and at
    least one line's worth), swallowed rows, and is a DataError naming the file, the data
    row, the column and the line breaks; any other value with a line break is counted and
    reported by :meth:`warn` (quoted text over two lines is legitimate data). Parquet files
    have no quoting and are not checked, nor are the columns no role reads.

    Example::

        check = LineBreakCheck({"tags": "multihot"})
        check.check(table, "data.csv", 0, ",", 8)   # raises on a value that swallowed rows
        check.warn()                                 # a UserWarning if any value had a break
    """

    def __init__(self, roles: dict[str, str]) -> None:
        self.roles = roles
        self.count = 0
        self.example: tuple[str, str, int, str] | None = None   # column, file, data row, value

    def check(self, table, fname: str, first_row: int, sep: str, n_fields: int,
              file_row=None) -> None:
        """Check one chunk (an Arrow table) whose first row is data row ``first_row`` + 1
        (0-based ``first_row``) of ``fname``; ``file_row`` maps a 0-based row of the table's
        file to its 0-based data row when they differ (skipped malformed lines)."""
        import pyarrow.compute as pc

        per_line = max(n_fields - 1, 1)
        for col in table.column_names:
            if col not in self.roles:
                continue
            arr = table.column(col)
            breaks = pc.fill_null(pc.count_substring(arr, "\n"), 0)
            if not pc.max(breaks).as_py():
                continue
            breaks = breaks.to_numpy(zero_copy_only=False)
            hit = np.flatnonzero(breaks > 0)
            values = arr.take(hit)
            seps = pc.count_substring(values, sep).to_numpy(zero_copy_only=False)
            swallowed = seps >= per_line * np.maximum(breaks[hit] - 1, 1)
            if swallowed.any():
                j = int(np.flatnonzero(swallowed)[0])
                i = int(hit[j])
                row = first_row + i if file_row is None else file_row(first_row + i)
                text = values[j].as_py()
                raise DataError(
                    f"{fname}, data row {row + 1}: the value of column '{col}' "
                    f"({self.roles[col]}) holds {int(breaks[i])} line breaks and "
                    f"{int(seps[j])} {sep!r} separators, as whole lines of the file do: the "
                    f"lines after it were read into this one value, so their rows are lost "
                    f"(a stray quote? a field that starts with \" runs to the next \"). The "
                    f"value starts {text[:60]!r}; remove the stray quote, or double a quote "
                    "meant inside a quoted field (\"\")")
            if self.example is None:
                i = int(hit[0])
                row = first_row + i if file_row is None else file_row(first_row + i)
                self.example = (col, fname, row, values[0].as_py())
            self.count += int(hit.size)

    def warn(self, stacklevel: int = 2) -> None:
        """One UserWarning for the values with a line break found so far, if any."""
        if not self.count:
            return
        col, fname, row, text = self.example
        warnings.warn(
            f"{self.count} value{'s' if self.count > 1 else ''} of the columns in use "
            f"hold{'' if self.count > 1 else 's'} a line break (e.g. column '{col}' "
            f"({self.roles[col]}) in {fname}, data row {row + 1}: {text[:60]!r}); a quoted "
            "line break is kept as part of the value: if it is not meant, look for a stray "
            "quote there", UserWarning, stacklevel=stacklevel + 1)


def iter_chunks(info: FileInfo, cfg: DataConfig, chunk_rows: int,
                malformed: list[str] | None = None) -> Iterator["pa.Table"]:
    """Arrow tables of the required columns as text (type ``string``, missing = null),
    ``chunk_rows`` rows or so each, in file order; each column is one contiguous array.
    Malformed CSV lines are skipped and described in ``malformed``. Raises ``_ShortLine``
    (arrow engine only) when a line has too few fields.

    The CSV reader's tables are used as they are (no copy to pandas: the preprocessing works
    on Arrow arrays); the other readers' text frames are converted.

    Example::

        for table in iter_chunks(inspect_file(path, cfg, 1 << 16), cfg, 1 << 16):
            table.column(cfg.label)          # a ChunkedArray of one chunk
    """
    cols = list(dict.fromkeys(c for c, _ in cfg.required_columns()))
    if info.engine == "parquet":
        frames = _parquet_chunks(info, cols, chunk_rows, cfg.label)
    elif info.engine == "arrow":
        yield from _arrow_csv_chunks(info.path, cfg, cols, chunk_rows, malformed)
        return
    else:
        frames = _pandas_csv_chunks(info.path, cfg, cols, chunk_rows, malformed)
    for df in frames:
        yield text_table(df)


def text_table(df: pd.DataFrame) -> "pa.Table":
    """A frame of text columns (missing = NaN) as an Arrow table of ``string`` columns."""
    import pyarrow as pa

    return pa.table({c: pa.array(df[c], type=pa.string(), from_pandas=True) for c in df.columns})


# Bytes Arrow parses at a time. Its reader keeps up to 32 blocks read ahead in a
# background queue (measured: 0.9 GB of RSS with 22 MB blocks), so blocks are small and
# ``_arrow_csv_chunks`` joins their batches into chunks of ``chunk_rows``.
ARROW_BLOCK_BYTES = 1 << 20


def _block_bytes(path: Path, chunk_rows: int) -> int:
    # Arrow cuts blocks by bytes: estimate bytes per row from the file's start; a block must
    # hold the longest line, hence the generous floor.
    sample = read_head(path, 1 << 16)
    lines = sample.count(b"\n") or 1
    longest = max((len(x) for x in sample.split(b"\n")), default=0)
    return int(max(min(chunk_rows * len(sample) / lines, ARROW_BLOCK_BYTES), 4 * longest, 1 << 12))


def header_only(path: Path) -> bool:
    """True for a CSV file of one line (the header) without a final line break, which
    Arrow's reader refuses ("Empty CSV file or block") where it reads a header with one as
    a file of no rows."""
    path = Path(path)
    if path.stat().st_size > 1 << 20:
        return False
    text = read_head(path, 2 << 20).rstrip(b"\r\n")
    return bool(text) and b"\n" not in text


def _arrow_csv_chunks(path, cfg, cols, chunk_rows, malformed) -> Iterator["pa.Table"]:
    import pyarrow as pa

    found: list[str] = []
    short = []

    def on_invalid(row) -> str:
        # A short line of a file with a header gets empty values (pandas' rule, below); in a
        # header-less file of a fixed layout (data.columns) it is a damaged line: malformed.
        if row.actual_columns < row.expected_columns and not cfg.columns:
            short.append(row)
            return "error"
        where = f"line {row.number}" if row.number is not None else "a line"
        # pandas' wording, which the messages used before
        found.append(f"{path.name}: Skipping {where}: expected {row.expected_columns} fields, saw {row.actual_columns}")
        return "skip"

    def frame(batches) -> "pa.Table":
        return pa.Table.from_batches(batches).select(cols).combine_chunks()

    try:
        reader = _open_arrow_csv(path, cfg, cols, chunk_rows, on_invalid)
    except pa.ArrowInvalid as exc:  # the first block is parsed on opening
        if short:
            raise _ShortLine() from None
        if not cfg.columns and header_only(path):
            return  # no data rows, as with a final line break
        raise DataError(f"cannot parse {path} as CSV (sep={_csv_sep(path, cfg)!r}): {exc}") from None
    except OSError as exc:  # a damaged gzip stream, seen by Arrow's decompressor
        raise DataError(f"cannot read {path}: {exc} (a damaged or cut file?)") from None
    pending, n_pending = [], 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            # Lines skipped after the last batch (or in a file whose every line is skipped,
            # which gives no batch at all) are counted too.
            if malformed is not None:
                malformed.extend(found)
            break
        except pa.ArrowInvalid as exc:
            if short:
                raise _ShortLine() from None
            raise DataError(f"cannot parse {path} as CSV (sep={_csv_sep(path, cfg)!r}): {exc}") from None
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc} (a damaged or cut file?)") from None
        if malformed is not None:
            malformed.extend(found)
        found.clear()
        pending.append(batch)
        n_pending += batch.num_rows
        if n_pending >= chunk_rows:
            yield frame(pending)
            pending, n_pending = [], 0
    if pending:
        yield frame(pending)


def _open_arrow_csv(path, cfg, cols, chunk_rows, on_invalid):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = {"column_names": list(cfg.columns)} if cfg.columns else {}
    return pcsv.open_csv(
        arrow_source(path),
        read_options=pcsv.ReadOptions(block_size=_block_bytes(path, chunk_rows), use_threads=False,
                                      **names),
        parse_options=pcsv.ParseOptions(delimiter=_csv_sep(path, cfg), invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(
            include_columns=cols, column_types={c: pa.string() for c in cols},
            strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True,
        ),
    )


def _pandas_csv_chunks(path, cfg, cols, chunk_rows, malformed) -> Iterator[pd.DataFrame]:
    sep = _csv_sep(path, cfg)
    # No usecols: with usecols pandas stops reporting lines with too many fields.
    # A header-less file: its names, and no column taken as the index (pandas' way with a
    # line longer than the names).
    names = dict(header=None, names=list(cfg.columns), index_col=False) if cfg.columns else {}
    reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                         on_bad_lines="warn", engine="c", chunksize=chunk_rows,
                         compression=pandas_compression(path), **names)
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            try:
                df = next(reader)
            except StopIteration:
                break
            except pd.errors.ParserError as exc:
                raise DataError(f"cannot parse {path} as CSV (sep={sep!r}): {exc}") from None
            except (OSError, EOFError) as exc:  # a damaged gzip stream
                raise DataError(f"cannot read {path}: {exc} (a damaged or cut file?)") from None
        for w in caught:
            if issubclass(w.category, pd.errors.ParserWarning):
                if malformed is not None:
                    malformed.extend(f"{path.name}: {m.strip()}" for m in str(w.message).split("\n") if m.strip())
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        yield pd.DataFrame({c: as_text(df[c]) for c in cols})


def _parquet_chunks(info: FileInfo, cols, chunk_rows, label: str | None = None) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(info.path)
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
        out = {}
        for c in cols:
            arr = batch.column(c)
            if c in info.list_seps:
                out[c] = _list_as_text(arr, info.list_seps[c], c, info.path)
            elif c == label and pa.types.is_boolean(arr.type):
                # A boolean label column: True is a click (1), False none (0).
                values = arr.to_numpy(zero_copy_only=False)
                text = np.where(values == True, "1", "0").astype(object)  # noqa: E712 (None too)
                text[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
                out[c] = pd.Series(text, dtype=object)
            else:
                out[c] = as_text(arrow_to_pandas(arr), info.integral.get(c))
        yield pd.DataFrame(out)


def arrow_to_pandas(arr) -> pd.Series:
    """An Arrow column as pandas without losing integer digits: an integer column with nulls
    becomes a nullable integer Series (pandas' default makes it float64, which holds integers
    exactly only up to 2**53: 19-digit ids would merge)."""
    import pyarrow as pa

    if pa.types.is_integer(arr.type) and arr.null_count:
        return arr.to_pandas(types_mapper={
            pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
            pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(),
            pa.uint16(): pd.UInt16Dtype(), pa.uint32(): pd.UInt32Dtype(),
            pa.uint64(): pd.UInt64Dtype()}.get)
    return arr.to_pandas()


def _list_as_text(arr, sep: str, col: str, path: Path) -> pd.Series:
    """A Parquet list column -> the multi-hot text form (tokens joined by ``sep``); a token
    that itself contains ``sep`` would be split, so it is an error naming the column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.cast(pc.list_flatten(arr), pa.string())
    if len(flat) and pc.any(pc.match_substring(flat, sep)).as_py():
        raise DataError(
            f"multihot column '{col}' in {path.name} is a list column whose values contain "
            f"its separator {sep!r}; pick another data.multihot sep"
        )
    lists = pc.cast(arr, pa.list_(pa.string()))
    if flat.null_count:
        # A null element would make the whole row's join null (every token of the row lost):
        # it is an empty token instead, which the tokenizer drops like any other.
        whole = pa.concat_arrays([lists])  # unsliced: from_arrays takes no sliced offsets
        lists = pa.ListArray.from_arrays(whole.offsets, pc.fill_null(whole.values, ""),
                                         mask=whole.is_null())
    joined = pc.binary_join(lists, sep)
    return pd.Series(joined.to_numpy(zero_copy_only=False), dtype=object).where(
        pd.Series(joined.is_valid().to_numpy(zero_copy_only=False)), np.nan)


def as_text(s: pd.Series, integral: bool | None = None) -> pd.Series:
    """Any column -> text with NaN for missing; integral floats print as integers so that a
    Parquet ``1.0`` and a CSV ``1`` are the same value. ``integral`` says whether the column
    is integral in every training file that holds it as floats (decided once, before the
    first chunk, by pipeline.float_text_integral, and kept in the feature map for new rows,
    so chunks, files and predictions agree); None decides from ``s``. Where ``integral`` is
    true, a value that is not integral (inf; a new 7.5) keeps its float text."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        # A pandas categorical (a Parquet dictionary column): its values, in their own dtype.
        cats = s.cat.categories
        if pd.api.types.is_float_dtype(cats.dtype):
            plain = s.astype(np.float64)
        elif pd.api.types.is_integer_dtype(cats.dtype):
            plain = s.astype("Int64")  # nullable: a missing value stays missing
        else:
            plain = s.astype(object)
        return as_text(plain, integral)
    if pd.api.types.is_string_dtype(s) and not pd.api.types.is_object_dtype(s):
        return s
    if pd.api.types.is_float_dtype(s):
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        whole = np.isfinite(vals) & (vals == np.round(vals)) & (np.abs(vals) < 2**62)
        if integral is None:  # the files' rule (FileInfo): every finite value integral
            integral = bool(np.all(whole | ~np.isfinite(vals)))
        if integral and np.all(whole | np.isnan(vals)):
            s = pd.Series(vals, index=s.index).astype("Int64")
        elif integral:
            # Integral values as integers; a value that is not one (inf, or a 7.5 the
            # training files never held) keeps its float text, row by row, so that one
            # such value changes nothing else.
            text = s.astype(str)
            ints = pd.Series(vals[whole].astype(np.int64), dtype=np.int64).astype(str)
            text = text.to_numpy(dtype=object)
            text[whole] = ints.to_numpy(dtype=object)
            s = pd.Series(text, index=s.index, dtype=object).mask(np.isnan(vals))
    missing = s.isna().to_numpy()
    text = s.astype(str)
    if missing.any():
        text = text.mask(missing)
    return text.astype("str")


def other_integer_spelling(values) -> pd.Series:
    """Each text value's other spelling of the same integer ('26' -> '26.0', '-3.0' -> '-3'),
    None for the rest (index: 0..n-1). An integer id column with missing values is a float
    column in pandas, which ``to_csv`` writes as '26.0', where a Parquet file of the same
    data reads '26' (reading.as_text): one id, two values. The spellings are kept as they
    are (caches and saved runs depend on them); this finds the pairs, for the warnings.

    Example::

        other_integer_spelling(["26", "26.0", "u1"]).tolist()   # ['26.0', '26', None]
    """
    s = pd.Series(np.asarray(values, dtype=object)).astype(str)
    out = pd.Series([None] * len(s), dtype=object)
    if not len(s):
        return out
    dotted = s.str.fullmatch(r"[+-]?\d+\.0").to_numpy(dtype=bool)
    if not dotted.any():  # the usual case: no 'N.0' value at all, nothing to pair
        return out
    plain = s.str.fullmatch(r"[+-]?\d+").to_numpy(dtype=bool)
    out[plain] = s[plain] + ".0"
    out[dotted] = s[dotted].str[:-2]
    return out


def integer_spelling_pairs(values) -> tuple[int, str | None]:
    """(how many integers the distinct text ``values`` spell both 'N' and 'N.0', the 'N' of
    the first of them), for the warning at vocabulary build.

    Example::

        integer_spelling_pairs(["26", "26.0", "7", "u1"])   # (1, '26')
    """
    values = pd.Index(np.asarray(values, dtype=object)).astype(str)
    alt = other_integer_spelling(values)
    plain = np.flatnonzero(alt.notna().to_numpy() & ~values.str.endswith(".0"))  # the 'N's
    twins = plain[pd.Index(alt.to_numpy()[plain]).isin(values)]
    return int(twins.size), (str(values[twins[0]]) if twins.size else None)


def prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` ahead of the consumer.

    Arrow's CSV parser and file reads release the GIL, so the next chunk is parsed while
    the current one is processed: on two cores the parse is mostly hidden, and the memory
    added is ``depth`` chunks. An exception in the producer is raised in the consumer at the
    item where it happened; a consumer that stops early stops the producer.

    Example::

        for table in prefetched(iter_chunks(info, cfg, chunk_rows)):
            ...   # the next table is being read meanwhile
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="autoft-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
