"""Drop-in AutoFT: turn an existing pre-trained PyTorch CTR model into an AutoFT model.

``autoft(model)`` returns a wrapper ``nn.Module`` whose ``forward`` takes the same arguments
and returns the same output as ``model``. Inside it, every ``nn.Embedding`` and
``nn.EmbeddingBag`` (also inside ``nn.ModuleDict`` / ``nn.ModuleList``, one per field as
FuxiCTR and DeepCTR-Torch hold them) is replaced by a frozen pre-trained table plus a tuned
copy, and the interaction layers named by ``layers`` get a frozen and a tuned copy, mixed per
instance by a policy network. See docs/dropin.md for the design, its cost and a worked example.

How the policy gets its per-instance input without changing the user's ``forward``: the
wrapper runs the model twice per call on the same arguments.

1. Collect pass (``torch.no_grad()``, every module in eval mode, so no dropout draw and no
   BatchNorm statistics update): every embedding module returns its frozen rows and records
   them; gated layers run their frozen copy.
2. The policy input is, per embedding module, the mean of its frozen rows over all lookups of
   the instance in this call (for a bag: its frozen pooled vector), concatenated over the
   modules (detached). The policy returns two logits per instance for every gated embedding
   module ("field") and every gated layer.
3. Real pass: every gated module reads its logits. An embedding module's ``[B, 2]`` logits
   are broadcast over all its lookups of the instance (each lookup draws its own gate in
   training); hold one table per field to get one gate per field.
"""

from __future__ import annotations

import copy
import warnings
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.policy import PolicyNetwork
from .modules import GatedEmbedding, freeze_as_buffers
from .ops.fused_optim import Lookup
from .ops import gumbel_gates, validate


@dataclass(frozen=True)
class Strategy:
    """What a strategy does with the embedding modules and with the listed layers.

    Each of ``embeddings`` / ``layers`` is ``"gate"`` (frozen and tuned copy mixed by the
    policy), ``"tune"`` (trained) or ``"freeze"`` (kept at the pre-trained values).
    """

    embeddings: str
    layers: str
    l2sp: bool = False

    @property
    def has_policy(self) -> bool:
        return "gate" in (self.embeddings, self.layers)


#: The strategies ``autoft`` accepts (the same names and meaning as ``autoft_fast.models``).
#: Parameters that are neither an embedding nor a listed layer are trained in every strategy.
STRATEGIES: dict[str, Strategy] = {
    "finetune_all": Strategy("tune", "tune"),
    "freeze_embedding": Strategy("freeze", "tune"),
    "freeze_dnn": Strategy("tune", "freeze"),
    "l2sp": Strategy("tune", "tune", l2sp=True),
    "autoft_layer": Strategy("tune", "gate"),
    "autoft_field": Strategy("gate", "tune"),
    "autoft": Strategy("gate", "gate"),
}

FORCE_CHOICES = (None, "frozen", "tuned")
# Logit difference that decides a hard gate whatever the Gumbel noise (|noise| < 47).
_FORCE_MARGIN = 1e4


class _CallState:
    """What one wrapper ``forward`` call shares with its gated modules (not saved)."""

    def __init__(self, tau: float):
        self.tau = tau
        self.collecting = False
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.batch: int | None = None
        self.first: str | None = None
        self.logits: torch.Tensor | None = None
        self.gates: dict[str, torch.Tensor] = {}
        # Gates forced (force_gates): no Gumbel noise is drawn, so the global generator (and
        # every dropout mask after it) moves as in the original model.
        self.forced = False

    def noise(self, training: bool) -> bool:
        return training and not self.forced

    def check_batch(self, size: int, where: str) -> None:
        if self.batch is None:
            self.batch, self.first = size, where
        elif size != self.batch:
            raise ValueError(f"{where} sees a batch of {size} instances but {self.first} saw "
                             f"{self.batch}; every embedding module must be looked up with the "
                             f"batch as its first axis")

    def record(self, slot: int, rows: torch.Tensor, batch: int, per_instance: int,
               where: str) -> None:
        self.check_batch(batch, where)
        self.rows.setdefault(slot, []).append(rows.reshape(batch, per_instance, rows.shape[-1]))

    def logits_for(self, gate: int, where: str) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError(f"{where} was called outside the AutoFT wrapper's forward; "
                               f"call the wrapper returned by autoft(), not the inner model")
        return self.logits[:, gate]


class _Gated(nn.Module):
    """Common part of the modules that replace an embedding module or a layer."""

    def __init__(self, name: str, role: str, state: _CallState):
        super().__init__()
        # role: "gate", "tune" or "freeze" (the strategy's plan for this module). Not `mode`,
        # which an nn.EmbeddingBag's forward may read as its pooling mode.
        self.name, self.role = name, role
        self.gate = -1  # column of the policy output; set by the wrapper when gated
        self.slot = -1  # position in the policy input; embedding modules only
        object.__setattr__(self, "_state", state)  # shared, not a submodule, not saved


def _check_embedding_options(name: str, module: nn.Module) -> None:
    kind = type(module).__name__
    if module.max_norm is not None:
        raise NotImplementedError(f"{name}: {kind} max_norm = {module.max_norm} renormalises "
                                  f"the table in place and is not supported by autoft()")
    if module.scale_grad_by_freq:
        raise NotImplementedError(f"{name}: {kind} scale_grad_by_freq=True is not supported by "
                                  f"autoft()")
    base = nn.Embedding if isinstance(module, nn.Embedding) else nn.EmbeddingBag
    if type(module).forward is not base.forward:
        raise TypeError(f"{name}: {kind} is a subclass of nn.{base.__name__} with its own forward, "
                        f"which a gated table would not run; keep the lookup in a plain "
                        f"nn.{base.__name__} submodule of it (that one is then gated) and "
                        f"the rest of its forward around it")


class _EmbeddingAttributes:
    """The read-only attributes of ``nn.Embedding`` / ``nn.EmbeddingBag`` that a model's
    forward may read from its embedding module."""

    max_norm = None
    norm_type = 2.0
    scale_grad_by_freq = False

    @property
    def num_embeddings(self) -> int:
        return self.frozen_weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.frozen_weight.shape[1]


def _padding_refusal(name: str, padding_idx: int) -> str:
    return (f"{name}: padding_idx = {padding_idx} with a fused optimizer: the update in the "
            "backward would move the padding row, which nn.Embedding keeps; train this table "
            "with your optimizer (no use_fused_optimizer / attach_fused_optimizers on it)")


class GatedEmbeddingSlot(_EmbeddingAttributes, _Gated):
    """Stands in for an ``nn.Embedding``: same call ``(input) -> rows``, frozen and tuned table.

    Example::

        >>> import torch
        >>> from autoft_fast.dropin import autoft
        >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4)), strategy="autoft_field")
        >>> type(net.model[0]).__name__
        'GatedEmbeddingSlot'
    """

    def __init__(self, name, module: nn.Embedding, role, state, backend="auto", table=None):
        super().__init__(name, role, state)
        _check_embedding_options(name, module)
        # `table`: the GatedEmbedding of another module that holds the same weight (tied).
        self.table = table if table is not None else GatedEmbedding.from_pretrained(
            module.weight, sparse=module.sparse, backend=backend)
        self.padding_idx = module.padding_idx
        if module.padding_idx is not None:
            # Refused when the fused rule is attached, not only at the next forward.
            self.table._fused_refusal = _padding_refusal(name, module.padding_idx)
        if role == "freeze":
            self.table.tuned_weight.requires_grad_(False)

    @property
    def frozen_weight(self) -> torch.Tensor:
        return self.table.frozen_weight

    @property
    def tuned_weight(self) -> torch.Tensor:
        return self.table.tuned_weight

    @property
    def sparse(self) -> bool:
        return self.table.sparse

    def forward(self, input):
        state, table = self._state, self.table
        if state.collecting:
            if input.dim() == 0:
                raise ValueError(f"{self.name}: a 0-d index has no batch axis; look embeddings "
                                 f"up with the batch as the first axis")
            rows = F.embedding(input, table.frozen_weight)
            state.record(self.slot, rows, input.shape[0], math.prod(input.shape[1:]), self.name)
            return rows
        if self.role == "freeze":
            return F.embedding(input, table.frozen_weight)
        if table.fused and self.padding_idx is not None:
            raise ValueError(_padding_refusal(self.name, self.padding_idx))
        if self.role == "tune":
            if table.fused:  # the tuned rows update themselves, as the gated role's do
                return table.lookup([Lookup(input)])[0]
            return F.embedding(input, table.tuned_weight, padding_idx=self.padding_idx,
                               sparse=table.sparse)
        logits = state.logits_for(self.gate, self.name)
        logits = logits.reshape(logits.shape[0], *([1] * (input.dim() - 1)), 2).expand(*input.shape, 2)
        out, gates = table(input, logits, tau=state.tau, noise=state.noise(self.training))
        state.gates[self.name] = gates.detach()
        if self.padding_idx is not None:
            # nn.Embedding's rule, applied in the forward as F.embedding applies it (so that
            # it holds whatever replaces the Parameter: to_empty, load_state_dict(assign=True),
            # torch.func): a padding lookup gives no gradient, to the row or to its gate (whose
            # two rows are equal while the padding row is untrained).
            pad = (input == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, out.detach(), out)
        return out


class GatedEmbeddingBagSlot(_EmbeddingAttributes, _Gated):
    """Stands in for an ``nn.EmbeddingBag``: same call ``(input, offsets, per_sample_weights)``.

    The gated bag op takes no max pooling, padding_idx, include_last_offset or trained
    per-sample weights, which a bag module may use; so the frozen and the tuned table are
    pooled separately with ``F.embedding_bag`` (the module's ``mode``, offsets and per-sample
    weights as given) and
    the two pooled vectors are mixed with one straight-through Gumbel gate per bag.

    Example::

        >>> import torch
        >>> from autoft_fast.dropin import autoft
        >>> net = autoft(torch.nn.Sequential(torch.nn.EmbeddingBag(10, 4)), strategy="autoft_field")
        >>> net(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 4])
    """

    def __init__(self, name, module: nn.EmbeddingBag, role, state, backend="auto", table=None):
        super().__init__(name, role, state)
        _check_embedding_options(name, module)
        if table is not None:  # tied to another bag module: share its two tables
            # The frozen table is read from that slot at every use (see __getattr__): a buffer
            # held here too would be replaced on the owner alone by .to() / .double(), and a
            # later load_state_dict would reach the owner's copy only. The tuned Parameter is
            # converted in place, so both slots keep the one object.
            object.__setattr__(self, "_tables_owner", table)
            self.tuned_weight = table.tuned_weight
        else:
            weight = module.weight.detach()
            self.register_buffer("frozen_weight", weight.clone())
            self.tuned_weight = nn.Parameter(weight.clone(), requires_grad=(role != "freeze"))
        self.mode = module.mode  # the pooling mode, as nn.EmbeddingBag names it
        self.padding_idx = module.padding_idx
        self.include_last_offset = module.include_last_offset
        self.sparse = module.sparse

    def __getattr__(self, name):
        if name == "frozen_weight":
            owner = self.__dict__.get("_tables_owner")
            if owner is not None:
                return owner.frozen_weight
        return super().__getattr__(name)

    def _pool(self, weight, input, offsets, per_sample_weights):
        return F.embedding_bag(input, weight, offsets, mode=self.mode, sparse=self.sparse,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=self.padding_idx)

    def forward(self, input, offsets=None, per_sample_weights=None):
        state = self._state
        frozen = self._pool(self.frozen_weight, input, offsets, per_sample_weights)
        if state.collecting:
            state.record(self.slot, frozen, frozen.shape[0], 1, self.name)
            return frozen
        if self.role == "freeze":
            return frozen
        tuned = self._pool(self.tuned_weight, input, offsets, per_sample_weights)
        if self.role == "tune":
            return tuned
        z = gumbel_gates(state.logits_for(self.gate, self.name), tau=state.tau, hard=True,
                         noise=state.noise(self.training)).to(tuned.dtype)
        state.gates[self.name] = z.detach()
        return z[:, :1] * frozen + z[:, 1:] * tuned


class GatedLayer(_Gated):
    """Stands in for an interaction layer: a frozen copy and a tuned copy of it.

    In ``gate`` mode both copies run on the same input and their outputs are mixed per
    instance by a straight-through Gumbel gate (hard in training, argmax in eval). The
    frozen copy always runs in eval mode (no dropout, no BatchNorm statistics update), so it
    stays the pre-trained function.

    Example::

        >>> import torch
        >>> from autoft_fast.dropin import autoft
        >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)))
        >>> type(net.model[1]).__name__
        'GatedLayer'
    """

    def __init__(self, name, module: nn.Module, role, state):
        super().__init__(name, role, state)
        # Buffers, not parameters: no "unfreeze all" (requires_grad_(True), a loop over
        # parameters()) can make the frozen copy trainable.
        self.frozen = freeze_as_buffers(copy.deepcopy(module)).eval()
        self.tuned = module
        if role == "freeze":
            self.tuned.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, *args, **kwargs):
        state = self._state
        if state.collecting or self.role == "freeze":
            return self.frozen(*args, **kwargs)
        if self.role == "tune":
            return self.tuned(*args, **kwargs)
        frozen, tuned = self.frozen(*args, **kwargs), self.tuned(*args, **kwargs)
        logits = state.logits_for(self.gate, self.name)
        if not isinstance(tuned, torch.Tensor) or tuned.dim() == 0 or tuned.shape[0] != logits.shape[0]:
            shape = tuple(tuned.shape) if isinstance(tuned, torch.Tensor) else type(tuned).__name__
            raise ValueError(f"layer {self.name!r} returned {shape}; a gated layer must return a "
                             f"tensor with the batch of {logits.shape[0]} instances as its first axis")
        z = gumbel_gates(logits, tau=state.tau, hard=True,
                         noise=state.noise(self.training)).to(tuned.dtype)
        state.gates[self.name] = z.detach()
        z = z.reshape(z.shape[0], *([1] * (tuned.dim() - 1)), 2)
        return z[..., 0] * frozen + z[..., 1] * tuned


_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _locations(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) that holds each submodule, shared modules included."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in root.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                found.setdefault(id(child), []).append((parent, attr))
    return found


def _warn_user_hooks(name: str, module: nn.Module, what: str) -> None:
    """Warn when a module autoft() replaces carries the user's hooks (a feature logger, an
    activation penalty): they no longer mean what they did."""
    hooks = sum(len(getattr(module, a, {})) for a in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    if hooks:
        warnings.warn(f"autoft(): module {name!r} has {hooks} hook(s) (register_forward_hook "
                      f"and the like); {what}. Register them on the wrapped model's modules "
                      f"instead", UserWarning, stacklevel=4)


def _replace(root, module, new, where) -> None:
    for parent, attr in where[id(module)]:
        setattr(parent, attr, new)


def _check_tied(model: nn.Module, embeddings) -> None:
    """Refuse an embedding weight that another kind of module also holds (a tied output
    layer): its gated copies would no longer be the weight that module reads."""
    kinds: dict[int, tuple[str, type]] = {}
    for name, module in embeddings:
        first = kinds.setdefault(id(module.weight), (name, type(module)))
        if first[1] is not type(module):
            raise ValueError(f"{name} and {first[0]} share one weight but are an nn.Embedding and "
                             f"an nn.EmbeddingBag; autoft() gates tied tables only between "
                             f"modules of one kind")
    for mname, module in model.named_modules():
        if isinstance(module, _EMBEDDING_TYPES):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in kinds:
                raise ValueError(f"{mname}.{pname} is the weight of embedding module "
                                 f"{kinds[id(p)][0]} (tied); autoft() makes a frozen and a "
                                 f"tuned copy of each table, so the tie cannot be kept: untie "
                                 f"it, or use a strategy without a policy (finetune_all, freeze_embedding, "
                                 f"freeze_dnn, l2sp), which keeps the model's own modules")


def _record_rows(module, args, output) -> None:
    # l2sp on a sparse table: the rows this call looked up (reset by each wrapper forward).
    rows = module.__dict__.setdefault("_autoft_rows", [])
    rows.append(args[0].detach().reshape(-1))


def _input_versions(args, kwargs) -> list:
    """(where, tensor, version) of every tensor among the arguments, one level into lists,
    tuples and dicts, and the key set of every dict: what the collect pass must not change.
    Inference tensors (made under torch.inference_mode) keep no version, so they are not
    checked."""
    out = []

    def visit(where, value, depth):
        if isinstance(value, torch.Tensor):
            if not value.is_inference():  # an inference tensor has no version counter
                out.append((where, value, value._version))
        elif depth < 2 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{where}[{i}]", v, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            out.append((where, value, frozenset(value)))
            for k, v in value.items():
                visit(f"{where}[{k!r}]", v, depth + 1)

    for i, a in enumerate(args):
        visit(f"argument {i}", a, 0)
    for k, v in kwargs.items():
        visit(f"argument {k!r}", v, 0)
    return out


def _check_inputs_unchanged(before: list, args, kwargs) -> None:
    for where, value, mark in before:
        now = value._version if isinstance(value, torch.Tensor) else frozenset(value)
        if now != mark:
            what = "was modified in place" if isinstance(value, torch.Tensor) else "changed its keys"
            raise RuntimeError(f"{where} {what} by the model's forward; autoft() runs the forward "
                               f"twice on the same arguments (once to read the frozen rows for the "
                               f"policy), so the forward must leave its inputs as it found them")


class _replaced_module_called:
    """The forward pre-hook left on a replaced module: calling it is an error. A class, not a
    closure, so that a model holding the module outside its tree still pickles."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module, args):
        raise RuntimeError(f"{self.name}: the model called its original {type(module).__name__}, "
                           f"which autoft() replaced by a gated one; the model must also hold it "
                           f"outside its module tree (a plain Python list or dict): hold it in "
                           f"an nn.ModuleList or nn.ModuleDict so that the gated module is the "
                           f"one called")


class AutoFTModel(nn.Module):
    """The model returned by :func:`autoft`; call it exactly as the original model.

    Attributes: ``model`` (the copy of the user's model with its modules replaced),
    ``policy`` (a :class:`PolicyNetwork`, ``None`` for strategies without gates),
    ``gate_names`` (the gated embedding modules and layers, in the policy's output order).

    Example::

        >>> import torch
        >>> from autoft_fast.dropin import autoft
        >>> base = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 1))
        >>> net = autoft(base, strategy="autoft")
        >>> net.gate_names
        ['0', '2']
        >>> net(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 1])
    """

    def __init__(self, model: nn.Module, *, strategy: str = "autoft", layers=None,
                 policy_hidden=(64,), tau: float = 5.0, l2sp_weight: float = 1e-3,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy = {strategy!r} is not one of {list(STRATEGIES)}")
        self.strategy = strategy
        plan = STRATEGIES[strategy]
        self.l2sp_weight = float(l2sp_weight)
        self._force = None
        state = _CallState(validate.check_tau(tau))
        object.__setattr__(self, "_state", state)

        self.model = copy.deepcopy(model)
        named = dict(self.model.named_modules())
        embeddings = [(n, m) for n, m in named.items() if isinstance(m, _EMBEDDING_TYPES)]
        if not embeddings:
            raise ValueError(f"model {type(model).__name__} has no nn.Embedding or nn.EmbeddingBag "
                             f"module; autoft() gates embedding tables, so there is nothing to wrap")
        layer_names = self._layer_names(named, layers)
        where = _locations(self.model)

        self.gate_names: list[str] = []
        slots: list[_Gated] = []
        if plan.has_policy:
            _check_tied(self.model, embeddings)
            tables: dict[int, object] = {}  # id(weight) -> the tables made for it (tied weights)
            for name, module in embeddings:
                cls = GatedEmbeddingSlot if isinstance(module, nn.Embedding) else GatedEmbeddingBagSlot
                # A table the user froze stays frozen (the strategy's freeze role): a gate
                # between two equal rows would choose nothing.
                role = plan.embeddings if module.weight.requires_grad else "freeze"
                shared = tables.get(id(module.weight))  # same kind (checked by _check_tied)
                kwargs = {"backend": backend} if cls is GatedEmbeddingSlot else {}
                slot = cls(name, module, role, state, table=shared, **kwargs)
                if shared is None:
                    tables[id(module.weight)] = slot.table if cls is GatedEmbeddingSlot else slot
                slot.slot = len(slots)
                if role == "gate":
                    slot.gate = len(self.gate_names)
                    self.gate_names.append(name)
                _warn_user_hooks(name, module, "its replacement runs none of them")
                _replace(self.model, module, slot, where)
                module.register_forward_pre_hook(_replaced_module_called(name))
                slots.append(slot)
        elif plan.embeddings == "freeze":
            for _, module in embeddings:
                module.requires_grad_(False)
        if plan.layers != "tune":
            for name in layer_names:
                _warn_user_hooks(name, named[name], "its frozen and tuned copies each run "
                                 "them, also in the pass that reads the frozen rows for the "
                                 "policy, so they fire up to three times a call")
                layer = GatedLayer(name, named[name], plan.layers, state)
                if plan.layers == "gate":
                    layer.gate = len(self.gate_names)
                    self.gate_names.append(name)
                _replace(self.model, named[name], layer, where)
        self.layer_names = layer_names

        self.policy = None
        if plan.has_policy:
            if not self.gate_names:
                if plan.layers != "gate":
                    raise ValueError(f"strategy {strategy!r} gates embedding tables, but every "
                                     f"table of the model has requires_grad=False, so there is "
                                     f"no tuned copy to choose")
                raise ValueError(f"strategy {strategy!r} gates layers but layers = {layers!r} names none")
            try:
                widths = list(policy_hidden)
            except TypeError:
                raise TypeError(f"policy_hidden = {policy_hidden!r} must be a sequence of widths, "
                                f"e.g. (64,)") from None
            if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
                raise ValueError(f"policy_hidden = {policy_hidden!r} must list positive integer "
                                 f"widths (or be empty for a linear policy)")
            in_dim = sum(s.embedding_dim for s in slots)
            self.policy = PolicyNetwork(in_dim, widths, len(self.gate_names))
            self.policy.to(embeddings[0][1].weight.device)
            self._slot_dims = [s.embedding_dim for s in slots]
        self.l2sp_source = None
        self._sparse_tables: list[str] = []  # l2sp: sparse tables, penalised on the rows used
        if plan.l2sp:
            self.l2sp_source = nn.Module()
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    self.l2sp_source.register_buffer(name.replace(".", "__"), p.detach().clone())
            for name, module in embeddings:
                if module.sparse and module.weight.requires_grad:
                    module.register_forward_hook(_record_rows)
                    self._sparse_tables.append(name)

    @staticmethod
    def _layer_names(named: dict[str, nn.Module], layers) -> list[str]:
        if layers is None:
            return [n for n, m in named.items() if isinstance(m, nn.Linear)]
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"layers must be a list of submodule names, got {layers!r}")
        layers = list(layers)
        for n in layers:
            if n not in named or n == "":
                choices = [k for k, m in named.items() if isinstance(m, (nn.Linear, nn.Sequential)) and k]
                raise ValueError(f"layers: {n!r} is not a submodule of the model; its nn.Linear and "
                                 f"nn.Sequential submodules are {choices}")
            if type(named[n]).forward is nn.Module.forward:
                raise ValueError(f"layers: {n!r} is a {type(named[n]).__name__}, which is not "
                                 f"called (it has no forward); list the layers it holds, or the "
                                 f"module whose forward uses its parameters")
            if any(isinstance(m, _EMBEDDING_TYPES) for m in named[n].modules()):
                raise ValueError(f"layers: {n!r} is or holds an embedding module; list interaction "
                                 f"layers only (the embeddings are gated per field)")
        for a in layers:
            for b in layers:
                if a != b and b.startswith(a + "."):
                    raise ValueError(f"layers: {b!r} lies inside {a!r}; list each layer once")
        return layers

    # -- the user's side -------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the model as the original ``forward(*args, **kwargs)`` does (two passes if gated)."""
        for name in self._sparse_tables:
            self.model.get_submodule(name)._autoft_rows = []
        if self.policy is None:
            return self.model(*args, **kwargs)
        state = self._state
        try:
            before = _input_versions(args, kwargs)
            state.forced = self._force is not None
            logits = self._policy_logits(args, kwargs)
            _check_inputs_unchanged(before, args, kwargs)
            state.collecting, state.logits, state.gates = False, logits, {}
            return self.model(*args, **kwargs)
        finally:
            state.logits, state.rows, state.batch, state.collecting = None, {}, None, False

    def _policy_logits(self, args, kwargs) -> torch.Tensor:
        state = self._state
        state.collecting, state.rows, state.batch = True, {}, None
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for m, was in modes:
                m.training = was
            state.collecting = False
        if state.batch is None:
            raise RuntimeError("the model's forward looked up no embedding module, so the policy "
                               "has no input; autoft() needs the embeddings to be used in forward")
        parts = []
        param = next(self.policy.parameters())
        device, dtype = param.device, param.dtype  # a model cast with .half() casts the policy
        for slot, dim in enumerate(self._slot_dims):
            rows = state.rows.get(slot)
            if rows is None:  # a module this call did not use
                parts.append(torch.zeros(state.batch, dim, device=device, dtype=dtype))
            else:
                looked = torch.cat(rows, dim=1).float()
                if looked.shape[1] == 0:  # a [B, 0] lookup (a batch where a field is empty):
                    parts.append(torch.zeros(state.batch, dim, device=device, dtype=dtype))
                else:  # its mean would be NaN, and NaN policy weights after one step
                    parts.append(looked.mean(dim=1).to(dtype))
        logits = self.policy(torch.cat(parts, dim=1).detach()).float()  # the gates read float32
        if self._force is not None:
            sign = 1.0 if self._force == "tuned" else -1.0
            forced = torch.tensor([-sign, sign], device=logits.device) * (_FORCE_MARGIN / 2)
            # keeps the graph, so a backward still runs (a NaN logit is forced too)
            logits = logits.nan_to_num(0.0, 0.0, 0.0) * 0 + forced
        return logits

    @property
    def tau(self) -> float:
        """The Gumbel-softmax temperature of every gate; set it to anneal (``net.tau = 0.5``)."""
        return self._state.tau

    @tau.setter
    def tau(self, value) -> None:
        self._state.tau = validate.check_tau(value)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters: ``{"model": [...], "policy": [...]}`` for the user's optimizer.

        Frozen tables and frozen layers are left out (they never get a gradient). Give the
        policy its own learning rate (a second param group) or its own optimizer.

        Example::

            >>> import torch
            >>> from autoft_fast.dropin import autoft
            >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)))
            >>> groups = net.parameter_groups()
            >>> opt = torch.optim.Adam([{"params": groups["model"], "lr": 1e-3},
            ...                         {"params": groups["policy"], "lr": 1e-2}])
        """
        model = [p for p in self.model.parameters() if p.requires_grad]
        policy = [] if self.policy is None else list(self.policy.parameters())
        return {"model": model, "policy": policy}

    def penalty(self) -> torch.Tensor:
        """The L2-SP term ``l2sp_weight * sum ||w - w_source||^2`` (0 for other strategies).

        Add it to the loss in every strategy; it is a zero tensor unless ``strategy="l2sp"``.

        Example::

            >>> import torch
            >>> from autoft_fast.dropin import autoft
            >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4)), strategy="l2sp")
            >>> float(net.penalty().detach())
            0.0
        """
        device = next(self.model.parameters()).device
        total = torch.zeros((), device=device)
        if self.l2sp_source is None:
            return total
        sparse = {f"{n}.weight": self.model.get_submodule(n) for n in self._sparse_tables}
        for name, p in self.model.named_parameters():
            source = getattr(self.l2sp_source, name.replace(".", "__"), None)
            if source is None:
                continue
            module = sparse.get(name)
            if module is None:
                total = total + (p - source).pow(2).sum()
                continue
            # A sparse table: the rows the last forward looked up, so that the gradient stays
            # sparse (SparseAdam refuses a dense one), as SparseAdam's own state is lazy.
            rows = getattr(module, "_autoft_rows", [])
            if not rows:
                continue
            rows = torch.unique(torch.cat(rows))
            if module.padding_idx is not None:
                rows = rows[rows != module.padding_idx]
            diff = F.embedding(rows, p, sparse=True) - source[rows]
            total = total + diff.pow(2).sum()
        return self.l2sp_weight * total

    def force_gates(self, choice: str | None) -> None:
        """Force every gate to ``"frozen"`` or ``"tuned"`` (``None``: the policy decides).

        The forced choice goes through the same gated path, so with ``"frozen"`` the model
        predicts exactly what the pre-trained model does.

        Example::

            >>> import torch
            >>> from autoft_fast.dropin import autoft
            >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4)), strategy="autoft_field")
            >>> net.force_gates("frozen")
        """
        if choice not in FORCE_CHOICES:
            raise ValueError(f"force_gates: choice = {choice!r} is not one of {list(FORCE_CHOICES)}")
        self._force = choice

    def tuned_fraction(self) -> dict[str, float]:
        """The fraction of tuned choices per gated module in the last forward call.

        Example::

            >>> import torch
            >>> from autoft_fast.dropin import autoft
            >>> net = autoft(torch.nn.Sequential(torch.nn.Embedding(10, 4)), strategy="autoft_field").eval()
            >>> _ = net(torch.tensor([1, 2]))
            >>> net.tuned_fraction()
            {'0': 0.0}
        """
        return {name: float(g[..., 1].float().mean()) for name, g in self._state.gates.items()}

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, tau={self.tau}, gates={len(self.gate_names)}"


def autoft(model: nn.Module, *, strategy: str = "autoft", layers=None, policy_hidden=(64,),
           tau: float = 5.0, l2sp_weight: float = 1e-3, backend: str = "auto") -> AutoFTModel:
    """Wrap a pre-trained CTR model as an AutoFT model with the same ``forward`` signature.

    ``model`` is copied (the caller's weights are never changed). ``strategy`` is one of
    ``STRATEGIES``; ``layers`` names the interaction layers (submodule names as in
    ``model.named_modules()``, e.g. ``["mlp.0", "mlp.3"]`` or ``["mlp"]``) that get layer
    gates (``autoft_layer``, ``autoft``) or stay frozen (``freeze_dnn``); the default is
    every ``nn.Linear``. ``policy_hidden`` and ``tau`` set the policy MLP and the Gumbel
    temperature; ``l2sp_weight`` weighs :meth:`AutoFTModel.penalty`; ``backend`` is the
    gated-embedding op's backend.

    Example::

        >>> import torch
        >>> from autoft_fast.dropin import autoft
        >>> class Tiny(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.ModuleDict({"user": torch.nn.Embedding(50, 4),
        ...                                         "item": torch.nn.Embedding(80, 4)})
        ...         self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        ...     def forward(self, x):
        ...         e = torch.cat([self.emb["user"](x[:, 0]), self.emb["item"](x[:, 1])], dim=1)
        ...         return self.mlp(e).squeeze(1)
        >>> net = autoft(Tiny(), strategy="autoft")
        >>> net.gate_names
        ['emb.user', 'emb.item', 'mlp.0', 'mlp.2']
        >>> opt = torch.optim.Adam([{"params": net.parameter_groups()["model"], "lr": 1e-3},
        ...                         {"params": net.parameter_groups()["policy"], "lr": 1e-2}])
        >>> loss = net(torch.tensor([[1, 2], [3, 4]])).sum() + net.penalty()
        >>> loss.backward(); opt.step()
    """
    return AutoFTModel(model, strategy=strategy, layers=layers, policy_hidden=policy_hidden,
                       tau=tau, l2sp_weight=l2sp_weight, backend=backend)
