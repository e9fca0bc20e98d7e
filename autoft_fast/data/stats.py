"""Bounded-memory statistics that preprocessing gathers chunk by chunk: value counts for the
vocabularies, quantiles for the numeric buckets, mean and standard deviation for dense columns.

Each accumulator takes one chunk at a time and holds memory in the number of distinct values
(or a constant), never in the number of rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .config import DataError

# Distinct numeric values kept exactly per bucketised column (16 bytes each). Beyond it the
# quantile sketch merges neighbouring values (see ``QuantileSketch``).
MAX_EXACT_DISTINCT = 1 << 22


class ValueCounter:
    """Counts of text values over many chunks, merged lazily so that adding a chunk costs
    about its own size (a per-chunk merge into one big table would cost the vocabulary's size
    every chunk).

    Example::

        c = ValueCounter()
        c.add(pd.Series(["a", "b", "a"]))
        c.counts().to_dict()          # {'a': 2, 'b': 1}
    """

    def __init__(self) -> None:
        self._merged: pd.Series | None = None
        self._pending: list[pd.Series] = []
        self._pending_len = 0

    def add(self, tokens: pd.Series) -> None:
        """Count the values of ``tokens`` (text, no missing values)."""
        if len(tokens) == 0:
            return
        self.add_counts(tokens.value_counts(sort=False))

    def add_counts(self, vc: pd.Series) -> None:
        """Add counts already made: value (index) -> count, each value once."""
        if len(vc) == 0:
            return
        self._pending.append(vc)
        self._pending_len += len(vc)
        merged_len = 0 if self._merged is None else len(self._merged)
        if self._pending_len > max(1 << 20, 2 * merged_len):
            self._consolidate()

    def _consolidate(self) -> None:
        parts = ([] if self._merged is None else [self._merged]) + self._pending
        if parts:
            allc = pd.concat(parts)
            self._merged = allc.groupby(level=0, sort=False).sum()
        self._pending, self._pending_len = [], 0

    def counts(self) -> pd.Series:
        """Value -> count (index: the values as text)."""
        self._consolidate()
        return self._merged if self._merged is not None else pd.Series([], dtype=np.int64)


def fit_vocab(counts: pd.Series, min_count: int) -> list[str]:
    """Values counted at least ``min_count`` times, most frequent first, ties by value (so
    ids are deterministic and stable across runs).

    Example::

        fit_vocab(pd.Series({"b": 2, "a": 2, "c": 1}), 2)   # ['a', 'b']
    """
    counts = counts[counts >= min_count]
    frame = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
    frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="stable")
    return frame["value"].tolist()


class QuantileSketch:
    """Quantiles of many float chunks, equal to ``np.quantile`` (method ``linear``) of all of
    them at once while the column has at most ``max_distinct`` distinct values.

    It keeps each distinct value with its count, which is exact and small for the count-like
    or rounded columns of CTR data (Criteo's I1..I13 have a few thousand distinct values in
    45M rows). A column with more distinct values than that is compressed by merging runs of
    neighbouring values into one weighted value; a quantile then lies within
    ``2 / max_distinct`` of the exact rank.

    Example::

        s = QuantileSketch()
        s.add(np.array([3.0, 1.0, 2.0])); s.add(np.array([4.0]))
        s.quantiles(np.array([0.5]))     # array([2.5]) == np.quantile([1, 2, 3, 4], 0.5)
    """

    def __init__(self, max_distinct: int = MAX_EXACT_DISTINCT) -> None:
        self.max_distinct = int(max_distinct)
        self.values = np.zeros(0, dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.exact = True

    def add(self, vals: np.ndarray) -> None:
        """Add the finite values of ``vals`` (NaN and +-inf are ignored)."""
        vals = np.asarray(vals, dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return
        self._pending.append(vals)
        self._pending_len += vals.size
        if self._pending_len > max(1 << 20, self.values.size):
            self._consolidate()

    def _consolidate(self) -> None:
        if not self._pending:
            return
        new_vals, new_counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._pending_len = [], 0
        vals = np.concatenate([self.values, new_vals])
        counts = np.concatenate([self.counts, new_counts])
        uniq, inverse = np.unique(vals, return_inverse=True)
        self.values = uniq
        self.counts = np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)
        if self.values.size > self.max_distinct:
            self._compress()

    def _compress(self) -> None:
        # Runs of neighbouring values of about equal mass, each kept at its weighted median.
        self.exact = False
        target = self.max_distinct // 2
        cum = np.cumsum(self.counts)
        total = int(cum[-1])
        group = np.minimum((cum - 1) * target // total, target - 1)
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        counts = np.add.reduceat(self.counts, starts)
        ends = np.r_[starts[1:], group.size]
        mids = []
        for s, e, c in zip(starts, ends, counts):
            half = np.searchsorted(np.cumsum(self.counts[s:e]), (c + 1) // 2)
            mids.append(self.values[s + half])
        self.values = np.asarray(mids, dtype=np.float64)
        self.counts = counts.astype(np.int64)

    @property
    def n(self) -> int:
        """How many finite values were added."""
        self._consolidate()
        return int(self.counts.sum())

    def quantiles(self, q: np.ndarray) -> np.ndarray:
        """``np.quantile(all_values, q)`` with numpy's own index and interpolation arithmetic,
        so that the result is the same to the last bit (tested against it)."""
        self._consolidate()
        n = int(self.counts.sum())
        q = np.asarray(q, dtype=np.float64)
        if n == 0:
            raise ValueError("QuantileSketch.quantiles: no values were added")
        cum = np.cumsum(self.counts)

        def order_stat(idx: np.ndarray) -> np.ndarray:
            return self.values[np.searchsorted(cum, idx, side="right")]

        virtual = (n - 1) * q  # numpy's linear method (Hyndman & Fan 7)
        prev = np.floor(virtual)
        nxt = prev + 1
        above = virtual >= n - 1
        below = virtual < 0
        prev[above] = nxt[above] = n - 1   # numpy clamps to the last / first value;
        prev[below] = nxt[below] = 0       # there a == b, so gamma does not matter
        gamma = virtual - prev
        a = order_stat(prev.astype(np.int64))
        b = order_stat(nxt.astype(np.int64))
        diff = b - a
        out = a + diff * gamma
        high = gamma >= 0.5
        out[high] = (b - diff * (1 - gamma))[high]
        return out


def quantile_edges(sketch: QuantileSketch, num_buckets: int) -> np.ndarray:
    """The bucket edges: inner ``num_buckets``-quantiles of the training values, duplicates
    merged (empty when the column had no finite training value)."""
    if sketch.n == 0:
        return np.zeros(0)
    return np.unique(sketch.quantiles(np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]))


class MeanStd:
    """Mean and (population) standard deviation over chunks, merged with Chan's formulas on
    values scaled by a power of two at least as large as any of them, so that squares never
    overflow: a column holding 1e200 keeps a finite std instead of turning every value into 0.

    Example::

        m = MeanStd(scale_of(np.array([1e200, 1.0])))
        m.add(np.array([1e200, 1.0]))
        m.mean_std("price")              # (5e+199, 5e+199)
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)
        self.n = 0
        self.mean_s = 0.0
        self.m2_s = 0.0

    def add(self, vals: np.ndarray) -> None:
        """Add the finite values of ``vals``."""
        vals = np.asarray(vals, dtype=np.float64)
        xs = vals[np.isfinite(vals)] / self.scale
        nb = xs.size
        if nb == 0:
            return
        mb = float(xs.mean())
        m2b = float(((xs - mb) ** 2).sum())
        n = self.n + nb
        delta = mb - self.mean_s
        self.mean_s += delta * nb / n
        self.m2_s += m2b + delta * delta * (self.n * nb / n)
        self.n = n

    def mean_std(self, column: str) -> tuple[float, float]:
        """(mean, std); std is 1.0 for a constant or empty column (values are then only
        centred). A std beyond float64's range is an error naming ``column``."""
        if self.n == 0:
            return 0.0, 1.0
        mean = self.mean_s * self.scale
        std = math.sqrt(self.m2_s / self.n) * self.scale
        if not math.isfinite(std) or not math.isfinite(mean):
            raise DataError(
                f"numeric column '{column}' (dense) has values too large to standardise "
                f"(std beyond float64's range); rescale it or use mode: bucket"
            )
        return mean, (std if std > 0 else 1.0)

    def standardise(self, vals: np.ndarray, mean: float, std: float) -> np.ndarray:
        """``(x - mean) / std`` computed on scaled values; missing and infinite -> 0."""
        vals = np.asarray(vals, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            z = (vals / self.scale - mean / self.scale) / (std / self.scale)
        z[~np.isfinite(z)] = 0.0
        return z


# A standardised dense value is clipped to +-DENSE_LIMIT standard deviations: float32 holds
# values up to 3.4e38 only, and a value a million deviations out would saturate any model
# (or overflow its first layer to inf and NaN).
DENSE_LIMIT = 1e6


def clip_dense(z: np.ndarray) -> np.ndarray:
    """Standardised values clipped to +-DENSE_LIMIT, in place (missing ones stay 0)."""
    return np.clip(z, -DENSE_LIMIT, DENSE_LIMIT, out=z)


def scale_of(vals: np.ndarray) -> float:
    """A power of two >= the largest finite |value| (1.0 when there is none), so that dividing
    by it is exact."""
    vals = np.asarray(vals, dtype=np.float64)
    finite = np.abs(vals[np.isfinite(vals)])
    return power_of_two_above(float(finite.max()) if finite.size else 0.0)


def power_of_two_above(x: float) -> float:
    """The smallest power of two >= x, within 2^-1022 .. 2^1023 (float64's normal powers);
    1.0 for x <= 0 or not finite.

    Small values get small scales too: a column whose values are all near 1e-200 squares
    them to 1e-400, which is 0 in float64, unless they are first divided by such a power."""
    if not (x > 0.0 and math.isfinite(x)):
        return 1.0
    m, e = math.frexp(x)
    if m == 0.5:
        e -= 1  # x is itself a power of two
    return math.ldexp(1.0, max(-1022, min(e, 1023)))
