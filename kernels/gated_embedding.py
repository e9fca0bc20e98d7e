"""Triton backend of the gated embedding op: fused forward and fused backward.

The two ops ``autoft_fast::gated_embedding_fwd_triton`` and
``autoft_fast::gated_embedding_bwd_triton`` have the kernel-level schemas of
docs/internals.md (flat ``[N]`` indices, ``[V, D]`` tables, ``[N, 2]`` logits, a 0-dim int64
CPU seed) and are declared with ``torch.library.triton_op`` so that ``torch.compile`` sees the
Triton kernels inside them instead of an opaque call.

One program handles ``BLOCK_N`` lookups. It computes the gate of each lookup once (Philox
noise regenerated from (seed, n), sigmoid, hard choice), then walks the embedding dimension in
``BLOCK_D`` chunks. The forward of a hard gate loads only the chosen row, so it moves two rows
per lookup (one read, one write) plus 8 bytes of logits; the backward reads grad_out and both
rows (the straight-through logit gradient needs <g, frozen> and <g, tuned>).

Example::

    >>> import torch, autoft_fast.kernels  # registers the ops  # doctest: +SKIP
    >>> idx = torch.tensor([0, 2, 2], device="cuda")
    >>> frozen, tuned = torch.randn(2, 4, 8, device="cuda").unbind(0)
    >>> logits = torch.zeros(3, 2, device="cuda")
    >>> out, gates = torch.ops.autoft_fast.gated_embedding_fwd_triton(
    ...     idx, frozen, tuned, logits, torch.tensor(7), None, 1.0, True, True, False)
    >>> out.shape, gates.shape
    (torch.Size([3, 8]), torch.Size([3, 2]))
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from autoft_fast.ops import library, quant, validate
from autoft_fast.ops.interface import BWD, FWD, NAMESPACE, BwdArgs, FwdArgs, with_signature

try:  # TRITON_INTERPRET=1 turns @triton.jit functions into InterpretedFunction objects.
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    _InterpretedFunction = ()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# The uniform scale of docs/op-contract.md (csrc/philox.h: kUniformScale).
UNIFORM_SCALE: tl.constexpr = tl.constexpr(4.6566127342e-10)


@triton.jit
def _gate_logit(
    n, nmask, logits_ptr, seed_ptr, seed_val, uniforms_ptr, tau,
    NOISE: tl.constexpr, USE_UNIFORMS: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
):
    """x = (logit1 - logit0 + l) / tau for a block of lookups n (int64), l the logistic noise."""
    l0 = tl.load(logits_ptr + 2 * n, mask=nmask, other=0.0)
    l1 = tl.load(logits_ptr + 2 * n + 1, mask=nmask, other=0.0)
    d = l1 - l0
    if NOISE:
        if USE_UNIFORMS:
            u = tl.load(uniforms_ptr + n, mask=nmask, other=0.5)
        else:
            if SEED_FROM_PTR:
                seed = tl.load(seed_ptr)
            else:
                seed = seed_val
            # Counter (call lo, call hi, 0, 0) with 32-bit words. tl.randint4x is not used: with
            # an int64 offset some Triton releases switch to the 64-bit Philox variant.
            call = n >> 2
            c0 = call.to(tl.uint32)
            c1 = (call >> 32).to(tl.uint32)
            zero = c0 * 0
            w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
            word = n & 3
            w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
            x = w.to(tl.int32, bitcast=True)
            x = tl.where(x < 0, -x - 1, x)
            u = x.to(tl.float32) * UNIFORM_SCALE
        d = d + (tl.log(u + 1e-20) - tl.log(1.0 - u))
    return d / tau


@triton.jit
def _frozen_scale(frozen_ptr, frow_off, nmask, D, QUANT: tl.constexpr):
    """The rows' int8 scales (the float16 in the last two bytes of each row), or 1."""
    if QUANT:
        lo = tl.load(frozen_ptr + frow_off + D, mask=nmask, other=0).to(tl.int32) & 0xFF
        hi = tl.load(frozen_ptr + frow_off + D + 1, mask=nmask, other=0).to(tl.int32) & 0xFF
        bits = (lo | (hi << 8)).to(tl.int16)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return tl.full(frow_off.shape, 1.0, tl.float32)


# Random seeds and batch sizes would otherwise each pick a specialisation (int32 vs int64,
# divisible by 16 or not) and recompile; D keeps its specialisation, it aligns the row loads.
@triton.jit(do_not_specialize=["seed_val", "N"])
def _fwd_kernel(
    idx_ptr, frozen_ptr, tuned_ptr, logits_ptr, seed_ptr, seed_val, uniforms_ptr,
    out_ptr, gates_ptr, N, D, FS, tau,
    HARD: tl.constexpr, NOISE: tl.constexpr, USE_UNIFORMS: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    row = tl.load(idx_ptr + n, mask=nmask, other=0).to(tl.int64)
    x = _gate_logit(n, nmask, logits_ptr, seed_ptr, seed_val, uniforms_ptr, tau,
                    NOISE, USE_UNIFORMS, SEED_FROM_PTR)
    y1 = 1.0 / (1.0 + tl.exp(-x))
    if HARD:
        # The contract's rule x > 0; NaN compares false, so a NaN logit picks the frozen row.
        pick_tuned = x > 0.0
        z1 = tl.where(pick_tuned, 1.0, 0.0)
        z0 = 1.0 - z1
    else:
        z1 = y1
        z0 = 1.0 / (1.0 + tl.exp(x))  # sigmoid(-x): 1 - y1 cancels when the gate is nearly sure
    tl.store(gates_ptr + 2 * n, z0, mask=nmask)
    tl.store(gates_ptr + 2 * n + 1, z1, mask=nmask)

    row_off = row * D
    # A frozen row is FS elements: D, or D + 2 for int8 (values, then the float16 scale).
    # Float rows use D, whose specialisation (divisible by 16) keeps the loads vectorised.
    if QUANT:
        frow_off = row * FS
    else:
        frow_off = row_off
    if HARD:  # the scale of a frozen row not chosen is not read (a NaN there stays out)
        scale = _frozen_scale(frozen_ptr, frow_off, nmask & (~pick_tuned), D, QUANT)
    else:
        scale = _frozen_scale(frozen_ptr, frow_off, nmask, D, QUANT)
    out_off = n * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = nmask[:, None] & (cols < D)[None, :]
        src = row_off[:, None] + cols[None, :]
        fsrc = frow_off[:, None] + cols[None, :]
        if HARD:
            # Read only the chosen row: half the table traffic of a soft mix.
            t = tl.load(tuned_ptr + src, mask=m2 & pick_tuned[:, None], other=0.0)
            f = tl.load(frozen_ptr + fsrc, mask=m2 & (~pick_tuned)[:, None], other=0).to(tl.float32)
            if QUANT:
                f = f * scale[:, None]
            o = f + t.to(tl.float32)
        else:
            t = tl.load(tuned_ptr + src, mask=m2, other=0.0).to(tl.float32)
            f = tl.load(frozen_ptr + fsrc, mask=m2, other=0).to(tl.float32)
            if QUANT:
                f = f * scale[:, None]
            o = z0[:, None] * f + z1[:, None] * t
        tl.store(out_ptr + out_off[:, None] + cols[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["seed_val", "N"])
def _bwd_kernel(
    grad_out_ptr, grad_gates_ptr, idx_ptr, frozen_ptr, tuned_ptr, logits_ptr,
    seed_ptr, seed_val, uniforms_ptr, grad_tuned_ptr, grad_logits_ptr, z1_ptr, N, D, FS, tau,
    HARD: tl.constexpr, NOISE: tl.constexpr, USE_UNIFORMS: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, HAS_GRAD_GATES: tl.constexpr, SPARSE: tl.constexpr,
    QUANT: tl.constexpr, STORE_Z1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    row = tl.load(idx_ptr + n, mask=nmask, other=0).to(tl.int64)
    x = _gate_logit(n, nmask, logits_ptr, seed_ptr, seed_val, uniforms_ptr, tau,
                    NOISE, USE_UNIFORMS, SEED_FROM_PTR)
    y1 = 1.0 / (1.0 + tl.exp(-x))
    # y0 * y1 as a product of two sigmoids: 1 - y1 would cancel when the gate is nearly sure.
    y0y1 = y1 * (1.0 / (1.0 + tl.exp(x)))
    if HARD:
        z1 = tl.where(x > 0.0, 1.0, 0.0)
    else:
        z1 = y1
    if STORE_Z1:  # the fused update needs to know which lookups reached the tuned row
        tl.store(z1_ptr + n, z1, mask=nmask)

    a0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_off = row * D
    if QUANT:
        frow_off = row * FS
    else:
        frow_off = row_off
    scale = _frozen_scale(frozen_ptr, frow_off, nmask, D, QUANT)
    lookup_off = n * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = nmask[:, None] & (cols < D)[None, :]
        src = row_off[:, None] + cols[None, :]
        mine = lookup_off[:, None] + cols[None, :]
        g = tl.load(grad_out_ptr + mine, mask=m2, other=0.0).to(tl.float32)
        f = tl.load(frozen_ptr + frow_off[:, None] + cols[None, :], mask=m2, other=0).to(tl.float32)
        if QUANT:
            f = f * scale[:, None]
        t = tl.load(tuned_ptr + src, mask=m2, other=0.0).to(tl.float32)
        a0 += tl.sum(g * f, axis=1)
        a1 += tl.sum(g * t, axis=1)
        gt = z1[:, None] * g
        if SPARSE:
            tl.store(grad_tuned_ptr + mine, gt.to(grad_tuned_ptr.dtype.element_ty), mask=m2)
        else:
            # float32 atomics; a hard gate that chose the frozen row adds nothing, so skip it.
            tl.atomic_add(grad_tuned_ptr + src, gt, mask=m2 & (z1 != 0.0)[:, None],
                          sem="relaxed")

    dl1 = y0y1 * (a1 - a0) / tau
    if HAS_GRAD_GATES:
        h0 = tl.load(grad_gates_ptr + 2 * n, mask=nmask, other=0.0)
        h1 = tl.load(grad_gates_ptr + 2 * n + 1, mask=nmask, other=0.0)
        dl1 += y0y1 * (h1 - h0) / tau
    tl.store(grad_logits_ptr + 2 * n, -dl1, mask=nmask)
    tl.store(grad_logits_ptr + 2 * n + 1, dl1, mask=nmask)


# --------------------------------------------------------------------------------------------
# Host side: validation, launch configuration
# --------------------------------------------------------------------------------------------


def _is_concrete(*tensors: Optional[torch.Tensor]) -> bool:
    """True for plain eager tensors; False while tracing (fake / functional tensors)."""
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def _interpreting() -> bool:
    return isinstance(_fwd_kernel, _InterpretedFunction)


def _block_sizes(n, d, concrete: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): about 4096 elements per program, D walked in chunks.

    The block ignores N on a GPU (a small batch only wastes lanes, while a block size per batch
    size would compile a kernel per batch size, and N is symbolic while tracing with dynamic
    shapes). The interpreter runs a block as numpy arrays, so there it shrinks to small
    batches. D is specialised on purpose: the block shape depends on it.
    """
    block_d = min(triton.next_power_of_2(max(int(d), 1)), 256)
    block_n = max(4, min(256, 4096 // block_d))
    if concrete and _interpreting():
        block_n = min(block_n, max(4, triton.next_power_of_2(max(n, 1))))
    num_warps = 8 if block_n * block_d >= 4096 else 4
    return block_n, block_d, num_warps


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return
    # What the registry's triton row says it serves (the kernels cannot import the registry:
    # it loads them).
    raise validate.device_not_served("triton", name, t.device,
                                     "CUDA tensors and CPU tensors (CPU tensors only "
                                     "under TRITON_INTERPRET=1)")


def _check_inputs(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau):
    """The contract's input checks (ops/validate.py) for direct callers of the kernel ops."""
    validate.check_kernel_inputs(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau,
                                 backend="triton", low_precision_frozen=True)
    for name, t in (("indices", indices), ("frozen_weight", frozen_weight),
                    ("tuned_weight", tuned_weight), ("logits", logits), ("uniforms", uniforms)):
        if t is not None:
            _check_device(t, name)


def _range_checked(indices: torch.Tensor, num_rows: int, concrete: bool) -> torch.Tensor:
    """The indices the kernel may read: range-checked eagerly, or by an op in a traced graph."""
    if concrete:
        validate.check_index_range(indices, num_rows)
        return indices
    return torch.ops.autoft_fast.checked_indices(indices, num_rows)


def _seed_args(seed: torch.Tensor, uses_seed: bool, device: torch.device, concrete: bool):
    """(seed_ptr tensor or None, seed value, SEED_FROM_PTR).

    Eagerly the seed is read on the host (a CPU tensor: no sync) and passed by value. While
    torch.compile traces, the value is unknown, so the kernel loads it from a device copy.
    """
    if not uses_seed:
        return None, 0, False
    if concrete:
        return None, validate.check_seed_value(seed.item()), False
    return seed.to(device), 0, True


def _noise_args(seed, uniforms, noise: bool, placeholder, concrete: bool):
    """What a lookup kernel is told of its noise: (USE_UNIFORMS, SEED_FROM_PTR, the seed
    pointer argument, the seed value, the uniforms pointer argument); ``placeholder`` stands in
    for a pointer the kernel does not read."""
    use_uniforms = noise and uniforms is not None
    seed_ptr, seed_val, seed_from_ptr = _seed_args(
        seed, noise and not use_uniforms, placeholder.device, concrete)
    return (use_uniforms, seed_from_ptr, seed_ptr if seed_from_ptr else placeholder, seed_val,
            uniforms if use_uniforms else placeholder)


def _launch_device(t: torch.Tensor, concrete: bool):
    """The device a launch must run on: Triton launches on the current CUDA device and its
    stream, not on the tensors' device, so tensors on another GPU (cuda:1 while cuda:0 is
    current) make that device current for the launch. Under torch.compile (not
    ``concrete``) Inductor places the launch itself."""
    if concrete and t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _fwd_launch(indices, frozen_weight, tuned_weight, logits, seed, uniforms,
                tau: float, hard: bool, noise: bool, concrete: bool):
    n = indices.shape[0]
    d = tuned_weight.shape[1]
    out = torch.empty((n, d), dtype=tuned_weight.dtype, device=indices.device)
    gates = torch.empty((n, 2), dtype=torch.float32, device=indices.device)
    if n == 0:
        return out, gates
    indices = _range_checked(indices, tuned_weight.shape[0], concrete)
    use_uniforms, seed_from_ptr, seed_arg, seed_val, uniforms_arg = _noise_args(
        seed, uniforms, noise, logits, concrete)
    block_n, block_d, num_warps = _block_sizes(n, d, concrete)
    kernel = _fwd_kernel if concrete else wrap_triton(_fwd_kernel)
    with _launch_device(indices, concrete):
        kernel[(triton.cdiv(n, block_n),)](
            indices, frozen_weight, tuned_weight, logits, seed_arg, seed_val, uniforms_arg,
            out, gates, n, d, frozen_weight.shape[1], float(tau),
            HARD=hard, NOISE=noise, USE_UNIFORMS=use_uniforms, SEED_FROM_PTR=seed_from_ptr,
            QUANT=quant.is_quantised(frozen_weight),
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out, gates


def _bwd_kernel_launch(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, seed,
                       uniforms, tau: float, hard: bool, noise: bool, accum, per_lookup: bool,
                       concrete: bool, z1=None):
    """Runs the backward kernel: logit gradients, and into ``accum`` either per-lookup float32
    rows z1 * g ([N, D], ``per_lookup``) or float32 atomics ([V, D]); ``z1`` [N] float32, if
    given, gets each lookup's tuned weight. Returns grad_logits [N, 2]."""
    n = indices.shape[0]
    d = tuned_weight.shape[1]
    grad_logits = torch.empty((n, 2), dtype=torch.float32, device=indices.device)
    if n == 0:
        return grad_logits
    use_uniforms, seed_from_ptr, seed_arg, seed_val, uniforms_arg = _noise_args(
        seed, uniforms, noise, logits, concrete)
    block_n, block_d, num_warps = _block_sizes(n, d, concrete)
    kernel = _bwd_kernel if concrete else wrap_triton(_bwd_kernel)
    with _launch_device(indices, concrete):
        kernel[(triton.cdiv(n, block_n),)](
            grad_out, grad_gates if grad_gates is not None else logits,
            indices, frozen_weight, tuned_weight, logits, seed_arg, seed_val, uniforms_arg,
            accum, grad_logits, z1 if z1 is not None else logits, n, d, frozen_weight.shape[1],
            float(tau),
            HARD=hard, NOISE=noise, USE_UNIFORMS=use_uniforms, SEED_FROM_PTR=seed_from_ptr,
            HAS_GRAD_GATES=grad_gates is not None, SPARSE=per_lookup,
            QUANT=quant.is_quantised(frozen_weight), STORE_Z1=z1 is not None,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
    return grad_logits


def _bwd_launch(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, seed,
                uniforms, tau: float, hard: bool, noise: bool, sparse: bool, concrete: bool):
    n = indices.shape[0]
    v, d = tuned_weight.shape
    device = indices.device
    # Float atomics sum a repeated row in scheduling order; under
    # torch.use_deterministic_algorithms(True) the kernel writes per-lookup float32 values and
    # index_put_(accumulate=True), deterministic there (a sort), sums them instead.
    deterministic = not sparse and torch.are_deterministic_algorithms_enabled()
    if n > 0:
        indices = _range_checked(indices, v, concrete)
    if sparse or deterministic:
        # Per-lookup float32 values; repeated rows are summed below, in float32.
        accum = torch.empty((n, d), dtype=torch.float32, device=device)
    else:
        # Dense: float32 atomics into a zeroed table, cast once at the end for 16-bit tables.
        accum = torch.zeros((v, d), dtype=torch.float32, device=device)
    grad_logits = _bwd_kernel_launch(grad_out, grad_gates, indices, frozen_weight, tuned_weight,
                                     logits, seed, uniforms, tau, hard, noise, accum,
                                     sparse or deterministic, concrete)
    if deterministic:
        accum = torch.zeros((v, d), dtype=torch.float32, device=device).index_put_(
            (indices.long(),), accum, accumulate=True)
    if sparse:
        # Coalesced: sorted unique rows, each the float32 sum of its lookups cast once (a
        # 16-bit running sum would stall: 4096 unit gradients sum to 256 in bfloat16).
        grad_rows, inverse = torch.unique(indices.to(torch.int64), return_inverse=True)
        grad_tuned = torch.zeros((grad_rows.shape[0], d), dtype=torch.float32, device=device)
        grad_tuned = grad_tuned.index_add_(0, inverse, accum).to(tuned_weight.dtype)
    else:
        grad_tuned = accum if tuned_weight.dtype == torch.float32 else accum.to(tuned_weight.dtype)
        grad_rows = torch.empty((0,), dtype=torch.int64, device=device)
    return grad_tuned, grad_logits, grad_rows


def _prepare_fwd(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau):
    _check_inputs(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau)
    return (indices.contiguous(), frozen_weight.contiguous(), tuned_weight.contiguous(),
            logits.contiguous(), None if uniforms is None else uniforms.contiguous())


# Under TRITON_INTERPRET=1 a kernel cannot run on fake or functional tensors, so a traced call
# (torch.compile, opcheck, make_fx) goes through an opaque op that runs the interpreter on real
# tensors. On a GPU the traced call launches the kernel through wrap_triton instead, which is
# what lets Inductor see and schedule it.
# Registered only under the interpreter: GPU users never see these two ops.
def _register_interpreted_ops() -> None:
    fwd_name = f"{NAMESPACE}::_gated_embedding_fwd_triton_interpreted"
    bwd_name = f"{NAMESPACE}::_gated_embedding_bwd_triton_interpreted"

    @with_signature(FWD)
    def _fwd_interpreted(*args):
        a = FwdArgs(*args)
        return _fwd_launch(a.indices, a.frozen_weight, a.tuned_weight, a.logits, a.seed,
                           a.uniforms, a.tau, a.hard, a.noise, concrete=True)

    @with_signature(BWD)
    def _bwd_interpreted(*args):
        a = BwdArgs(*args)
        return _bwd_launch(a.grad_out, a.grad_gates, a.indices, a.frozen_weight, a.tuned_weight,
                           a.logits, a.seed, a.uniforms, a.tau, a.hard, a.noise, a.sparse,
                           concrete=True)

    torch.library.custom_op(fwd_name, _fwd_interpreted, mutates_args=()).register_fake(library.fake_fwd)
    torch.library.custom_op(bwd_name, _bwd_interpreted, mutates_args=()).register_fake(library.fake_bwd)


if _interpreting():
    _register_interpreted_ops()


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


@triton_op(f"{NAMESPACE}::gated_embedding_fwd_triton", mutates_args=())
@with_signature(FWD)
def gated_embedding_fwd_triton(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward of the gated embedding (Triton): returns (out [N, D], gates [N, 2]).

    Arguments: those of ``autoft_fast.ops.interface.FWD``. ``sparse`` only tells the autograd
    formula which gradient layout to build; the forward ignores it.

    Example::

        >>> out, gates = torch.ops.autoft_fast.gated_embedding_fwd_triton(  # doctest: +SKIP
        ...     idx, frozen, tuned, logits, torch.tensor(7), None, 1.0, True, True, False)
    """
    a = FwdArgs(*args)
    indices, frozen_weight, tuned_weight, logits, uniforms = _prepare_fwd(
        a.indices, a.frozen_weight, a.tuned_weight, a.logits, a.seed, a.uniforms, a.tau)
    concrete = _is_concrete(indices, frozen_weight, tuned_weight, logits, a.seed, uniforms)
    if not concrete and _interpreting():
        return torch.ops.autoft_fast._gated_embedding_fwd_triton_interpreted(
            indices, frozen_weight, tuned_weight, logits, a.seed, uniforms, *a[6:])
    return _fwd_launch(indices, frozen_weight, tuned_weight, logits, a.seed, uniforms,
                       a.tau, a.hard, a.noise, concrete)


@triton_op(f"{NAMESPACE}::gated_embedding_bwd_triton", mutates_args=())
@with_signature(BWD)
def gated_embedding_bwd_triton(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward (Triton): returns (grad_tuned, grad_logits [N, 2] float32, grad_rows).

    Arguments: those of ``autoft_fast.ops.interface.BWD``. Dense: grad_tuned is [V, D] (float32
    atomics then the table dtype) and grad_rows an empty int64 [0]. With ``sparse``: grad_rows
    are the sorted unique rows looked up (int64) and grad_tuned [len(grad_rows), D] their
    gradients, summed in float32 and cast once: a coalesced COO gradient
    ``(grad_rows[None], grad_tuned, (V, D))``.

    Example::

        >>> gt, gl, rows = torch.ops.autoft_fast.gated_embedding_bwd_triton(  # doctest: +SKIP
        ...     grad_out, None, idx, frozen, tuned, logits, torch.tensor(7), None,
        ...     1.0, True, True, False)
    """
    a = BwdArgs(*args)
    indices, frozen_weight, tuned_weight, logits, uniforms = _prepare_fwd(
        a.indices, a.frozen_weight, a.tuned_weight, a.logits, a.seed, a.uniforms, a.tau)
    validate.check_grads(a.grad_out, a.grad_gates, indices, tuned_weight)
    grad_out = a.grad_out.contiguous()
    grad_gates = None if a.grad_gates is None else a.grad_gates.contiguous()
    concrete = _is_concrete(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits,
                            a.seed, uniforms)
    if not concrete and _interpreting():
        return torch.ops.autoft_fast._gated_embedding_bwd_triton_interpreted(
            grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, a.seed,
            uniforms, *a[8:])
    return _bwd_launch(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, a.seed,
                       uniforms, a.tau, a.hard, a.noise, a.sparse, concrete)
