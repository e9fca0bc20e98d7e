"""The optimizer fused into the op's backward: the tuned rows are updated where their gradient is made.

With a :class:`FusedOptimizer` the op's backward never hands a tuned-table gradient to autograd.
It asks the backend's backward for the sparse-mode row sums (sorted unique rows, each the
float32 sum of its lookups' contributions: the sorted segments of the repeated indices), keeps
the rows that were *touched* (at least one lookup whose forward gate gave the tuned row a
nonzero weight) and applies the update to those rows of the table, in place. The logits still
get their ordinary gradient. No [V, D] tensor is ever made; the [U, D] row sums are the only
gradient values, and they are consumed at once.

The update rules, one row each in :data:`RULES` (state is lazy: only touched rows change):

- ``sgd``: w -= lr * g (torch.optim.SGD without momentum or weight decay);
- ``rowwise_adagrad``: s[v] += mean(g * g); w -= lr * g / (sqrt(s[v]) + eps) (one float32
  accumulator per row, as FBGEMM's row-wise Adagrad; with D = 1 it is torch.optim.Adagrad);
- ``adam``: lazy Adam, exactly torch.optim.SparseAdam's formula (one step count per table,
  moments of the touched rows only).

Example::

    >>> import torch, autoft_fast
    >>> from autoft_fast.ops.fused_optim import FusedOptimizer
    >>> opt = FusedOptimizer("sgd", lr=0.1)
    >>> w = torch.zeros(10, 4, requires_grad=True)
    >>> state = opt.new_state(w)
    >>> out, _ = autoft_fast.gated_embedding(torch.tensor([3, 3]), torch.zeros(10, 4), w,
    ...                                      torch.tensor([[0., 9.], [0., 9.]]), noise=False,
    ...                                      optimizer=opt, optimizer_state=state)
    >>> out.sum().backward()
    >>> w[3].tolist()   # two lookups of row 3, gradient 1 each: 0 - 0.1 * 2
    [-0.20000000298023224, -0.20000000298023224, -0.20000000298023224, -0.20000000298023224]
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import memory, validate

STEP = "step"


@dataclass(frozen=True)
class Rule:
    """One fused update rule: its state tensors and its row update.

    ``state``: name -> "row" (one float32 per table row) or "element" (float32 [V, D]).
    ``update(opt, w, g, state_rows, step)`` gets the touched rows ``w`` and their gradient sums
    ``g`` (float32 [U, D]) and the rows of each state tensor (float32), and returns the new
    rows of ``w`` and of each state tensor.
    """

    state: dict
    update: Callable
    doc: str


def _sgd(opt, w, g, s, step):
    return w.add(g, alpha=-opt.lr), {}


def _rowwise_adagrad(opt, w, g, s, step):
    acc = s["sum"] + (g * g).mean(dim=1)
    return w - opt.lr * g / (acc.sqrt() + opt.eps).unsqueeze(1), {"sum": acc}


def _adam(opt, w, g, s, step):
    beta1, beta2 = opt.betas
    m_old, v_old = s["exp_avg"], s["exp_avg_sq"]
    m_delta = (g - m_old).mul_(1 - beta1)
    v_delta = (g * g - v_old).mul_(1 - beta2)
    m = m_old + m_delta
    v = v_old + v_delta
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    step_size = opt.lr * math.sqrt(bc2) / bc1
    return w + (-step_size) * (m / (v.sqrt() + opt.eps)), {"exp_avg": m, "exp_avg_sq": v}


RULES: dict[str, Rule] = {
    "sgd": Rule({}, _sgd, "w -= lr * g"),
    "rowwise_adagrad": Rule({"sum": "row"}, _rowwise_adagrad,
                            "s += mean(g^2) per row; w -= lr * g / (sqrt(s) + eps)"),
    "adam": Rule({"exp_avg": "element", "exp_avg_sq": "element"}, _adam,
                 "lazy Adam (torch.optim.SparseAdam's formula) on the touched rows"),
}

_DEFAULT_EPS = {"sgd": 0.0, "rowwise_adagrad": 1e-10, "adam": 1e-8}


def check_kind(kind) -> str:
    """``kind`` if it names a fused rule, else a ValueError naming it and the choices."""
    if not isinstance(kind, str) or kind not in RULES:
        raise ValueError(f"optimizer = {kind!r} is not one of {sorted(RULES)}")
    return kind


@dataclass(frozen=True)
class FusedOptimizer:
    """Which rule the op's backward applies to the tuned rows, and its hyperparameters.

    ``deterministic``: combine repeated rows in a fixed order (a sorted, segment-by-segment
    sum), so that a run is bit-identical to the next. The kernels that update in the backward
    (``cpu``, ``cuda``, ``triton``) and the plain tables' ``rows_update`` always do; the flag
    decides for the torch-ops update (the ``reference`` backend, a data-parallel redirect),
    whose uncoalesced rows are then summed by a sort instead of atomics.

    Example::

        >>> from autoft_fast.ops.fused_optim import FusedOptimizer
        >>> FusedOptimizer("adam", lr=1e-3).betas
        (0.9, 0.999)
    """

    kind: str
    lr: float
    eps: float | None = None
    betas: tuple = (0.9, 0.999)
    deterministic: bool = True
    _eps: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self):
        check_kind(self.kind)
        # lr = 0 is allowed (the first steps of a warm-up schedule): the state still moves.
        lr = _real("lr", self.lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr = {self.lr!r} must be a finite number >= 0")
        object.__setattr__(self, "lr", lr)
        eps = _real("eps", _DEFAULT_EPS[self.kind] if self.eps is None else self.eps)
        if not eps >= 0:
            raise ValueError(f"eps = {self.eps!r} must be a number >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas = {self.betas!r} must be two numbers in [0, 1)")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be True or False, got {self.deterministic!r}")
        object.__setattr__(self, "_eps", float(eps))

    @property
    def rule(self) -> Rule:
        return RULES[self.kind]

    def new_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero state for a [V, D] table: the rule's tensors and a 0-dim int64 step count."""
        v, d = weight.shape
        state = {STEP: torch.zeros((), dtype=torch.int64, device=weight.device)}
        for name, kind in self.rule.state.items():
            shape = (v,) if kind == "row" else (v, d)
            # Rows are read and written at random: huge pages where they apply (ops/memory.py).
            state[name] = memory.zeros(shape, dtype=torch.float32, device=weight.device)
        return state

    def check_state(self, weight: torch.Tensor, state) -> None:
        """ValueError naming the key when ``state`` is not :meth:`new_state`'s layout."""
        if not isinstance(state, dict):
            raise TypeError(f"optimizer_state must be a dict of tensors, got {type(state).__name__}")
        want = self.new_state(weight.new_empty((0, weight.shape[1])))
        for name in want:
            if name not in state:
                raise ValueError(f"optimizer_state lacks {name!r} (a {self.kind} state has "
                                 f"{sorted(want)})")
        step = state[STEP]
        if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.int64):
            got = (f"{step.dtype} of shape {tuple(step.shape)}" if isinstance(step, torch.Tensor)
                   else type(step).__name__)
            raise ValueError(f"optimizer_state[{STEP!r}] must be a 0-dim int64 tensor (the step "
                             f"count), got {got}")
        for name, kind in self.rule.state.items():
            shape = (weight.shape[0],) if kind == "row" else tuple(weight.shape)
            t = state[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"optimizer_state[{name!r}] must be a tensor, got "
                                 f"{type(t).__name__}")
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"optimizer_state[{name!r}] must be float32 of shape {shape}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
            if not t.is_contiguous():  # the kernels write rows through a pointer
                raise ValueError(f"optimizer_state[{name!r}] must be contiguous (strides "
                                 f"{t.stride()}); pass optimizer.new_state(...) or "
                                 f".contiguous() of it")
            if t.device != weight.device:
                raise ValueError(f"optimizer_state[{name!r}] is on {t.device}, the table on "
                                 f"{weight.device}; move the state with the table")
        if step.device != weight.device and step.device.type != "cpu":
            raise ValueError(f"optimizer_state[{STEP!r}] is on {step.device}, the table on "
                             f"{weight.device}")

    def kernel_args(self, weight: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple:
        """Counts this step and returns the trailing arguments of a kernel that updates in place.

        (state_a, state_b, rule, lr, eps, beta1, beta2, step) of the
        ``gated_embedding_bwd_update`` op (ops/interface.py): the rule's state tensors in
        :data:`RULES` order (empty tensors where it has fewer), the rule's index in
        :data:`RULES`, and the step count after this step.

        Example::

            >>> import torch
            >>> from autoft_fast.ops.fused_optim import FusedOptimizer
            >>> opt = FusedOptimizer("rowwise_adagrad", lr=0.1)
            >>> w = torch.zeros(3, 2)
            >>> args = opt.kernel_args(w, opt.new_state(w))
            >>> tuple(args[0].shape), args[2:4], args[-1]
            ((3,), (1, 0.1), 1)
        """
        step_t = state[STEP]
        step_t.add_(1)
        tensors = [state[name] for name in self.rule.state]
        tensors += [torch.empty(0, dtype=torch.float32, device=weight.device)] * (2 - len(tensors))
        return (*tensors, list(RULES).index(self.kind), float(self.lr), self._eps,
                float(self.betas[0]), float(self.betas[1]), int(step_t.item()))

    def apply(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
              state: dict[str, torch.Tensor]) -> None:
        """Update ``weight[rows]`` (sorted unique) and the state in place from ``grad`` [U, D].

        Inside :func:`updates_redirected` the update is handed to the redirect instead (the
        data-parallel trainer combines every rank's rows there, then calls :meth:`apply_now`).
        """
        if _redirects:
            _redirects[-1](self, weight, rows, grad, state)
            return
        self.apply_now(weight, rows, grad, state)

    def apply_now(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
                  state: dict[str, torch.Tensor]) -> None:
        """:meth:`apply` without looking at any redirect."""
        step_t = state[STEP]
        step_t.add_(1)
        if rows.numel() == 0:
            return
        step = int(step_t.item())
        rows = rows.to(device=weight.device, dtype=torch.int64)
        w_rows = weight.index_select(0, rows).float()
        s_rows = {k: state[k].index_select(0, rows) for k in self.rule.state}
        rule_opt = _Hyper(self.lr, self._eps, self.betas)
        new_w, new_s = self.rule.update(rule_opt, w_rows, grad.float(), s_rows, step)
        weight.index_copy_(0, rows, new_w.to(weight.dtype))
        for k, v in new_s.items():
            state[k].index_copy_(0, rows, v)


def _real(name: str, value) -> float:
    """``value`` as a float: a Python or NumPy real number, or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Hyper:
    lr: float
    eps: float
    betas: tuple


_paused = [0]


@contextlib.contextmanager
def fused_updates_paused():
    """Inside this block, backward passes through the op compute the logit gradients only.

    For steps that train something else (a held-out policy step) on a model whose tables
    update themselves in the backward. The pause is process-wide, not per thread: autograd
    runs the backward of CUDA tensors on its own device threads, which a thread-local flag
    would not reach; so two threads training in one process must not overlap such a block
    with another's ordinary backward.

    Example::

        >>> from autoft_fast.ops.fused_optim import fused_updates_paused
        >>> with fused_updates_paused():
        ...     pass
    """
    _paused[0] += 1
    try:
        yield
    finally:
        _paused[0] -= 1


def updates_paused() -> bool:
    return _paused[0] > 0


def updates_are_redirected() -> bool:
    """Whether an :func:`updates_redirected` block is active (kernels must not update then).

    Example::

        >>> from autoft_fast.ops.fused_optim import updates_are_redirected, updates_redirected
        >>> with updates_redirected(lambda *update: None):
        ...     updates_are_redirected()
        True
    """
    return bool(_redirects)


_redirects: list = []


@contextlib.contextmanager
def updates_redirected(fn: Callable):
    """Inside this block, every fused update goes to ``fn(optimizer, weight, rows, grad, state)``.

    ``rows``/``grad`` are one backward's sorted unique touched rows and their float32 sums;
    nothing is applied unless ``fn`` calls ``optimizer.apply_now``. Used to defer the update
    until the row gradients of every data-parallel rank are combined.

    Example::

        >>> from autoft_fast.ops.fused_optim import updates_redirected
        >>> pending = []
        >>> with updates_redirected(lambda *update: pending.append(update)):
        ...     pass
    """
    _redirects.append(fn)
    try:
        yield
    finally:
        _redirects.pop()


def combine_rows(rows: torch.Tensor, values: torch.Tensor, *, deterministic: bool):
    """Sorted unique rows and their float32 sums from one value row per lookup (uncoalesced)."""
    values = values.float()
    if rows.numel() == 0:
        return rows.to(torch.int64), values
    if deterministic:
        order = torch.argsort(rows, stable=True)
        rows_sorted = rows[order]
        unique, counts = torch.unique_consecutive(rows_sorted, return_counts=True)
        sums = torch.segment_reduce(values[order], "sum", lengths=counts)
        return unique.to(torch.int64), sums
    unique, inverse = torch.unique(rows, return_inverse=True)
    sums = values.new_zeros((unique.shape[0], values.shape[1])).index_add_(0, inverse, values)
    return unique.to(torch.int64), sums


def touched_rows_mask(rows: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Which of the sorted unique ``rows`` had a lookup whose forward gate z1 was nonzero."""
    used = indices.reshape(-1)[gates.reshape(-1, 2)[:, 1] != 0].to(torch.int64)
    return torch.isin(rows, used)


@dataclass(frozen=True)
class Lookup:
    """One group of lookups into a plain table, for :func:`fused_lookup`.

    ``indices`` [*S] (``pooled=False``: out [*S, D] = w * W[indices]) or [*S, L] (``pooled=True``:
    out [*S, D] = sum over L of w * W[indices]). ``weights``: None (every w = 1) or a float tensor
    of ``indices``' shape; it may require grad (then it gets <grad_out, W[indices]>). A lookup
    whose weight is 0 (a PAD slot, a gate that chose the frozen row) does not touch its row.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import Lookup
        >>> Lookup(torch.tensor([[1, 2]])).pooled
        False
    """

    indices: torch.Tensor
    weights: torch.Tensor | None = None
    pooled: bool = False


def plain_lookup(weight: torch.Tensor, lk: Lookup) -> torch.Tensor:
    """The output of one :class:`Lookup` with ordinary autograd (no fused update).

    ``F.embedding`` (times the weights), or for a pooled lookup each row times its weight summed
    in slot order (what ``BaseCTRModel.pool_multihot`` computes), so the fused forward equals
    the dense one bit for bit.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import Lookup, plain_lookup
        >>> plain_lookup(torch.eye(3), Lookup(torch.tensor([[0, 2]]), torch.ones(1, 2), True))
        tensor([[1., 0., 1.]])
    """
    if lk.pooled:
        *shape, length = lk.indices.shape
        ids = lk.indices.reshape(-1, length)
        rows = torch.nn.functional.embedding(ids, weight)
        if lk.weights is not None:
            rows = rows * lk.weights.reshape(-1, length, 1).to(weight.dtype)
        # Summed slot by slot, in slot order: the rounding of BaseCTRModel.pool_multihot and of
        # the bag op (F.embedding_bag's x86 kernel fuses the multiply into the add).
        out = rows[:, 0] if length else weight.new_zeros(ids.shape[0], weight.shape[1])
        for slot in range(1, length):
            out = out + rows[:, slot]
        return out.view(*shape, weight.shape[1])
    out = torch.nn.functional.embedding(lk.indices, weight)
    return out if lk.weights is None else lk.weights.unsqueeze(-1) * out


def _rows_update_kernel(weight: torch.Tensor):
    """The kernel op (C++ on the CPU, Triton on CUDA) that can update ``weight``'s rows, or None."""
    if not weight.is_contiguous() or weight.dtype not in (torch.float32, torch.bfloat16,
                                                          torch.float16):
        return None
    from . import registry
    return registry.rows_update_op(weight.device)


class OpenCall:
    """One fused call of a table, from its forward until its backward has run (``done``).

    ``shared``: another call of the same table was open at the same table version, so the
    two may meet in one backward, where an update inside the first backward would change the
    rows the second reads (and a rule with state would take two steps). A shared call's
    backward hands its rows to :func:`defer_update` instead, and at the end of the backward
    pass the row sums of every shared call of the table are combined into one step: the step
    of one call with the lookups concatenated. A call left open (a forward never run backward)
    makes later calls shared, which costs them only the fused kernel's speed.
    """

    __slots__ = ("done", "shared", "__weakref__")

    def __init__(self) -> None:
        self.done = False
        self.shared = False


# id(table) -> (table version, the open calls at that version); a call's entry lives as long
# as its autograd graph (a weak set), the table's entry as long as the table.
_open_calls: dict[int, tuple[int, weakref.WeakSet]] = {}


def open_call(weight: torch.Tensor) -> OpenCall:
    """Register a fused call of ``weight`` made now (from its op's forward); see OpenCall.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import open_call
        >>> w = torch.zeros(3, 2)
        >>> a, b = open_call(w), open_call(w)
        >>> a.shared, b.shared
        (True, True)
    """
    call = OpenCall()
    key = id(weight)
    entry = _open_calls.get(key)
    if entry is None or entry[0] != weight._version:
        if entry is None:
            weakref.finalize(weight, _open_calls.pop, key, None)
        entry = (weight._version, weakref.WeakSet())
        _open_calls[key] = entry
    for other in entry[1]:
        if not other.done:
            other.shared = call.shared = True
    entry[1].add(call)
    return call


# graph task id -> id(table) -> the deferred updates of the shared calls of one backward pass.
_deferred: dict[int, dict[int, list]] = {}
_MAX_DEFERRED_PASSES = 8


def defer_update(optimizer: "FusedOptimizer", weight: torch.Tensor, rows: torch.Tensor,
                 values: torch.Tensor, state: dict, *, l2sp=None,
                 bump_version: bool = False) -> None:
    """Queue a call's update for the end of the backward pass that is running (a shared
    call), or for the end of the :func:`fused_updates_accumulated` block around it.

    ``rows`` [K] and ``values`` [K, D] need not be unique: the queued calls of a table in one
    backward are concatenated and combined (:func:`combine_rows`) and ``l2sp`` is added once
    per backward; then one :meth:`FusedOptimizer.apply` runs on the sum over the backward
    passes (``bump_version``: and autograd is told the table changed). A backward that
    raised before its end never applies its queued updates; the oldest such leftovers are
    dropped once more than a few backward passes have updates queued (a backward nested in
    another, as reentrant checkpointing runs one, keeps the outer one's).
    """
    task = torch._C._current_graph_task_id()
    entry = (optimizer, weight, rows, values, state, l2sp, bump_version)
    if _accumulations:
        _accumulations[-1].setdefault(id(weight), {}).setdefault(task, []).append(entry)
        return
    if task not in _deferred:
        while len(_deferred) >= _MAX_DEFERRED_PASSES:
            _deferred.pop(next(iter(_deferred)))  # the oldest: a backward that raised
        _deferred[task] = {}
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _apply_deferred(task))
    _deferred[task].setdefault(id(weight), []).append(entry)


def _apply_deferred(task: int) -> None:
    for entries in _deferred.pop(task, {}).values():
        _step_table([entries])


def _step_table(passes: list) -> None:
    """One step of one table from its queued calls, grouped by backward pass."""
    optimizer, weight, _, _, state, l2sp, _ = passes[0][0]
    w = weight.detach()
    rows, values = [], []
    for entries in passes:
        if any(e[0] is not optimizer or e[4].keys() != state.keys()
               or any(e[4][k] is not v for k, v in state.items()) for e in entries):
            raise RuntimeError("fused optimizer: calls of one table were given different "
                               "optimizers or optimizer states")
        r, v = combine_rows(torch.cat([e[2].to(torch.int64) for e in entries]),
                            torch.cat([e[3].to(torch.float32) for e in entries]),
                            deterministic=optimizer.deterministic)
        if not _redirects:  # a redirect (data-parallel) adds L2-SP after combining ranks
            v = add_l2sp(w, r, v, l2sp)
        rows.append(r)
        values.append(v)
    if len(passes) > 1:
        r, v = combine_rows(torch.cat(rows), torch.cat(values),
                            deterministic=optimizer.deterministic)
    else:
        r, v = rows[0], values[0]
    with torch.no_grad():
        optimizer.apply(w, r, v, state)
    if any(e[6] for entries in passes for e in entries) and not _redirects:
        torch.autograd.graph.increment_version(weight)


_accumulations: list[dict] = []


def updates_accumulated() -> bool:
    """Whether a :func:`fused_updates_accumulated` block is active."""
    return bool(_accumulations)


@contextlib.contextmanager
def fused_updates_accumulated():
    """Gradient accumulation for tables with a fused optimizer.

    Inside this block no fused table is updated: each backward hands its row gradients on,
    and every backward's logit gradients read the rows the block started with. On leaving
    the block each table takes one optimizer step on the sum of its row gradients over the
    block's backward passes: the step ``torch.optim`` takes after gradients accumulated over
    micro-batches (lazy L2-SP adds its term once per backward, as a penalty in each
    micro-batch's loss would). A block left by an exception applies nothing. Process-wide,
    as :func:`fused_updates_paused`.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import (FusedOptimizer, Lookup, fused_lookup,
        ...                                          fused_updates_accumulated)
        >>> w = torch.nn.Parameter(torch.zeros(4, 1))
        >>> opt = FusedOptimizer("adam", lr=0.1)
        >>> state = opt.new_state(w)
        >>> with fused_updates_accumulated():
        ...     for ids in ([1], [1, 2]):
        ...         fused_lookup(w, [Lookup(torch.tensor(ids))], opt, state)[0].sum().backward()
        ...     w[1].item()                          # nothing applied yet
        0.0
        >>> int(state["step"]), round(w[1].item(), 4)  # one Adam step on the summed gradient
        (1, -0.1)
    """
    pending: dict = {}
    _accumulations.append(pending)
    try:
        yield
    finally:
        _accumulations.pop()
    for per_pass in pending.values():
        _step_table(list(per_pass.values()))


def refuse_double_backward(op: str) -> None:
    """Raise, before any update, in a fused backward asked to build a graph (create_graph=
    True): the step it takes cannot be differentiated, and a second backward would read rows
    the first one updated."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} with optimizer= has no double backward: its backward updates the table, "
            "so create_graph=True cannot hold (no update was made); differentiate without "
            "create_graph, or train this table without a fused optimizer")


@contextlib.contextmanager
def _step_undone_on_error(state: dict):
    """Give back the step that ``kernel_args`` counted when the kernel then raises: a failed
    call leaves the state as it found it (Adam's bias correction reads the count)."""
    before = int(state[STEP].item())
    try:
        yield
    except BaseException:
        state[STEP].fill_(before)
        raise


class _FusedLookup(torch.autograd.Function):
    """The plain lookups of one table whose backward updates the touched rows in place."""

    @staticmethod
    def forward(ctx, weight, spec, *tensors):
        optimizer, state, pooled, l2sp = spec
        lookups = [Lookup(tensors[2 * i], tensors[2 * i + 1], p) for i, p in enumerate(pooled)]
        ctx.weight, ctx.spec, ctx.lookups = weight, spec, lookups
        ctx.call = open_call(weight)
        return tuple(plain_lookup(weight.detach(), lk) for lk in lookups)

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward("fused_lookup")
        optimizer, state, _, l2sp = ctx.spec
        ctx.call.done = True
        w = ctx.weight.detach()
        dim = w.shape[1]
        rows, values, grad_weights = [], [], []
        for i, (lk, g) in enumerate(zip(ctx.lookups, grads)):
            ids = lk.indices
            g = g.to(torch.float32)
            gw = None
            if lk.pooled:
                per = g.unsqueeze(-2).expand(*ids.shape, dim)
                if ctx.needs_input_grad[2 + 2 * i + 1]:
                    gw = (torch.nn.functional.embedding(ids, w).float() * per).sum(-1)
            else:
                per = g
                if ctx.needs_input_grad[2 + 2 * i + 1]:
                    gw = (torch.nn.functional.embedding(ids, w).float() * g).sum(-1)
            grad_weights.append(None if gw is None else gw.to(lk.weights.dtype))
            flat_ids = ids.reshape(-1)
            flat = per.reshape(-1, dim)
            if lk.weights is not None:
                lw = lk.weights.detach().reshape(-1)
                keep = lw != 0
                flat = flat[keep] * lw[keep].float().unsqueeze(1)
                flat_ids = flat_ids[keep]
            rows.append(flat_ids.to(torch.int64))
            values.append(flat)
        if not updates_paused():
            all_rows, all_values = torch.cat(rows), torch.cat(values)
            kernel = None if _redirects or l2sp is not None else _rows_update_kernel(w)
            if ctx.call.shared or _accumulations:
                defer_update(optimizer, ctx.weight, all_rows, all_values, state, l2sp=l2sp)
            elif kernel is not None:
                # One kernel pass: rows combined as combine_rows does (sorted, float32 sums in
                # lookup order) and updated by the rule as apply_now does.
                with torch.no_grad(), _step_undone_on_error(state):
                    kernel(all_rows, all_values, w, *optimizer.kernel_args(w, state))
            else:
                u_rows, sums = combine_rows(all_rows, all_values,
                                            deterministic=optimizer.deterministic)
                if not _redirects:  # a redirect (data-parallel) adds it after combining ranks
                    sums = add_l2sp(w, u_rows, sums, l2sp)
                with torch.no_grad():
                    optimizer.apply(w, u_rows, sums, state)
        out = [None, None]
        for gw in grad_weights:
            out += [None, gw]
        return tuple(out)


def add_l2sp(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, l2sp) -> torch.Tensor:
    """``grad`` [U, D] plus the lazy L2-SP term alpha * (weight[rows] - anchor[rows]).

    ``l2sp``: None (``grad`` as it is) or ``(anchor, alpha)``; ``rows`` sorted unique int64.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import add_l2sp
        >>> add_l2sp(torch.ones(3, 1), torch.tensor([2]), torch.zeros(1, 1), (torch.zeros(3, 1), 0.5))
        tensor([[0.5000]])
    """
    if l2sp is None or rows.numel() == 0:
        return grad
    anchor, alpha = l2sp
    return grad + alpha * (weight.detach().index_select(0, rows).float()
                           - anchor.detach().index_select(0, rows).float())


@torch.compiler.disable  # eager under torch.compile, as functional._fused (open_call's state)
def fused_lookup(weight: torch.Tensor, lookups, optimizer: FusedOptimizer,
                 state: dict[str, torch.Tensor], *, l2sp=None) -> tuple:
    """Plain lookups of ``weight`` [V, D] whose backward applies ``optimizer`` to the touched rows.

    ``lookups``: a sequence of :class:`Lookup`; returns one output per lookup, the values of
    ``plain_lookup`` bit for bit. The step's update is one optimizer step: the backward
    takes every lookup's gradient row (times its weight), drops the lookups of weight 0,
    combines repeated rows exactly (sorted segments, :func:`combine_rows`) and hands the sorted
    unique rows with their float32 sums to :meth:`FusedOptimizer.apply`; ``weight`` never gets
    a ``.grad`` and no [V, D] gradient is made. The result equals the plain optimizer (SGD,
    SparseAdam, ...) given the step's gradient on the touched rows. Several calls of one
    table that meet in one backward are one step as well, applied at its end (:class:`OpenCall`);
    one call is the fast path (its rows go straight to the update kernel).

    ``l2sp = (anchor, alpha)``: lazy L2-SP. The penalty alpha / 2 * ||weight - anchor||^2 adds
    alpha * (weight[r] - anchor[r]) to the gradient of every touched row r (rows not looked up
    this step are not pulled, as the lazy optimizer state of those rows does not move either).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.fused_optim import FusedOptimizer, Lookup, fused_lookup
        >>> w = torch.nn.Parameter(torch.zeros(10, 2))
        >>> opt = FusedOptimizer("sgd", lr=0.5)
        >>> (out,) = fused_lookup(w, [Lookup(torch.tensor([4, 4, 1]))], opt, opt.new_state(w))
        >>> out.sum().backward()
        >>> w[4].tolist(), w[1].tolist(), w.grad is None
        ([-1.0, -1.0], [-0.5, -0.5], True)
    """
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"optimizer must be a FusedOptimizer, got {type(optimizer).__name__}")
    if validate.under_func_transform():
        raise ValueError(validate.FUSED_UNDER_FUNC_TRANSFORM.format(what="fused_lookup"))
    optimizer.check_state(weight, state)
    lookups = list(lookups)
    for lk in lookups:
        if not isinstance(lk, Lookup):
            raise TypeError(f"lookups must be Lookup objects, got {type(lk).__name__}")
        if lk.indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be int32 or int64, got {lk.indices.dtype}")
        if lk.weights is not None and tuple(lk.weights.shape) != tuple(lk.indices.shape):
            raise ValueError(f"weights of shape {tuple(lk.weights.shape)} must have the indices' "
                             f"shape {tuple(lk.indices.shape)}")
        # Before any update: the contract's IndexError naming the position, not the gather's.
        validate.check_index_range(lk.indices, weight.shape[0])
    tensors = []
    for lk in lookups:
        tensors += [lk.indices, lk.weights]
    spec = (optimizer, state, tuple(lk.pooled for lk in lookups), l2sp)
    return _FusedLookup.apply(weight, spec, *tensors)
