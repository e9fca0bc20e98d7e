"""``GatedEmbedding``: a frozen and a tuned embedding table mixed per lookup by policy gates."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

from .ops import fused_optim, memory, quant, validate
from .ops.functional import gated_embedding, gated_embedding_bag
from .ops.fused_optim import STEP, FusedOptimizer, check_kind
from .ops.registry import check_backend_name
from .ops.validate import frozen_dtypes_for


def keep_sparse_grad_coalesced(param: nn.Parameter) -> None:
    """Keep the "coalesced" mark of a sparse gradient that autograd's accumulation drops.

    The CPU backward returns a coalesced COO gradient (sorted unique rows), but PyTorch's
    AccumulateGrad rebuilds the tensor without that mark, so the optimizer would sort it
    again (several ms per step at 100k lookups). This post-accumulate hook re-marks the
    gradient when its rows are verifiably sorted and unique (one comparison pass); a gradient
    accumulated over several backward calls fails the check and is left as it is.

    Example::

        >>> import torch, autoft_fast
        >>> w = torch.nn.Parameter(torch.randn(100, 8))
        >>> autoft_fast.keep_sparse_grad_coalesced(w)
    """
    param.register_post_accumulate_grad_hook(_mark_coalesced_if_sorted)


def _mark_coalesced_if_sorted(param) -> None:
    g = param.grad
    if g is None or not g.is_sparse or g.is_coalesced() or g.sparse_dim() != 1:
        return
    rows = g._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        g._coalesced_(True)


EMBEDDING_OPTIMIZERS = ("dense", "fused_sgd", "fused_rowwise_adagrad", "fused_adam")


def _float32_logits(logits):
    # Upcasting a float16 / bfloat16 tensor is exact; the op takes float32 logits only.
    if isinstance(logits, torch.Tensor) and logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (and its submodules) into a buffer of the same name
    and value, in place: a frozen copy that ``requires_grad_(True)``, an "unfreeze all"
    loop over ``parameters()`` (Lightning's ``unfreeze``) and an optimizer built from
    ``parameters()`` cannot reach, while the module computes exactly as before (its forward
    reads ``self.weight`` either way) and its state_dict keys stay the same.

    Example::

        >>> import torch
        >>> lin = freeze_as_buffers(torch.nn.Linear(3, 2))
        >>> list(lin.parameters()), sorted(dict(lin.named_buffers()))
        ([], ['bias', 'weight'])
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach().requires_grad_(False))
    return module


def fused_tables(model: nn.Module) -> list:
    """The tables of ``model`` that update themselves in the backward, in module order.

    ``GatedEmbedding`` and ``EmbeddingTable`` modules with a fused optimizer; each names its
    trained table ``fused_weight`` and its state ``optimizer_state()``.

    Example::

        >>> import torch, autoft_fast
        >>> from autoft_fast.modules import fused_tables
        >>> fused_tables(torch.nn.ModuleDict({"emb": autoft_fast.GatedEmbedding(10, 4)}))
        []
    """
    return [m for m in model.modules()
            if isinstance(m, FusedTableMixin) and m.fused_optimizer is not None]


def attach_fused_optimizers(model: nn.Module, embedding_optimizer: str, lr: float) -> list:
    """Give every trained feature-indexed table of ``model`` the fused rule ``embedding_optimizer``.

    The tables are the ``GatedEmbedding`` modules (their tuned copy) and the plain
    ``EmbeddingTable`` modules (the base models' ``embedding`` and DeepFM's first-order
    ``linear``) whose weight requires grad. ``embedding_optimizer`` is one of
    :data:`EMBEDDING_OPTIMIZERS`; "dense" changes nothing (the tables keep ordinary gradients
    for the trainer's optimizer). Returns the modules that now update themselves in the
    backward.

    Example::

        >>> import torch, autoft_fast
        >>> from autoft_fast.modules import EmbeddingTable, attach_fused_optimizers
        >>> model = torch.nn.ModuleDict({"emb": autoft_fast.GatedEmbedding(10, 4),
        ...                              "plain": EmbeddingTable(10, 4)})
        >>> len(attach_fused_optimizers(model, "fused_adam", lr=1e-3))
        2
    """
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"embedding_optimizer = {embedding_optimizer!r} is not one of "
                         f"{list(EMBEDDING_OPTIMIZERS)}")
    if embedding_optimizer == "dense":
        return []
    kind = embedding_optimizer[len("fused_"):]
    mods = [m for m in model.modules()
            if isinstance(m, FusedTableMixin) and m.fused_weight.requires_grad]
    refused = next((m._fused_refusal for m in mods if getattr(m, "_fused_refusal", None)), None)
    if refused:  # before any table is changed
        raise ValueError(refused)
    for m in mods:
        m.use_fused_optimizer(kind, lr=lr)
    plain = [n for n, m in model.named_modules()
             if type(m) in (nn.Embedding, nn.EmbeddingBag) and m.weight.requires_grad]
    if plain:
        # e.g. a dropin wrapper of a strategy without a policy (finetune_all, l2sp, ...),
        # which keeps the user's own modules: the comparison would mix two optimizers.
        shown = ", ".join(repr(n) for n in plain[:3]) + (", ..." if len(plain) > 3 else "")
        warnings.warn(
            f"attach_fused_optimizers: {len(plain)} nn.Embedding / nn.EmbeddingBag module(s) "
            f"({shown}) get no fused rule and stay with your optimizer: only GatedEmbedding "
            f"and EmbeddingTable modules carry one ({len(mods)} fused here)", UserWarning,
            stacklevel=2)
    return mods


def set_fused_lr(model: nn.Module, lr: float) -> int:
    """Set the learning rate of every fused-optimizer table of ``model`` (state kept).

    For a learning-rate schedule in your own loop: step your scheduler, then pass its value
    on, e.g. ``set_fused_lr(model, scheduler.get_last_lr()[0])``. Returns the number of tables
    changed.

    Example::

        >>> import torch, autoft_fast
        >>> from autoft_fast.modules import set_fused_lr
        >>> model = torch.nn.ModuleDict({"emb": autoft_fast.GatedEmbedding(10, 4, optimizer="sgd",
        ...                                                                lr=0.1)})
        >>> set_fused_lr(model, 0.05)
        1
    """
    tables = fused_tables(model)
    for m in tables:
        m.set_lr(lr)
    return len(tables)


_STATE_PREFIX = "optimizer_"


class FusedTableMixin:
    """A table module that may carry a fused optimizer: its rule and its state buffers.

    The class sets ``fused_weight`` (the trained [V, D] Parameter). The state is kept in
    buffers ``optimizer_<name>`` (``optimizer_step``, ``optimizer_exp_avg``, ...), so it is in
    the state_dict: checkpoints and resume carry it. A module without a fused optimizer loads
    a state_dict that has these buffers by dropping them (they are training state, not
    weights: a model saved after fused training loads for prediction).
    """

    fused_optimizer: FusedOptimizer | None = None

    def use_fused_optimizer(self, optimizer: str, *, lr: float | None, eps: float | None = None,
                            betas=(0.9, 0.999)) -> None:
        """Let the backward update the trained rows with ``optimizer``; its state starts at zero.

        Example::

            >>> import autoft_fast
            >>> emb = autoft_fast.GatedEmbedding(10, 4)
            >>> emb.use_fused_optimizer("rowwise_adagrad", lr=0.1)
            >>> tuple(emb.optimizer_sum.shape)
            (10,)
        """
        check_kind(optimizer)
        if lr is None:
            raise ValueError(f"lr must be given with optimizer = {optimizer!r}")
        if getattr(self, "_fused_refusal", None):  # set by the module that owns this table
            raise ValueError(self._fused_refusal)
        if hasattr(self, "_dropped_state"):
            step = self.__dict__.pop("_dropped_state")
            warnings.warn(
                f"use_fused_optimizer({optimizer!r}) on a {type(self).__name__} whose loaded "
                "state_dict held fused-optimizer state"
                + (f" (step {step})" if step is not None else "")
                + ", dropped because no fused optimizer was attached when it was loaded: the "
                "rule starts from zero. To resume training, attach the fused optimizer "
                "(use_fused_optimizer / attach_fused_optimizers) before load_state_dict",
                UserWarning, stacklevel=3)
        self.fused_optimizer = FusedOptimizer(optimizer, lr=lr, eps=eps, betas=tuple(betas))
        for name, t in self.fused_optimizer.new_state(self.fused_weight.detach()).items():
            self.register_buffer(f"{_STATE_PREFIX}{name}", t)

    def set_lr(self, lr: float) -> None:
        """Change the fused optimizer's learning rate, keeping its state (a schedule's step).

        ``torch.optim.lr_scheduler`` acts on a ``torch.optim`` optimizer's param groups and
        never reaches a rule fused into the backward; call this (or :func:`set_fused_lr` for
        every table of a model) with the scheduler's new value instead. Calling
        :meth:`use_fused_optimizer` again would start the state afresh.

        Example::

            >>> import autoft_fast
            >>> emb = autoft_fast.GatedEmbedding(10, 4, optimizer="adam", lr=1e-3)
            >>> emb.set_lr(5e-4)
            >>> emb.fused_optimizer.lr
            0.0005
        """
        if self.fused_optimizer is None:
            raise ValueError("set_lr: this table has no fused optimizer (use_fused_optimizer "
                             "first; without one its rows train with your own optimizer)")
        self.fused_optimizer = dataclasses.replace(self.fused_optimizer, lr=lr)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() cast every floating buffer, but the fused
        # optimizer's state must stay float32 (the kernels require it, and a 16-bit moment
        # would lose the state): it moves with the module, its dtype kept, from the original.
        saved = {k: b for k, b in self._buffers.items()
                 if k.startswith(_STATE_PREFIX) and b is not None}
        out = super()._apply(fn, recurse)
        for k, old in saved.items():
            new = self._buffers.get(k)
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return out

    def optimizer_state(self) -> dict[str, torch.Tensor] | None:
        """The fused optimizer's state tensors (the module's buffers), or None without one."""
        if self.fused_optimizer is None:
            return None
        names = (STEP,) + tuple(self.fused_optimizer.rule.state)
        return {n: getattr(self, f"{_STATE_PREFIX}{n}") for n in names}

    _l2sp = None

    def set_l2sp(self, anchor, alpha: float) -> None:
        """Pull the fused-updated rows toward ``anchor`` [V, D] with strength ``alpha`` (L2-SP).

        Only used with a fused optimizer (a dense table gets the penalty from the loss).
        ``anchor`` is held by reference (a frozen table of the same model), not saved twice:
        a tensor, or ``(module, name)``, the attribute ``name`` of ``module`` read at each
        use, so that an anchor replaced by ``load_state_dict(assign=True)`` (a new Parameter
        object on the same module) is the one pulled toward.

        Example::

            >>> import torch
            >>> from autoft_fast.modules import EmbeddingTable
            >>> table = EmbeddingTable(10, 4)
            >>> table.set_l2sp(torch.zeros(10, 4), 0.01)
        """
        if isinstance(anchor, tuple):
            if (len(anchor) != 2 or not isinstance(anchor[0], nn.Module)
                    or not isinstance(anchor[1], str)):
                raise TypeError("anchor must be a tensor or a (module, attribute name) pair, "
                                f"got {anchor!r}")
            held = getattr(anchor[0], anchor[1])
        else:
            held = anchor
        if not isinstance(held, torch.Tensor):
            raise TypeError(f"anchor must be a tensor, got {type(held).__name__}")
        if tuple(held.shape) != tuple(self.fused_weight.shape):
            raise ValueError(f"anchor of shape {tuple(held.shape)} must have the table's shape "
                             f"{tuple(self.fused_weight.shape)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha = {alpha!r} must be a number >= 0")
        # A tuple, so that the anchor is not registered as a second parameter (or, given as
        # its module, a submodule) of this module.
        self._l2sp = (anchor, float(alpha))

    @property
    def fused(self) -> bool:
        """Whether a lookup now would update the table in its backward (fused, training)."""
        return (self.fused_optimizer is not None and self.fused_weight.requires_grad
                and torch.is_grad_enabled())

    def lookup(self, lookups) -> tuple:
        """Plain lookups of the trained table: one output per ``fused_optim.Lookup``.

        Fused (``fused_optim.fused_lookup``) when :attr:`fused`, else ordinary autograd calls.
        Every lookup of one step should go in one call (one optimizer step per table). For a
        ``GatedEmbedding`` the table is the tuned copy (DeepFM's gated first-order weights
        look it up this way, weighted by their field's gate).

        Example::

            >>> import torch
            >>> from autoft_fast.modules import EmbeddingTable
            >>> from autoft_fast.ops.fused_optim import Lookup
            >>> (out,) = EmbeddingTable(10, 4).lookup([Lookup(torch.tensor([1, 2]))])
            >>> out.shape
            torch.Size([2, 4])
        """
        if not self.fused:
            return tuple(fused_optim.plain_lookup(self.fused_weight, lk) for lk in lookups)
        return fused_optim.fused_lookup(self.fused_weight, lookups, self.fused_optimizer,
                                        self.optimizer_state(), l2sp=self.active_l2sp())

    def active_l2sp(self):
        """``(anchor tensor, alpha)`` of :meth:`set_l2sp` when alpha > 0, else None."""
        if self._l2sp is None or not self._l2sp[1] > 0:
            return None
        anchor, alpha = self._l2sp
        if isinstance(anchor, tuple):
            anchor = getattr(anchor[0], anchor[1])
        return anchor, alpha

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.fused_optimizer is None:
            # A fused-trained model loads for prediction without its optimizer's state; a
            # later use_fused_optimizer says it was dropped (a resume must attach first).
            dropped = [k for k in state_dict if k.startswith(prefix + _STATE_PREFIX)
                       and "." not in k[len(prefix):]]
            step = state_dict.get(prefix + _STATE_PREFIX + STEP)
            if dropped:
                self._dropped_state = (int(step.max()) if isinstance(step, torch.Tensor)
                                       and step.numel() else None)
            for key in dropped:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EmbeddingTable(FusedTableMixin, nn.Embedding):
    """A plain feature-indexed table (``nn.Embedding``) that can train itself in the backward.

    Without a fused optimizer it is ``nn.Embedding`` exactly (same init, state_dict and
    gradients). With one (``use_fused_optimizer``, or ``autoft.embedding_optimizer: fused_*``
    through the trainer), :meth:`lookup` (and the forward, ``table(indices)``) runs
    ``fused_optim.fused_lookup``: the looked-up rows
    are updated inside the backward with the rule's lazy formula and ``weight`` never gets a
    ``.grad``. ``set_l2sp(anchor, alpha)`` adds the lazy L2-SP pull toward ``anchor`` to the
    fused update (see ``fused_lookup``).

    Example::

        >>> import torch
        >>> from autoft_fast.modules import EmbeddingTable
        >>> from autoft_fast.ops.fused_optim import Lookup
        >>> table = EmbeddingTable(100, 8)
        >>> table.use_fused_optimizer("adam", lr=1e-3)
        >>> (out,) = table.lookup([Lookup(torch.tensor([[1, 2], [2, 3]]))])
        >>> out.sum().backward()
        >>> int(table.optimizer_step), table.weight.grad is None
        (1, True)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, _weight=None,
                 device=None, dtype=None, **kwargs):
        fresh = _weight is None and len(args) < 6  # the 6th positional is nn.Embedding's _weight
        if fresh:
            # nn.Embedding's own init (normal_, then the padding row zeroed), in memory
            # advised for huge pages where that applies (ops/memory.py); the same random draws.
            _weight = memory.empty((num_embeddings, embedding_dim), device=device, dtype=dtype)
            with torch.no_grad():
                nn.init.normal_(_weight)
        super().__init__(num_embeddings, embedding_dim, *args, _weight=_weight, device=device,
                         dtype=dtype, **kwargs)
        if fresh:
            self._fill_padding_idx_with_zero()

    @property
    def fused_weight(self) -> nn.Parameter:
        return self.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.Embedding``'s forward; with a fused optimizer (in training, gradients on) the
        fused lookup of ``input`` (``table(idx)`` is ``table.lookup([Lookup(idx)])[0]``)."""
        if not self.fused:
            return super().forward(input)
        if self.padding_idx is not None or self.max_norm is not None or self.scale_grad_by_freq:
            raise ValueError("EmbeddingTable with a fused optimizer: padding_idx, max_norm and "
                             "scale_grad_by_freq are not fused (give a PAD lookup weight 0 "
                             "with lookup([Lookup(indices, weights)]) instead)")
        return self.lookup([fused_optim.Lookup(input)])[0]


class FrozenRows:
    """A low-precision frozen table as lookups see it: ``rows(indices)`` gives the rows at
    ``indices`` dequantised to the tuned dtype; ``dtype``, ``shape`` and ``new_zeros`` as a
    ``[V, D]`` tensor of that dtype would have them. Made by ``GatedEmbedding.frozen_table()``.
    """

    def __init__(self, table: "GatedEmbedding"):
        self._table = table
        self.dtype = table.tuned_weight.dtype
        self.shape = (table.num_embeddings, table.embedding_dim)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self._table.frozen_rows(indices)

    def new_zeros(self, *size) -> torch.Tensor:
        return self._table.tuned_weight.new_zeros(*size)


class GatedEmbedding(FusedTableMixin, nn.Module):
    """Frozen pre-trained rows and fine-tuned rows, chosen per lookup by Gumbel-softmax gates.

    The frozen copy is a buffer (saved in the state_dict, never trained); the tuned copy is a
    Parameter initialised from it. ``frozen_dtype`` ("float32", "bfloat16", "float16" or
    "int8"; default: the tuned table's dtype) stores the frozen copy in lower precision: int8
    is row-wise quantised (``autoft_fast.ops.quant``, 18 bytes a row at D = 16 instead of 64)
    and the kernels dequantise it as they read it; the tuned copy starts from the full-precision
    weights. ``.float()`` / ``.to(dtype)`` keep that precision of the frozen copy wherever the
    new tuned dtype can be paired with it (bfloat16 / float16 under float32, int8 under any).
    In train mode the gates are sampled with Gumbel noise; in
    eval mode they are the deterministic argmax of the logits (pass ``noise=True`` to
    ``forward`` to sample at evaluation too).

    Example::

        >>> import torch, autoft_fast
        >>> pretrained = torch.nn.Embedding(1000, 16)
        >>> emb = autoft_fast.GatedEmbedding.from_pretrained(pretrained, sparse=True)
        >>> idx = torch.randint(0, 1000, (32, 8))
        >>> logits = torch.randn(32, 8, 2, requires_grad=True)
        >>> out, gates = emb(idx, logits, tau=1.0)
        >>> out.shape
        torch.Size([32, 8, 16])

    With ``optimizer`` ("sgd", "rowwise_adagrad" or "adam") and ``lr`` the backward updates
    the touched tuned rows itself (see ``autoft_fast.ops.fused_optim``): ``tuned_weight`` then
    never gets a ``.grad``, so a general optimizer over ``parameters()`` skips it, and the
    optimizer state (``optimizer_*`` buffers, ``optimizer_step``) is in the state_dict::

        >>> emb = autoft_fast.GatedEmbedding(1000, 16, optimizer="adam", lr=1e-3)
        >>> out, gates = emb(idx, logits)
        >>> out.sum().backward()
        >>> int(emb.optimizer_step), emb.tuned_weight.grad is None
        (1, True)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, sparse: bool = False,
                 backend: str = "auto", device=None, dtype=None, optimizer: str | None = None,
                 lr: float | None = None, eps: float | None = None, betas=(0.9, 0.999),
                 frozen_dtype=None):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"num_embeddings = {num_embeddings} and embedding_dim = "
                             f"{embedding_dim} must both be positive")
        num_embeddings, embedding_dim = int(num_embeddings), int(embedding_dim)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        check_backend_name(backend)
        # Both tables in memory advised for huge pages where that applies (ops/memory.py).
        weight = memory.empty((num_embeddings, embedding_dim), device=device, dtype=dtype)
        nn.init.normal_(weight)
        self.register_buffer("frozen_weight", self._store_frozen(weight, frozen_dtype))
        self.tuned_weight = nn.Parameter(weight)
        self.sparse = validate.check_flag("sparse", sparse)
        if self.sparse:
            keep_sparse_grad_coalesced(self.tuned_weight)
        self.backend = backend
        self.fused_optimizer = None
        if optimizer is not None:
            self.use_fused_optimizer(optimizer, lr=lr, eps=eps, betas=betas)
        elif lr is not None or eps is not None:
            raise ValueError(f"{'lr' if lr is not None else 'eps'} is given without optimizer: "
                             "it sets the fused optimizer (optimizer='sgd', 'rowwise_adagrad' "
                             "or 'adam'); without one, pass the table to a torch optimizer")

    def __setstate__(self, state):
        # A deep copy or an unpickled module has new Parameters, without the hook.
        super().__setstate__(state)
        if self.__dict__.get("sparse"):
            keep_sparse_grad_coalesced(self.tuned_weight)

    def _apply(self, fn, recurse=True):
        # .float() / .to(dtype) cast every floating buffer: a frozen copy stored in a lower
        # precision on purpose (frozen_dtype) keeps it where the new tuned dtype can be
        # paired with it, as the fused optimizer's state keeps float32.
        frozen = self._buffers.get("frozen_weight")
        chosen = frozen is not None and frozen.dtype != self.tuned_weight.dtype
        out = super()._apply(fn, recurse)
        new = self._buffers.get("frozen_weight")
        if (chosen and new is not None and new.dtype != frozen.dtype
                and frozen.dtype in frozen_dtypes_for(self.tuned_weight.dtype)):
            self._buffers["frozen_weight"] = frozen.to(device=new.device)
        return out

    def _store_frozen(self, weight: torch.Tensor, frozen_dtype) -> torch.Tensor:
        if frozen_dtype is None or quant.check_frozen_dtype(frozen_dtype) == weight.dtype:
            return memory.copy(weight.detach())
        allowed = frozen_dtypes_for(weight.dtype)
        if quant.check_frozen_dtype(frozen_dtype) not in allowed:
            names = [n for n, d in quant.FROZEN_DTYPES.items() if d in allowed]
            raise ValueError(f"frozen_dtype = {frozen_dtype!r} is not a precision the op reads "
                             f"under a {weight.dtype} tuned table; choose one of {names}")
        stored = quant.to_frozen_dtype(weight, frozen_dtype)
        return memory.copy(stored) if memory.wanted(stored) else stored

    @property
    def fused_weight(self) -> nn.Parameter:
        """The table a fused optimizer trains: the tuned copy."""
        return self.tuned_weight

    @classmethod
    def from_pretrained(cls, weight, *, sparse: bool = False, backend: str = "auto",
                        frozen_dtype=None, **optimizer):
        """Build from a pre-trained ``[V, D]`` tensor or ``nn.Embedding``; both copies start equal.

        The pre-trained tensor is copied, never aliased: training the tuned copy cannot
        change the caller's weights. ``frozen_dtype``: the frozen copy's storage (see the
        class docstring; the tuned copy keeps ``weight``'s dtype). Keyword ``optimizer``,
        ``lr``, ``eps``, ``betas``: the fused optimizer, as in the constructor.

        Example::

            >>> import torch, autoft_fast
            >>> emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(100, 8))
            >>> torch.equal(emb.frozen_weight, emb.tuned_weight)
            True
            >>> emb8 = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(100, 16),
            ...                                                   frozen_dtype="int8")
            >>> emb8.frozen_weight.dtype, emb8.frozen_weight.nbytes / emb8.tuned_weight.nbytes
            (torch.int8, 0.28125)
        """
        if isinstance(weight, nn.Embedding):
            weight = weight.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor or nn.Embedding, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D [V, D] table, got shape {tuple(weight.shape)}")
        module = cls(weight.shape[0], weight.shape[1], sparse=sparse, backend=backend,
                     device=weight.device, dtype=weight.dtype, frozen_dtype=frozen_dtype,
                     **optimizer)
        with torch.no_grad():
            module.frozen_weight = module._store_frozen(weight, frozen_dtype)
            module.tuned_weight.copy_(weight.detach())
        return module

    def frozen_dense_weight(self) -> torch.Tensor:
        """The frozen table as the op reads it, ``[V, D]`` in the tuned dtype.

        The buffer itself when it has the tuned dtype; otherwise a dequantised copy of the
        whole table (made on each call: prefer :meth:`frozen_rows` for a few rows).

        Example::

            >>> import torch, autoft_fast
            >>> emb = autoft_fast.GatedEmbedding(10, 4, frozen_dtype="int8")
            >>> emb.frozen_dense_weight().shape
            torch.Size([10, 4])
        """
        if self.frozen_weight.dtype == self.tuned_weight.dtype:
            return self.frozen_weight
        return quant.dequantize(self.frozen_weight, self.tuned_weight.dtype)

    def frozen_table(self):
        """The frozen table to look rows up in: the buffer itself when it has the tuned dtype,
        else a :class:`FrozenRows` view that dequantises only the rows looked up (no [V, D]
        copy). ``BaseCTRModel.field_vectors`` takes either.

        Example::

            >>> import torch, autoft_fast
            >>> view = autoft_fast.GatedEmbedding(10, 4, frozen_dtype="int8").frozen_table()
            >>> view.rows(torch.tensor([1, 2])).shape, view.shape
            (torch.Size([2, 4]), (10, 4))
        """
        if self.frozen_weight.dtype == self.tuned_weight.dtype:
            return self.frozen_weight
        return FrozenRows(self)

    def frozen_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The frozen rows at ``indices`` (any shape) as the op reads them, in the tuned dtype.

        Example::

            >>> import torch, autoft_fast
            >>> emb = autoft_fast.GatedEmbedding(10, 4, frozen_dtype="bfloat16")
            >>> emb.frozen_rows(torch.tensor([[1, 2]])).shape
            torch.Size([1, 2, 4])
        """
        return quant.frozen_rows(self.frozen_weight, indices, self.tuned_weight.dtype)

    @property
    def num_embeddings(self) -> int:
        return self.frozen_weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.tuned_weight.shape[1]

    def forward(self, indices, logits, tau: float = 1.0, hard: bool = True, noise=None,
                seed=None, uniforms=None):
        """Return ``(out, gates)`` for ``indices`` [*S] and policy ``logits`` [*S, 2].

        ``noise=None`` samples Gumbel noise in train mode and takes the argmax in eval mode.
        16-bit ``logits`` (a policy under ``torch.autocast``) are taken as float32, the
        op's dtype for them.
        """
        if noise is None:
            noise = self.training
        logits = _float32_logits(logits)
        return gated_embedding(indices, self.frozen_weight, self.tuned_weight, logits, tau=tau,
                               hard=hard, noise=noise, seed=seed, uniforms=uniforms,
                               sparse=self.sparse, backend=self.backend,
                               optimizer=self.fused_optimizer,
                               optimizer_state=self.optimizer_state())

    def bag(self, values, offsets, logits, mode: str = "mean", tau: float = 1.0, hard: bool = True,
            noise=None, seed=None, uniforms=None, per_sample_weights=None):
        """Return ``(out [B, D], gates [B, 2])`` for bags ``values[offsets[b]:offsets[b + 1]]``.

        One gate per bag from ``logits`` [B, 2]; the bag's frozen and tuned rows are pooled
        by ``mode`` ("sum" or "mean") and mixed (``autoft_fast.gated_embedding_bag``). The
        tuned table gets an ordinary gradient (dense, or COO when ``sparse``); a module with a
        fused optimizer refuses where a backward could run (the bag op does not fuse one),
        and evaluates under ``torch.no_grad()``.

        Example::

            >>> import torch, autoft_fast
            >>> emb = autoft_fast.GatedEmbedding(100, 8)
            >>> out, gates = emb.bag(torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3]),
            ...                      torch.zeros(2, 2), mode="mean")
            >>> out.shape
            torch.Size([2, 8])
        """
        if noise is None:
            noise = self.training
        logits = _float32_logits(logits)
        return gated_embedding_bag(values, offsets, self.frozen_weight, self.tuned_weight, logits,
                                   per_sample_weights=per_sample_weights, mode=mode, tau=tau,
                                   hard=hard, noise=noise, seed=seed, uniforms=uniforms,
                                   sparse=self.sparse, backend=self.backend,
                                   # no backward can run (no_grad, a frozen table): nothing
                                   # to fuse, so evaluation works with an optimizer attached
                                   optimizer=self.fused_optimizer if self.fused else None)

    def extra_repr(self) -> str:
        frozen = ("" if self.frozen_weight.dtype == self.tuned_weight.dtype
                  else f", frozen_dtype={self.frozen_weight.dtype}")
        return (f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.tuned_weight.dtype}{frozen}, "
                f"sparse={self.sparse}, backend={self.backend!r}" +
                (f", optimizer={self.fused_optimizer.kind!r}, lr={self.fused_optimizer.lr}"
                 if self.fused_optimizer is not None else ""))
