"""Read a FuxiCTR dataset_config / model_config pair (and its feature_map.json) into an
experiment config of this package.

FuxiCTR keeps a run's settings in two YAML files (or two folders of them): a
``dataset_config`` keyed by dataset id (files, ``feature_cols``, ``label_col``,
``min_categr_count``) and a ``model_config`` keyed by experiment id, whose ``Base`` entry is
merged under every experiment (the experiment's keys win). Its preprocessing writes
``<data_root>/<dataset_id>/feature_map.json``. FuxiCTR has no notion of domains, so the
domain column and its source / target values are given separately.

What maps is converted (see ``docs/fuxictr.md`` for the table); what does not map is
reported: a key whose loss changes nothing essential is a warning that names it, a key that
cannot be ignored (a custom ``preprocess`` function, a multi-task label, a model or data
format this package does not have) is a :class:`ConfigError` naming it.

Example::

    from autoft_fast.config.experiment import load_fuxictr
    imp = load_fuxictr("config/dataset_config.yaml", "config/model_config.yaml", "DeepFM_test",
                       domain={"column": "pid", "source": ["430548_1007"], "target": "430539_1007"})
    imp.config.model.name, imp.warnings[:1]
    # ('deepfm', ["model_config 'DeepFM_test': embedding_regularizer = 1e-08 is not applied ..."])

The same through an experiment file (``load_config`` reads its ``fuxictr:`` section)::

    fuxictr:
      dataset_config: config/dataset_config.yaml    # a file, or FuxiCTR's config folder
      model_config: config/model_config.yaml
      experiment_id: DeepFM_test
      domain: {column: pid, source: ['430548_1007'], target: '430539_1007'}
    strategies: [finetune_all, autoft]              # any other section overrides the import
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data import FILE_SUFFIXES, DomainSpec, file_format
from .schema import ConfigError, parse_section, setting

__all__ = ["FUXICTR_KEY", "FUXICTR_MODELS", "FuxiCTRImport", "FuxiCTRSection", "FuxiCTRWarning",
           "expand_fuxictr", "fuxictr_to_experiment", "looks_like_fuxictr",
           "read_dataset_config", "read_feature_map", "read_model_config"]

FUXICTR_KEY = "fuxictr"

# FuxiCTR model class -> ours. The architectures agree in structure (embeddings -> MLP;
# first-order + FM + MLP; cross network v2 + MLP); FuxiCTR-only options are reported below.
FUXICTR_MODELS = {"DNN": "dnn", "DeepFM": "deepfm", "DCNv2": "dcnv2"}

# Keys that only steer how FuxiCTR itself runs (workers, logging, pickling, h5 reuse):
# they change no result here and are reported together in one line.
_RUN_KEYS = ("num_workers", "workers", "verbose", "pickle_feature_encoder", "use_hdf5",
             "debug_mode", "debug", "partition_block_size", "data_block_size", "streaming",
             "rebuild_dataset")

# Keys whose value, when it is one of these, is what this package does anyway.
_NEUTRAL = {"shuffle": (True,), "save_best_only": (True,), "eval_steps": (None,),
            "every_x_epochs": (None, 1), "group_id": (None,), "use_features": (None,),
            "feature_specs": (None,), "feature_config": (None,),
            "loss": ("binary_crossentropy",), "task": ("binary_classification",)}

# Values that cannot be ignored: a run with them would be another experiment.
_REQUIRED_VALUE = {"loss": "binary_crossentropy", "task": "binary_classification"}

_ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "leaky_relu")
_METRICS = {"auc", "logloss"}
_READABLE_FORMATS = ("csv", "parquet")


class FuxiCTRWarning(UserWarning):
    """A FuxiCTR key that has no counterpart here and was not applied (the message names it)."""


def _existing_path(value, where, ctx):
    p = value if value.is_absolute() else Path(ctx.get("base_dir", ".")) / value
    if not p.exists():
        raise ConfigError(f"{where}: {str(p)!r} does not exist")
    return p


def _under_base(value, where, ctx):
    return value if value is None or value.is_absolute() else Path(ctx.get("base_dir", ".")) / value


@dataclass(frozen=True)
class FuxiCTRSection:
    """The ``fuxictr:`` section of an experiment file: which FuxiCTR files to read, and the
    domain split FuxiCTR itself has no key for. Paths are relative to the experiment file.

    Example::

        FuxiCTRSection.from_dict({"dataset_config": "cfg", "model_config": "cfg",
                                  "experiment_id": "DNN_test",
                                  "domain": {"column": "pid", "source": ["a"], "target": "b"}})
    """

    error = ConfigError
    dataset_config: Path = setting(after=_existing_path, doc=(
        "FuxiCTR's dataset_config.yaml, or its config folder (dataset_config.yaml or "
        "dataset_config/*.yaml inside)"))
    model_config: Path = setting(after=_existing_path, doc=(
        "FuxiCTR's model_config.yaml, or its config folder (model_config.yaml or "
        "model_config/*.yaml inside)"))
    experiment_id: str = setting(doc="the experiment id (a key of the model config)")
    domain: DomainSpec = setting(doc="domain column and source / target values")
    feature_map: Path | None = setting(None, after=_under_base, doc=(
        "a FuxiCTR feature_map.json; default <data_root>/<dataset_id>/feature_map.json when "
        "that file exists"))
    root: Path | None = setting(None, after=_under_base, doc=(
        "the folder FuxiCTR's relative data paths (train_data, data_root, model_root) start "
        "from; default: the current working directory, as FuxiCTR's scripts open them"))

    @classmethod
    def from_dict(cls, d: Mapping | None, base_dir: Path | str = ".") -> "FuxiCTRSection":
        """Check a ``fuxictr:`` mapping; relative paths are taken from ``base_dir``.

        Example::

            FuxiCTRSection.from_dict(yaml.safe_load(open("exp.yaml"))["fuxictr"], Path("."))
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{FUXICTR_KEY}: must be a mapping, got {d!r}")
        return parse_section(cls, d, FUXICTR_KEY, ctx={"base_dir": Path(base_dir)})


@dataclass
class FuxiCTRImport:
    """The result of reading a FuxiCTR pair: our experiment mapping (YAML-able, what
    ``parse_config`` reads), every warning about a key not applied and, from
    :func:`~autoft_fast.config.experiment.load_fuxictr`, the parsed config.

    Example::

        imp = load_fuxictr(ds, mc, "DNN_test", domain={...})
        yaml.safe_dump(imp.experiment)         # an experiment file to keep and edit
    """

    experiment: dict
    warnings: list[str] = field(default_factory=list)
    config: Any = None


# ----------------------------------------------------------------------------- reading
def _yaml_files(path: Path, stem: str) -> list[Path]:
    # FuxiCTR's rule: a file, or in a folder <stem>.yaml, else every <stem>/*.yaml.
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / f"{stem}.yaml").is_file():
        return [path / f"{stem}.yaml"]
    found = sorted((path / stem).glob("*.yaml"))
    if not found:
        raise ConfigError(f"{stem}: no {stem}.yaml or {stem}/*.yaml under {str(path)!r}")
    return found


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{str(path)!r} must be a YAML mapping keyed by id, got "
                          f"{type(doc).__name__}")
    return doc


def read_model_config(path: Path | str, experiment_id: str) -> dict:
    """The settings of ``experiment_id``: its entry merged over ``Base`` (a key of the
    experiment replaces Base's), as FuxiCTR's ``load_model_config`` does.

    Example::

        read_model_config("config/", "DeepFM_test")["model"]      # 'DeepFM'
    """
    base, exp, ids = None, None, []
    for p in _yaml_files(Path(path), "model_config"):
        doc = _read_yaml(p)
        if base is None and isinstance(doc.get("Base"), dict):
            base = doc["Base"]
        if exp is None and experiment_id in doc:
            exp = doc[experiment_id]
        ids += [k for k in doc if k != "Base"]
    if exp is None:
        raise ConfigError(f"experiment_id {experiment_id!r} is not in the model config "
                          f"{str(path)!r}; it has: {', '.join(map(str, ids)) or 'none'}")
    if not isinstance(exp, dict):
        raise ConfigError(f"model_config {experiment_id!r} must be a mapping, got {exp!r}")
    params = dict(base or {})
    params.update(exp)
    if "dataset_id" not in params:
        raise ConfigError(f"model_config {experiment_id!r} has no dataset_id")
    return params


def read_dataset_config(path: Path | str, dataset_id: str) -> dict:
    """The entry ``dataset_id`` of a FuxiCTR dataset config (a file or a config folder).

    Example::

        read_dataset_config("config/", "tiny_csv")["label_col"]   # {'name': 'clk', ...}
    """
    ids = []
    for p in _yaml_files(Path(path), "dataset_config"):
        doc = _read_yaml(p)
        if dataset_id in doc:
            if not isinstance(doc[dataset_id], dict):
                raise ConfigError(f"dataset_config {dataset_id!r} must be a mapping, got "
                                  f"{doc[dataset_id]!r}")
            return dict(doc[dataset_id])
        ids += list(doc)
    raise ConfigError(f"dataset_id {dataset_id!r} is not in the dataset config {str(path)!r}; "
                      f"it has: {', '.join(map(str, ids)) or 'none'}")


def read_feature_map(path: Path | str) -> dict:
    """A FuxiCTR feature_map.json: ``{"labels": [...], "features": {name: spec}}`` with
    the features in file order (the file holds them as a list of one-key mappings).

    Example::

        read_feature_map("data/tiny/feature_map.json")["features"]["userid"]["vocab_size"]
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"feature_map: {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"feature_map: {str(path)!r} is not valid JSON: {e}") from None
    raw = doc.get("features") if isinstance(doc, dict) else None
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(x, dict) and len(x) == 1 for x in raw):
        items = [next(iter(x.items())) for x in raw]
    else:
        raise ConfigError(f"feature_map: {str(path)!r} has no 'features' list of "
                          "{name: spec} entries")
    return {"labels": list(doc.get("labels") or []), "features": dict(items)}


# ----------------------------------------------------------------------------- converting
class _Report:
    """Collects warnings; per-column notes with the same text are joined into one line."""

    def __init__(self):
        self.lines: list[str] = []
        self._grouped: dict[tuple[str, str], list[str]] = {}

    def add(self, msg: str) -> None:
        self.lines.append(msg)

    def column(self, where: str, key_msg: str, column: str) -> None:
        self._grouped.setdefault((where, key_msg), []).append(column)

    def done(self) -> list[str]:
        for (where, msg), cols in self._grouped.items():
            self.lines.append(f"{where} {', '.join(repr(c) for c in cols)}: {msg}")
        self._grouped = {}
        return self.lines


def _is_zero(value) -> bool:
    if value in (None, 0, 0.0, False):
        return True
    if isinstance(value, str):
        s = value.strip().lower()
        for wrap in ("l1(", "l2(", "l1_l2("):
            if s.startswith(wrap) and s.endswith(")"):
                s = s[len(wrap):-1]
        try:
            return all(float(x) == 0.0 for x in s.split(","))
        except ValueError:
            return False
    return False


def _resolve(root: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path string, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def _data_paths(root: Path, value, fmt: str, where: str) -> list[Path]:
    """The files a FuxiCTR ``train_data`` / ``valid_data`` / ``test_data`` value names, as
    FuxiCTR reads them: a file, a folder (its ``*.<data_format>`` files, sorted) or a glob
    pattern (its matches, sorted); each file's name must say ``fmt`` (``.csv.gz`` is CSV)."""
    p = _resolve(root, value, where)
    if any(ch in p.name for ch in "*?["):
        paths = sorted(x for x in p.parent.glob(p.name) if x.is_file())
        if not paths:
            raise ConfigError(f"{where} = {value!r}: the pattern matches no file in "
                              f"{str(p.parent)!r}")
    elif p.is_dir():
        paths = sorted(x for x in p.glob(f"*.{fmt}") if x.is_file())
        if not paths:
            raise ConfigError(f"{where} = {value!r} is a folder without *.{fmt} files "
                              f"(data_format {fmt!r})")
    else:
        paths = [p]
    for x in paths:
        got = file_format(x)
        if got is None or got[0] != fmt:
            raise ConfigError(f"{where} = {value!r}: data_format is {fmt!r} but "
                              f"{x.name!r} is named as "
                              + (f"a {got[0]} file" if got else "no data file format")
                              + f" (suffixes: {sorted(FILE_SUFFIXES)}, optionally .gz for csv)")
    return paths


def _columns(cols, where: str) -> list[dict]:
    # FuxiCTR's feature_cols entry may name several columns at once: one entry per column.
    if not isinstance(cols, list) or not cols:
        raise ConfigError(f"{where} must be a non-empty list of column entries, got {cols!r}")
    out = []
    for i, col in enumerate(cols):
        if not isinstance(col, dict) or "name" not in col:
            raise ConfigError(f"{where}[{i}] must be a mapping with a name, got {col!r}")
        names = col["name"] if isinstance(col["name"], list) else [col["name"]]
        for n in names:
            if not isinstance(n, str) or not n:
                raise ConfigError(f"{where}[{i}].name must be a column name or a list of them, "
                                  f"got {col['name']!r}")
            out.append(dict(col, name=n))
    return out


def _convert_data(ds: dict, dataset_id: str, domain: dict, root: Path, fmap: dict | None,
                  embedding_dim: int | None, rep: _Report) -> dict:
    where = f"dataset_config {dataset_id!r}"
    ds = dict(ds)
    ds.pop("dataset_id", None)
    data: dict[str, Any] = {"name": dataset_id, "domain": domain}

    fmt = ds.pop("data_format", "csv")
    if fmt not in _READABLE_FORMATS:
        raise ConfigError(f"{where}: data_format {fmt!r} cannot be read here; convert the files "
                          f"to one of {list(_READABLE_FORMATS)} (the raw files, not FuxiCTR's "
                          "processed ones)")
    files = []
    for key in ("train_data", "valid_data", "test_data"):
        value = ds.pop(key, None)
        if value is None:
            continue
        for p in _data_paths(root, value, fmt, f"{where}.{key}"):
            if p not in files:
                files.append(p)
    if not files:
        raise ConfigError(f"{where} names no data file (train_data, valid_data, test_data)")
    data["files"] = [str(p) for p in files]
    if len(files) > 1:
        rep.add(f"{where}: train_data, valid_data and test_data are read as one table; the "
                "fixed FuxiCTR split is not kept: the source domains are pre-trained on and the "
                "target domain's rows are split by data.split (random 70/10/20 by default)")
    data_root = ds.pop("data_root", None)
    if data_root is not None:
        data["cache_dir"] = str(_resolve(root, data_root, f"{where}.data_root"))
    if "sep" in ds:
        # FuxiCTR passes it to its CSV reader (tab-separated files named .csv, say).
        data["csv_sep"] = ds.pop("sep")
    # FuxiCTR's default bucket count for quantile_bucket columns without their own.
    default_buckets = ds.pop("num_buckets", 10)
    if "min_categr_count" in ds:
        data["min_count"] = ds.pop("min_categr_count")
    else:
        data["min_count"] = 1  # FuxiCTR's default; ours would be 2

    label = ds.pop("label_col", None)
    if isinstance(label, list):
        if len(label) != 1:
            raise ConfigError(f"{where}.label_col lists {len(label)} labels; only one 0/1 label "
                              "(binary_classification) is supported")
        label = label[0]
    if not isinstance(label, dict) or not isinstance(label.get("name"), str):
        raise ConfigError(f"{where}.label_col must be a mapping with a column name, got {label!r}")
    data["label"] = label["name"]
    for k in label:
        if k not in ("name", "dtype"):
            rep.add(f"{where}.label_col: {k} is not applied (the label is read as 0/1)")

    categorical, numeric, multihot = [], [], []
    buckets = set()
    global_min = data["min_count"]
    fwhere = f"{where}.feature_cols"
    fm_feats = (fmap or {}).get("features", {})
    seen_active = []
    for col in _columns(ds.pop("feature_cols", None), fwhere):
        name, kind = col["name"], col.get("type")
        if col.get("active", True) is False:
            continue
        if kind not in ("categorical", "numeric", "sequence", "meta"):
            raise ConfigError(f"{fwhere} {name!r}: type {kind!r} is not one of categorical, "
                              "numeric, sequence")
        if col.get("preprocess"):
            raise ConfigError(f"{fwhere} {name!r}: preprocess {col['preprocess']!r} is a FuxiCTR "
                              "function that cannot run here; write the derived column into "
                              "the data file and drop the preprocess key")
        if name == domain.get("column"):
            rep.column(fwhere, "is the domain column; it defines the domains and is not also "
                       "used as a feature", name)
            continue
        if kind == "meta":
            rep.column(fwhere, "type meta (group ids for group-wise metrics) is not used", name)
            continue
        seen_active.append((name, kind))
        used = {"name", "active", "type", "dtype"}
        if col.get("source"):
            used.add("source")
            rep.column(fwhere, "source (feature group) is not used", name)
        if "embedding_dim" in col:
            used.add("embedding_dim")
            if col["embedding_dim"] != embedding_dim:
                rep.column(fwhere, f"embedding_dim {col['embedding_dim']} is not applied (one "
                           f"width for every field: {embedding_dim})", name)
        for k in ("pretrained_emb", "freeze_emb", "pretrain_dim", "pretrain_usage"):
            if k in col:
                used.add(k)
                rep.column(fwhere, f"{k} is not applied (the pre-trained rows come from "
                           "pre-training on the source domains)", name)
        if "share_embedding" in col:
            used.add("share_embedding")
            rep.column(fwhere, f"share_embedding {col['share_embedding']!r} is not applied (the "
                       "column gets its own vocabulary and rows)", name)
        if "min_categr_count" in col:
            used.add("min_categr_count")
            if col["min_categr_count"] != global_min:
                rep.column(fwhere, f"min_categr_count {col['min_categr_count']} is not applied "
                           f"(one min_count for every column: {global_min})", name)
        if "fill_na" in col:
            used.add("fill_na")
            if col["fill_na"] not in ("", None):
                rep.column(fwhere, f"fill_na {col['fill_na']!r} is not applied (missing "
                           "categorical values are the value '', missing numbers the mean)", name)
        if kind == "categorical":
            proc = col.get("category_processor")
            used.add("category_processor")
            if proc == "quantile_bucket":
                used.add("num_buckets")
                buckets.add(col.get("num_buckets", default_buckets))
                numeric.append({"name": name, "mode": "bucket"})
            else:
                if proc is not None:
                    rep.column(fwhere, f"category_processor {proc!r} is not applied (an ordinary "
                               "vocabulary is built)", name)
                categorical.append(name)
        elif kind == "numeric":
            used.add("normalizer")
            norm = col.get("normalizer")
            if norm != "StandardScaler":
                rep.column(fwhere, f"normalizer {norm!r} is replaced by standardisation with "
                           "the training rows' mean and std", name)
            numeric.append({"name": name, "mode": "dense"})
        else:  # sequence -> multi-hot bag
            used |= {"splitter", "max_len", "padding", "encoder"}
            entry = {"name": name, "sep": col.get("splitter", "^")}
            max_len = col.get("max_len") or fm_feats.get(name, {}).get("max_len")
            if max_len:
                entry["max_len"] = max_len
            else:
                rep.column(fwhere, "max_len is not given (FuxiCTR takes the longest training "
                           "sequence); the default max_len 8 is used", name)
            if col.get("padding", "post") != "post":
                rep.column(fwhere, f"padding {col['padding']!r} is not applied (the first "
                           "max_len tokens are kept, as FuxiCTR's 'post')", name)
            if col.get("encoder", "MaskedAveragePooling") != "MaskedAveragePooling":
                rep.column(fwhere, f"encoder {col['encoder']!r} is not applied (bags are "
                           "mean-pooled, as MaskedAveragePooling)", name)
            multihot.append(entry)
        for k in col:
            if k not in used:
                rep.column(fwhere, f"{k} has no counterpart and is not applied", name)
    data["categorical"] = categorical
    data["numeric"] = numeric
    data["multihot"] = multihot
    if len(buckets) > 1:
        rep.add(f"{fwhere}: quantile_bucket columns ask for {sorted(buckets)} buckets; one "
                f"num_buckets for every column: {max(buckets)}")
    if buckets:
        data["num_buckets"] = max(buckets)

    if fmap is not None:
        active = dict(seen_active)
        for name, spec in fm_feats.items():
            if name not in active:
                if name != domain.get("column"):
                    rep.add(f"feature_map: feature {name!r} is not an active column of {where}")
            elif isinstance(spec, dict) and spec.get("type") not in (None, active[name]):
                rep.add(f"feature_map: feature {name!r} has type {spec.get('type')!r} but "
                        f"{where} says {active[name]!r}; the dataset config is used")
        if fmap.get("labels") and data["label"] not in fmap["labels"]:
            rep.add(f"feature_map: labels {fmap['labels']} do not include {data['label']!r}")

    for k in ds:
        rep.add(f"{where}: {k} has no counterpart and is not applied")
    return data


def _hidden_units(mc: dict, name: str, where: str, rep: _Report, used: set) -> tuple[list, str | None]:
    if name != "dcnv2":
        for key in ("hidden_units", "dnn_hidden_units"):
            if key in mc:
                used.add(key)
                return mc[key], None
        return None, None
    structure = mc.get("model_structure", "parallel")
    used |= {"model_structure", "stacked_dnn_hidden_units", "parallel_dnn_hidden_units"}
    if structure == "crossnet_only":
        return [], "parallel"
    if structure not in ("parallel", "stacked"):
        raise ConfigError(f"{where}: model_structure {structure!r} has no counterpart; use "
                          "parallel, stacked or crossnet_only")
    return mc.get(f"{structure}_dnn_hidden_units", []), structure


def _monitor(mc: dict, where: str, rep: _Report) -> str | None:
    value, mode = mc.get("monitor"), mc.get("monitor_mode")
    if value is None:
        return None
    if isinstance(value, dict):
        # FuxiCTR watches sum(weight * metric), maximised or minimised by monitor_mode (default
        # max): a metric counts in its own direction (AUC up, logloss down) when the sign of
        # its weight agrees with the mode.
        sign = -1 if mode == "min" else 1
        weighted = {str(k).lower(): w for k, w in value.items()
                    if isinstance(w, (int, float)) and not isinstance(w, bool) and w != 0}
        unknown = [k for k in weighted if k not in _METRICS]
        if unknown:
            raise ConfigError(f"{where}: monitor {value!r} weighs {unknown[0]!r}, which has no "
                              "counterpart; use AUC or logloss")
        right = [k for k, w in weighted.items() if sign * w * (1 if k == "auc" else -1) > 0]
        if not right:
            raise ConfigError(f"{where}: monitor {value!r} with monitor_mode "
                              f"{mode or 'max'!r} would make early stopping prefer a worse "
                              "model (AUC lower or logloss higher); give AUC a positive or "
                              "logloss a negative weight under max")
        pick = "auc" if "auc" in right else right[0]
        if len(weighted) > 1:
            rep.add(f"{where}: monitor {value!r} (a weighted sum of metrics) is not applied; "
                    f"early stopping watches {pick}")
        return pick
    value = str(value).lower()
    if value not in _METRICS:
        raise ConfigError(f"{where}: monitor {mc['monitor']!r} has no counterpart; use AUC or "
                          "logloss")
    if mode is not None and mode != ("max" if value == "auc" else "min"):
        raise ConfigError(f"{where}: monitor_mode {mode!r} does not fit monitor {value!r} "
                          f"(AUC is maximised, logloss minimised)")
    return value


def _convert_model(mc: dict, experiment_id: str, root: Path, rep: _Report) -> dict:
    where = f"model_config {experiment_id!r}"
    used = {"model", "dataset_id"}
    fuxi_name = mc.get("model")
    if fuxi_name not in FUXICTR_MODELS:
        raise ConfigError(f"{where}: model {fuxi_name!r} has no counterpart here; choose one of "
                          f"{', '.join(FUXICTR_MODELS)}")
    name = FUXICTR_MODELS[fuxi_name]
    model: dict[str, Any] = {"name": name}
    train: dict[str, Any] = {}
    out: dict[str, Any] = {"model": model}

    for key, value in _REQUIRED_VALUE.items():
        if key in mc and mc[key] != value:
            raise ConfigError(f"{where}: {key} {mc[key]!r} is not supported; only {value!r}")
    if "embedding_dim" in mc:
        used.add("embedding_dim")
        model["embedding_dim"] = mc["embedding_dim"]
    hidden, structure = _hidden_units(mc, name, where, rep, used)
    if hidden is not None:
        model["hidden_units"] = hidden
    if structure is not None:
        model["structure"] = structure
    for key in ("hidden_activations", "dnn_activations"):
        if key in mc:
            used.add(key)
            acts = mc[key] if isinstance(mc[key], list) else [mc[key]]
            acts = [str(a).lower() for a in acts]
            if len(set(acts)) > 1:
                rep.add(f"{where}: {key} {mc[key]!r} differ per layer; one activation for every "
                        f"layer: {acts[0]}")
            if acts and acts[0] not in _ACTIVATIONS:
                raise ConfigError(f"{where}: {key} {mc[key]!r} has no counterpart; use one of "
                                  f"{', '.join(_ACTIVATIONS)}")
            if acts:
                model["activation"] = acts[0]
    for ours, theirs in (("dropout", "net_dropout"), ("batch_norm", "batch_norm"),
                         ("cross_layers", "num_cross_layers")):
        if theirs in mc:
            used.add(theirs)
            model[ours] = mc[theirs]
    if name == "dcnv2":
        used |= {"use_low_rank_mixture", "low_rank", "num_experts"}
        if mc.get("use_low_rank_mixture"):
            rep.add(f"{where}: use_low_rank_mixture (with low_rank, num_experts) is not applied; "
                    "the cross layers are full-rank")

    for ours, theirs in (("lr", "learning_rate"), ("batch_size", "batch_size"),
                         ("epochs", "epochs"), ("patience", "early_stop_patience"),
                         ("patience", "patience")):
        if theirs in mc:
            used.add(theirs)
            train[ours] = mc[theirs]
    if "optimizer" in mc:
        used.add("optimizer")
        opt = str(mc["optimizer"]).lower()
        if opt not in ("adam", "adamw"):
            raise ConfigError(f"{where}: optimizer {mc['optimizer']!r} has no counterpart; use "
                              "adam or adamw")
        train["optimizer"] = opt
    used |= {"monitor", "monitor_mode"}
    monitor = _monitor(mc, where, rep)
    if monitor is not None:
        train["monitor"] = monitor
    if "seed" in mc:
        used.add("seed")
        out["seeds"] = [mc["seed"]]
    for key in ("embedding_regularizer", "net_regularizer"):
        if key in mc:
            used.add(key)
            if not _is_zero(mc[key]):
                rep.add(f"{where}: {key} = {mc[key]!r} is not applied (no regulariser; "
                        "finetune.weight_decay is the nearest setting)")
    if "metrics" in mc:
        used.add("metrics")
        extra = [m for m in (mc["metrics"] or []) if str(m).lower() not in _METRICS]
        if extra:
            rep.add(f"{where}: metrics {extra} are not computed (AUC and logloss are)")
    if "model_root" in mc:
        used.add("model_root")
        out["run_dir"] = str(_resolve(root, mc["model_root"], f"{where}.model_root"))
    if "gpu" in mc:
        used.add("gpu")
        gpu = mc["gpu"]
        if isinstance(gpu, bool) or not isinstance(gpu, int):
            raise ConfigError(f"{where}: gpu must be an integer (-1 for the CPU), got {gpu!r}")
        out["device"] = "cpu" if gpu < 0 else f"cuda:{gpu}"

    run_keys = [k for k in mc if k in _RUN_KEYS]
    if run_keys:
        rep.add(f"{where}: {', '.join(run_keys)} only steer how FuxiCTR runs; not applied")
    used |= set(run_keys)
    for key, neutral in _NEUTRAL.items():
        if key in mc:
            used.add(key)
            if mc[key] not in neutral:
                rep.add(f"{where}: {key} = {mc[key]!r} is not applied")
    for key in mc:
        if key not in used:
            rep.add(f"{where}: {key} has no counterpart and is not applied")

    if train:
        # One FuxiCTR run is one training; here it sets both stages, pre-training on the
        # source domains and fine-tuning on the target.
        out["pretrain"] = dict(train)
        out["finetune"] = dict(train)
        if "seeds" in out:
            out["pretrain"]["seed"] = out["seeds"][0]
    return out


def fuxictr_to_experiment(dataset_config: Path | str, model_config: Path | str,
                          experiment_id: str, domain: Mapping, *,
                          feature_map: Path | str | None = None,
                          root: Path | str | None = None, overrides: Mapping | None = None,
                          warn: bool = False) -> FuxiCTRImport:
    """Convert a FuxiCTR pair into an experiment mapping of this package (``experiment``,
    which :func:`~autoft_fast.config.parse_config` reads) and the list of ``warnings`` about
    keys not applied. Raises :class:`ConfigError` for what cannot be ignored.

    ``domain`` is ``{column, source: [...], target}``; ``root`` is where FuxiCTR's relative
    data paths start (default: the current working directory); ``feature_map`` defaults to
    ``<data_root>/<dataset_id>/feature_map.json`` when that file exists. ``overrides`` are
    sections of our experiment file laid over the import (a mapping is merged key by key,
    e.g. ``{"finetune": {"epochs": 3}, "strategies": ["finetune_all", "autoft"]}``); ``warn``
    also issues each warning as a :class:`FuxiCTRWarning`.
    :func:`autoft_fast.config.experiment.load_fuxictr` parses the result as well.

    Example::

        imp = fuxictr_to_experiment("config", "config", "DNN_test",
                                    {"column": "pid", "source": ["a"], "target": "b"})
        Path("exp.yaml").write_text(yaml.safe_dump(imp.experiment))
    """
    if not isinstance(experiment_id, str) or not experiment_id:
        raise ConfigError(f"experiment_id must be a non-empty string, got {experiment_id!r}")
    if not isinstance(domain, Mapping):
        raise ConfigError(f"domain must be a mapping {{column, source, target}}, got {domain!r}")
    domain = dict(domain)
    root = Path(root).resolve() if root is not None else Path.cwd()
    rep = _Report()
    mc = read_model_config(model_config, experiment_id)
    dataset_id = mc["dataset_id"]
    ds = read_dataset_config(dataset_config, dataset_id)
    if feature_map is None and isinstance(ds.get("data_root"), str):
        guess = _resolve(root, ds["data_root"], "data_root") / str(dataset_id) / "feature_map.json"
        feature_map = guess if guess.is_file() else None
    fmap = read_feature_map(feature_map) if feature_map is not None else None

    exp = _convert_model(mc, experiment_id, root, rep)
    exp["data"] = _convert_data(ds, str(dataset_id), domain, root, fmap,
                                exp["model"].get("embedding_dim", 16), rep)
    exp = _overlay({"name": experiment_id, **exp}, overrides or {})
    notes = rep.done()
    if warn:
        for msg in notes:
            warnings.warn(msg, FuxiCTRWarning, stacklevel=2)
    return FuxiCTRImport(experiment=exp, warnings=notes)


def _overlay(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def expand_fuxictr(raw: dict, base_dir: Path | str) -> tuple[dict, list[str]]:
    """An experiment mapping with a ``fuxictr:`` section -> the same mapping with the section
    replaced by the imported ones (the file's own sections laid over them) and the warnings.
    A mapping without the section is returned unchanged. ``load_config`` calls this.

    Example::

        raw, notes = expand_fuxictr(yaml.safe_load(open("exp.yaml")), Path("."))
    """
    if FUXICTR_KEY not in raw:
        return raw, []
    sec = FuxiCTRSection.from_dict(raw[FUXICTR_KEY], base_dir)
    imp = fuxictr_to_experiment(sec.dataset_config, sec.model_config, sec.experiment_id,
                                {"column": sec.domain.column, "source": list(sec.domain.source),
                                 "target": sec.domain.target},
                                feature_map=sec.feature_map, root=sec.root)
    rest = {k: v for k, v in raw.items() if k != FUXICTR_KEY}
    imported = {k: v for k, v in imp.experiment.items() if k != "name"}  # name: the file's
    return _overlay(imported, rest), imp.warnings


def looks_like_fuxictr(raw: Any) -> str | None:
    """'model_config' or 'dataset_config' when a parsed YAML file is one of FuxiCTR's own
    (so that passing it as an experiment file gets a pointer to the ``fuxictr:`` section),
    else None.

    Example:
        >>> looks_like_fuxictr({"Base": {}, "DNN_test": {"model": "DNN", "dataset_id": "d"}})
        'model_config'
    """
    if not isinstance(raw, dict) or not raw:
        return None
    entries = [v for v in raw.values() if isinstance(v, dict)]
    if "Base" in raw or any("dataset_id" in v and "model" in v for v in entries):
        return "model_config"
    if any("feature_cols" in v and "label_col" in v for v in entries):
        return "dataset_config"
    return None
