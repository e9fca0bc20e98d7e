"""The ``data:`` section of an experiment YAML (or a dataset YAML), parsed and checked once.

Every key is validated here so that a typo fails before minutes of preprocessing, with a
message that names the key and the value. The full format, with an example, is in
``docs/data.md``.

Example::

    cfg = DataConfig.from_dict({
        "files": ["clicks.csv"], "label": "click",
        "categorical": ["user", "item"],
        "numeric": ["price", {"name": "age", "mode": "dense"}],
        "multihot": [{"name": "tags", "sep": "|", "max_len": 5}],
        "domain": {"column": "site", "source": ["a", "b"], "target": "c"},
    }, base_dir=Path("."))
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from .schema import ConfigError, parse_section, section_to_dict, setting

__all__ = ["DataError", "DataConfig", "NumericColumn", "MultiHotColumn", "DomainSpec",
           "TargetSplit", "SourceSplit", "SplitSpec", "load_data_config", "FILE_SUFFIXES",
           "file_format", "file_suffix"]

NUMERIC_MODES = ("bucket", "dense")
FILE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}


GZIP_SUFFIX = ".gz"


def file_suffix(path: Path) -> tuple[str, bool]:
    """``(suffix, gzip)``: the suffix that names a data file's format, and whether the file is
    gzip-compressed (named ``*.gz``). ``train.txt.gz`` -> ``('.txt', True)``; a bare
    ``train.gz`` (Avazu's download) -> ``('.csv', True)``, read as CSV with ``csv_sep``."""
    path = Path(path)
    if path.suffix.lower() != GZIP_SUFFIX:
        return path.suffix.lower(), False
    inner = Path(path.stem).suffix.lower()
    return (inner or ".csv"), True


def file_format(path: Path) -> tuple[str, bool] | None:
    """``('csv' | 'parquet', gzip)`` of a data file by its name, or None when the suffix names
    no format. A gzip-compressed Parquet file is refused (Parquet compresses inside)."""
    suffix, gz = file_suffix(path)
    fmt = FILE_SUFFIXES.get(suffix)
    if fmt is None:
        return None
    if gz and fmt == "parquet":
        raise DataError(f"'{Path(path).name}' is a gzip-compressed Parquet file: Parquet "
                        "compresses its own columns; gunzip it and give the .parquet file")
    return fmt, gz


class DataError(ConfigError):
    """A problem with the user's data or data config (a ``ValueError``, so it can be caught
    either way). The message always names the column, key or file involved."""


def _column(value, where, ctx):
    if isinstance(value, (list, tuple)):
        return tuple(_column(v, where, ctx) for v in value)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: a column name must be a non-empty string, got {value!r}")
    return value


def _plain_name(value, where, ctx):
    if not isinstance(value, str) or not value or any(c in value for c in "/\\"):
        raise DataError(f"{where} must be a non-empty string without slashes, got {value!r}")
    return value


def _non_empty(value, where, ctx):
    if not value:
        raise DataError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _one_char(value, where, ctx):
    if not isinstance(value, str) or len(value) != 1:
        raise DataError(one_char_message(where, value))
    return value


def one_char_message(where: str, value) -> str:
    """Why ``value`` is not a separator; a backslash escape written where YAML (single
    quotes) or a shell keeps it as two characters gets the way to write it."""
    escapes = {"\\t": "a tab", "\\n": "a line break", "\\r": "a carriage return"}
    if value in escapes:
        return (f"{where} is the two characters {value} (a backslash and "
                f"'{value[1]}'), not {escapes[value]}: YAML reads '\\{value[1]}' in single "
                f"quotes as written; write it double-quoted, \"\\{value[1]}\"")
    return f"{where} must be one character (e.g. ',' or '\\t'), got {value!r}"


def _domain_values(value, where, ctx):
    # YAML turns `source: [1, 2]` into ints while the column is read as text: compare as text.
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(f"{where}: a domain value must be a string or an integer, got {v!r}")
    out = [str(v) for v in items]
    return out if isinstance(value, (list, tuple)) else out[0]


def _entries(value, where, ctx):
    # A column list entry is a name, or a mapping with a name and options.
    items = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        elif not isinstance(item, Mapping):
            raise DataError(f"{where}: each entry must be a column name or a mapping with a "
                            f"name, got {item!r}")
        out.append(item)
    return out


def _files(value, where, ctx):
    if not value:
        raise DataError(f"{where} must be a path or a non-empty list of paths, got {list(value)!r}")
    base = Path(ctx.get("base_dir", "."))
    out = []
    for p in value:
        p = p if p.is_absolute() else base / p
        if file_format(p) is None:
            raise DataError(f"{where}: cannot tell the format of '{p.name}' from its suffix; "
                            f"use one of {sorted(FILE_SUFFIXES)} (CSV and TSV also "
                            "gzip-compressed, e.g. train.txt.gz)")
        out.append(p)
    return tuple(out)


def _under_base(value, where, ctx):
    return value if value.is_absolute() else Path(ctx.get("base_dir", ".")) / value


_FRACTION = dict(minimum=0.0, maximum=1.0, min_open=True, max_open=True)


@dataclass(frozen=True)
class NumericColumn:
    """A numeric column: ``bucket`` turns it into a categorical field of quantile buckets,
    ``dense`` feeds the standardised value to the model as a float."""

    error = DataError
    name: str = setting(after=_column, doc="the column")
    mode: str | None = setting(None, choices=NUMERIC_MODES, doc="bucket or dense (default: "
                               "data.numeric_mode)")


@dataclass(frozen=True)
class MultiHotColumn:
    """A column holding several tokens joined by ``sep`` (e.g. ``"sports|news"``); at most
    ``max_len`` tokens per row are kept (the first ones)."""

    error = DataError
    name: str = setting(after=_column, doc="the column")
    sep: str = setting("|", after=_non_empty, doc="the token separator")
    max_len: int = setting(8, minimum=1, doc="tokens kept per row (the first ones)")


@dataclass(frozen=True)
class DomainSpec:
    """Which column holds the domain, and which of its values are source and target."""

    error = DataError
    column: str = setting(after=_column, doc="the domain column")
    source: tuple[str, ...] = setting(before=_domain_values, doc="the source domain values")
    target: str = setting(before=_domain_values, doc="the target domain value")

    def check(self, section: str) -> None:
        if not self.source:
            raise DataError(f"{section}.source must name at least one source domain value")
        if len(set(self.source)) != len(self.source):
            raise DataError(f"{section}.source lists a value twice: {list(self.source)}")
        if self.target in self.source:
            raise DataError(f"{section}.target '{self.target}' is also listed in {section}.source")


@dataclass(frozen=True)
class TargetSplit:
    """How the target domain's rows are cut into train / valid / test.

    ``random``: a seeded permutation. ``time``: rows sorted by ``time_column`` (stable, so
    ties keep file order); the earliest ``1 - valid - test`` go to train, then valid, and the
    latest ``test`` fraction to test, which is how a model is used after deployment.
    """

    error = DataError
    method: str = setting("random", choices=("random", "time"), doc="random or time")
    valid: float = setting(0.1, **_FRACTION, doc="fraction of target rows for validation")
    test: float = setting(0.2, **_FRACTION, doc="fraction of target rows for the test")
    seed: int = setting(2024, minimum=0, doc="seed of the random split")
    time_column: str | None = setting(None, after=lambda v, w, c: v if v is None else
                                      _column(v, w, c), doc="the column a time split sorts by")
    time_format: str | None = setting(None, after=lambda v, w, c: v if v is None else
                                      _non_empty(v, w, c),
                                      doc="strftime format of a date time column, e.g. "
                                          "'%d/%m/%Y' (default: ISO 8601, or one format "
                                          "inferred for the whole column)")

    def check(self, section: str) -> None:
        if self.valid + self.test >= 1.0:
            raise DataError(f"{section}: valid ({self.valid}) + test ({self.test}) must leave "
                            "rows for train (sum < 1)")
        if self.method == "time" and self.time_column is None:
            raise DataError(f"{section}.method is 'time' but {section}.time_column is not set")
        if self.method != "time" and self.time_column is not None:
            raise DataError(f"{section}.time_column '{self.time_column}' is set but method is "
                            f"'{self.method}'; set method: time to split by it")
        if self.time_format is not None and self.time_column is None:
            raise DataError(f"{section}.time_format is set but {section}.time_column is not")


@dataclass(frozen=True)
class SourceSplit:
    """The source domains' rows are cut at random into train and a ``valid`` fraction
    (used for early stopping while pre-training)."""

    error = DataError
    valid: float = setting(0.05, **_FRACTION, doc="fraction of source rows for validation")
    seed: int = setting(2024, minimum=0, doc="seed of the split")


@dataclass(frozen=True)
class SplitSpec:
    """``split: {target: ..., source: ...}``."""

    error = DataError
    target: TargetSplit = setting(TargetSplit(), doc="the target domain's train/valid/test split")
    source: SourceSplit = setting(SourceSplit(), doc="the source domains' train/valid split")


@dataclass(frozen=True)
class DataConfig:
    """A checked ``data:`` config. Build it with :meth:`from_dict` (see the module docstring).

    Example::

        cfg = DataConfig.from_dict(yaml.safe_load(open("data.yaml"))["data"], Path("."))
        cfg.target_split.test      # 0.2
    """

    error = DataError
    files: tuple[Path, ...] = setting(after=_files, doc=(
        "CSV / Parquet files, relative to the YAML file's folder"))
    label: str = setting(after=_column, doc="the 0/1 label column")
    domain: DomainSpec = setting(doc="domain column and source / target values")
    name: str = setting("data", after=_plain_name, doc="name of the data set (cache folder)")
    categorical: tuple[str, ...] = setting((), after=_column, doc="categorical columns")
    numeric: tuple[NumericColumn, ...] = setting((), before=_entries, doc=(
        "numeric columns: names or {name, mode}"))
    numeric_mode: str = setting("bucket", choices=NUMERIC_MODES, doc=(
        "the mode of numeric columns that give none"))
    multihot: tuple[MultiHotColumn, ...] = setting((), before=_entries, doc=(
        "multi-hot columns: names or {name, sep, max_len}"))
    split: SplitSpec = setting(SplitSpec(), doc="how rows are split")
    num_buckets: int = setting(16, minimum=2, doc="quantile buckets of a bucketised numeric column")
    min_count: int = setting(2, minimum=1, doc="values rarer than this in training rows map to OOV")
    on_bad_rows: str = setting("fail", choices=("skip", "fail"), doc="what a malformed row does")
    csv_sep: str = setting(",", after=_one_char, doc="the CSV field separator (one character)")
    columns: tuple[str, ...] = setting((), after=_column, doc=(
        "the column names of CSV / TSV files that have no header line, in file order "
        "(Criteo's train.txt); empty: every CSV file starts with a header. Parquet files "
        "carry their own names"))
    cache: bool = setting(True, doc="cache the processed tensors")
    cache_dir: Path = setting(Path(".autoft_cache"), after=_under_base,
                              doc="where the processed tensors are cached")

    def __post_init__(self):
        # Entries that gave no mode take the section's numeric_mode.
        object.__setattr__(self, "numeric", tuple(
            c if c.mode is not None else replace(c, mode=self.numeric_mode) for c in self.numeric))

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: Path | str = ".") -> "DataConfig":
        """Parse the ``data:`` section of a YAML file. Relative paths (``files``,
        ``cache_dir``) are taken relative to ``base_dir`` (the YAML file's folder).

        Raises :class:`DataError` naming the key for an unknown key, a missing required key
        or a bad value.

        Example::

            DataConfig.from_dict(yaml.safe_load(open("data.yaml"))["data"], Path("."))
        """
        if not isinstance(d, Mapping):
            raise DataError(f"the data config must be a mapping, got {type(d).__name__}")
        return parse_section(cls, d, "data", ctx={"base_dir": Path(base_dir)})

    def check(self, section: str) -> None:
        if not (self.categorical or self.numeric or self.multihot):
            raise DataError("data config lists no feature columns: give at least one of "
                            "categorical, numeric, multihot")
        # A column used twice (or the label used as a feature) is almost always a slip in the
        # YAML, and a label-as-feature silently leaks the answer into the model.
        seen: dict[str, str] = {}
        roles = [(self.label, "label"), (self.domain_column, "domain.column")]
        roles += [(c, "categorical") for c in self.categorical]
        roles += [(c.name, "numeric") for c in self.numeric]
        roles += [(c.name, "multihot") for c in self.multihot]
        for col, role in roles:
            if col in seen:
                if seen[col] == role:
                    raise DataError(f"column '{col}' is listed twice in {role}")
                raise DataError(f"column '{col}' is used twice: as {seen[col]} and as {role}")
            seen[col] = role
        if self.columns:
            repeated = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if repeated:
                raise DataError(f"data.columns names {repeated[0]!r} twice; every column name "
                                "must be unique")
            missing = [c for c, role in self.required_columns() if c not in self.columns]
            if missing:
                import difflib
                role = dict(self.required_columns())[missing[0]]
                hint = difflib.get_close_matches(missing[0], self.columns, n=1)
                raise DataError(f"column '{missing[0]}' ({role}) is not in data.columns"
                                + (f"; did you mean '{hint[0]}'?" if hint else "") + " "
                                f"({len(self.columns)} names: {', '.join(self.columns[:30])}"
                                f"{' ...' if len(self.columns) > 30 else ''})")
        tc = self.target_split.time_column
        if tc is not None and tc == self.label:
            raise DataError(f"{section}.split.target.time_column '{tc}' is the label column")

    # ------------------------------------------------------------------ views
    @property
    def domain_column(self) -> str:
        """The column that holds the domain."""
        return self.domain.column

    @property
    def source_domains(self) -> tuple[str, ...]:
        """The source domain values, as text."""
        return self.domain.source

    @property
    def target_domain(self) -> str:
        """The target domain value, as text."""
        return self.domain.target

    @property
    def target_split(self) -> TargetSplit:
        """How the target rows are split."""
        return self.split.target

    @property
    def source_split(self) -> SourceSplit:
        """How the source rows are split."""
        return self.split.source

    def required_columns(self) -> list[tuple[str, str]]:
        """(column, role) for every column the pipeline reads, in a stable order."""
        cols = [(self.label, "label"), (self.domain_column, "domain column")]
        cols += [(c, "categorical") for c in self.categorical]
        cols += [(c.name, "numeric") for c in self.numeric]
        cols += [(c.name, "multihot") for c in self.multihot]
        tc = self.target_split.time_column
        if tc is not None and tc not in {c for c, _ in cols}:
            cols.append((tc, "time column"))
        return cols

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict that :meth:`from_dict` accepts again (paths absolute)."""
        return section_to_dict(self)

    def processing_dict(self) -> dict[str, Any]:
        """What determines the processed tensors: everything but the file locations and the
        cache settings (the files enter the cache key through their content hashes)."""
        d = self.to_dict()
        for key in ("files", "cache", "cache_dir", "name", "numeric_mode"):
            d.pop(key)
        if not d["columns"]:
            d.pop("columns")  # files with a header: the key as before the option existed
        return d


def load_data_config(path: Path | str) -> DataConfig:
    """Read a YAML file whose top level is either the ``data:`` mapping itself or an
    experiment with a ``data:`` section; relative paths are taken from the file's folder.

    Example::

        cfg = load_data_config(generate_synthetic(SyntheticConfig(), Path("demo_data")))
    """
    from .._io import read_yaml_file

    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(GZIP_SUFFIX) or Path(name).suffix in FILE_SUFFIXES):
        doc = read_yaml_file(path, "data: file", DataError)
        if isinstance(doc, Mapping) and isinstance(doc.get("data"), str):
            # An experiment whose data: names a dataset YAML (the usual form): that file,
            # relative to the experiment's folder as load_config takes it.
            return load_data_config((path.parent.resolve() / doc["data"]).resolve())
        if isinstance(doc, Mapping) and "data" not in doc and "synthetic" in doc:
            raise DataError(f"{str(path)!r} is an experiment whose data are generated (its "
                            "synthetic: section), not described by a data: section; load it "
                            "with autoft_fast.config.load_config, or write the data set with "
                            "`autoft-fast generate` and load its dataset.yaml")
    return DataConfig.from_dict(read_data_yaml(path), base_dir=path.parent)


def read_data_yaml(path: Path | str) -> dict:
    """The ``data:`` mapping of a dataset or experiment YAML file.

    Example::

        read_data_yaml("runs/cache/synthetic-1234/dataset.yaml")["label"]   # 'click'
    """
    from .._io import read_yaml_file

    name = Path(path).name.lower()
    if name.endswith(GZIP_SUFFIX) or Path(name).suffix in FILE_SUFFIXES:
        # `data: clicks.csv`: the data file itself where a dataset YAML belongs (not read as
        # YAML: a large CSV would take long to fail).
        raise DataError(
            f"data: {str(path)!r} is a data file; data: takes a mapping that describes it "
            f"(or the path of a dataset YAML holding one), e.g. data: {{files: "
            f"[{Path(path).name}], label: click, categorical: [user, item], domain: {{column: "
            f"domain, source: [a, b], target: c}}}} (docs/data.md lists every key)")
    doc = read_yaml_file(path, "data: file", DataError)
    if isinstance(doc, Mapping) and "data" in doc and isinstance(doc["data"], Mapping):
        doc = doc["data"]
    if not isinstance(doc, Mapping):
        raise DataError(f"data: file {str(path)!r} is not a YAML mapping")
    return dict(doc)
