"""Triton backend of the gated bag op (multi-hot fields): fused forward and fused backward.

The ops ``autoft_fast::gated_embedding_bag_fwd_triton`` and
``autoft_fast::gated_embedding_bag_bwd_triton`` have the kernel-level schemas of
``autoft_fast.ops.interface.BAG_FWD`` / ``BAG_BWD`` (values [L], offsets [B + 1], optional
float32 per-value weights, [V, D] tables, [B, 2] logits, a 0-dim int64 CPU seed) and are
declared with ``torch.library.triton_op`` as the lookup ops are (kernels/gated_embedding.py).

One program handles ``BLOCK_B`` bags. It draws each bag's gate once (the lookup op's Philox
stream indexed by bag), then, per ``BLOCK_D`` chunk of the row, walks the values of its bags in
step: value k of every bag of the block at once, up to the longest bag of the block (shorter
bags are masked), pooling the frozen and the tuned rows in float32 registers in value order (no
[L, D] gather buffer). A hard forward loads only the chosen table's rows. The backward pools
both tables again (the straight-through logit gradient needs <g, F[b]> and <g, T[b]>) and, in the
same walk, emits each value's tuned-row gradient z1[b] * c_i * g[b]: float32 atomics into a
[V, D] table (dense), or one float32 row per value that torch then sums per table row in float32
(sparse mode: sorted unique rows, cast once; dense under torch.use_deterministic_algorithms).

Example::

    >>> import torch, autoft_fast.kernels  # registers the ops  # doctest: +SKIP
    >>> values, offsets = torch.tensor([0, 2, 2], device="cuda"), torch.tensor([0, 1, 3], device="cuda")
    >>> frozen, tuned = torch.randn(2, 4, 8, device="cuda").unbind(0)
    >>> logits = torch.zeros(2, 2, device="cuda")
    >>> out, gates = torch.ops.autoft_fast.gated_embedding_bag_fwd_triton(
    ...     values, offsets, None, frozen, tuned, logits, torch.tensor(7), None, 1.0, True, True, 1,
    ...     False)
    >>> out.shape, gates.shape
    (torch.Size([2, 8]), torch.Size([2, 2]))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from autoft_fast.ops import library, quant, validate
from autoft_fast.ops.interface import (BAG_BWD, BAG_FWD, BAG_MODES, NAMESPACE, BagBwdArgs,
                                       BagFwdArgs, with_signature)

from .gated_embedding import (_block_sizes, _check_device, _frozen_scale, _gate_logit,
                              _interpreting, _is_concrete, _launch_device, _seed_args)

_MEAN = BAG_MODES.index("mean")


def _bag_block_sizes(bags: int, d: int, concrete: bool):
    """The lookup kernels' block sizes, with at most one warp per 32 bags of a block. At the
    lookup kernels' warp counts Triton 3.7's sm_90 compiler failed on the bag kernels for
    D = 32, 64 and 128 ('tt.load' op failed to verify that mask type matches ptr type), each
    time with more threads than bags in the block; with this cap they compiled at every D
    tried (1 to 512; python_tests/test_triton_specific.py builds them for sm_90)."""
    block_b, block_d, num_warps = _block_sizes(bags, d, concrete)
    return block_b, block_d, max(1, min(num_warps, block_b // 32))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bag_bounds(offsets_ptr, b, bmask):
    """(first value, value count) of each bag b of the block, and the longest count."""
    start = tl.load(offsets_ptr + b, mask=bmask, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + b + 1, mask=bmask, other=0).to(tl.int64)
    count = end - start
    # The walk's trip count as int32 (a bag never holds 2**31 values): loop bounds of one type.
    return start, count, tl.max(count, axis=0).to(tl.int32)


@triton.jit
def _value_weights(weights_ptr, pos, vmask, count, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr):
    """c_i of the values at ``pos``: w_i (sum) or w_i / len(bag) (mean), w_i = 1 without weights."""
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + pos, mask=vmask, other=0.0)
    else:
        w = tl.where(vmask, 1.0, 0.0)
    if MEAN:
        w = w / tl.maximum(count, 1).to(tl.float32)
    return w


# Random seeds and bag counts would otherwise each pick a specialisation and recompile.
@triton.jit(do_not_specialize=["seed_val", "B"])
def _bag_fwd_kernel(
    values_ptr, offsets_ptr, weights_ptr, frozen_ptr, tuned_ptr, logits_ptr, seed_ptr, seed_val,
    uniforms_ptr, out_ptr, gates_ptr, B, D, FS, tau,
    HARD: tl.constexpr, NOISE: tl.constexpr, USE_UNIFORMS: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, QUANT: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < B
    start, count, longest = _bag_bounds(offsets_ptr, b, bmask)
    x = _gate_logit(b, bmask, logits_ptr, seed_ptr, seed_val, uniforms_ptr, tau,
                    NOISE, USE_UNIFORMS, SEED_FROM_PTR)
    y1 = 1.0 / (1.0 + tl.exp(-x))
    if HARD:
        # The contract's rule x > 0; NaN compares false, so a NaN logit picks the frozen rows.
        pick_tuned = x > 0.0
        z1 = tl.where(pick_tuned, 1.0, 0.0)
        z0 = 1.0 - z1
    else:
        pick_tuned = bmask
        z1 = y1
        z0 = 1.0 / (1.0 + tl.exp(x))  # sigmoid(-x): 1 - y1 cancels when the gate is nearly sure
    tl.store(gates_ptr + 2 * b, z0, mask=bmask)
    tl.store(gates_ptr + 2 * b + 1, z1, mask=bmask)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = bmask[:, None] & (cols < D)[None, :]
        pf = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        pt = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for k in range(0, longest):
            vmask = bmask & (k < count)
            pos = start + k
            row = tl.load(values_ptr + pos, mask=vmask, other=0).to(tl.int64)
            w = _value_weights(weights_ptr, pos, vmask, count, HAS_WEIGHTS, MEAN)
            mk = m2 & vmask[:, None]
            if QUANT:
                frow_off = row * FS
            else:
                frow_off = row * D
            if HARD:
                # Only the chosen table's rows are read (their int8 scales too: a NaN in a
                # row not chosen stays out).
                scale = _frozen_scale(frozen_ptr, frow_off, vmask & (~pick_tuned), D, QUANT)
                fmask = mk & (~pick_tuned)[:, None]
                tmask = mk & pick_tuned[:, None]
            else:
                scale = _frozen_scale(frozen_ptr, frow_off, vmask, D, QUANT)
                fmask = mk
                tmask = mk
            f = tl.load(frozen_ptr + frow_off[:, None] + cols[None, :], mask=fmask,
                        other=0).to(tl.float32)
            if QUANT:
                f = f * scale[:, None]
            t = tl.load(tuned_ptr + (row * D)[:, None] + cols[None, :], mask=tmask,
                        other=0.0).to(tl.float32)
            pf += w[:, None] * f
            pt += w[:, None] * t
        if HARD:
            o = pf + pt  # the other table's sum is exactly 0
        else:
            o = z0[:, None] * pf + z1[:, None] * pt
        tl.store(out_ptr + (b * D)[:, None] + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["seed_val", "B"])
def _bag_bwd_kernel(
    grad_out_ptr, grad_gates_ptr, values_ptr, offsets_ptr, weights_ptr, frozen_ptr, tuned_ptr,
    logits_ptr, seed_ptr, seed_val, uniforms_ptr, accum_ptr, grad_logits_ptr, B, D, FS, tau,
    HARD: tl.constexpr, NOISE: tl.constexpr, USE_UNIFORMS: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, HAS_GRAD_GATES: tl.constexpr, PER_VALUE: tl.constexpr,
    QUANT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < B
    start, count, longest = _bag_bounds(offsets_ptr, b, bmask)
    x = _gate_logit(b, bmask, logits_ptr, seed_ptr, seed_val, uniforms_ptr, tau,
                    NOISE, USE_UNIFORMS, SEED_FROM_PTR)
    y1 = 1.0 / (1.0 + tl.exp(-x))
    # y0 * y1 as a product of two sigmoids: 1 - y1 would cancel when the gate is nearly sure.
    y0y1 = y1 * (1.0 / (1.0 + tl.exp(x)))
    if HARD:
        z1 = tl.where(x > 0.0, 1.0, 0.0)
    else:
        z1 = y1

    a0 = tl.zeros([BLOCK_B], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = bmask[:, None] & (cols < D)[None, :]
        g = tl.load(grad_out_ptr + (b * D)[:, None] + cols[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        pf = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        pt = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for k in range(0, longest):
            vmask = bmask & (k < count)
            pos = start + k
            row = tl.load(values_ptr + pos, mask=vmask, other=0).to(tl.int64)
            w = _value_weights(weights_ptr, pos, vmask, count, HAS_WEIGHTS, MEAN)
            mk = m2 & vmask[:, None]
            if QUANT:
                frow_off = row * FS
            else:
                frow_off = row * D
            scale = _frozen_scale(frozen_ptr, frow_off, vmask, D, QUANT)
            f = tl.load(frozen_ptr + frow_off[:, None] + cols[None, :], mask=mk,
                        other=0).to(tl.float32)
            if QUANT:
                f = f * scale[:, None]
            src = (row * D)[:, None] + cols[None, :]
            t = tl.load(tuned_ptr + src, mask=mk, other=0.0).to(tl.float32)
            pf += w[:, None] * f
            pt += w[:, None] * t
            gt = (z1 * w)[:, None] * g
            if PER_VALUE:
                tl.store(accum_ptr + (pos * D)[:, None] + cols[None, :], gt, mask=mk)
            else:
                # A hard gate that chose the frozen rows adds nothing: skip its atomics.
                tl.atomic_add(accum_ptr + src, gt, mask=mk & (z1 != 0.0)[:, None], sem="relaxed")
        a0 += tl.sum(g * pf, axis=1)
        a1 += tl.sum(g * pt, axis=1)

    dl1 = y0y1 * (a1 - a0) / tau
    if HAS_GRAD_GATES:
        h0 = tl.load(grad_gates_ptr + 2 * b, mask=bmask, other=0.0)
        h1 = tl.load(grad_gates_ptr + 2 * b + 1, mask=bmask, other=0.0)
        dl1 += y0y1 * (h1 - h0) / tau
    tl.store(grad_logits_ptr + 2 * b, -dl1, mask=bmask)
    tl.store(grad_logits_ptr + 2 * b + 1, dl1, mask=bmask)


# --------------------------------------------------------------------------------------------
# Host side: validation, launch configuration
# --------------------------------------------------------------------------------------------


def _check_inputs(values, offsets, weights, frozen_weight, tuned_weight, logits, seed, uniforms,
                  tau, mode):
    """The contract's bag checks (ops/validate.py) for direct callers of the kernel ops."""
    validate.check_bag_inputs(values, offsets, weights, frozen_weight, tuned_weight, logits,
                              uniforms, reference=False)
    validate.check_kernel_inputs(values.new_empty((offsets.shape[0] - 1,)), frozen_weight,
                                 tuned_weight, logits, seed, uniforms, tau, backend="triton",
                                 low_precision_frozen=True)
    if isinstance(mode, bool) or mode not in range(len(BAG_MODES)):
        raise ValueError(f"mode must be 0 (sum) or 1 (mean), got mode = {mode!r}")
    for name, t in (("values", values), ("offsets", offsets), ("per_sample_weights", weights),
                    ("frozen_weight", frozen_weight), ("tuned_weight", tuned_weight),
                    ("logits", logits), ("uniforms", uniforms)):
        if t is not None:
            _check_device(t, name)


def _checked_values(values, offsets, num_rows: int, concrete: bool) -> torch.Tensor:
    """The values the kernel may read: offsets and range checked eagerly, or by an op in a
    traced graph (which runs the same checks at run time)."""
    if concrete:
        validate.check_bag_data(values, offsets, num_rows)
        return values
    return torch.ops.autoft_fast.checked_bag_values(values, offsets, num_rows)


def _contiguous(values, offsets, weights, frozen_weight, tuned_weight, logits, uniforms):
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return tuple(c(t) for t in (values, offsets, weights, frozen_weight, tuned_weight, logits,
                                uniforms))


def _fwd_launch(values, offsets, weights, frozen_weight, tuned_weight, logits, seed, uniforms,
                tau: float, hard: bool, noise: bool, mode: int, concrete: bool):
    bags = offsets.shape[0] - 1
    d = tuned_weight.shape[1]
    device = values.device
    out = torch.empty((bags, d), dtype=tuned_weight.dtype, device=device)
    gates = torch.empty((bags, 2), dtype=torch.float32, device=device)
    values = _checked_values(values, offsets, tuned_weight.shape[0], concrete)
    if bags == 0:
        return out, gates
    use_uniforms = noise and uniforms is not None
    seed_ptr, seed_val, seed_from_ptr = _seed_args(seed, noise and not use_uniforms, device, concrete)
    block_b, block_d, num_warps = _bag_block_sizes(bags, d, concrete)
    kernel = _bag_fwd_kernel if concrete else wrap_triton(_bag_fwd_kernel)
    with _launch_device(values, concrete):
        kernel[(triton.cdiv(bags, block_b),)](
            values, offsets, weights if weights is not None else logits, frozen_weight,
            tuned_weight, logits, seed_ptr if seed_from_ptr else logits, seed_val,
            uniforms if use_uniforms else logits, out, gates, bags, d, frozen_weight.shape[1],
            float(tau),
            HARD=hard, NOISE=noise, USE_UNIFORMS=use_uniforms, SEED_FROM_PTR=seed_from_ptr,
            QUANT=quant.is_quantised(frozen_weight), HAS_WEIGHTS=weights is not None,
            MEAN=mode == _MEAN, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out, gates


def _bwd_launch(grad_out, grad_gates, values, offsets, weights, frozen_weight, tuned_weight,
                logits, seed, uniforms, tau: float, hard: bool, noise: bool, mode: int,
                sparse: bool, concrete: bool):
    bags = offsets.shape[0] - 1
    length = values.shape[0]
    v, d = tuned_weight.shape
    device = values.device
    grad_logits = torch.empty((bags, 2), dtype=torch.float32, device=device)
    values = _checked_values(values, offsets, v, concrete)
    # As the lookup backward: float atomics sum a repeated row in scheduling order, so sparse
    # mode and deterministic dense mode take one float32 row per value, summed below.
    per_value = sparse or torch.are_deterministic_algorithms_enabled()
    if per_value:
        accum = torch.empty((length, d), dtype=torch.float32, device=device)
    else:
        accum = torch.zeros((v, d), dtype=torch.float32, device=device)
    if bags > 0:
        use_uniforms = noise and uniforms is not None
        seed_ptr, seed_val, seed_from_ptr = _seed_args(seed, noise and not use_uniforms, device,
                                                       concrete)
        block_b, block_d, num_warps = _bag_block_sizes(bags, d, concrete)
        kernel = _bag_bwd_kernel if concrete else wrap_triton(_bag_bwd_kernel)
        with _launch_device(values, concrete):
            kernel[(triton.cdiv(bags, block_b),)](
                grad_out, grad_gates if grad_gates is not None else logits, values, offsets,
                weights if weights is not None else logits, frozen_weight, tuned_weight, logits,
                seed_ptr if seed_from_ptr else logits, seed_val,
                uniforms if use_uniforms else logits, accum, grad_logits, bags, d,
                frozen_weight.shape[1], float(tau),
                HARD=hard, NOISE=noise, USE_UNIFORMS=use_uniforms, SEED_FROM_PTR=seed_from_ptr,
                HAS_GRAD_GATES=grad_gates is not None, PER_VALUE=per_value,
                QUANT=quant.is_quantised(frozen_weight), HAS_WEIGHTS=weights is not None,
                MEAN=mode == _MEAN, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
            )
    if sparse:
        # Coalesced: sorted unique rows, each the float32 sum of its values' rows, cast once.
        grad_rows, inverse = torch.unique(values.to(torch.int64), return_inverse=True)
        grad_tuned = torch.zeros((grad_rows.shape[0], d), dtype=torch.float32, device=device)
        grad_tuned = grad_tuned.index_add_(0, inverse, accum).to(tuned_weight.dtype)
        return grad_tuned, grad_logits, grad_rows
    if per_value:
        accum = torch.zeros((v, d), dtype=torch.float32, device=device).index_put_(
            (values.long(),), accum, accumulate=True)
    grad_tuned = accum if tuned_weight.dtype == torch.float32 else accum.to(tuned_weight.dtype)
    return grad_tuned, grad_logits, torch.empty((0,), dtype=torch.int64, device=device)


# Under TRITON_INTERPRET=1 a traced call runs the interpreter on real tensors through an opaque
# op (see kernels/gated_embedding.py); registered only under the interpreter.
def _register_interpreted_ops() -> None:
    @with_signature(BAG_FWD)
    def _fwd_interpreted(*args):
        a = BagFwdArgs(*args)
        return _fwd_launch(a.values, a.offsets, a.per_sample_weights, a.frozen_weight,
                           a.tuned_weight, a.logits, a.seed, a.uniforms, a.tau, a.hard, a.noise,
                           a.mode, concrete=True)

    @with_signature(BAG_BWD)
    def _bwd_interpreted(*args):
        a = BagBwdArgs(*args)
        return _bwd_launch(a.grad_out, a.grad_gates, a.values, a.offsets, a.per_sample_weights,
                           a.frozen_weight, a.tuned_weight, a.logits, a.seed, a.uniforms, a.tau,
                           a.hard, a.noise, a.mode, a.sparse, concrete=True)

    torch.library.custom_op(f"{NAMESPACE}::_gated_embedding_bag_fwd_triton_interpreted",
                            _fwd_interpreted, mutates_args=()).register_fake(library.fake_bag_fwd)
    torch.library.custom_op(f"{NAMESPACE}::_gated_embedding_bag_bwd_triton_interpreted",
                            _bwd_interpreted, mutates_args=()).register_fake(library.fake_bag_bwd)


if _interpreting():
    _register_interpreted_ops()


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


@triton_op(f"{NAMESPACE}::gated_embedding_bag_fwd_triton", mutates_args=())
@with_signature(BAG_FWD)
def gated_embedding_bag_fwd_triton(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused bag forward (Triton): returns (out [B, D], gates [B, 2]).

    Arguments: those of ``autoft_fast.ops.interface.BAG_FWD`` (``mode`` 0 = sum, 1 = mean).

    Example::

        >>> out, gates = torch.ops.autoft_fast.gated_embedding_bag_fwd_triton(  # doctest: +SKIP
        ...     values, offsets, None, frozen, tuned, logits, torch.tensor(7), None,
        ...     1.0, True, True, 1, False)
    """
    a = BagFwdArgs(*args)
    _check_inputs(a.values, a.offsets, a.per_sample_weights, a.frozen_weight, a.tuned_weight,
                  a.logits, a.seed, a.uniforms, a.tau, a.mode)
    tensors = _contiguous(a.values, a.offsets, a.per_sample_weights, a.frozen_weight,
                          a.tuned_weight, a.logits, a.uniforms)
    concrete = _is_concrete(*tensors, a.seed)
    values, offsets, weights, frozen_weight, tuned_weight, logits, uniforms = tensors
    if not concrete and _interpreting():
        return torch.ops.autoft_fast._gated_embedding_bag_fwd_triton_interpreted(
            values, offsets, weights, frozen_weight, tuned_weight, logits, a.seed, uniforms,
            a.tau, a.hard, a.noise, a.mode, a.sparse)
    return _fwd_launch(values, offsets, weights, frozen_weight, tuned_weight, logits, a.seed,
                       uniforms, a.tau, a.hard, a.noise, a.mode, concrete)


@triton_op(f"{NAMESPACE}::gated_embedding_bag_bwd_triton", mutates_args=())
@with_signature(BAG_BWD)
def gated_embedding_bag_bwd_triton(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused bag backward (Triton): returns (grad_tuned, grad_logits [B, 2], grad_rows).

    Arguments: those of ``autoft_fast.ops.interface.BAG_BWD``. Dense: grad_tuned [V, D] and an
    empty int64 grad_rows. ``sparse``: grad_rows the sorted unique values (int64) and grad_tuned
    [len(grad_rows), D] their gradients, summed in float32 and cast once (coalesced COO).

    Example::

        >>> gt, gl, rows = torch.ops.autoft_fast.gated_embedding_bag_bwd_triton(  # doctest: +SKIP
        ...     grad_out, None, values, offsets, None, frozen, tuned, logits, torch.tensor(7),
        ...     None, 1.0, True, True, 1, False)
    """
    a = BagBwdArgs(*args)
    _check_inputs(a.values, a.offsets, a.per_sample_weights, a.frozen_weight, a.tuned_weight,
                  a.logits, a.seed, a.uniforms, a.tau, a.mode)
    validate.check_grads(a.grad_out, a.grad_gates, a.logits.new_empty((a.logits.shape[0],)),
                         a.tuned_weight)
    tensors = _contiguous(a.values, a.offsets, a.per_sample_weights, a.frozen_weight,
                          a.tuned_weight, a.logits, a.uniforms)
    grad_out = a.grad_out.contiguous()
    grad_gates = None if a.grad_gates is None else a.grad_gates.contiguous()
    concrete = _is_concrete(grad_out, grad_gates, *tensors, a.seed)
    values, offsets, weights, frozen_weight, tuned_weight, logits, uniforms = tensors
    if not concrete and _interpreting():
        return torch.ops.autoft_fast._gated_embedding_bag_bwd_triton_interpreted(
            grad_out, grad_gates, values, offsets, weights, frozen_weight, tuned_weight, logits,
            a.seed, uniforms, a.tau, a.hard, a.noise, a.mode, a.sparse)
    return _bwd_launch(grad_out, grad_gates, values, offsets, weights, frozen_weight, tuned_weight,
                       logits, a.seed, uniforms, a.tau, a.hard, a.noise, a.mode, a.sparse, concrete)
