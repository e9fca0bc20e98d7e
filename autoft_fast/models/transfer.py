"""Transfer models: the nine strategies of the AutoFT experiments over one pre-trained model.

What each strategy keeps where (``net`` is the copy that is trained on the target,
``frozen_net`` a copy that never changes, ``field_embedding`` a GatedEmbedding that holds
the frozen and the tuned table):

| strategy         | embeddings                         | interaction stack + output layer |
| ---------------- | ---------------------------------- | -------------------------------- |
| target_only      | fresh, trained                     | fresh, trained                   |
| source_only      | pre-trained, fixed                 | pre-trained, fixed               |
| finetune_all     | trained                            | trained                          |
| freeze_embedding | fixed                              | trained                          |
| freeze_dnn       | trained                            | fixed                            |
| l2sp             | trained, L2-SP penalty             | trained, L2-SP penalty           |
| autoft_layer     | trained (``ungated: tune``)        | per-instance gate frozen / tuned |
| autoft_field     | per-instance, per-field gate       | trained (``ungated: tune``)      |
| autoft           | per-instance, per-field gate       | per-instance gate frozen / tuned |

"Embeddings" are every feature-indexed table: the shared embedding table and DeepFM's
first-order weights (a width-1 embedding). The "interaction stack" is every other
parameter: MLP layers, cross layers, and the output layer, which holds the global bias,
so ``freeze_dnn`` trains the embeddings only and ``freeze_embedding`` trains everything
else. A fixed part also keeps its batch-norm statistics and runs without dropout (it is
always in eval mode): frozen means a fixed function, bit for bit.

Gates. Field gates use the fused op through ``GatedEmbedding`` for single-valued fields.
A multi-hot field has one gate per (instance, field) but several lookups: its non-PAD slots
form one bag, gated by the bag op (``GatedEmbedding.bag``, mean pooling), which pools the
frozen rows and the tuned rows separately and mixes the two pooled vectors by the bag's gate.
(With a fused optimizer on a table that has multi-hot fields -- the bag op fuses none -- the
single-valued lookups and the bags' values go through one call of the gated op, each value
with its bag's logits and uniform, and the values' rows are then mean-pooled: the op's
backward takes one optimizer step per training step, and the bags' gates and gradients are
the bag op's.)
DeepFM's first-order weights follow their field's embedding gate: the op's returned gates
mix the frozen and tuned first-order rows (the gradient reaches the logits through the
gates' straight-through rule). Every gated layer (``mlp_<i>``, ``cross_<i>``, ``output``)
runs both copies on the same input and mixes per instance: h = u0 * frozen(x) + u1 *
tuned(x); with hard gates that is exactly one of the two. (Computing both is the simple
choice; a tuned batch-norm layer therefore sees the whole batch for its statistics.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.strategies import FIELD_GATED, LAYER_GATED, STRATEGIES, STRATEGY_TABLE
from ..modules import FusedTableMixin, GatedEmbedding, freeze_as_buffers, fused_tables
from ..ops import gumbel_gates, memory
from ..ops import philox
from .base import BaseCTRModel, build_base_model
from .config import AutoFTConfig, ModelConfig
from .frequency import FrequencyRule, ValueFrequencies
from .policy import PolicyNetwork

__all__ = ["FIELD_GATED", "LAYER_GATED", "STRATEGIES", "TransferModel", "build_transfer_model"]

# A logit margin no Gumbel sample can overturn (a logistic sample from a 31-bit uniform is
# at most ~21.5 in size), used by force_gates.
_FORCE_MARGIN = 1.0e4


def _copy(pretrained: BaseCTRModel) -> BaseCTRModel:
    """A deep copy without the gradients the pre-training may have left on the parameters;
    its large tables in memory advised for huge pages (autoft_fast.ops.memory)."""
    clone = memory.deepcopy_module(pretrained)
    for p in clone.parameters():
        p.grad = None
    return clone


def _freeze(module: nn.Module | None) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(False)


class TransferModel(nn.Module):
    """One transfer strategy over a pre-trained base model; ``forward(batch) -> logits [B]``.

    Build with :func:`build_transfer_model`. Besides ``forward``:

    - ``parameter_groups()`` -> ``{'model': [...], 'policy': [...]}`` trainable parameters
      (give each group its own optimizer / learning rate);
    - ``penalty()`` -> scalar to add to the BCE loss after a training forward: the L2-SP
      term (``l2sp``) and the tuned-fraction term (AutoFT with ``tuned_penalty`` > 0);
    - ``set_tau(t)`` / ``tau``: the Gumbel-softmax temperature (see ``tau_at``);
    - ``reset_policy_stats()`` / ``policy_stats()``: the fraction of instances that chose
      the tuned path per field and per layer, over the eval-mode forwards since the reset;
    - ``force_gates('frozen' | 'tuned' | None)``: override the policy (diagnostics, tests);
    - ``last_gates``: ``{'field': [B, F, 2] | None, 'layer': [B, L, 2] | None}``, the gate
      values of the last forward (field order ``field_gate_names``, layers ``layer_gate_names``).
    """

    def __init__(self, strategy: str, pretrained: BaseCTRModel | None, feature_map,
                 model_cfg: ModelConfig, cfg: AutoFTConfig, value_counts=None):
        super().__init__()
        self.strategy = strategy
        self.autoft_config = cfg
        self._tau = float(cfg.tau)
        self.embedding_optimizer = cfg.embedding_optimizer  # read by the Trainer
        self._forced: str | None = None
        # _gated_apply: skip the frozen layer's backward when no instance of the batch takes
        # it (an exact shortcut; False computes the zero contributions, for tests).
        self.skip_unused_frozen_backward = True
        self._policy_fixed = False  # fix_policy()
        self.frozen_net: BaseCTRModel | None = None
        self.field_embedding = None
        self.field_linear = None
        self.policy: PolicyNetwork | None = None
        self._fixed: list[str] = []  # submodules kept in eval mode (frozen functions)

        row = STRATEGY_TABLE[strategy]
        self.strategy_row = row
        embeddings = row.part("embeddings", cfg.ungated)
        stack = row.part("stack", cfg.ungated)
        if row.fresh:
            self.net = build_base_model(feature_map, model_cfg)
        else:
            self.net = _copy(pretrained)
            for p in self.net.parameters():
                p.requires_grad_(True)
        net = self.net
        self.field_gate_names = list(net.field_names) if embeddings == "gated" else []
        self.layer_gate_names = list(net.layer_names) if stack == "gated" else []

        if embeddings == "frozen" and stack == "frozen":
            _freeze(net)
            self._fixed.append("net")
        elif embeddings == "frozen":
            self._freeze_embeddings()
        elif stack == "frozen":
            self._freeze_stack()
        if row.l2sp or stack == "gated":
            # The layer gates' frozen path, or the L2-SP penalty's anchor.
            # Buffers, not parameters: no "unfreeze all" can make the frozen copy trainable.
            self.frozen_net = freeze_as_buffers(_copy(pretrained))
            self._fixed.append("frozen_net")

        if embeddings == "gated":
            self.field_embedding = GatedEmbedding.from_pretrained(
                pretrained.embedding.weight, sparse=cfg.sparse, backend=cfg.backend,
                frozen_dtype=cfg.frozen_dtype)
            if pretrained.linear is not None:
                self.field_linear = GatedEmbedding.from_pretrained(
                    pretrained.linear.weight, sparse=cfg.sparse, backend=cfg.backend)
            # The gated tables replace the plain ones: no third copy of the big table.
            net.embedding = None
            net.linear = None
            if self.frozen_net is not None:
                self.frozen_net.embedding = None
                self.frozen_net.linear = None
        elif self.frozen_net is not None and stack == "gated":
            # The policy reads the frozen embeddings; the frozen first-order table is unused.
            self.frozen_net.linear = None

        num_gates = len(self.field_gate_names) + len(self.layer_gate_names)
        self.value_frequencies: ValueFrequencies | None = None
        if num_gates and "freq" in cfg.policy_input:
            if value_counts is None:
                raise ValueError(f"autoft.policy_input = {cfg.policy_input!r} needs the value "
                                 "counts of the source and target training rows: pass "
                                 "value_counts=(source_counts, target_counts) (see "
                                 "autoft_fast.models.frequency.count_rows)")
            self.value_frequencies = ValueFrequencies(*value_counts)
        self.frequency_rule: FrequencyRule | None = None
        if self.field_gate_names and cfg.field_policy == "frequency":
            # Without value_counts every field lookup takes the tuned row (threshold 0 knows
            # no rare value); the runner passes the target's counts and sets the threshold.
            self.frequency_rule = FrequencyRule(None if value_counts is None else value_counts[1])
        if num_gates:
            width = _POLICY_INPUT_WIDTH[cfg.policy_input](net)
            self.policy = PolicyNetwork(width, cfg.policy_hidden_units, num_gates,
                                        init_tuned=cfg.policy_init_tuned)
            self.policy.to(next(net.parameters()).device)
        self._l2sp_names = [n for n, p in net.named_parameters() if p.requires_grad] \
            if row.l2sp else []
        if row.l2sp:  # used only when a table is fused-updated (fused_optim.fused_lookup)
            for name in ("embedding", "linear"):
                table = getattr(net, name)
                if isinstance(table, FusedTableMixin):
                    # By module and name: load_state_dict(assign=True) puts a new
                    # Parameter there, which a tensor held here would not follow.
                    table.set_l2sp((getattr(self.frozen_net, name), "weight"), cfg.l2sp_alpha)
        self._last_tuned_fraction: torch.Tensor | None = None
        self.last_gates: dict[str, torch.Tensor | None] = {"field": None, "layer": None}
        self.reset_policy_stats()
        self.train()

    # ----- construction helpers ------------------------------------------------------------
    def _freeze_embeddings(self) -> None:
        _freeze(self.net.embedding)
        _freeze(self.net.linear)

    def _freeze_stack(self) -> None:
        _freeze(self.net.layers)
        self._fixed.append("net.layers")

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._fixed:
            self.get_submodule(name).eval()
        return self

    # ----- public API ----------------------------------------------------------------------
    @property
    def tau(self) -> float:
        """The current Gumbel-softmax temperature."""
        return self._tau

    def set_tau(self, tau: float) -> None:
        """Set the temperature used by the next forwards (the trainer's schedule calls this).

        Example::

            >>> model.set_tau(tau_at(autoft_cfg, epoch / max(1, epochs - 1)))
        """
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 \
                or tau == float("inf"):
            raise ValueError(f"tau = {tau!r} must be a finite number > 0")
        self._tau = float(tau)

    def force_gates(self, path: str | None) -> None:
        """Send every gate to ``'frozen'`` or ``'tuned'``, or back to the policy (``None``).

        With ``'frozen'`` an ``autoft`` model computes exactly the pre-trained model.
        """
        if path not in (None, "frozen", "tuned"):
            raise ValueError(f"path = {path!r} is not one of None, 'frozen', 'tuned'")
        self._forced = path

    def fix_policy(self) -> None:
        """Freeze the policy: its parameters stop training, it runs in eval mode, and the
        gates are its noise-free choices in training too (what evaluation uses with
        ``eval_gates: argmax``). The second stage of ``policy_refit: retrain`` trains the model
        under the choices found in the first, as DARTS retrains the architecture it found.

        Example::

            >>> model.fix_policy()
            >>> model.parameter_groups()["policy"]
            []
        """
        if self.policy is None:
            raise ValueError(f"strategy {self.strategy!r} has no policy to fix")
        for p in self.policy.parameters():
            p.requires_grad_(False)
        self._policy_fixed = True
        if "policy" not in self._fixed:
            self._fixed.append("policy")
        self.train(self.training)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: ``'model'`` (CTR model copies) and ``'policy'``.

        Example::

            >>> groups = model.parameter_groups()
            >>> opt = torch.optim.AdamW(groups["model"], lr=1e-3)
            >>> policy_opt = torch.optim.Adam(groups["policy"], lr=1e-2) if groups["policy"] else None
        """
        policy_ids = {id(p) for p in self.policy.parameters()} if self.policy is not None else set()
        model = [p for p in self.parameters() if p.requires_grad and id(p) not in policy_ids]
        policy = [p for p in self.policy.parameters() if p.requires_grad] \
            if self.policy is not None else []
        return {"model": model, "policy": policy}

    def penalty(self) -> torch.Tensor:
        """Regularisers to add to the BCE loss of the last training forward (0 when none)."""
        ref = next(self.parameters())
        total = ref.new_zeros(())
        if self._l2sp_names:
            sq = ref.new_zeros(())
            # A fused-updated table takes its L2-SP term inside its update (lazy L2-SP).
            fused = {id(m.fused_weight) for m in fused_tables(self.net)}
            for name in self._l2sp_names:
                if id(self.net.get_parameter(name)) in fused:
                    continue
                w = self.net.get_parameter(name)
                sq = sq + (w - self.frozen_net.get_buffer(name)).pow(2).sum()
            total = total + 0.5 * self.autoft_config.l2sp_alpha * sq
        frac, cfg = self._last_tuned_fraction, self.autoft_config
        if frac is not None and cfg.tuned_penalty > 0:
            total = total + cfg.tuned_penalty * frac
        if frac is not None and cfg.tuned_budget is not None and cfg.tuned_budget_weight > 0:
            total = total + cfg.tuned_budget_weight * torch.relu(frac - cfg.tuned_budget)
        return total

    def reset_policy_stats(self) -> None:
        """Start a new count of the gate choices made by eval-mode forwards."""
        self._stat_tuned: torch.Tensor | None = None
        self._stat_count = 0

    def policy_stats(self) -> dict[str, dict[str, float]]:
        """Fraction of instances whose gate chose the tuned path, per field and per layer
        (with soft gates, ``hard: false``, the mean weight of the tuned path).

        Counts the eval-mode forwards since ``reset_policy_stats()``; ``{'field': {},
        'layer': {}}`` when the strategy has no policy or nothing was counted yet.

        Example::

            >>> model.eval(); model.reset_policy_stats()
            >>> for batch in iterate_batches(test, 4096, shuffle=False): model(batch)
            >>> model.policy_stats()["field"]      # {'user_id': 0.31, 'item_id': 0.87, ...}
        """
        if self._stat_tuned is None or not bool((self._stat_count > 0).any()):
            return {"field": {}, "layer": {}}
        # A field whose every counted bag was empty has no choice to report: NaN.
        frac = (self._stat_tuned / self._stat_count).tolist()
        nf = len(self.field_gate_names)
        return {"field": dict(zip(self.field_gate_names, frac[:nf])),
                "layer": dict(zip(self.layer_gate_names, frac[nf:]))}

    # ----- forward -------------------------------------------------------------------------
    def forward(self, batch) -> torch.Tensor:
        """Logits ``[B]`` (pre-sigmoid) of the strategy's model for ``batch``."""
        if self.policy is None:
            return self.net(batch)
        net, cfg = self.net, self.autoft_config
        # Training draws noise until the policy is fixed (then its noise-free choices train
        # the model, whatever eval_gates says); evaluation draws only with eval_gates: sample.
        noise = (not self._policy_fixed) if self.training else cfg.eval_gates == "sample"
        logits = self._policy_logits(batch)
        # Single-valued fields are gated inside the fused op, multi-hot fields inside the bag
        # op, layers by gumbel_gates; the last two share one noise stream over their gates.
        ns = len(net.single_fields) if self.field_embedding is not None else 0
        nm = len(net.multihot_fields) if self.field_embedding is not None else 0
        # One seed for the multi-hot and layer gates (logit order): they draw exactly what one
        # gumbel_gates call over both would, whichever path pools the bags.
        uniforms = None
        if noise and logits.shape[1] > ns:
            seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
            uniforms = philox.uniforms(seed, (logits.shape[0], logits.shape[1] - ns),
                                       device=logits.device)
        other = None
        if logits.shape[1] > ns + nm:
            other = gumbel_gates(logits[:, ns + nm:], tau=self._tau, hard=cfg.hard, noise=noise,
                                 uniforms=None if uniforms is None else uniforms[:, nm:])
        gates = []

        if self.field_embedding is not None:
            fields, first, field_gates = self._gated_fields(
                batch, logits[:, :ns], logits[:, ns:ns + nm],
                None if uniforms is None else uniforms[:, :nm], noise)
            gates.append(field_gates)
        else:
            fields = net.field_vectors(batch, net.embedding)
            first = net.field_vectors(batch, net.linear) if net.linear is not None else None

        if self.layer_gate_names:
            layer_gates = other
            gates.append(layer_gates)
            apply = self._gated_apply(layer_gates)
        else:
            apply = net.apply_own_layer

        out = net.interact(fields, first, batch.dense, apply)
        # Kept for inspection (tests, debugging): the forward gate values of this batch,
        # detached (a graph kept here would live until the next forward and make the model
        # refuse copy.deepcopy).
        self.last_gates = {"field": gates[0].detach() if self.field_embedding is not None
                           else None,
                           "layer": gates[-1].detach() if self.layer_gate_names else None}
        self._record(gates, batch)
        return out

    def _frozen_input(self, batch) -> torch.Tensor:
        # policy_input "frozen": the instance's pre-trained field vectors and dense values.
        if self.field_embedding is not None:
            frozen = self.net.field_vectors(batch, self.field_embedding.frozen_table())
        else:
            frozen = self.frozen_net.field_vectors(batch, self.frozen_net.embedding.weight)
        return self.net.flat_input(frozen, batch.dense)

    def _policy_logits(self, batch) -> torch.Tensor:
        with torch.no_grad():  # detached: the policy's input does not move with the tuned copy
            x = _POLICY_INPUTS[self.autoft_config.policy_input](self, batch)
        if self._forced is None:
            # float32 whatever the autocast: the gated ops take float32 logits.
            logits = self.policy(x).float()
            if self.frequency_rule is not None:
                # A lookup of a value the target saw at most k times: the frozen row, by a
                # margin no noise overturns; every other field gate: the network's.
                nf = len(self.field_gate_names)
                allowed = self.frequency_rule.tuned(batch, self.net)
                if allowed.device.type == "cpu" and bool(allowed.all()):
                    # Nothing to force (at k = 0 every value of a training batch was seen):
                    # the logits as they are, which is what the multiply-add gives then.
                    # (CPU only: on a GPU the test would wait for the device.)
                    return logits
                # logits * keep + (1 - keep) * frozen, keep = 1 on the layer gates: the values
                # (and gradients) of torch.where(allowed, logits, frozen) for finite logits,
                # in a third of its time (where broadcast a bool mask, then a cat copied).
                keep = logits.new_ones(logits.shape[0], logits.shape[1], 1)
                keep[:, :nf, 0] = allowed
                frozen = torch.tensor([_FORCE_MARGIN, -_FORCE_MARGIN], dtype=logits.dtype,
                                      device=logits.device)
                logits = torch.addcmul((1.0 - keep) * frozen, logits, keep)
            return logits
        sign = 1.0 if self._forced == "tuned" else -1.0
        logits = x.new_empty(x.shape[0], self.policy.num_gates, 2)
        logits[..., 0] = -sign * _FORCE_MARGIN
        logits[..., 1] = sign * _FORCE_MARGIN
        return logits

    def set_frequency_threshold(self, k: float) -> None:
        """With ``autoft.field_policy: frequency``: the count at or below which a field's
        lookup takes the frozen row (see :class:`~autoft_fast.models.frequency.FrequencyRule`).

        Example::

            >>> model.set_frequency_threshold(30)
        """
        if self.frequency_rule is None:
            raise ValueError(f"strategy {self.strategy!r} has no frequency field policy "
                             "(autoft.field_policy: frequency, field-gated strategies only)")
        self.frequency_rule.set_threshold(k)

    def _gated_fields(self, batch, single_logits, multihot_logits, multihot_uniforms, noise: bool):
        net, cfg = self.net, self.autoft_config
        emb = self.field_embedding
        ns = len(net.single_fields)
        if emb.fused_optimizer is not None and net.multihot_fields and self._fused_bags_in_op():
            fields, field_gates = self._fused_fields_in_op(batch, single_logits, multihot_logits,
                                                           multihot_uniforms, noise)
        elif emb.fused_optimizer is not None and net.multihot_fields:
            # The readable form of the route above (the tests check that the two agree):
            # every lookup of the tuned copy goes through one fused lookup (one optimizer step
            # per training step on the table), scaled by its gate as the first-order rows
            # below are; gates from gumbel_gates.
            field_gates = torch.cat(
                (gumbel_gates(single_logits, tau=self._tau, hard=cfg.hard, noise=noise),
                 gumbel_gates(multihot_logits, tau=self._tau, hard=cfg.hard, noise=noise,
                              uniforms=multihot_uniforms)), dim=1)
            frozen = net.field_vectors(batch, emb.frozen_table())
            fields = field_gates[..., 0:1] * frozen + net.field_vectors(
                batch, emb, scale=field_gates[..., 1])
        else:
            parts, gates = [], []
            if ns:
                out, g = emb(batch.sparse, single_logits, tau=self._tau, hard=cfg.hard,
                             noise=noise)
                parts.append(out)
                gates.append(g)
            if net.multihot_fields:
                # One gate per (instance, field) for a whole bag: see the module docstring.
                out, g = self._gated_bags(batch.multihot, multihot_logits, multihot_uniforms,
                                          noise)
                parts.append(out)
                gates.append(g)
            fields = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            field_gates = torch.cat(gates, dim=1) if len(gates) > 1 else gates[0]
        first = None
        if self.field_linear is not None:
            lin = self.field_linear
            frozen = net.field_vectors(batch, lin.frozen_weight)
            tuned = net.field_vectors(batch, lin, sparse=lin.sparse, scale=field_gates[..., 1])
            first = field_gates[..., 0:1] * frozen + tuned
        return fields, first, field_gates

    def _fused_bags_in_op(self) -> bool:
        """True: with a fused optimizer and multi-hot fields, every field lookup goes through
        one call of the gated op (:meth:`_fused_fields_in_op`); False: the gates from
        ``gumbel_gates`` and the tuned rows from a plain fused lookup. The tests switch."""
        return True

    def _fused_fields_in_op(self, batch, single_logits, multihot_logits, multihot_uniforms,
                            noise: bool):
        """``(fields [B, F, D], gates [B, F, 2])`` with a fused optimizer and multi-hot fields.

        The optimizer takes one step per training step on the table, so the single-valued
        lookups and the bags' values go through one call of the gated op (its backward
        updates the table once). A bag's values each get the bag's logits and the bag's
        uniform, so all draw the bag's gate; their rows are then mean-pooled (as
        ``pool_multihot`` pools), and the straight-through gradient of the bag's logits, the
        sum over its values, is the bag op's. The bags' gates themselves (also of empty bags)
        come from ``gumbel_gates`` with the same logits and uniforms: the same values. The
        singles' uniforms are drawn as ``gumbel_gates`` would draw them, so this route gives
        the gates of the route it replaced.
        """
        net, cfg, emb = self.net, self.autoft_config, self.field_embedding
        b, nm = multihot_logits.shape[:2]
        ns = single_logits.shape[1]
        values, offsets = net.multihot_bags(batch.multihot)
        counts = offsets[1:] - offsets[:-1]
        bag_ids = torch.repeat_interleave(torch.arange(b * nm, device=values.device), counts,
                                          output_size=values.shape[0])
        bag_gates = gumbel_gates(multihot_logits, tau=self._tau, hard=cfg.hard, noise=noise,
                                 uniforms=multihot_uniforms)
        indices = [values]
        logits = [multihot_logits.reshape(b * nm, 2)[bag_ids]]
        uniforms = None
        if noise:
            if multihot_uniforms is None:  # the bags' stream, as gumbel_gates drew it above
                raise ValueError("the multi-hot gates' uniforms are needed with noise")
            uniforms = [multihot_uniforms.reshape(-1)[bag_ids]]
        if ns:
            indices.insert(0, batch.sparse.reshape(-1))
            logits.insert(0, single_logits.reshape(b * ns, 2))
            if noise:
                seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
                uniforms.insert(0, philox.uniforms(seed, (b * ns,), device=values.device))
        out, gates = emb(torch.cat(indices), torch.cat(logits), tau=self._tau, hard=cfg.hard,
                         noise=noise, uniforms=None if uniforms is None else torch.cat(uniforms))
        dim = emb.embedding_dim
        rows = out[b * ns:]
        per_value = 1.0 / counts.clamp_min(1).to(rows.dtype)[bag_ids]
        pooled = rows.new_zeros(b * nm, dim).index_add(0, bag_ids, rows * per_value[:, None])
        pooled = pooled.view(b, nm, dim)
        if not ns:
            return pooled, bag_gates
        return (torch.cat((out[:b * ns].view(b, ns, dim), pooled), dim=1),
                torch.cat((gates[:b * ns].view(b, ns, 2), bag_gates), dim=1))

    def _bags_in_op(self) -> bool:
        """True: multi-hot fields go through the bag op. The eager formula of ``_gated_bags``
        (``pool_multihot`` of each table, mixed by ``gumbel_gates``) is the readable statement
        of what the op computes; the tests switch to it to check that the two agree."""
        return True

    def _gated_bags(self, ids, logits, uniforms, noise: bool):
        """``(out [B, F_multi, D], gates [B, F_multi, 2])`` of the multi-hot ids ``[B, F_multi, L]``.

        One gate per (instance, field) bag from ``logits`` ``[B, F_multi, 2]`` (``uniforms``:
        its noise, or None); the bag's frozen rows and tuned rows are mean-pooled separately
        and mixed by the gate. Both routes compute the same values: the pooling is one
        computation (``BaseCTRModel.pool_multihot``), the gates one formula and noise.
        """
        net, cfg, emb = self.net, self.autoft_config, self.field_embedding
        b, nm = logits.shape[:2]
        if self._bags_in_op():
            values, offsets = net.multihot_bags(ids)
            out, g = emb.bag(values, offsets, logits.reshape(b * nm, 2), mode="mean",
                             tau=self._tau, hard=cfg.hard, noise=noise,
                             uniforms=None if uniforms is None else uniforms.reshape(-1))
            return out.view(b, nm, emb.embedding_dim), g.view(b, nm, 2)
        g = gumbel_gates(logits, tau=self._tau, hard=cfg.hard, noise=noise, uniforms=uniforms)
        frozen = net.pool_multihot(ids, emb.frozen_table())
        tuned = net.pool_multihot(ids, emb.tuned_weight, sparse=emb.sparse)
        return g[..., 0:1] * frozen + g[..., 1:2] * tuned, g

    def _gated_apply(self, layer_gates):
        index = {name: i for i, name in enumerate(self.layer_gate_names)}
        frozen_layers, tuned_layers = self.frozen_net.layers, self.net.layers

        def apply(name, *inputs):
            u = layer_gates[:, index[name]]
            if self.skip_unused_frozen_backward and torch.is_grad_enabled() \
                    and u.device.type == "cpu" and not bool(u[:, 0].any()):
                # No instance takes the frozen layer: its output is needed only for the gate's
                # straight-through gradient, and what would flow back through it into the
                # inputs is u0 * ... = exactly 0, so autograd need not run its backward.
                # (CPU only: on a GPU the test would wait for the device every layer.)
                a = frozen_layers[name](*(t.detach() for t in inputs))
            else:
                a = frozen_layers[name](*inputs)
            b = tuned_layers[name](*inputs)
            shape = (-1,) + (1,) * (a.dim() - 1)
            return u[:, 0].view(shape) * a + u[:, 1].view(shape) * b

        return apply

    def _choice_mask(self, tuned: torch.Tensor, batch) -> torch.Tensor | None:
        """[B, G] bool: the gates that choose something (False for the field gate of an
        empty multi-hot bag); None when every gate does."""
        net = self.net
        if self.field_embedding is None or not net.multihot_fields:
            return None
        ns, nm = len(net.single_fields), len(net.multihot_fields)
        counted = torch.ones(tuned.shape, dtype=torch.bool, device=tuned.device)
        counted[:, ns:ns + nm] = (batch.multihot != net.multihot_pad.view(1, -1, 1)).any(dim=2)
        return counted

    def _record(self, parts: list, batch) -> None:
        """``parts``: the batch's gate tensors [B, G_i, 2] (fields, then layers), joined only
        where they are used (a training step without a tuned penalty or budget needs none).
        In eval mode the choices are counted for ``policy_stats``; an empty multi-hot bag
        has no row to choose and is not counted for its field."""
        if self.training:
            # Only kept when it is used: it holds the batch's autograd graph until the next step.
            cfg = self.autoft_config
            wanted = cfg.tuned_penalty > 0 or cfg.tuned_budget is not None
            self._last_tuned_fraction = None
            if wanted:
                # The fraction of real choices, as policy_stats counts them: the gate of an
                # empty bag chooses nothing and would only put a gradient on its logits.
                tuned = _joined(parts)[..., 1]
                mask = self._choice_mask(tuned, batch)
                self._last_tuned_fraction = tuned.mean() if mask is None else (
                    (tuned * mask).sum() / mask.sum().clamp(min=1))
            return
        gates = _joined(parts)
        self._last_tuned_fraction = None
        # The tuned weight of each choice: 0 or 1 with hard gates; with soft gates
        # (autoft.hard: false) the share the tuned path really has in the output, where a
        # count of weights above 0.5 would call a 50/50 mix "tuned".
        picked = gates[..., 1].to(torch.float64)                            # [B, G]
        counted = self._choice_mask(picked, batch)
        if counted is not None:
            picked = picked * counted
        chosen = picked.sum(dim=0)
        seen = (counted.sum(dim=0).to(torch.float64) if counted is not None
                else torch.full_like(chosen, float(gates.shape[0])))
        if self._stat_tuned is None or self._stat_tuned.device != chosen.device:
            self._stat_tuned = torch.zeros_like(chosen)
            self._stat_count = torch.zeros_like(chosen)
        self._stat_tuned += chosen
        self._stat_count += seen

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, tau={self._tau}"


def _joined(parts: list) -> torch.Tensor:
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _freq_input(model: TransferModel, batch) -> torch.Tensor:
    return model.value_frequencies(batch, model.net)


# What the policy network reads, by autoft.policy_input (AutoFTConfig declares the choices),
# and how wide that input is for a base model.
_POLICY_INPUTS = {
    "frozen": TransferModel._frozen_input,
    "freq": _freq_input,
    "frozen+freq": lambda m, b: torch.cat((TransferModel._frozen_input(m, b),
                                           _freq_input(m, b)), dim=1),
}
_POLICY_INPUT_WIDTH = {
    "frozen": lambda net: net.flat_dim,
    "freq": lambda net: ValueFrequencies.width(net.num_fields),
    "frozen+freq": lambda net: net.flat_dim + ValueFrequencies.width(net.num_fields),
}


def _check_pretrained(pretrained, feature_map, model_cfg: ModelConfig, strategy: str) -> None:
    if pretrained is None:
        raise ValueError(f"strategy = {strategy!r} needs a pre-trained model, got pretrained = None")
    if not isinstance(pretrained, BaseCTRModel):
        raise TypeError(f"pretrained must be a BaseCTRModel (from build_base_model), "
                        f"got {type(pretrained).__name__}")
    if pretrained.num_rows != int(feature_map.num_rows):
        raise ValueError(f"pretrained has {pretrained.num_rows} embedding rows but "
                         f"feature_map.num_rows = {feature_map.num_rows}")
    names = list(feature_map.single_fields) + list(feature_map.multihot_fields)
    if pretrained.field_names != names or pretrained.dense_fields != list(feature_map.dense_fields or []):
        raise ValueError(f"pretrained was built for fields {pretrained.field_names} (dense "
                         f"{pretrained.dense_fields}), feature_map has {names} (dense "
                         f"{list(feature_map.dense_fields or [])})")
    diff = {k: (getattr(pretrained.config, k), getattr(model_cfg, k)) for k in model_cfg.arch_keys()
            if getattr(pretrained.config, k) != getattr(model_cfg, k)}
    if diff:
        raise ValueError("pretrained model and model config disagree on "
                         + ", ".join(f"{k} (pretrained {a!r}, config {b!r})" for k, (a, b) in diff.items()))


def build_transfer_model(strategy: str, pretrained: BaseCTRModel | None, feature_map,
                         model_cfg: dict | ModelConfig | None,
                         autoft_cfg: dict | AutoFTConfig | None = None, *,
                         value_counts=None) -> TransferModel:
    """Build the model of one transfer strategy (see ``STRATEGIES``) on the target domain.

    ``pretrained`` (the source-trained base model) is copied, never modified; it may be None
    only for ``target_only``, which ignores it and builds a fresh base model from
    ``model_cfg`` (initialised from torch's RNG: seed first). For the other strategies the
    architecture keys of ``model_cfg`` must match the pre-trained model's.
    ``autoft_cfg`` is the ``autoft:`` section (:class:`AutoFTConfig`). ``value_counts`` =
    ``(source_counts, target_counts)``, each ``[num_rows]`` (see
    :func:`~autoft_fast.models.frequency.count_rows`), is needed when ``policy_input``
    includes ``freq``.

    The tables train with ordinary gradients (your optimizer) as built: ``autoft.
    embedding_optimizer`` (fused lazy Adam by default) is applied by the library's
    :class:`~autoft_fast.train.Trainer` when it trains the model. In your own loop call
    ``autoft_fast.modules.attach_fused_optimizers(model, model.embedding_optimizer, lr)`` to
    train as the CLI does (the fused tables then get no ``.grad``).

    Example::

        >>> pre = build_base_model(fmap, {"name": "dnn"})          # ... trained on the source
        >>> model = build_transfer_model("autoft", pre, fmap, {"name": "dnn"}, {"tau": 5.0})
        >>> groups = model.parameter_groups()                       # {'model': [...], 'policy': [...]}
        >>> loss = F.binary_cross_entropy_with_logits(model(batch), batch.label) + model.penalty()
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy = {strategy!r} is not one of {list(STRATEGIES)}")
    mcfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    acfg = autoft_cfg if isinstance(autoft_cfg, AutoFTConfig) else AutoFTConfig.from_dict(autoft_cfg)
    if STRATEGY_TABLE[strategy].needs_pretrained:
        _check_pretrained(pretrained, feature_map, mcfg, strategy)
        if STRATEGY_TABLE[strategy].field_policy and not pretrained.field_names:
            raise ValueError(f"strategy = {strategy!r} gates embedding fields, but the feature "
                             f"map has none (only dense fields {pretrained.dense_fields})")
        if strategy == "freeze_dnn" and not pretrained.field_names:
            raise ValueError(f"strategy = 'freeze_dnn' trains only the embedding tables, but "
                             f"the feature map has no embedded field (only dense fields "
                             f"{pretrained.dense_fields}): nothing would be trained")
    return TransferModel(strategy, pretrained, feature_map, mcfg, acfg, value_counts)
