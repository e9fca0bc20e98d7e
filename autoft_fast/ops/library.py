"""The op's torch.library schemas, fake kernels and autograd formula: declared once, here.

The schemas are derived from :mod:`autoft_fast.ops.interface`. The C++ CPU and CUDA kernels
only register implementations for them (``TORCH_LIBRARY_IMPL(autoft_fast, CPU/CUDA, m)``); the
Triton pair is declared by ``torch.library.triton_op`` in ``autoft_fast.kernels`` with the same
derived signature. Every backend's forward op gets the same autograd formula through
:func:`register_autograd_for`, which the backend registry calls.
"""

from __future__ import annotations

from typing import Callable

import torch

from .interface import (BAG_BWD, BAG_FWD, BWD, BWD_UPDATE, FWD, NAMESPACE, PHILOX_UNIFORMS,
                        ROWS_UPDATE,
                        BagBwdArgs, BagFwdArgs,
                        BwdArgs, BwdUpdateArgs, FwdArgs, schema)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(schema(FWD))
_lib.define(schema(BWD))
_lib.define(schema(BWD_UPDATE))
_lib.define(schema(ROWS_UPDATE))
_lib.define(schema(PHILOX_UNIFORMS))
_lib.define(schema(BAG_FWD))
_lib.define(schema(BAG_BWD))


def fake_fwd(*args):
    """Output shapes of the forward (any backend): out [N, D] in the table dtype, gates [N, 2]."""
    a = FwdArgs(*args)
    n = a.indices.shape[0]
    out = a.tuned_weight.new_empty((n, a.tuned_weight.shape[1]))
    gates = a.logits.new_empty((n, 2), dtype=torch.float32)
    return out, gates


def fake_bwd(*args):
    """Output shapes of the backward (any backend); sparse mode has a data-dependent row count."""
    a = BwdArgs(*args)
    n = a.indices.shape[0]
    grad_logits = a.logits.new_empty((n, 2), dtype=torch.float32)
    if a.sparse:
        # How many rows a backend returns is data-dependent (at most n). An upper bound is only
        # given when n is a plain int: a symbolic n (dynamic batch size) cannot bound it.
        ctx = torch.library.get_ctx()
        rows = ctx.new_dynamic_size(max=n) if isinstance(n, int) else ctx.new_dynamic_size()
        grad_rows = a.indices.new_empty((rows,), dtype=torch.int64)
    else:
        rows = a.tuned_weight.shape[0]
        grad_rows = a.indices.new_empty((0,), dtype=torch.int64)
    grad_tuned = a.tuned_weight.new_empty((rows, a.tuned_weight.shape[1]))
    return grad_tuned, grad_logits, grad_rows


def fake_bwd_update(*args):
    """Output shape of the updating backward: grad_logits [N, 2] (the tables change in place)."""
    a = BwdUpdateArgs(*args)
    return a.logits.new_empty((a.indices.shape[0], 2), dtype=torch.float32)


torch.library.register_fake(f"{NAMESPACE}::{BWD_UPDATE.name}", fake_bwd_update, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::{ROWS_UPDATE.name}", lambda *args: None, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::{PHILOX_UNIFORMS.name}",
                            lambda seed, n: seed.new_empty((n,), dtype=torch.float32), lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::{FWD.name}", fake_fwd, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::{BWD.name}", fake_bwd, lib=_lib)

@torch.library.custom_op(f"{NAMESPACE}::checked_indices", mutates_args=())
def checked_indices(indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A copy of ``indices`` after the contract's range check (IndexError naming the position).

    A traced graph (torch.compile) keeps this op and runs it at run time, so a kernel launched
    from the graph reads only checked indices; the copy is what ties the kernel to the check.

    Example::

        >>> import torch
        >>> torch.ops.autoft_fast.checked_indices(torch.tensor([0, 2]), 3).tolist()
        [0, 2]
    """
    from .validate import check_index_range

    check_index_range(indices, num_rows)
    return indices.clone()


@checked_indices.register_fake
def _(indices, num_rows):
    return torch.empty_like(indices)


@torch.library.custom_op(f"{NAMESPACE}::checked_bag_values", mutates_args=())
def checked_bag_values(values: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A copy of the bag op's ``values`` after the contract's offsets and range checks.

    The bag form of :func:`checked_indices`: a traced graph keeps it, so a kernel launched from
    the graph reads only bags whose offsets and values were checked at run time.

    Example::

        >>> import torch
        >>> torch.ops.autoft_fast.checked_bag_values(torch.tensor([0, 2]), torch.tensor([0, 1, 2]), 3).tolist()
        [0, 2]
    """
    from .validate import check_bag_data

    check_bag_data(values, offsets, num_rows)
    return values.clone()


@checked_bag_values.register_fake
def _(values, offsets, num_rows):
    return torch.empty_like(values)


DOUBLE_BACKWARD_ERROR = (
    "gated_embedding: backend {backend!r} has no double backward (the fused kernels give "
    "first-order gradients only); use backend='reference' for create_graph=True / "
    "higher-order gradients")

_SAVED = ("indices", "frozen_weight", "tuned_weight", "logits", "seed", "uniforms")
_OPTIONS = ("tau", "hard", "noise", "sparse")


def _setup_context(ctx, inputs, output):
    a = FwdArgs(*inputs)
    # Nothing of the forward is kept but its inputs: the backward regenerates the noise.
    ctx.save_for_backward(*(getattr(a, k) for k in _SAVED))
    ctx.options = tuple(getattr(a, k) for k in _OPTIONS)
    ctx.set_materialize_grads(False)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a first-order gradient through; differentiating it again raises the one error."""

    @staticmethod
    def forward(backend, value, *anchors):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR.format(backend=ctx.backend))


def _refuse_double_backward(outputs, backend: str, anchors):
    """Tie each gradient to the tensors it depends on through a node that refuses to differentiate."""
    return [None if t is None else _NoDoubleBackward.apply(backend, t, *anchors) for t in outputs]


def _grad_inputs(grad_out, grad_gates, tuned_weight, logits, rows: int):
    """The incoming gradient (zeros when only the gates got one) and, under create_graph,
    the tensors a second differentiation would reach (see _refuse_double_backward)."""
    if grad_out is None:
        grad_out = tuned_weight.new_zeros((rows, tuned_weight.shape[1]))
    anchors = [t for t in (grad_out, grad_gates, tuned_weight, logits)
               if t is not None and t.requires_grad] if torch.is_grad_enabled() else []
    return grad_out, anchors


def _grad_outputs(grad_tuned, grad_logits, grad_rows, *, name, anchors, sparse, coalesced,
                  tuned_weight):
    """The backward kernel's outputs as autograd wants them: double backward refused, and
    in sparse mode the tuned gradient as a COO tensor (coalesced where the backend says so:
    that saves the optimizer a coalesce, several ms for ~100k lookups in PyTorch's sparse
    SGD step)."""
    if anchors:  # create_graph=True: the gradients would be differentiated again
        grad_tuned, grad_logits = _refuse_double_backward((grad_tuned, grad_logits), name, anchors)
    if sparse:
        grad_tuned = torch.sparse_coo_tensor(
            grad_rows.reshape(1, -1), grad_tuned, tuned_weight.shape, is_coalesced=coalesced,
            check_invariants=False)  # rows were range-checked by the forward
    return grad_tuned, grad_logits


def _make_backward(bwd_op, backend_of: Callable[[str], tuple[str, bool]]):
    def backward(ctx, grad_out, grad_gates):
        saved = ctx.saved_tensors
        indices, frozen_weight, tuned_weight, logits, seed, uniforms = saved
        tau, hard, noise, sparse = ctx.options
        name, coalesced = backend_of(indices.device.type)
        # Only the gates got a gradient: none reaches the table (None, as autograd gives
        # the reference), not a table of zeros that an optimizer would still step on.
        out_used = grad_out is not None
        grad_out, anchors = _grad_inputs(grad_out, grad_gates, tuned_weight, logits,
                                         indices.shape[0])
        with torch.no_grad():
            grad_tuned, grad_logits, grad_rows = bwd_op(
                grad_out.contiguous(), None if grad_gates is None else grad_gates.contiguous(),
                indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise,
                sparse)
        grad_tuned, grad_logits = _grad_outputs(
            grad_tuned, grad_logits, grad_rows, name=name, anchors=anchors, sparse=sparse,
            coalesced=coalesced, tuned_weight=tuned_weight)
        if not ctx.needs_input_grad[2] or not out_used:
            grad_tuned = None
        if not ctx.needs_input_grad[3]:
            grad_logits = None
        grads = [None] * len(FWD.args)
        grads[2], grads[3] = grad_tuned, grad_logits
        return tuple(grads)

    return backward


def register_autograd_for(fwd_name: str, bwd_op, backend_of: Callable[[str], tuple[str, bool]]) -> None:
    """Give the forward op ``fwd_name`` the contract's straight-through backward via ``bwd_op``.

    ``backend_of(device_type)`` -> (backend name, whether its sparse-mode rows come sorted and
    unique); one op may serve several backends (the C++ op serves 'cpu' and 'cuda').
    """
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op, backend_of),
                                    setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Bags (multi-hot fields)
# ---------------------------------------------------------------------------------------------

def fake_bag_fwd(*args):
    """Output shapes of the bag forward: out [B, D] in the tuned dtype, gates [B, 2]."""
    a = BagFwdArgs(*args)
    b = a.logits.shape[0]
    return (a.tuned_weight.new_empty((b, a.tuned_weight.shape[1])),
            a.logits.new_empty((b, 2), dtype=torch.float32))


def fake_bag_bwd(*args):
    """Output shapes of the bag backward; sparse mode has a data-dependent row count (<= L)."""
    a = BagBwdArgs(*args)
    b, length = a.logits.shape[0], a.values.shape[0]
    grad_logits = a.logits.new_empty((b, 2), dtype=torch.float32)
    if a.sparse:
        ctx = torch.library.get_ctx()
        rows = ctx.new_dynamic_size(max=length) if isinstance(length, int) else ctx.new_dynamic_size()
        grad_rows = a.values.new_empty((rows,), dtype=torch.int64)
    else:
        rows = a.tuned_weight.shape[0]
        grad_rows = a.values.new_empty((0,), dtype=torch.int64)
    return a.tuned_weight.new_empty((rows, a.tuned_weight.shape[1])), grad_logits, grad_rows


torch.library.register_fake(f"{NAMESPACE}::{BAG_FWD.name}", fake_bag_fwd, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::{BAG_BWD.name}", fake_bag_bwd, lib=_lib)

_BAG_SAVED = ("values", "offsets", "per_sample_weights", "frozen_weight", "tuned_weight",
              "logits", "seed", "uniforms")
_BAG_OPTIONS = ("tau", "hard", "noise", "mode", "sparse")
_BAG_TUNED, _BAG_LOGITS = BAG_FWD.names.index("tuned_weight"), BAG_FWD.names.index("logits")


def _bag_setup_context(ctx, inputs, output):
    a = BagFwdArgs(*inputs)
    ctx.save_for_backward(*(getattr(a, k) for k in _BAG_SAVED))
    ctx.options = tuple(getattr(a, k) for k in _BAG_OPTIONS)
    ctx.set_materialize_grads(False)


def _make_bag_backward(bwd_op, backend_of: Callable[[str], tuple[str, bool]]):
    def backward(ctx, grad_out, grad_gates):
        values, offsets, weights, frozen_weight, tuned_weight, logits, seed, uniforms = ctx.saved_tensors
        tau, hard, noise, mode, sparse = ctx.options
        name, coalesced = backend_of(values.device.type)
        out_used = grad_out is not None  # as for lookups: no table gradient without one
        grad_out, anchors = _grad_inputs(grad_out, grad_gates, tuned_weight, logits,
                                         logits.shape[0])
        with torch.no_grad():
            grad_tuned, grad_logits, grad_rows = bwd_op(
                grad_out.contiguous(), None if grad_gates is None else grad_gates.contiguous(),
                values, offsets, weights, frozen_weight, tuned_weight, logits, seed, uniforms,
                tau, hard, noise, mode, sparse)
        grad_tuned, grad_logits = _grad_outputs(
            grad_tuned, grad_logits, grad_rows, name=name, anchors=anchors, sparse=sparse,
            coalesced=coalesced, tuned_weight=tuned_weight)
        grads = [None] * len(BAG_FWD.args)
        grads[_BAG_TUNED] = grad_tuned if ctx.needs_input_grad[_BAG_TUNED] and out_used else None
        grads[_BAG_LOGITS] = grad_logits if ctx.needs_input_grad[_BAG_LOGITS] else None
        return tuple(grads)

    return backward


def register_bag_autograd_for(fwd_name: str, bwd_op, backend_of: Callable[[str], tuple[str, bool]]) -> None:
    """Give the bag forward op ``fwd_name`` the straight-through backward via ``bwd_op``."""
    torch.library.register_autograd(fwd_name, _make_bag_backward(bwd_op, backend_of),
                                    setup_context=_bag_setup_context)
