"""``gated_embedding``: the public functional form of the op (docs/op-contract.md)."""

from __future__ import annotations

import logging

import torch

from . import validate
from .reference import reference_gated_embedding, straight_through_gates

log = logging.getLogger("autoft_fast")

BACKENDS = ("reference", "cpu", "cuda", "triton")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: the CPU), fastest first.

    ``backend="auto"`` picks the first one. Example::

        >>> import autoft_fast
        >>> autoft_fast.available_backends("cpu")[-1]
        'reference'
    """
    from .. import _extension as ext

    device = torch.device("cpu" if device is None else device)
    found = []
    if device.type == "cpu" and ext.has_kernel("CPU"):
        found.append("cpu")
    if device.type == "cuda":
        # CUDA C++ first: it has no per-call JIT dispatch cost. Not yet measured against
        # Triton on a GPU (benchmarks/gpu_check.sh does that); revisit with its numbers.
        if ext.has_kernel("CUDA"):
            found.append("cuda")
        if ext.triton_usable(device):
            found.append("triton")
    if device.type == "cpu" and ext.triton_usable(device):
        found.append("triton")  # interpreter only: correct but slow, never preferred
    found.append("reference")
    return found


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run; a compiled graph treats the answer as a constant (no graph break)."""
    from .. import _extension as ext

    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend = {backend!r} is not one of {('auto',) + BACKENDS}")
    usable = available_backends(device)
    if backend == "auto":
        chosen = usable[0]
        if chosen == "reference" and device.type == "cpu":
            ext.warn_missing_extension_once()
        _log_choice_once(f"backend 'auto' picked {chosen!r} for device {device} (available: {usable})")
        return chosen
    if backend not in usable:
        served = {"cpu": "CPU tensors", "cuda": "CUDA tensors",
                  "triton": "CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"}
        if backend in ("cpu", "cuda") and ext._C is None:
            why = f"the compiled extension is not built ({ext.BUILD_HINT})"
        elif backend == "triton" and ext.load_triton() is None:
            why = f"the Triton kernels could not be loaded ({ext.TRITON_ERROR})"
        else:
            why = f"it serves {served[backend]}"
        raise ValueError(
            f"backend = {backend!r} is not available for tensors on {device}: {why}; "
            f"available there: {usable}")
    _log_choice_once(f"backend {backend!r} for device {device}")
    return backend


_logged: set[str] = set()


def _log_choice_once(message: str) -> None:
    # Once per distinct choice: a training loop calls the op thousands of times.
    if message not in _logged:
        _logged.add(message)
        log.debug("gated_embedding: %s", message)


def _kernel_op(backend: str):
    if backend == "triton":
        return torch.ops.autoft_fast.gated_embedding_fwd_triton
    return torch.ops.autoft_fast.gated_embedding_fwd


def _seed_tensor(seed: int | None, noise: bool, uniforms) -> torch.Tensor:
    if not noise or uniforms is not None:
        return torch.zeros((), dtype=torch.int64)  # unused; drawing would move the user's RNG
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
    want_reference = backend == "reference"
    validate.check_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                          reference=want_reference)
    tau = validate.check_tau(tau)
    seed = validate.check_seed(seed)
    hard, noise, sparse = bool(hard), bool(noise), bool(sparse)
    if uniforms is not None and noise:
        validate.check_uniform_range(uniforms)
    chosen = _resolve_backend(backend, indices.device)
    if chosen != "reference" and (frozen_weight.dtype == torch.float64 or logits.dtype == torch.float64):
        raise TypeError(f"float64 tables or logits are served by the 'reference' backend only, "
                        f"not {chosen!r}")

    if chosen == "reference":
        validate.check_index_range(indices, frozen_weight.shape[0])
        if noise and uniforms is None and seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        return reference_gated_embedding(indices, frozen_weight, tuned_weight, logits, tau=tau,
                                         hard=hard, noise=noise, seed=seed, uniforms=uniforms,
                                         sparse=sparse)

    shape = indices.shape
    dim = tuned_weight.shape[1]
    flat_uniforms = None if (uniforms is None or not noise) else uniforms.reshape(-1).contiguous()
    out, gates = _kernel_op(chosen)(
        indices.reshape(-1).contiguous(),
        frozen_weight.detach().contiguous(),
        tuned_weight.contiguous(),
        logits.reshape(-1, 2).contiguous(),
        _seed_tensor(seed, noise, flat_uniforms),
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
    if uniforms is not None:
        if tuple(uniforms.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"uniforms must have shape {tuple(logits.shape[:-1])}, got {tuple(uniforms.shape)}")
        validate.check_uniform_range(uniforms)
    if noise and uniforms is None and seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = straight_through_gates(logits.to(compute), tau=tau, hard=bool(hard), noise=bool(noise),
                               seed=seed, uniforms=uniforms)
    return z
