"""The op's torch.library schemas, fake kernels and autograd formula: declared once, here.

The C++ CPU and CUDA kernels only register implementations for these schemas
(``TORCH_LIBRARY_IMPL(autoft_fast, CPU/CUDA, m)``); the Triton pair is declared by
``torch.library.triton_op`` in ``autoft_fast.kernels`` with the same signature, and gets the
same autograd formula through :func:`register_autograd_for`.
"""

from __future__ import annotations

import torch

NAMESPACE = "autoft_fast"

FWD_SCHEMA = (
    "gated_embedding_fwd(Tensor indices, Tensor frozen_weight, Tensor tuned_weight, "
    "Tensor logits, Tensor seed, Tensor? uniforms, float tau, bool hard, bool noise, "
    "bool sparse) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "gated_embedding_bwd(Tensor grad_out, Tensor? grad_gates, Tensor indices, "
    "Tensor frozen_weight, Tensor tuned_weight, Tensor logits, Tensor seed, Tensor? uniforms, "
    "float tau, bool hard, bool noise, bool sparse) -> (Tensor, Tensor)"
)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(FWD_SCHEMA)
_lib.define(BWD_SCHEMA)


def fake_fwd(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise, sparse):
    n = indices.shape[0]
    out = tuned_weight.new_empty((n, tuned_weight.shape[1]))
    gates = logits.new_empty((n, 2), dtype=torch.float32)
    return out, gates


def fake_bwd(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, seed, uniforms,
             tau, hard, noise, sparse):
    n = indices.shape[0]
    rows = n if sparse else tuned_weight.shape[0]
    grad_tuned = tuned_weight.new_empty((rows, tuned_weight.shape[1]))
    grad_logits = logits.new_empty((n, 2), dtype=torch.float32)
    return grad_tuned, grad_logits


torch.library.register_fake(f"{NAMESPACE}::gated_embedding_fwd", fake_fwd, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::gated_embedding_bwd", fake_bwd, lib=_lib)


def _setup_context(ctx, inputs, output):
    indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise, sparse = inputs
    # Nothing of the forward is kept but its inputs: the backward regenerates the noise.
    ctx.save_for_backward(indices, frozen_weight, tuned_weight, logits, seed, uniforms)
    ctx.options = (tau, hard, noise, sparse)
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_gates):
        indices, frozen_weight, tuned_weight, logits, seed, uniforms = ctx.saved_tensors
        tau, hard, noise, sparse = ctx.options
        n, dim = indices.shape[0], tuned_weight.shape[1]
        if grad_out is None:
            grad_out = tuned_weight.new_zeros((n, dim))
        grad_tuned, grad_logits = bwd_op(
            grad_out.contiguous(), None if grad_gates is None else grad_gates.contiguous(),
            indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise, sparse)
        if sparse:
            grad_tuned = torch.sparse_coo_tensor(
                indices.reshape(1, -1).long(), grad_tuned, tuned_weight.shape,
                check_invariants=False)  # indices were range-checked by the forward
        if not ctx.needs_input_grad[2]:
            grad_tuned = None
        if not ctx.needs_input_grad[3]:
            grad_logits = None
        return None, None, grad_tuned, grad_logits, None, None, None, None, None, None

    return backward


def register_autograd_for(fwd_name: str, bwd_op) -> None:
    """Give the forward op ``fwd_name`` the contract's straight-through backward via ``bwd_op``."""
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op), setup_context=_setup_context)


register_autograd_for(f"{NAMESPACE}::gated_embedding_fwd", torch.ops.autoft_fast.gated_embedding_bwd)
