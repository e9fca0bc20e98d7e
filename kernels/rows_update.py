"""Triton kernels of the fused optimizer: the row update of ``ops/fused_optim.py``'s rules.

Two ops, with the kernel-level interfaces of ``autoft_fast.ops.interface``:

- ``autoft_fast::rows_update_triton`` (ROWS_UPDATE): one gradient row per lookup
  (``values[n]`` for row ``indices[n]``); repeated rows are combined and the touched rows of
  the table and of the rule's state are updated in place. A plain table's fused lookup uses it
  on CUDA tensors, as it uses the C++ ``rows_update`` on CPU tensors.
- ``autoft_fast::gated_embedding_bwd_update_triton`` (BWD_UPDATE): the gated op's backward with
  the update inside it. The backward kernel writes the logit gradients and each lookup's row
  z1 * g; the lookups that reached the tuned row (z1 != 0 for a hard gate) then go to the
  update kernel. Returns grad_logits [N, 2].

The update kernel: the lookups are sorted by row (a stable sort, so each row's lookups are
contiguous and in lookup order), and one program takes one touched row. It sums the row's
gradients in float32 in lookup order, then applies the rule with the formulas and the float32
operations of the C++ kernel (``apply_row_update``; square roots and divisions correctly
rounded), so the result does not depend on scheduling: a run is bit-identical to the next.
A hot row whose lookups cross a window of ``SEGMENT_WINDOW`` sorted positions is summed in
pieces instead, as the CUDA kernels sum one (``kSegmentWindow`` there, the same windows and
slots): ``_pieces_kernel`` sums its run within each window in lookup order, and the row's
program adds those sums in window order, so no program walks a whole hot row.
No coalesced gradient is formed and no torch-ops optimizer step runs; what is stored between
the two kernels is the per-lookup row (float32 [N, D]) and the sort.

Example::

    >>> import torch, autoft_fast.kernels  # registers the ops  # doctest: +SKIP
    >>> w = torch.zeros(4, 8, device="cuda")
    >>> e = torch.empty(0, device="cuda")
    >>> torch.ops.autoft_fast.rows_update_triton(
    ...     torch.tensor([1, 1], device="cuda"), torch.ones(2, 8, device="cuda"), w,
    ...     e, e, 0, 0.5, 0.0, 0.9, 0.999, 1)
    >>> w[1, 0].item()   # two gradients of 1 summed, times -lr
    -1.0
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from autoft_fast.ops import validate
from autoft_fast.ops.interface import (BWD_UPDATE, NAMESPACE, ROWS_UPDATE, BwdUpdateArgs,
                                       with_signature)

from . import gated_embedding as _ge

RULE_NAMES = ("sgd", "rowwise_adagrad", "adam")  # the order of fused_optim.RULES


@triton.jit
def _segment_sum(values_ptr, order_ptr, start, end, cols, cmask, D):
    """The float32 sum, in sorted (= lookup) order, of the rows values[order[start:end]]."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for q in range(start, end):
        n = tl.load(order_ptr + q).to(tl.int64)
        acc += tl.load(values_ptr + n * D + cols, mask=cmask, other=0.0)
    return acc


SEGMENT_WINDOW = 128  # = kSegmentWindow of csrc/cuda/gated_embedding_kernels.cuh


@triton.jit(do_not_specialize=["N", "D"])
def _pieces_kernel(order_ptr, inv_ptr, seg_ptr, values_ptr, part_ptr, N, D,
                   WINDOW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Slot g of window w = g // 2 (the CUDA kernels' layout): 2w the piece that starts at the
    window's first position when its segment crosses a window boundary, 2w + 1 the piece of
    the window's last segment when it starts after that position and runs on into the next
    window. Sums the piece in lookup order into part[g]; a slot of no such piece is left."""
    g = tl.program_id(0)
    w0 = (g // 2).to(tl.int64) * WINDOW
    w1 = tl.minimum(w0 + WINDOW, N)
    if g % 2 == 0:
        u = tl.load(inv_ptr + w0)
        s_u = tl.load(seg_ptr + u)
        e_u = tl.load(seg_ptr + u + 1)
        valid = (s_u < w0) | (e_u > w1)
        begin = w0
        end = tl.minimum(e_u, w1)
    else:
        u = tl.load(inv_ptr + w1 - 1)
        s_u = tl.load(seg_ptr + u)
        e_u = tl.load(seg_ptr + u + 1)
        valid = (e_u > w1) & (s_u > w0)
        begin = s_u
        end = w1
    if valid:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            acc = _segment_sum(values_ptr, order_ptr, begin, end, cols, cmask, D)
            tl.store(part_ptr + g.to(tl.int64) * D + cols, acc, mask=cmask)


@triton.jit
def _row_sum(values_ptr, order_ptr, part_ptr, start, end, cols, cmask, D, WINDOW: tl.constexpr):
    """The row's gradient sum: in lookup order, or from its piece sums in window order when its
    lookups cross a window boundary (the order of the CUDA kernels' add_pieces)."""
    fw = start // WINDOW
    lw = (end - 1) // WINDOW
    if lw > fw:
        first = 2 * fw + (start % WINDOW != 0).to(start.dtype)
        acc = tl.zeros(cols.shape, dtype=tl.float32)
        acc += tl.load(part_ptr + first * D + cols, mask=cmask, other=0.0)
        for w in range(fw + 1, lw + 1):
            acc += tl.load(part_ptr + (2 * w) * D + cols, mask=cmask, other=0.0)
    else:
        acc = _segment_sum(values_ptr, order_ptr, start, end, cols, cmask, D)
    return acc


@triton.jit
def _to_bfloat16(x):
    """float32 -> bfloat16 rounded to nearest even (NaN -> the canonical quiet NaN): the bits of
    torch's and the C++ kernels' conversion, written out because Triton's interpreter truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["D"])
def _rows_update_kernel(
    order_ptr, seg_ptr, rows_ptr, values_ptr, part_ptr, weight_ptr, sa_ptr, sb_ptr, D,
    lr, eps, omb1, omb2, neg_step,
    RULE: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
):
    u = tl.program_id(0)
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    row = tl.load(rows_ptr + u).to(tl.int64)
    denom = 1.0
    if RULE == 1:
        # Row-wise Adagrad: the row's mean squared gradient first (a second pass sums again,
        # in the same order, so both passes see the same sums).
        sq = tl.sum(tl.zeros([BLOCK_D], dtype=tl.float32), axis=0)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            g = _row_sum(values_ptr, order_ptr, part_ptr, start, end, cols, cmask, D, WINDOW)
            sq += tl.sum(g * g, axis=0)
        acc = tl.load(sa_ptr + row) + tl.div_rn(sq, D.to(tl.float32))
        tl.store(sa_ptr + row, acc)
        denom = tl.sqrt_rn(acc) + eps
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = _row_sum(values_ptr, order_ptr, part_ptr, start, end, cols, cmask, D, WINDOW)
        off = row * D + cols
        w = tl.load(weight_ptr + off, mask=cmask, other=0.0).to(tl.float32)
        if RULE == 0:
            w = w + (-lr) * g
        elif RULE == 1:
            w = w - tl.div_rn(lr * g, denom)
        else:
            m = tl.load(sa_ptr + off, mask=cmask, other=0.0)
            v = tl.load(sb_ptr + off, mask=cmask, other=0.0)
            m = m + (g - m) * omb1
            v = v + (g * g - v) * omb2
            tl.store(sa_ptr + off, m, mask=cmask)
            tl.store(sb_ptr + off, v, mask=cmask)
            w = w + neg_step * tl.div_rn(m, tl.sqrt_rn(v) + eps)
        if weight_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(weight_ptr + off, _to_bfloat16(w), mask=cmask)
        else:
            tl.store(weight_ptr + off, w.to(weight_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _check_update_args(weight, weight_name, state_a, state_b, rule, step):
    """The checks of the C++ make_row_update, with its messages."""
    if isinstance(rule, bool) or rule not in (0, 1, 2):
        raise ValueError(f"rule must be 0 (sgd), 1 (rowwise_adagrad) or 2 (adam), got rule = {rule}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be [V, D], got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError(f"{weight_name} must be contiguous (its rows are updated in place)")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{weight_name} must be float32, bfloat16 or float16, got dtype {weight.dtype}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the step count after this step), got step = {step}")
    v, d = weight.shape
    wanted = {1: (("state_a", state_a, (v,)),),
              2: (("state_a", state_a, (v, d)), ("state_b", state_b, (v, d)))}.get(rule, ())
    for name, t, shape in wanted:
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got dtype {t.dtype}")
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {list(shape)}, "
                             f"got shape {list(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} must be on {weight.device} with {weight_name}, got {t.device}")


def _hyper(rule, lr, eps, beta1, beta2, step):
    """(lr, eps, 1 - beta1, 1 - beta2, -lr sqrt(bc2) / bc1) as make_row_update forms them."""
    neg_step = 0.0
    if rule == 2:
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        neg_step = -(lr * math.sqrt(bc2) / bc1)
    return float(lr), float(eps), float(1.0 - beta1), float(1.0 - beta2), neg_step


def update_rows(indices, values, weight, state_a, state_b, rule, lr, eps, beta1, beta2, step,
                concrete: bool = True) -> None:
    """Combine ``values`` [N, D] float32 by row ``indices`` [N] and update in place (checked)."""
    n = indices.shape[0]
    if n == 0:
        return
    d = weight.shape[1]
    # Stable: a row's lookups stay in lookup order, so its sum is formed in that order.
    sorted_rows, order = torch.sort(indices.to(torch.int64), stable=True)
    # The piece kernel maps a sorted position to its row's segment (inverse); a batch that
    # fits one window has no row crossing a window and needs neither.
    pieces = n > SEGMENT_WINDOW
    unique = torch.unique_consecutive(sorted_rows, return_inverse=pieces, return_counts=True)
    rows, counts = unique[0], unique[-1]
    seg = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=seg[1:])
    block_d = min(triton.next_power_of_2(max(int(d), 1)), 1024)
    warps = 1 if block_d <= 64 else 4
    parts = values  # read only for a row whose lookups cross a window: none when n fits one
    if pieces:
        slots = 2 * triton.cdiv(n, SEGMENT_WINDOW)
        parts = torch.empty((slots, d), dtype=torch.float32, device=values.device)
        kernel = _pieces_kernel if concrete else wrap_triton(_pieces_kernel)
        with _ge._launch_device(weight, concrete):
            kernel[(slots,)](order, unique[1], seg, values, parts, n, d,
                             WINDOW=SEGMENT_WINDOW, BLOCK_D=block_d, num_warps=warps)
    kernel = _rows_update_kernel if concrete else wrap_triton(_rows_update_kernel)
    empty = values  # a placeholder pointer for the state a rule does not have
    with _ge._launch_device(weight, concrete):
        kernel[(rows.shape[0],)](
            order, seg, rows, values, parts, weight,
            state_a if rule >= 1 else empty, state_b if rule == 2 else empty, d,
            *_hyper(rule, lr, eps, beta1, beta2, step),
            RULE=rule, BLOCK_D=block_d, WINDOW=SEGMENT_WINDOW, num_warps=warps,
        )


def _check_device(t: torch.Tensor, name: str) -> None:
    _ge._check_device(t, name)


@triton_op(f"{NAMESPACE}::rows_update_triton", mutates_args=("weight", "state_a", "state_b"))
@with_signature(ROWS_UPDATE)
def rows_update_triton(*args) -> None:
    """The fused optimizer's update of a plain table's rows (Triton); see ROWS_UPDATE.

    Example::

        >>> torch.ops.autoft_fast.rows_update_triton(  # doctest: +SKIP
        ...     rows, values, weight, state_a, state_b, 2, 1e-3, 1e-8, 0.9, 0.999, 1)
    """
    indices, values, weight, state_a, state_b, rule, lr, eps, beta1, beta2, step = args
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got dtype {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {list(indices.shape)}")
    _check_update_args(weight, "weight", state_a, state_b, rule, step)
    n, d = indices.shape[0], weight.shape[1]
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got dtype {values.dtype}")
    if tuple(values.shape) != (n, d):
        raise ValueError(f"values must be [N, D] = [{n}, {d}] (one gradient row per index), "
                         f"got shape {list(values.shape)}")
    for name, t in (("indices", indices), ("values", values), ("weight", weight)):
        _check_device(t, name)
    concrete = _ge._is_concrete(indices, values, weight, state_a, state_b)
    if n > 0:
        indices = _ge._range_checked(indices, weight.shape[0], concrete)
    update_rows(indices, values.contiguous(), weight, state_a, state_b, rule, lr, eps, beta1,
                beta2, step, concrete)


@triton_op(f"{NAMESPACE}::gated_embedding_bwd_update_triton",
           mutates_args=("tuned_weight", "state_a", "state_b"))
@with_signature(BWD_UPDATE)
def gated_embedding_bwd_update_triton(*args) -> torch.Tensor:
    """The gated op's backward with the fused optimizer's update (Triton); see BWD_UPDATE.

    Returns grad_logits [N, 2]; the tuned rows that a lookup's gate used, and their state, are
    updated in place.

    Example::

        >>> g_l = torch.ops.autoft_fast.gated_embedding_bwd_update_triton(  # doctest: +SKIP
        ...     grad_out, None, idx, frozen, tuned, logits, torch.tensor(7), None, 1.0, True,
        ...     True, state_a, state_b, 2, 1e-3, 1e-8, 0.9, 0.999, 1)
    """
    a = BwdUpdateArgs(*args)
    indices, frozen_weight, tuned_weight, logits, uniforms = _ge._prepare_fwd(
        a.indices, a.frozen_weight, a.tuned_weight, a.logits, a.seed, a.uniforms, a.tau)
    if tuned_weight.data_ptr() != a.tuned_weight.data_ptr():
        raise ValueError("tuned_weight must be contiguous (its rows are updated in place)")
    validate.check_grads(a.grad_out, a.grad_gates, indices, tuned_weight)
    _check_update_args(a.tuned_weight, "tuned_weight", a.state_a, a.state_b, a.rule, a.step)
    grad_out = a.grad_out.contiguous()
    grad_gates = None if a.grad_gates is None else a.grad_gates.contiguous()
    concrete = _ge._is_concrete(grad_out, grad_gates, indices, frozen_weight, tuned_weight,
                                logits, a.seed, uniforms)
    n, (v, d) = indices.shape[0], tuned_weight.shape
    if n > 0:
        indices = _ge._range_checked(indices, v, concrete)
    per_lookup = torch.empty((n, d), dtype=torch.float32, device=indices.device)
    z1 = torch.empty((n,), dtype=torch.float32, device=indices.device)
    grad_logits = _ge._bwd_kernel_launch(grad_out, grad_gates, indices, frozen_weight,
                                         tuned_weight, logits, a.seed, uniforms, a.tau, a.hard,
                                         a.noise, per_lookup, True, concrete, z1=z1)
    if a.hard:
        # A lookup whose gate chose the frozen row does not touch its tuned row (lazy state).
        keep = z1 != 0
        indices, per_lookup = indices[keep], per_lookup[keep]
    update_rows(indices, per_lookup, a.tuned_weight, a.state_a, a.state_b, a.rule, a.lr, a.eps,
                a.beta1, a.beta2, a.step, concrete)
    return grad_logits
