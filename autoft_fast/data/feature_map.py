"""The feature map: where every field's ids live in the one shared embedding table.

All fields share a single table of ``num_rows`` rows; field ``f`` owns the contiguous range
``[f.offset, f.offset + f.vocab_size)``. Within a field, local id 0 is padding (empty
multi-hot slots) and local id ``vocab_size - 1`` is out-of-vocabulary (values unseen in the
training rows, or rarer than ``min_count``). Source and target rows are encoded with the same
map, so a pre-trained row means the same value in both domains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

FIELD_KINDS = ("categorical", "numeric_bucket", "multihot")


@dataclass(frozen=True)
class FieldInfo:
    """One embedding field. ``vocab_size`` counts PAD and OOV; ``offset`` is the global id of
    its PAD row."""

    name: str
    kind: str
    vocab_size: int
    offset: int

    @property
    def pad_id(self) -> int:
        """Global id of this field's padding row."""
        return self.offset

    @property
    def oov_id(self) -> int:
        """Global id of this field's out-of-vocabulary row."""
        return self.offset + self.vocab_size - 1


@dataclass
class FeatureMap:
    """Layout of the shared embedding table and of the columns of :class:`TensorData`.

    ``single_fields`` are the columns of ``TensorData.sparse`` (categorical, then bucketised
    numeric), ``multihot_fields`` the second axis of ``TensorData.multihot``,
    ``dense_fields`` the columns of ``TensorData.dense``. ``domain_values[k]`` is the domain
    that ``TensorData.domain == k`` means: the source domains in config order, then the target
    (always last).

    Example::

        fm = bundle.feature_map
        table = torch.nn.Embedding(fm.num_rows, 16, padding_idx=None)
        f = fm.field("user")            # FieldInfo(name='user', kind='categorical', ...)
    """

    fields: list[FieldInfo]
    single_fields: list[str]
    multihot_fields: list[str]
    multihot_max_len: int
    dense_fields: list[str]
    domain_values: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """Rows of the shared embedding table (sum of every field's vocab_size)."""
        return sum(f.vocab_size for f in self.fields)

    @property
    def num_fields(self) -> int:
        """Embedding fields seen by an interaction layer: single + multi-hot (dense excluded)."""
        return len(self.single_fields) + len(self.multihot_fields)

    def field(self, name: str) -> FieldInfo:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field named '{name}'; fields: {[f.name for f in self.fields]}")

    def multihot_pad_ids(self) -> torch.Tensor:
        """LongTensor [F_multi]: the PAD global id of each multi-hot field, for masks:
        ``valid = batch.multihot != fm.multihot_pad_ids()[None, :, None]``."""
        return torch.tensor([self.field(n).pad_id for n in self.multihot_fields], dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-able) that :meth:`from_dict` turns back into an equal map."""
        return {
            "fields": [asdict(f) for f in self.fields],
            "single_fields": list(self.single_fields),
            "multihot_fields": list(self.multihot_fields),
            "multihot_max_len": int(self.multihot_max_len),
            "dense_fields": list(self.dense_fields),
            "domain_values": list(self.domain_values),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureMap":
        """Inverse of :meth:`to_dict`; checks that offsets tile the table without gaps."""
        fm = cls(
            fields=[FieldInfo(**f) for f in d["fields"]],
            single_fields=list(d["single_fields"]),
            multihot_fields=list(d["multihot_fields"]),
            multihot_max_len=int(d["multihot_max_len"]),
            dense_fields=list(d["dense_fields"]),
            domain_values=list(d["domain_values"]),
            extra=dict(d.get("extra", {})),
        )
        fm.check()
        return fm

    def check(self) -> None:
        offset = 0
        for f in self.fields:
            if f.kind not in FIELD_KINDS:
                raise ValueError(f"field '{f.name}': kind must be one of {FIELD_KINDS}, got {f.kind!r}")
            if f.vocab_size < 2:
                raise ValueError(f"field '{f.name}': vocab_size must be >= 2 (PAD and OOV), got {f.vocab_size}")
            if f.offset != offset:
                raise ValueError(f"field '{f.name}': offset {f.offset} should be {offset} (fields tile the table)")
            offset += f.vocab_size
        names = [f.name for f in self.fields]
        if names != [*self.single_fields, *self.multihot_fields]:
            raise ValueError(f"fields {names} must be single_fields then multihot_fields")
