"""How often an instance's feature values occur in the source and in the target training rows.

The method's premise is that this decides reuse against re-learning: a row seen often in the
source is well estimated by pre-training, a row seen often in the target can be re-learnt from
the target, and a row rare in both is best left alone. The policy network can see it as an
extra input (``autoft.policy_input: frozen+freq`` or ``freq``): per field, log(1 + count)
scaled to [0, 1] by the largest count of that split, once for the source and once for the
target training rows, so two numbers per field.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FrequencyRule", "ValueFrequencies", "count_rows"]


def count_rows(data, num_rows: int) -> torch.Tensor:
    """How often each global id occurs in ``data`` (a TensorData): float64 ``[num_rows]``.

    Multi-hot slots count once per token; padding slots are counted too (their rows are the
    fields' PAD ids, whose frequency the policy may as well see).

    Example::

        >>> counts = count_rows(bundle.splits["source_train"], bundle.feature_map.num_rows)
    """
    counts = torch.zeros(num_rows, dtype=torch.float64)
    for ids in (data.sparse, data.multihot):
        if ids is not None and ids.numel():
            flat = ids.reshape(-1).to(torch.long)
            counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
    return counts


def _scaled_log(counts: torch.Tensor) -> torch.Tensor:
    top = float(counts.max()) if counts.numel() else 0.0
    return (torch.log1p(counts) / math.log1p(max(top, 1.0))).to(torch.float32)


class ValueFrequencies(nn.Module):
    """Per-field log-frequency features of an instance: ``[B, 2 * F]`` (source, then target).

    Built from the id counts of the source and the target training rows (see
    :func:`count_rows`); kept as buffers, so they move with the model and are saved in its
    state_dict (a saved model predicts with the frequencies it was trained with).

    Example::

        >>> freq = ValueFrequencies(count_rows(src, V), count_rows(tgt, V))
        >>> freq(batch, net).shape              # [B, 2 * num_fields]
    """

    def __init__(self, source_counts: torch.Tensor, target_counts: torch.Tensor):
        super().__init__()
        if source_counts.shape != target_counts.shape or source_counts.dim() != 1:
            raise ValueError(f"source_counts and target_counts must be 1-D of one length, got "
                             f"{tuple(source_counts.shape)} and {tuple(target_counts.shape)}")
        self.register_buffer("table", torch.stack(
            (_scaled_log(source_counts), _scaled_log(target_counts)), dim=1))

    @staticmethod
    def width(num_fields: int) -> int:
        """Input features added for ``num_fields`` fields."""
        return 2 * num_fields

    def forward(self, batch, net) -> torch.Tensor:
        parts = []
        if net.single_fields:
            parts.append(self.table[batch.sparse])                       # [B, Fs, 2]
        if net.multihot_fields:
            ids = batch.multihot                                          # [B, Fm, L]
            mask = (ids != net.multihot_pad.view(1, -1, 1)).to(self.table.dtype)
            vals = self.table[ids] * mask.unsqueeze(-1)
            parts.append(vals.sum(2) / mask.sum(2, keepdim=True).clamp_min(1.0))
        if not parts:
            return self.table.new_zeros(batch.label.shape[0], 0)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        # Source features of every field first, then target ones.
        return torch.cat((x[..., 0], x[..., 1]), dim=1)


class FrequencyRule(nn.Module):
    """The frequency rule of ``autoft.field_policy: frequency``: per instance and field, the
    tuned row is allowed when the instance's value occurs more than ``threshold`` times in
    the target training rows; otherwise the lookup takes the frozen row (where the tuned row
    is allowed, the policy network's gate decides).

    That is the method's premise stated as a rule: a row the target saw often can be
    re-learnt from the target; a row it saw a few times is moved by a few noisy optimizer
    steps, and the pre-trained row is the better estimate. A multi-hot bag is judged by the
    mean log(1 + count) of its tokens against log(1 + threshold); an empty bag is not
    forced. The counts and the
    threshold are buffers: a saved model predicts with the rule it was trained with.

    Example::

        >>> rule = FrequencyRule(count_rows(target_train, V))
        >>> rule.set_threshold(30)
        >>> rule.tuned(batch, net).shape        # [B, F], True = the tuned row
    """

    def __init__(self, target_counts: torch.Tensor | None):
        super().__init__()
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self._allowed_key = None      # see _allowed
        self._allowed_table = None
        if target_counts is None:
            # Counts not given: no value is known to be rare, every lookup takes the tuned row
            # (as threshold 0 does for every value the target saw) until counts are given.
            self.counts = None
            return
        if target_counts.dim() != 1:
            raise ValueError(f"target_counts must be 1-D [num_rows], got shape "
                             f"{tuple(target_counts.shape)}")
        # float32 holds every count up to 2**24 exactly; larger ones are far above any threshold.
        self.register_buffer("counts", target_counts.to(torch.float32).clamp(max=2.0 ** 24))

    def set_threshold(self, k: float) -> None:
        """Set the count at or below which a value takes the frozen row (``k >= 0``)."""
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0 \
                or k == float("inf"):
            raise ValueError(f"frequency threshold = {k!r} must be a finite number >= 0")
        if self.counts is None and k > 0:
            raise ValueError("frequency threshold > 0 needs the value counts of the target "
                             "training rows: build the model with value_counts=(source_counts, "
                             "target_counts) (see autoft_fast.models.frequency.count_rows)")
        self.threshold.fill_(float(k))

    def _allowed(self) -> torch.Tensor:
        """``counts > threshold`` per row, bool ``[num_rows]``: a quarter of the float32
        counts' bytes, so a batch's random reads of it mostly hit the cache (at 4M rows, 0.6
        against 1.0 ms per training batch of 4096 x 26 lookups). Rebuilt when the counts or
        the threshold change (``set_threshold``, ``load_state_dict``, ``.to()``); read
        nowhere else, so nothing else can see it stale."""
        # The tensors themselves in the key (compared by identity; held, so that no new
        # tensor can take an old one's place) and their in-place versions.
        key = self._allowed_key
        counts, threshold = self.counts, self.threshold
        if key is None or key[0] is not counts or key[1] != counts._version \
                or key[2] is not threshold or key[3] != threshold._version:
            self._allowed_table = counts > threshold
            self._allowed_key = (counts, counts._version, threshold, threshold._version)
        return self._allowed_table

    def tuned(self, batch, net) -> torch.Tensor:
        """Bool ``[B, F]`` in the field order of ``net`` (single-valued, then multi-hot)."""
        if self.counts is None:
            return torch.ones(batch.label.shape[0], len(net.single_fields) +
                              len(net.multihot_fields), dtype=torch.bool,
                              device=self.threshold.device)
        parts = []
        if net.single_fields:
            ids = batch.sparse
            parts.append(torch.index_select(self._allowed(), 0, ids.reshape(-1)).view(ids.shape))
        if net.multihot_fields:
            ids = batch.multihot                                          # [B, Fm, L]
            mask = (ids != net.multihot_pad.view(1, -1, 1)).to(self.counts.dtype)
            logs = torch.log1p(self.counts[ids]) * mask
            n = mask.sum(2)
            mean = logs.sum(2) / n.clamp_min(1.0)
            # An empty bag has no value to judge (and no row: both paths pool to zero), so
            # the rule leaves it to the network's gate rather than forcing it frozen.
            parts.append((mean > torch.log1p(self.threshold)) | (n == 0))
        if not parts:
            return torch.zeros(batch.label.shape[0], 0, dtype=torch.bool,
                               device=self.counts.device)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
