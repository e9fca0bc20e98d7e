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
    "float tau, bool hard, bool noise, bool sparse) -> (Tensor, Tensor, Tensor)"
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
    grad_logits = logits.new_empty((n, 2), dtype=torch.float32)
    if sparse:
        # How many distinct rows a backend returns is data-dependent (at most n).
        rows = torch.library.get_ctx().new_dynamic_size(max=n) if n else 0
        grad_rows = indices.new_empty((rows,), dtype=torch.int64)
    else:
        rows = tuned_weight.shape[0]
        grad_rows = indices.new_empty((0,), dtype=torch.int64)
    grad_tuned = tuned_weight.new_empty((rows, tuned_weight.shape[1]))
    return grad_tuned, grad_logits, grad_rows


torch.library.register_fake(f"{NAMESPACE}::gated_embedding_fwd", fake_fwd, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::gated_embedding_bwd", fake_bwd, lib=_lib)


def _setup_context(ctx, inputs, output):
    indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise, sparse = inputs
    # Nothing of the forward is kept but its inputs: the backward regenerates the noise.
    ctx.save_for_backward(indices, frozen_weight, tuned_weight, logits, seed, uniforms)
    ctx.options = (tau, hard, noise, sparse)
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op, coalesced_on: tuple[str, ...]):
    def backward(ctx, grad_out, grad_gates):
        indices, frozen_weight, tuned_weight, logits, seed, uniforms = ctx.saved_tensors
        tau, hard, noise, sparse = ctx.options
        n, dim = indices.shape[0], tuned_weight.shape[1]
        if grad_out is None:
            grad_out = tuned_weight.new_zeros((n, dim))
        grad_tuned, grad_logits, grad_rows = bwd_op(
            grad_out.contiguous(), None if grad_gates is None else grad_gates.contiguous(),
            indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, hard, noise, sparse)
        if sparse:
            # A coalesced gradient (sorted unique rows) saves the optimizer a coalesce: PyTorch's
            # sparse SGD step on an uncoalesced one of ~100k lookups costs several ms.
            grad_tuned = torch.sparse_coo_tensor(
                grad_rows.reshape(1, -1), grad_tuned, tuned_weight.shape,
                is_coalesced=indices.device.type in coalesced_on,
                check_invariants=False)  # rows were range-checked by the forward
        if not ctx.needs_input_grad[2]:
            grad_tuned = None
        if not ctx.needs_input_grad[3]:
            grad_logits = None
        return None, None, grad_tuned, grad_logits, None, None, None, None, None, None

    return backward


def register_autograd_for(fwd_name: str, bwd_op, *, coalesced_on: tuple[str, ...]) -> None:
    """Give the forward op ``fwd_name`` the contract's straight-through backward via ``bwd_op``.

    ``coalesced_on``: the device types on which ``bwd_op``'s sparse-mode rows come sorted and
    unique (the others return one row per lookup, as nn.Embedding does).
    """
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op, coalesced_on),
                                    setup_context=_setup_context)


register_autograd_for(f"{NAMESPACE}::gated_embedding_fwd", torch.ops.autoft_fast.gated_embedding_bwd,
                      coalesced_on=("cpu",))
