"""Base CTR models: DNN, DeepFM and DCN-v2 over one shared embedding table.

Every model is split the same way, so that the transfer models can swap in frozen, tuned
and gated versions of each part without re-implementing the architectures:

- ``field_vectors(batch, weight)``: the instance's field vectors ``[B, F, dim]`` from a
  ``[V, dim]`` table: single-valued fields (``batch.sparse``) are one row each, multi-hot
  fields (``batch.multihot``) the mean of their non-PAD rows (an empty bag gives zeros).
  Field order: ``feature_map.single_fields`` then ``feature_map.multihot_fields``.
- ``interact(fields, first_order, dense, apply)``: the interaction stack and output layer.
  Every parameterised layer is reached through ``apply(name, *inputs)``; the base model
  passes its own layers, a transfer model passes frozen, tuned or gated mixtures of them.
- ``embedding`` (an ``EmbeddingTable``, i.e. an ``nn.Embedding`` that can carry a fused
  optimizer; all fields), ``linear`` (DeepFM's first-order weights, an ``EmbeddingTable`` of
  width 1, else None) and ``layers`` (``nn.ModuleDict`` keyed by
  ``layer_names``: ``cross_<i>``, ``mlp_<i>``, ``output``).

Dense values (``batch.dense``) are concatenated to the MLP (and cross network) input as
they are; they do not enter the FM, which is defined over embeddings only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import EmbeddingTable, FrozenRows, FusedTableMixin
from ..ops.fused_optim import Lookup
from .config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                "leaky_relu": nn.LeakyReLU}


class MLPLayer(nn.Module):
    """One MLP block: Linear -> (BatchNorm) -> activation -> (Dropout); the unit a layer gate routes."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ModelConfig):
        super().__init__()
        parts = [nn.Linear(in_dim, out_dim)]
        if cfg.batch_norm:
            parts.append(nn.BatchNorm1d(out_dim))
        parts.append(_ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            parts.append(nn.Dropout(cfg.dropout))
        self.block = nn.Sequential(*parts)

    def forward(self, x):
        return self.block(x)


class CrossLayerV2(nn.Module):
    """DCN-v2 full-rank cross layer: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0, x):
        return x0 * self.linear(x) + x


class OutputLayer(nn.Module):
    """The final Linear(in, 1) that gives the logit (it holds the model's global bias)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def _field_infos(feature_map):
    by_name = {f.name: f for f in feature_map.fields}
    missing = [n for n in list(feature_map.single_fields) + list(feature_map.multihot_fields)
               if n not in by_name]
    if missing:
        raise ValueError(f"feature_map: fields {missing} are listed as model inputs but have no "
                         f"FieldInfo in feature_map.fields")
    return by_name


def _rows(indices: torch.Tensor, weight, sparse: bool = False) -> torch.Tensor:
    """The rows of ``weight`` (a tensor or a :class:`FrozenRows` view) at ``indices``."""
    if isinstance(weight, FrozenRows):
        return weight.rows(indices)
    return F.embedding(indices, weight, sparse=sparse)


class BaseCTRModel(nn.Module):
    """Shared embedding table + an interaction stack; ``forward(batch) -> logits [B]``.

    Subclasses set ``layers`` / ``layer_names`` and implement ``interact``. Build one with
    :func:`build_base_model`.
    """

    model_name = "base"

    def __init__(self, feature_map, cfg: ModelConfig):
        super().__init__()
        by_name = _field_infos(feature_map)
        self.config = cfg
        self.single_fields = list(feature_map.single_fields)
        self.multihot_fields = list(feature_map.multihot_fields)
        self.dense_fields = list(feature_map.dense_fields or [])
        self.field_names = self.single_fields + self.multihot_fields
        self.num_rows = int(feature_map.num_rows)
        if not self.field_names and not self.dense_fields:
            raise ValueError("feature_map has no single, multi-hot or dense fields: nothing to model")
        # A multi-hot slot holding its field's local id 0 (global id = offset) is padding.
        self.register_buffer("multihot_pad", torch.tensor(
            [by_name[n].offset for n in self.multihot_fields], dtype=torch.long), persistent=False)
        self.embedding = EmbeddingTable(self.num_rows, cfg.embedding_dim)
        nn.init.normal_(self.embedding.weight, std=cfg.embedding_init_std)
        self.linear: EmbeddingTable | None = None
        self.layers = nn.ModuleDict()

    # ----- embeddings ---------------------------------------------------------------------
    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    @property
    def flat_dim(self) -> int:
        """Width of the MLP / cross input: all field vectors flattened plus the dense values."""
        return self.num_fields * self.config.embedding_dim + len(self.dense_fields)

    def multihot_slot_weights(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """Each slot's weight in its bag's mean: 1 / (non-PAD slots), 0 for PAD; ``[B, F_multi, L]``."""
        mask = (ids != self.multihot_pad.view(1, -1, 1)).to(dtype)
        return mask / mask.sum(dim=2, keepdim=True).clamp_min(1.0)

    def multihot_bags(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, offsets) of the bags of multi-hot ids ``[B, F_multi, L]``: the non-PAD slots.

        Bag ``b * F_multi + f`` holds field f of instance b in slot order (the layout of
        ``autoft_fast.gated_embedding_bag``); an all-PAD slot list is an empty bag.

        Example::

            >>> values, offsets = model.multihot_bags(batch.multihot)
            >>> offsets.shape                                  # B * F_multi + 1
        """
        keep = ids != self.multihot_pad.view(1, -1, 1)
        counts = keep.sum(dim=2).reshape(-1)
        offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, dim=0)))
        return ids[keep], offsets

    def pool_multihot(self, ids: torch.Tensor, weight: torch.Tensor, sparse: bool = False):
        """Mean of the non-PAD rows of ``weight`` for ids ``[B, F_multi, L]`` -> ``[B, F_multi, dim]``.

        Computed as the bag op's mean pooling is (docs/op-contract.md, "Bags"): each row times
        1 / (bag length), added in slot order in the table's dtype, an empty bag giving zeros.
        So a gated model whose gates all choose one table pools bit for bit what this pools.
        (F.embedding_bag with per-sample weights is not used: its x86 kernel fuses the multiply
        into the add, which rounds differently.)
        """
        b, f, _ = ids.shape
        values, offsets = self.multihot_bags(ids)
        counts = offsets[1:] - offsets[:-1]
        bag_ids = torch.repeat_interleave(torch.arange(b * f, device=ids.device), counts,
                                          output_size=values.shape[0])
        per_value = 1.0 / counts.clamp_min(1).to(weight.dtype)[bag_ids]
        rows = _rows(values, weight, sparse)
        pooled = weight.new_zeros(b * f, weight.shape[1]).index_add(0, bag_ids, rows * per_value[:, None])
        return pooled.view(b, f, weight.shape[1])

    def field_vectors(self, batch, weight, sparse: bool = False,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
        """Field vectors ``[B, F, dim]`` of ``batch`` looked up in ``weight``.

        ``weight``: a ``[V, dim]`` tensor, a table module (``EmbeddingTable``, or a
        ``GatedEmbedding`` for its tuned copy), or a low-precision frozen table's
        ``FrozenRows`` view (``GatedEmbedding.frozen_table()``: only the rows looked up are
        dequantised). A table with a fused optimizer, in a forward
        that records gradients, is looked up with ``fused_optim.fused_lookup``: every field's
        lookups in one call, so the backward takes one optimizer step on the table; the values
        are the same either way. ``sparse`` asks for a COO gradient on a plain ``weight`` (as
        ``nn.Embedding(sparse=True)``). ``scale`` ``[B, F]`` multiplies each field vector (a
        gate's weight); a fused lookup does not touch the rows of a lookup scaled by 0.

        Example::

            >>> fields = model.field_vectors(batch, model.embedding)      # [B, F, dim]
        """
        if isinstance(weight, FusedTableMixin):
            if weight.fused:
                return self._fused_field_vectors(batch, weight, scale)
            weight = weight.fused_weight
        parts = []
        if self.single_fields:
            parts.append(_rows(batch.sparse, weight, sparse))
        if self.multihot_fields:
            parts.append(self.pool_multihot(batch.multihot, weight, sparse=sparse))
        if not parts:
            return weight.new_zeros(self._batch_size(batch), 0, weight.shape[1])
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out if scale is None else scale.unsqueeze(-1) * out

    def _fused_field_vectors(self, batch, table, scale) -> torch.Tensor:
        ns = len(self.single_fields)
        lookups = []
        if self.single_fields:
            lookups.append(Lookup(batch.sparse, None if scale is None else scale[:, :ns]))
        if self.multihot_fields:
            per_slot = self.multihot_slot_weights(batch.multihot, table.fused_weight.dtype)
            if scale is not None:
                per_slot = scale[:, ns:].unsqueeze(-1) * per_slot
            lookups.append(Lookup(batch.multihot, per_slot, pooled=True))
        if not lookups:
            return table.fused_weight.new_zeros(self._batch_size(batch), 0,
                                                table.fused_weight.shape[1])
        parts = table.lookup(lookups)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _batch_size(self, batch) -> int:
        return int(batch.label.shape[0])

    def flat_input(self, fields: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
        """The MLP / cross input: flattened field vectors, then the dense values."""
        x = fields.flatten(1)
        if self.dense_fields:
            x = torch.cat([x, dense.to(x.dtype)], dim=1)
        return x

    # ----- the stack ----------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names of the parameterised layers in forward order (the layer-gate order)."""
        return list(self.layers.keys())

    def apply_own_layer(self, name: str, *inputs):
        return self.layers[name](*inputs)

    def interact(self, fields, first_order, dense, apply) -> torch.Tensor:
        """The interaction stack: logits from field vectors; each model class defines its own.

        ``apply(name, *inputs)`` runs layer ``name`` (the transfer models pass a gated one).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define its interaction stack")

    def forward(self, batch) -> torch.Tensor:
        """Logits ``[B]`` (pre-sigmoid) for a batch with ``sparse``, ``multihot``, ``dense``."""
        fields = self.field_vectors(batch, self.embedding)
        first = self.field_vectors(batch, self.linear) if self.linear is not None else None
        return self.interact(fields, first, batch.dense, self.apply_own_layer)

    def _add_mlp(self, in_dim: int) -> int:
        for i, width in enumerate(self.config.hidden_units):
            self.layers[f"mlp_{i}"] = MLPLayer(in_dim, width, self.config)
            in_dim = width
        return in_dim

    def _run_mlp(self, x, apply):
        for i in range(len(self.config.hidden_units)):
            x = apply(f"mlp_{i}", x)
        return x

    def extra_repr(self) -> str:
        return (f"fields={self.num_fields}, dense={len(self.dense_fields)}, rows={self.num_rows}, "
                f"dim={self.config.embedding_dim}")


class DNN(BaseCTRModel):
    """Embeddings -> MLP -> output layer."""

    model_name = "dnn"

    def __init__(self, feature_map, cfg: ModelConfig):
        super().__init__(feature_map, cfg)
        self.layers["output"] = OutputLayer(self._add_mlp(self.flat_dim))

    def interact(self, fields, first_order, dense, apply):
        return apply("output", self._run_mlp(self.flat_input(fields, dense), apply))


class DeepFM(BaseCTRModel):
    """First-order weights + FM over the field vectors + MLP, all on one embedding table.

    logit = sum_i w[x_i] + sum_{i<j} <e_i, e_j> + MLP(e); the global bias is the output
    layer's bias.
    """

    model_name = "deepfm"

    def __init__(self, feature_map, cfg: ModelConfig):
        super().__init__(feature_map, cfg)
        self.linear = EmbeddingTable(self.num_rows, 1)
        nn.init.zeros_(self.linear.weight)
        self.layers["output"] = OutputLayer(self._add_mlp(self.flat_dim))

    def interact(self, fields, first_order, dense, apply):
        square_of_sum = fields.sum(dim=1).pow(2)
        sum_of_square = fields.pow(2).sum(dim=1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(dim=1)
        deep = apply("output", self._run_mlp(self.flat_input(fields, dense), apply))
        return first_order.sum(dim=(1, 2)) + fm + deep


class DCNv2(BaseCTRModel):
    """DCN-v2: full-rank cross network and MLP, ``parallel`` (default) or ``stacked``."""

    model_name = "dcnv2"

    def __init__(self, feature_map, cfg: ModelConfig):
        super().__init__(feature_map, cfg)
        d0 = self.flat_dim
        for i in range(cfg.cross_layers):
            self.layers[f"cross_{i}"] = CrossLayerV2(d0)
        if cfg.structure == "parallel":
            mlp_out = self._add_mlp(d0) if cfg.hidden_units else 0
            out_dim = (d0 if cfg.cross_layers else 0) + mlp_out
        else:
            out_dim = self._add_mlp(d0)
        # The output layer is created last so that it is last in layer_names.
        self.layers["output"] = OutputLayer(out_dim)

    def interact(self, fields, first_order, dense, apply):
        x0 = self.flat_input(fields, dense)
        cross = x0
        for i in range(self.config.cross_layers):
            cross = apply(f"cross_{i}", x0, cross)
        if self.config.structure == "stacked":
            return apply("output", self._run_mlp(cross, apply))
        parts = [cross] if self.config.cross_layers else []
        if self.config.hidden_units:
            parts.append(self._run_mlp(x0, apply))
        return apply("output", torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


_MODELS = {"dnn": DNN, "deepfm": DeepFM, "dcnv2": DCNv2}


def build_base_model(feature_map, model_cfg: dict | ModelConfig | None) -> BaseCTRModel:
    """Build the base CTR model named by ``model_cfg['name']`` (dnn | deepfm | dcnv2).

    ``feature_map`` is the data's FeatureMap (fields, shared table size); ``model_cfg`` the
    ``model:`` section (see :class:`ModelConfig` for keys and defaults).

    Example::

        >>> from autoft_fast.models import build_base_model
        >>> model = build_base_model(bundle.feature_map, {"name": "deepfm", "embedding_dim": 8})
        >>> logits = model(batch)          # [B], pre-sigmoid
    """
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    return _MODELS[cfg.name](feature_map, cfg)
