"""The ``reference`` backend: the op of docs/op-contract.md in plain PyTorch.

It is the oracle of every test, so it favours obviousness over speed: two gathers, the gate
as an explicit autograd function (so that the logit gradient carries y0 * y1 computed as a
product, as the contract asks, and not torch.sigmoid's y * (1 - y)), and a float32 (or, for
float64 tables, float64) mix. It runs on any device (meta included) and supports both gradient modes; the
tuned-table gradient sums repeated rows in float32 (float64 for float64 tables) and casts once,
dense or as a coalesced COO tensor, so 16-bit tables lose nothing to a 16-bit running sum.
Its backward is differentiable: the reference also gives second-order gradients.
"""

from __future__ import annotations

import torch

from .philox import logistic_noise, uniforms_tensor
from .quant import frozen_rows as _frozen_rows


class _StraightThroughGate(torch.autograd.Function):
    """(logits [..., 2], noise l [...]) -> (z, y1); z hard or soft, gradient the soft Jacobian."""

    # forward / setup_context split (not forward(ctx, ...)): torch.func transforms
    # (torch.func.grad, functional_call-based training) accept only this form.
    @staticmethod
    def forward(logits, noise, tau, hard):
        x = (logits[..., 1] - logits[..., 0] + noise) / tau
        y1 = torch.sigmoid(x)
        y0 = torch.sigmoid(-x)
        if hard:
            # The contract's rule x > 0 (y1 > 0.5 in exact arithmetic; a float sigmoid rounds to
            # 0.5 for 0 < x < 3e-8). A tie and NaN both pick the frozen row: the comparison is false.
            pick = (x > 0).to(logits.dtype)
            z = torch.stack((1 - pick, pick), dim=-1)
        else:
            z = torch.stack((y0, y1), dim=-1)
        return z, y1

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, noise, tau, _hard = inputs
        ctx.save_for_backward(logits, noise)
        ctx.tau = tau
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_z, _grad_y1):
        # y0 * y1 recomputed from the inputs, so that a double backward differentiates it too.
        logits, noise = ctx.saved_tensors
        x = (logits[..., 1] - logits[..., 0] + noise) / ctx.tau
        y0y1 = torch.sigmoid(x) * torch.sigmoid(-x)
        s = y0y1 * (grad_z[..., 1] - grad_z[..., 0]) / ctx.tau
        return torch.stack((-s, s), dim=-1), None, None, None


class _HardMix(torch.autograd.Function):
    """out = z0 * f + z1 * t for one-hot gates z, its value the chosen row itself: a NaN or inf
    in the row not chosen cannot reach the output (0 * inf would be NaN), as in the kernels.
    Gradients are the formula's: d z = (<g, f>, <g, t>), d t = z1 * g, d f = z0 * g."""

    @staticmethod
    def forward(z, f, t):
        return torch.where(z[..., 1:2] > 0.5, t, f)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        z, f, t = ctx.saved_tensors  # differentiable ops below: a double backward works
        grad_z = torch.stack(((g * f).sum(-1), (g * t).sum(-1)), dim=-1)
        grad_f = g * z[..., 0:1] if ctx.needs_input_grad[1] else None
        grad_t = g * z[..., 1:2] if ctx.needs_input_grad[2] else None
        return grad_z, grad_f, grad_t


class _TunedRows(torch.autograd.Function):
    """tuned_weight[idx] in ``compute``; the gradient sums repeated rows in ``compute`` precision."""

    @staticmethod
    def forward(weight, idx, sparse, compute):
        flat = idx.reshape(-1)
        return weight.index_select(0, flat).reshape(*idx.shape, weight.shape[1]).to(compute)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, idx, sparse, _compute = inputs
        ctx.save_for_backward(idx)
        ctx.table = (weight.shape, weight.dtype)
        ctx.sparse = sparse

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        (rows, dim), dtype = ctx.table
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        g = grad.reshape(idx.numel(), dim).to(acc)  # (-1 is ambiguous when dim is 0)
        flat = idx.reshape(-1)
        if ctx.sparse:
            unique, inverse = torch.unique(flat, return_inverse=True)
            values = g.new_zeros((unique.shape[0], dim)).index_add(0, inverse, g).to(dtype)
            out = torch.sparse_coo_tensor(unique.reshape(1, -1), values, (rows, dim),
                                          is_coalesced=True, check_invariants=False)
        else:
            out = g.new_zeros((rows, dim)).index_add(0, flat, g).to(dtype)
        return out, None, None, None


def gate_noise(shape, *, noise: bool, seed: int | None, uniforms, device, dtype) -> torch.Tensor:
    """The logistic noise l of the contract for lookups of ``shape`` (zeros without noise)."""
    if not noise:
        return torch.zeros(shape, device=device, dtype=dtype)
    if uniforms is None:
        uniforms = uniforms_tensor(seed, tuple(shape), device=device)
    return logistic_noise(uniforms.to(dtype))


def straight_through_gates(logits, *, tau: float, hard: bool, noise: bool, seed: int | None,
                           uniforms=None) -> torch.Tensor:
    """Gates z [..., 2] of the contract, with straight-through gradients to ``logits``."""
    l = gate_noise(logits.shape[:-1], noise=noise, seed=seed, uniforms=uniforms,
                   device=logits.device, dtype=logits.dtype)
    z, _ = _StraightThroughGate.apply(logits, l, tau, hard)
    return z


def reference_gated_embedding(indices, frozen_weight, tuned_weight, logits, *, tau=1.0,
                              hard=True, noise=True, seed=None, uniforms=None, sparse=False):
    """out, gates of the contract in plain PyTorch (inputs already validated).

    Computes in float64 when the tables are float64 (the tests' oracle), else in float32.
    ``seed`` is an int or a 0-dim int64 tensor (traceable by torch.compile).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.reference import reference_gated_embedding
        >>> f = torch.randn(5, 3)
        >>> out, gates = reference_gated_embedding(torch.tensor([1, 4]), f, f + 1,
        ...                                        torch.zeros(2, 2), seed=3)
        >>> out.shape, gates.shape
        (torch.Size([2, 3]), torch.Size([2, 2]))
    """
    compute = torch.float64 if tuned_weight.dtype == torch.float64 else torch.float32
    gates = straight_through_gates(logits.to(compute), tau=tau, hard=hard, noise=noise,
                                   seed=seed, uniforms=uniforms)
    idx = indices.long()
    # A low-precision frozen table is widened (int8: dequantised) row by row, as the kernels do.
    frozen_rows = _frozen_rows(frozen_weight.detach(), idx, compute)
    tuned_rows = _TunedRows.apply(tuned_weight, idx, sparse, compute)
    if hard:
        out = _HardMix.apply(gates, frozen_rows, tuned_rows)
    else:
        out = gates[..., 0:1] * frozen_rows + gates[..., 1:2] * tuned_rows
    gate_dtype = torch.float64 if compute == torch.float64 else torch.float32
    return out.to(tuned_weight.dtype), gates.to(gate_dtype)


def bag_segments(offsets: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bag id of each value [L], values per bag [B]) of ``offsets`` [B + 1]."""
    counts = (offsets[1:] - offsets[:-1]).long()
    bag_ids = torch.repeat_interleave(torch.arange(counts.shape[0], device=offsets.device), counts,
                                      output_size=length)
    return bag_ids, counts


def reference_gated_embedding_bag(values, offsets, frozen_weight, tuned_weight, logits, *,
                                  per_sample_weights=None, mode="mean", tau=1.0, hard=True,
                                  noise=True, seed=None, uniforms=None, sparse=False):
    """out [B, D], gates [B, 2] of the contract's bag op in plain PyTorch (inputs validated).

    Bag b is ``values[offsets[b]:offsets[b + 1]]``; its frozen and tuned rows are pooled
    separately (weighted by ``per_sample_weights``; ``mode="mean"`` divides by the bag's
    length, an empty bag pools to zeros) and mixed by one gate drawn from ``logits[b]``.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.reference import reference_gated_embedding_bag
        >>> f = torch.randn(5, 3)
        >>> out, gates = reference_gated_embedding_bag(torch.tensor([1, 4, 2]), torch.tensor([0, 2, 3]),
        ...                                            f, f + 1, torch.zeros(2, 2), seed=3)
        >>> out.shape, gates.shape
        (torch.Size([2, 3]), torch.Size([2, 2]))
    """
    compute = torch.float64 if tuned_weight.dtype == torch.float64 else torch.float32
    gates = straight_through_gates(logits.to(compute), tau=tau, hard=hard, noise=noise,
                                   seed=seed, uniforms=uniforms)
    idx = values.long()
    bags, dim = logits.shape[0], tuned_weight.shape[1]
    bag_ids, counts = bag_segments(offsets, idx.shape[0])
    w = torch.ones(idx.shape[0], dtype=compute, device=idx.device) if per_sample_weights is None \
        else per_sample_weights.to(compute)
    if mode == "mean":
        w = w / counts.clamp_min(1).to(compute)[bag_ids]
    frozen_rows = _frozen_rows(frozen_weight.detach(), idx, compute)
    tuned_rows = _TunedRows.apply(tuned_weight, idx, sparse, compute)
    zeros = torch.zeros((bags, dim), dtype=compute, device=idx.device)
    pooled_frozen = zeros.index_add(0, bag_ids, frozen_rows * w[:, None])
    pooled_tuned = zeros.index_add(0, bag_ids, tuned_rows * w[:, None])
    if hard:  # the chosen pool itself: a NaN / inf in the other cannot reach the output
        out = _HardMix.apply(gates, pooled_frozen, pooled_tuned)
    else:
        out = gates[:, 0:1] * pooled_frozen + gates[:, 1:2] * pooled_tuned
    return out.to(tuned_weight.dtype), gates.to(compute)
