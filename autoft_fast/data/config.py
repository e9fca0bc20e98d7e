"""The ``data:`` section of an experiment YAML, parsed and checked once.

Every key is validated here so that a typo fails before minutes of preprocessing, with a
message that names the key and the value. The full format, with an example, is in
``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class DataError(ValueError):
    """A problem with the user's data or data config (a ``ValueError``, so it can be caught
    either way). The message always names the column, key or file involved."""


NUMERIC_MODES = ("bucket", "dense")
BAD_ROW_POLICIES = ("skip", "fail")
SPLIT_METHODS = ("random", "time")
FILE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class NumericColumn:
    """A numeric column: ``bucket`` turns it into a categorical field of quantile buckets,
    ``dense`` feeds the standardised value to the model as a float."""

    name: str
    mode: str = "bucket"


@dataclass(frozen=True)
class MultiHotColumn:
    """A column holding several tokens joined by ``sep`` (e.g. ``"sports|news"``); at most
    ``max_len`` tokens per row are kept (the first ones)."""

    name: str
    sep: str = "|"
    max_len: int = 8


@dataclass(frozen=True)
class TargetSplit:
    """How the target domain's rows are cut into train / valid / test.

    ``random``: a seeded permutation. ``time``: rows sorted by ``time_column`` (stable, so
    ties keep file order); the earliest ``1 - valid - test`` go to train, then valid, and the
    latest ``test`` fraction to test, which is how a model is used after deployment.
    """

    method: str = "random"
    valid: float = 0.1
    test: float = 0.2
    seed: int = 2024
    time_column: str | None = None


@dataclass(frozen=True)
class SourceSplit:
    """The source domains' rows are cut at random into train and a ``valid`` fraction
    (used for early stopping while pre-training)."""

    valid: float = 0.05
    seed: int = 2024


@dataclass(frozen=True)
class DataConfig:
    """A checked ``data:`` config. Build it with :meth:`from_dict`.

    Example::

        cfg = DataConfig.from_dict({
            "files": ["clicks.csv"], "label": "click",
            "categorical": ["user", "item"],
            "numeric": ["price", {"name": "age", "mode": "dense"}],
            "multihot": [{"name": "tags", "sep": "|", "max_len": 5}],
            "domain": {"column": "site", "source": ["a", "b"], "target": "c"},
        }, base_dir=Path("."))
    """

    files: tuple[Path, ...]
    label: str
    domain_column: str
    source_domains: tuple[str, ...]
    target_domain: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[NumericColumn, ...] = ()
    multihot: tuple[MultiHotColumn, ...] = ()
    num_buckets: int = 16
    min_count: int = 2
    target_split: TargetSplit = field(default_factory=TargetSplit)
    source_split: SourceSplit = field(default_factory=SourceSplit)
    on_bad_rows: str = "fail"
    csv_sep: str = ","
    name: str = "data"
    cache: bool = True
    cache_dir: Path | None = None

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
        base_dir = Path(base_dir)
        _reject_unknown(d, _TOP_KEYS, "data")
        for key in ("files", "label", "domain"):
            if key not in d:
                raise DataError(f"data config: required key '{key}' is missing")

        files = d["files"]
        if isinstance(files, (str, Path)):
            files = [files]
        if not isinstance(files, (list, tuple)) or not files:
            raise DataError(f"data.files must be a path or a non-empty list of paths, got {files!r}")
        paths = []
        for f in files:
            if not isinstance(f, (str, Path)) or not str(f):
                raise DataError(f"data.files: each entry must be a path, got {f!r}")
            p = Path(f).expanduser()
            p = p if p.is_absolute() else base_dir / p
            if p.suffix.lower() not in FILE_SUFFIXES:
                raise DataError(
                    f"data.files: cannot tell the format of '{p.name}' from its suffix; "
                    f"use one of {sorted(FILE_SUFFIXES)}"
                )
            paths.append(p)

        label = _name(d["label"], "data.label")

        dom = d["domain"]
        if not isinstance(dom, Mapping):
            raise DataError(f"data.domain must be a mapping with column/source/target, got {dom!r}")
        _reject_unknown(dom, ("column", "source", "target"), "data.domain")
        for key in ("column", "source", "target"):
            if key not in dom:
                raise DataError(f"data.domain: required key '{key}' is missing")
        domain_column = _name(dom["column"], "data.domain.column")
        source = dom["source"]
        if not isinstance(source, (list, tuple)):
            source = [source]
        if not source:
            raise DataError("data.domain.source must name at least one source domain value")
        # YAML turns `source: [1, 2]` into ints while the column is read as text: compare as text.
        source = tuple(_domain_value(v, "data.domain.source") for v in source)
        target = _domain_value(dom["target"], "data.domain.target")
        if len(set(source)) != len(source):
            raise DataError(f"data.domain.source lists a value twice: {list(source)}")
        if target in source:
            raise DataError(f"data.domain.target '{target}' is also listed in data.domain.source")

        categorical = tuple(_name(c, "data.categorical") for c in _as_list(d.get("categorical", []), "data.categorical"))

        numeric_mode = d.get("numeric_mode", "bucket")
        if numeric_mode not in NUMERIC_MODES:
            raise DataError(f"data.numeric_mode must be one of {NUMERIC_MODES}, got {numeric_mode!r}")
        numeric = []
        for item in _as_list(d.get("numeric", []), "data.numeric"):
            if isinstance(item, Mapping):
                _reject_unknown(item, ("name", "mode"), "data.numeric entry")
                if "name" not in item:
                    raise DataError(f"data.numeric entry {dict(item)!r} has no 'name'")
                mode = item.get("mode", numeric_mode)
                if mode not in NUMERIC_MODES:
                    raise DataError(f"data.numeric '{item['name']}': mode must be one of {NUMERIC_MODES}, got {mode!r}")
                numeric.append(NumericColumn(_name(item["name"], "data.numeric"), mode))
            else:
                numeric.append(NumericColumn(_name(item, "data.numeric"), numeric_mode))

        multihot = []
        for item in _as_list(d.get("multihot", []), "data.multihot"):
            if isinstance(item, Mapping):
                _reject_unknown(item, ("name", "sep", "max_len"), "data.multihot entry")
                if "name" not in item:
                    raise DataError(f"data.multihot entry {dict(item)!r} has no 'name'")
                name = _name(item["name"], "data.multihot")
                sep = item.get("sep", "|")
                if not isinstance(sep, str) or not sep:
                    raise DataError(f"data.multihot '{name}': sep must be a non-empty string, got {sep!r}")
                max_len = _int(item.get("max_len", 8), f"data.multihot '{name}' max_len", minimum=1)
                multihot.append(MultiHotColumn(name, sep, max_len))
            else:
                multihot.append(MultiHotColumn(_name(item, "data.multihot")))

        if not (categorical or numeric or multihot):
            raise DataError("data config lists no feature columns: give at least one of categorical, numeric, multihot")

        num_buckets = _int(d.get("num_buckets", 16), "data.num_buckets", minimum=2)
        min_count = _int(d.get("min_count", 2), "data.min_count", minimum=1)

        split = d.get("split", {}) or {}
        if not isinstance(split, Mapping):
            raise DataError(f"data.split must be a mapping with 'target' and/or 'source', got {split!r}")
        _reject_unknown(split, ("target", "source"), "data.split")
        target_split = _target_split(split.get("target", {}) or {})
        source_split = _source_split(split.get("source", {}) or {})

        on_bad_rows = d.get("on_bad_rows", "fail")
        if on_bad_rows not in BAD_ROW_POLICIES:
            raise DataError(f"data.on_bad_rows must be one of {BAD_ROW_POLICIES}, got {on_bad_rows!r}")
        csv_sep = d.get("csv_sep", ",")
        if not isinstance(csv_sep, str) or not csv_sep:
            raise DataError(f"data.csv_sep must be a non-empty string, got {csv_sep!r}")
        name = d.get("name", "data")
        if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
            raise DataError(f"data.name must be a non-empty string without slashes, got {name!r}")
        cache = d.get("cache", True)
        if not isinstance(cache, bool):
            raise DataError(f"data.cache must be true or false, got {cache!r}")
        cache_dir = d.get("cache_dir", ".autoft_cache")
        if not isinstance(cache_dir, (str, Path)) or not str(cache_dir):
            raise DataError(f"data.cache_dir must be a path, got {cache_dir!r}")
        cache_dir = Path(cache_dir).expanduser()
        cache_dir = cache_dir if cache_dir.is_absolute() else base_dir / cache_dir

        cfg = cls(
            files=tuple(paths), label=label, domain_column=domain_column, source_domains=source,
            target_domain=target, categorical=categorical, numeric=tuple(numeric),
            multihot=tuple(multihot), num_buckets=num_buckets, min_count=min_count,
            target_split=target_split, source_split=source_split, on_bad_rows=on_bad_rows,
            csv_sep=csv_sep, name=name, cache=cache, cache_dir=cache_dir,
        )
        cfg._check_columns_distinct()
        return cfg

    def _check_columns_distinct(self) -> None:
        # A column used twice (or the label used as a feature) is almost always a slip in the
        # YAML, and a label-as-feature silently leaks the answer into the model.
        seen: dict[str, str] = {}
        roles = [(self.label, "label"), (self.domain_column, "domain.column")]
        roles += [(c, "categorical") for c in self.categorical]
        roles += [(c.name, "numeric") for c in self.numeric]
        roles += [(c.name, "multihot") for c in self.multihot]
        for col, role in roles:
            if col in seen:
                raise DataError(f"column '{col}' is used twice: as {seen[col]} and as {role}")
            seen[col] = role
        tc = self.target_split.time_column
        if tc is not None and tc == self.label:
            raise DataError(f"data.split.target.time_column '{tc}' is the label column")

    # ------------------------------------------------------------------ views
    @property
    def feature_columns(self) -> list[str]:
        return [*self.categorical, *(c.name for c in self.numeric), *(c.name for c in self.multihot)]

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
        return {
            "name": self.name,
            "files": [str(p) for p in self.files],
            "label": self.label,
            "categorical": list(self.categorical),
            "numeric": [dataclasses.asdict(c) for c in self.numeric],
            "multihot": [dataclasses.asdict(c) for c in self.multihot],
            "domain": {"column": self.domain_column, "source": list(self.source_domains), "target": self.target_domain},
            "split": {
                "target": {k: v for k, v in dataclasses.asdict(self.target_split).items() if v is not None},
                "source": dataclasses.asdict(self.source_split),
            },
            "num_buckets": self.num_buckets,
            "min_count": self.min_count,
            "on_bad_rows": self.on_bad_rows,
            "csv_sep": self.csv_sep,
            "cache": self.cache,
            "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None,
        }

    def processing_dict(self) -> dict[str, Any]:
        """What determines the processed tensors: everything but the file locations and the
        cache settings (the files enter the cache key through their content hashes)."""
        d = self.to_dict()
        for key in ("files", "cache", "cache_dir", "name"):
            d.pop(key)
        return d


_TOP_KEYS = (
    "name", "files", "label", "categorical", "numeric", "numeric_mode", "multihot", "domain",
    "split", "num_buckets", "min_count", "on_bad_rows", "csv_sep", "cache", "cache_dir",
)


def _reject_unknown(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in known:
            raise DataError(f"unknown key '{key}' in {where}; known keys: {', '.join(known)}")


def _as_list(v: Any, where: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Mapping)):
        return [v]
    if not isinstance(v, (list, tuple)):
        raise DataError(f"{where} must be a list, got {v!r}")
    return list(v)


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise DataError(f"{where}: a column name must be a non-empty string, got {v!r}")
    return v


def _domain_value(v: Any, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(f"{where}: a domain value must be a string or an integer, got {v!r}")
    return str(v)


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise DataError(f"{where} must be an integer >= {minimum}, got {v!r}")
    return v


def _fraction(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) < 1.0):
        raise DataError(f"{where} must be a fraction strictly between 0 and 1, got {v!r}")
    return float(v)


def _target_split(d: Any) -> TargetSplit:
    if not isinstance(d, Mapping):
        raise DataError(f"data.split.target must be a mapping, got {d!r}")
    _reject_unknown(d, ("method", "valid", "test", "seed", "time_column"), "data.split.target")
    method = d.get("method", "random")
    if method not in SPLIT_METHODS:
        raise DataError(f"data.split.target.method must be one of {SPLIT_METHODS}, got {method!r}")
    valid = _fraction(d.get("valid", 0.1), "data.split.target.valid")
    test = _fraction(d.get("test", 0.2), "data.split.target.test")
    if valid + test >= 1.0:
        raise DataError(
            f"data.split.target: valid ({valid}) + test ({test}) must leave rows for train (sum < 1)"
        )
    seed = _int(d.get("seed", 2024), "data.split.target.seed", minimum=0)
    time_column = d.get("time_column")
    if method == "time":
        if time_column is None:
            raise DataError("data.split.target.method is 'time' but data.split.target.time_column is not set")
        time_column = _name(time_column, "data.split.target.time_column")
    elif time_column is not None:
        raise DataError(
            f"data.split.target.time_column '{time_column}' is set but method is '{method}'; "
            "set method: time to split by it"
        )
    return TargetSplit(method, valid, test, seed, time_column)


def _source_split(d: Any) -> SourceSplit:
    if not isinstance(d, Mapping):
        raise DataError(f"data.split.source must be a mapping, got {d!r}")
    _reject_unknown(d, ("valid", "seed"), "data.split.source")
    return SourceSplit(
        _fraction(d.get("valid", 0.05), "data.split.source.valid"),
        _int(d.get("seed", 2024), "data.split.source.seed", minimum=0),
    )


def load_data_config(path: Path | str) -> DataConfig:
    """Read a YAML file whose top level is either the ``data:`` mapping itself or an
    experiment with a ``data:`` section; relative paths are taken from the file's folder.

    Example::

        cfg = load_data_config(generate_synthetic(SyntheticConfig(), Path("demo_data")))
    """
    import yaml

    path = Path(path)
    with open(path) as f:
        doc = yaml.safe_load(f)
    if isinstance(doc, Mapping) and "data" in doc and isinstance(doc["data"], Mapping):
        doc = doc["data"]
    return DataConfig.from_dict(doc, base_dir=path.parent)
