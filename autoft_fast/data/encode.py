"""Encoding new rows with a feature map fitted earlier: the same rules as the pipeline's
encode stage (``pipeline._encode``), applied to rows that were never part of the training
data (a predict path).

Values unseen in the training rows (or rarer than ``min_count`` there) map to their field's
OOV id, numeric columns fall into the trained bucket edges, dense columns are standardised
with the trained mean and std. The columns are read as text by the pipeline's own rules
(``reading.as_text``), so a value means the same here as it did when the map was fitted.

Example::

    enc = RowEncoder(data_cfg, bundle.feature_map, bundle.vocabularies)
    batch = enc.encode(pd.read_csv("new.csv", dtype=str))   # a TensorData, label 0 if absent
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .config import DataConfig, DataError
from .feature_map import FeatureMap
from .pipeline import _parse_numbers, _tokens
from .reading import as_text, other_integer_spelling
from .stats import clip_dense, power_of_two_above
from .store import id_dtype
from .tensors import TensorData

__all__ = ["RowEncoder", "feature_columns"]


def feature_columns(cfg: DataConfig) -> list[str]:
    """The columns a model reads (categorical, numeric, multi-hot), in config order.

    Example::

        feature_columns(cfg)   # ['user', 'item', 'price', 'tags']
    """
    return [*cfg.categorical, *(c.name for c in cfg.numeric), *(m.name for m in cfg.multihot)]


def _holds_floats(col: pd.Series) -> bool:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return pd.api.types.is_float_dtype(col.cat.categories.dtype)
    return pd.api.types.is_float_dtype(col.dtype)


def _spells_integers(vocab: pd.Index) -> bool:
    """Whether new float values of a column that was text in training should print as
    integers (7.0 -> '7', as a CSV of integer ids spells them) rather than as floats
    ('7.0', as pandas writes a float column): the spelling most of its integral values have.
    Decided once per column, so that a row's text never depends on the other rows read
    with it."""
    if not len(vocab):
        return True
    text = pd.Series(vocab.astype(str))
    dotted = int(text.str.fullmatch(r"[+-]?\d+\.0").sum())
    plain = int(text.str.fullmatch(r"[+-]?\d+").sum())
    return plain >= dotted


class RowEncoder:
    """Turns frames of new rows into :class:`TensorData` with a fitted feature map.

    ``cfg`` gives the columns' roles (and multi-hot separators and lengths),
    ``feature_map`` and ``vocabularies`` are a DataBundle's (``bundle.feature_map``,
    ``bundle.vocabularies``) or what a saved run holds.

    Example::

        enc = RowEncoder(cfg, bundle.feature_map, bundle.vocabularies)
        data = enc.encode(frame)           # frame: the feature columns, any dtype
    """

    def __init__(self, cfg: DataConfig, feature_map: FeatureMap, vocabularies: dict):
        self.cfg = cfg
        self.fm = feature_map
        missing = [f for f in feature_map.single_fields + feature_map.multihot_fields
                   if f not in vocabularies]
        if missing:
            raise DataError(f"the vocabularies lack the fields {missing} of the feature map")
        self.lookups = {c: pd.Index(vocabularies[c], dtype=object)
                        for c in [*cfg.categorical, *(m.name for m in cfg.multihot)]}
        extra = feature_map.extra
        self.edges = {k: np.asarray(v, dtype=np.float64)
                      for k, v in extra.get("bucket_edges", {}).items()}
        self.dense = {k: (float(v[0]), float(v[1]))
                      for k, v in extra.get("dense_mean_std", {}).items()}
        self.ids = id_dtype(feature_map.num_rows)
        # The text form of float columns the training data fixed (see reading.as_text).
        self.integral = dict(extra.get("float_text_integral", {}))
        self._checked: set = set()  # columns _check_numbers has looked at
        self.reset_counts()

    def reset_counts(self) -> None:
        """Start a new count of the categorical and multi-hot values that ``encode`` met
        (``present``) and of those unknown to the vocabulary (``unknown``), per column."""
        self.present: dict[str, int] = {c: 0 for c in self.lookups}
        self.unknown: dict[str, int] = {c: 0 for c in self.lookups}
        # Unknown values the vocabulary knows in the other spelling, 'N' vs 'N.0': per
        # column [count, (the value met, the value known)] (see reading.other_integer_spelling).
        self.respelled: dict[str, list] = {c: [0, None] for c in self.lookups}

    def _count_unknown(self, c: str, values: pd.Series | pd.Index, unknown: np.ndarray) -> None:
        self.unknown[c] += int(unknown.sum())
        if not unknown.any() or not len(self.lookups[c]):
            return
        missed = np.asarray(values, dtype=object)[unknown]
        alt = other_integer_spelling(missed)
        known = alt.notna().to_numpy().copy()
        if known.any():
            known[known] = self.lookups[c].get_indexer(alt[known]) >= 0
        if known.any():
            slot = self.respelled[c]
            slot[0] += int(known.sum())
            if slot[1] is None:
                i = int(np.flatnonzero(known)[0])
                slot[1] = (str(missed[i]), str(alt.iloc[i]))

    def mostly_unknown(self, share: float = 0.9, least: int = 20) -> dict[str, float]:
        """The columns, counted since ``reset_counts``, whose non-empty values were unknown to
        the vocabulary more than ``share`` of the time (of at least ``least`` values): the
        sign of columns read under the wrong names, or of a population the model never saw."""
        return {c: self.unknown[c] / n for c, n in self.present.items()
                if n >= least and self.unknown[c] > share * n}

    def _check_numbers(self, column: pd.Series, name: str) -> None:
        """Warn (once per column) when a numeric dtype meets a vocabulary of zero-padded
        numbers: pandas read '00961' as 961, which the model has never seen."""
        if (name in self._checked or not pd.api.types.is_numeric_dtype(column.dtype)
                or pd.api.types.is_bool_dtype(column.dtype)):
            return
        self._checked.add(name)
        lk = self.lookups[name]
        padded = lk[lk.astype(str).str.match(r"[+-]?0\d")] if len(lk) else lk
        if len(padded):
            warnings.warn(
                f"column '{name}' of the new rows holds numbers ({column.dtype}), but the "
                f"model's values of it are text with leading zeros (e.g. {padded[0]!r}), "
                "which numbers lose: such values become the unknown value; read the rows as "
                "text (pd.read_csv(..., dtype=str))", stacklevel=3)

    def encode(self, frame: pd.DataFrame, first_row: int | None = None) -> TensorData:
        """The rows of ``frame`` as TensorData (label from the label column when the frame
        has it, else 0; domain: the target's index). Raises DataError naming a missing
        feature column or a non-numeric value of a numeric column (with its row).

        Example::

            enc.encode(pd.DataFrame({"user": ["u1"], "item": ["i9"], "price": ["3.5"]}))
        """
        cfg, fm = self.cfg, self.fm
        missing = [c for c in feature_columns(cfg) if c not in frame.columns]
        repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]}
                          & set(feature_columns(cfg)))
        if repeated:
            raise DataError(f"the new rows have the feature column(s) {repeated} more than "
                            "once; every column name must be unique")
        if missing:
            raise DataError(f"the new rows lack the feature column(s) {missing}; columns "
                            f"present: {[str(c) for c in frame.columns][:30]}")
        n = len(frame)
        by_name = {f.name: f for f in fm.fields}
        sparse = np.empty((n, len(fm.single_fields)), dtype=self.ids)
        for j, c in enumerate(cfg.categorical):
            self._check_numbers(frame[c], c)
            if c not in self.integral and _holds_floats(frame[c]):
                # Text in training: float rows follow its spelling (decided once).
                self.integral[c] = _spells_integers(self.lookups[c])
            text = as_text(frame[c], self.integral.get(c)).fillna("")
            lk = self.lookups[c]
            codes = lk.get_indexer(text) if len(lk) else np.full(n, -1)
            given = (text != "").to_numpy()
            self.present[c] += int(given.sum())
            self._count_unknown(c, text, given & (codes < 0))
            info = by_name[c]
            sparse[:, j] = np.where(codes >= 0, codes + 1, info.vocab_size - 1) + info.offset
        j = len(cfg.categorical)
        dense = np.empty((n, len(fm.dense_fields)), dtype=np.float32) if fm.dense_fields else None
        jd = 0
        for col in cfg.numeric:
            vals, bad = _parse_numbers(as_text(frame[col.name]))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                # A file's rows are named by their data row (1-based, as the pipeline names
                # them; first_row: the file's rows before this frame), a frame's by its index.
                where = (f"data row {first_row + i + 1}" if first_row is not None
                         else f"row {frame.index[i]!r} of the frame")
                raise DataError(f"numeric column '{col.name}' holds {int(bad.sum())} values that "
                                f"are not numbers (e.g. {frame[col.name].iloc[i]!r} in {where})")
            if col.mode == "bucket":
                bucket = np.searchsorted(self.edges[col.name], vals, side="right")
                sparse[:, j] = np.where(np.isnan(vals), 1, bucket + 2) + by_name[col.name].offset
                j += 1
            else:
                dense[:, jd] = _standardise(vals, *self.dense[col.name])
                jd += 1
        multihot = None
        if fm.multihot_fields:
            multihot = np.empty((n, len(fm.multihot_fields), fm.multihot_max_len), dtype=self.ids)
            for jm, m in enumerate(cfg.multihot):
                info = by_name[m.name]
                multihot[:, jm, :] = info.pad_id
                self._check_numbers(frame[m.name], m.name)
                tok, row, tpos = _tokens(as_text(frame[m.name]), m.sep)
                lk = self.lookups[m.name]
                codes = lk.get_indexer(tok) if len(lk) else np.full(len(tok), -1)
                self.present[m.name] += int(len(tok))
                self._count_unknown(m.name, tok, codes < 0)
                local = np.where(codes >= 0, codes + 1, info.vocab_size - 1)
                keep = tpos < m.max_len
                multihot[row[keep], jm, tpos[keep]] = local[keep] + info.offset
        label = np.zeros(n, dtype=np.float32)
        if cfg.label in frame.columns:
            lab, _ = _parse_numbers(as_text(frame[cfg.label]))
            ok = (lab == 0) | (lab == 1)
            label[ok] = lab[ok]
        domain = np.full(n, len(fm.domain_values) - 1, dtype=np.int64)
        return TensorData(
            sparse=torch.from_numpy(sparse),
            multihot=None if multihot is None else torch.from_numpy(multihot),
            dense=None if dense is None else torch.from_numpy(dense),
            label=torch.from_numpy(label), domain=torch.from_numpy(domain))


def _standardise(vals: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x - mean) / std`` as the pipeline computes it: where that overflows, the same
    formula on values divided by a power of two (exact, so the finite results agree);
    missing and infinite -> 0 (the training mean); clipped to +-stats.DENSE_LIMIT."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = (vals - mean) / std
        overflow = ~np.isfinite(z) & np.isfinite(vals)
        if overflow.any():
            big = float(np.abs(vals[overflow]).max())
            s = power_of_two_above(max(big, abs(mean), std))
            z[overflow] = (vals[overflow] / s - mean / s) / (std / s)
    z[~np.isfinite(z)] = 0.0
    return clip_dense(z)
