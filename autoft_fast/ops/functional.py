"""``gated_embedding``: the public functional form of the op (docs/op-contract.md)."""

from __future__ import annotations

import torch

from . import registry, validate
from .registry import available_backends  # noqa: F401  (re-exported)
from .reference import reference_gated_embedding, straight_through_gates



@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run; a compiled graph treats the answer as a constant (no graph break)."""
    return registry.resolve(backend, device).name


class _DenseGradThroughView(torch.autograd.Function):
    """A contiguous copy of a non-contiguous table whose gradient flows back dense.

    A sparse COO gradient cannot pass back through an arbitrary view (a transpose of a hybrid
    COO tensor fails inside PyTorch), so a strided tuned table gets its gradient densified.
    """

    @staticmethod
    def forward(ctx, weight):
        return weight.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def _seed_tensor(seed: int | None, noise: bool, uniforms) -> torch.Tensor:
    if not noise or uniforms is not None:
        return torch.zeros((), dtype=torch.int64)  # unused; drawing would move the user's RNG
    if isinstance(seed, torch.Tensor):
        return seed
    if seed is None:
        # From torch's default CPU generator, so torch.manual_seed makes a run reproducible;
        # kept as a tensor (no .item()) so that torch.compile does not break the graph here.
        return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64)


def gated_embedding(indices, frozen_weight, tuned_weight, logits, *, tau=1.0, hard=True,
                    noise=True, seed=None, uniforms=None, sparse=False, backend="auto"):
    """Mix frozen and tuned embedding rows per lookup with a Gumbel-softmax gate.

    Returns ``(out, gates)``: ``out`` of shape ``indices.shape + (D,)`` in the tuned table's
    dtype, ``gates`` of shape ``indices.shape + (2,)`` (float32; one-hot when ``hard``).
    Gradients reach ``tuned_weight`` (dense, or a COO tensor when ``sparse=True``) and
    ``logits`` (straight-through when ``hard``); ``frozen_weight`` never gets one.
    See docs/op-contract.md for the exact semantics.

    Example::

        >>> import torch, autoft_fast
        >>> frozen = torch.randn(1000, 16)
        >>> tuned = frozen.clone().requires_grad_()
        >>> idx = torch.randint(0, 1000, (32, 8))
        >>> logits = torch.zeros(32, 8, 2, requires_grad=True)
        >>> out, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, tau=1.0, seed=0)
        >>> out.shape, gates.shape
        (torch.Size([32, 8, 16]), torch.Size([32, 8, 2]))
        >>> out.sum().backward()
    """
    row = registry.REGISTRY.get(backend) if backend != registry.AUTO else None
    validate.check_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                          reference=row is not None and row.is_reference)
    tau = validate.check_tau(tau)
    seed = validate.check_seed(seed)
    hard = validate.check_flag("hard", hard)
    noise = validate.check_flag("noise", noise)
    sparse = validate.check_flag("sparse", sparse)
    if uniforms is not None and noise:
        validate.check_uniform_range(uniforms)
    row = registry.REGISTRY[_resolve_backend(backend, indices.device)]
    if not row.is_reference and (frozen_weight.dtype == torch.float64 or logits.dtype == torch.float64):
        raise TypeError(f"float64 tables or logits are served by the 'reference' backend only, "
                        f"not {row.name!r}")
    if sparse and not tuned_weight.is_contiguous() and tuned_weight.requires_grad:
        tuned_weight = _DenseGradThroughView.apply(tuned_weight)
    seed_t = _seed_tensor(seed, noise, uniforms)

    if row.is_reference:
        validate.check_index_range(indices, frozen_weight.shape[0])
        return reference_gated_embedding(indices, frozen_weight, tuned_weight, logits, tau=tau,
                                         hard=hard, noise=noise, seed=seed_t, uniforms=uniforms,
                                         sparse=sparse)

    shape = indices.shape
    dim = tuned_weight.shape[1]
    flat_uniforms = None if (uniforms is None or not noise) else uniforms.reshape(-1).contiguous()
    out, gates = row.ops()[0](
        indices.reshape(-1).contiguous(),
        frozen_weight.detach().contiguous(),
        tuned_weight.contiguous(),
        logits.reshape(-1, 2).contiguous(),
        seed_t,
        flat_uniforms,
        tau, hard, noise, sparse,
    )
    return out.reshape(*shape, dim), gates.reshape(*shape, 2)


def gumbel_gates(logits, *, tau=1.0, hard=True, noise=True, seed=None, uniforms=None):
    """Straight-through Gumbel-softmax gates over the last (size-2) axis, as the op draws them.

    Channel 0 is the frozen path, channel 1 the tuned one. Same noise stream, tie rule and
    straight-through gradient as :func:`gated_embedding`; used for layer-wise gates.

    Example::

        >>> import torch, autoft_fast
        >>> logits = torch.randn(4, 3, 2, requires_grad=True)
        >>> z = autoft_fast.gumbel_gates(logits, tau=5.0, seed=1)
        >>> bool(((z == 0) | (z == 1)).all()), z.sum(-1).eq(1).all().item()
        (True, True)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() == 0 or logits.shape[-1] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have a last axis of size 2, got {shape}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    tau = validate.check_tau(tau)
    seed = validate.check_seed(seed)
    hard = validate.check_flag("hard", hard)
    noise = validate.check_flag("noise", noise)
    if uniforms is not None:
        if tuple(uniforms.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"uniforms must have the shape of indices {tuple(logits.shape[:-1])}, "
                             f"got {tuple(uniforms.shape)}")
        validate.check_uniform_range(uniforms)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = straight_through_gates(logits.to(compute), tau=tau, hard=hard, noise=noise,
                               seed=_seed_tensor(seed, noise, uniforms), uniforms=uniforms)
    return z
