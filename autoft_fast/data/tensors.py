"""Processed data as tensors, and batches cut from them by slicing.

A batch is a :class:`TensorData` too, so a model's ``forward(batch)`` works the same on a
batch and on a whole split. Batching never loops over rows in Python: a shuffled epoch is
one ``randperm`` and one ``index_select`` per tensor per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .feature_map import FeatureMap

SPLIT_NAMES = ("source_train", "source_valid", "target_train", "target_valid", "target_test")
_TENSORS = ("sparse", "multihot", "dense", "label", "domain")


@dataclass
class TensorData:
    """Rows of processed data.

    sparse   IntTensor   [N, F_single]   global ids (see FeatureMap); int32, or int64 when
                                         the table has 2^31 rows or more (store.id_dtype)
    multihot IntTensor   [N, F_multi, L] global ids (dtype of sparse), the field's PAD id in
                                         empty slots; or None
    dense    FloatTensor [N, F_dense]    standardised values; or None
    label    FloatTensor [N]             0.0 / 1.0
    domain   LongTensor  [N]             index into FeatureMap.domain_values

    Example::

        batch = data.index(torch.tensor([0, 5, 7]))   # 3 rows
        len(batch)                                     # 3
    """

    sparse: torch.Tensor
    multihot: torch.Tensor | None
    dense: torch.Tensor | None
    label: torch.Tensor
    domain: torch.Tensor

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"TensorData.{name} has {t.shape[0]} rows, label has {n}")

    def __len__(self) -> int:
        return self.label.shape[0]

    def index(self, idx: torch.Tensor) -> "TensorData":
        """The rows ``idx`` (LongTensor [B]) of every tensor, as a new TensorData."""
        return TensorData(*(None if t is None else t.index_select(0, idx) for t in self._tensors()))

    def slice(self, start: int, stop: int) -> "TensorData":
        """Rows ``start:stop`` as views (no copy)."""
        return TensorData(*(None if t is None else t[start:stop] for t in self._tensors()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TensorData":
        """Every tensor moved to ``device``."""
        return TensorData(
            *(None if t is None else t.to(device, non_blocking=non_blocking) for t in self._tensors())
        )

    def select_domain(self, domain_index: int) -> "TensorData":
        """The rows of one domain (``domain == domain_index``)."""
        return self.index(torch.nonzero(self.domain == domain_index).flatten())

    def _tensors(self) -> tuple:
        return tuple(getattr(self, name) for name in _TENSORS)

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in _TENSORS}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor | None]) -> "TensorData":
        return cls(**{name: d[name] for name in _TENSORS})


@dataclass
class DataBundle:
    """What :func:`prepare_data` returns: the feature map and the five splits
    (``source_train``, ``source_valid``, ``target_train``, ``target_valid``, ``target_test``),
    plus each field's vocabulary (``vocabularies[field][local_id - 1]`` is the value of
    local id ``1 .. vocab_size - 2``; bucket fields list their bucket edges as text) and
    preprocessing counts in ``stats``."""

    feature_map: FeatureMap
    splits: dict[str, TensorData]
    vocabularies: dict[str, list[str]]
    stats: dict


# Rows gathered at a time by a shuffled pass (rounded to whole batches): the transient copy
# of a split is about this many rows (a few tens of MB for a few dozen fields).
GATHER_ROWS = 1 << 18


def iterate_batches(
    data: TensorData,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    min_last: int = 1,
) -> Iterator[TensorData]:
    """Yield batches of ``batch_size`` rows (the last may be shorter unless ``drop_last``).

    A last batch of fewer than ``min_last`` rows joins the batch before it (so that one is
    longer than ``batch_size``): a model with BatchNorm cannot train on a batch of one row.

    With ``shuffle``, one permutation per call (drawn from ``generator``, or torch's global
    generator) so that every row appears exactly once per epoch; the rows are gathered in that
    order a chunk of about ``GATHER_ROWS`` rows at a time (whole batches) and batches are
    views of the chunk, so the transient copy is a chunk, not the split. Without ``shuffle``,
    batches are views in file order. Example::

        g = torch.Generator().manual_seed(0)
        for batch in iterate_batches(bundle.splits["target_train"], 4096, shuffle=True, generator=g):
            loss = bce(model(batch), batch.label)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(data)
    if isinstance(min_last, bool) or not isinstance(min_last, int) or min_last < 1:
        raise ValueError(f"min_last must be a positive integer, got {min_last!r}")
    stop = n - n % batch_size if drop_last else n
    starts = list(range(0, stop, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()  # the batch before it runs to the end
    ends = [min(start + batch_size, n) for start in starts[:-1]] + [stop] if starts else []
    if not shuffle:
        for start, end in zip(starts, ends):
            yield data.slice(start, end)
        return
    # The permutation is drawn where the generator lives, then moved to the data.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=gen_device).to(data.label.device)
    # One gather per chunk of whole batches, then views: a per-batch index_select runs a
    # parallel region per tensor per batch, and on a busy CPU each of those can stall for
    # milliseconds (measured: 8 ms vs 0.2 ms per 4096-row batch on 2 loaded cores); a gather
    # of the whole split held a copy of it (two, across an epoch's boundary: the last batch
    # of one and the copy of the next) beside the memory-mapped split.
    per_chunk = max(1, GATHER_ROWS // batch_size)
    for c in range(0, len(starts), per_chunk):
        lo, hi = starts[c], ends[min(c + per_chunk, len(starts)) - 1]
        part = data.index(perm[lo:hi])
        for start, end in zip(starts[c:c + per_chunk], ends[c:c + per_chunk]):
            yield part.slice(start - lo, end - lo)
        del part
