"""``gated_embedding``: the public functional form of the op (docs/op-contract.md)."""

from __future__ import annotations

import torch

from . import fused_optim, quant, registry, validate
from .registry import available_backends  # noqa: F401  (re-exported)
from .reference import (reference_gated_embedding, reference_gated_embedding_bag,
                        straight_through_gates)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device, low_precision: bool) -> str:
    """The backend to run; a compiled graph treats the answer as a constant (no graph break).

    The row's ops are resolved here too: that registers their autograd formula on first use,
    which must not happen inside a traced call (torch.compile as the first use of a backend
    in a process), and this function runs outside the trace."""
    row = registry.resolve(backend, device, low_precision)
    if not row.is_reference:
        row.ops()
    return row.name


class _DenseGradThroughView(torch.autograd.Function):
    """A contiguous copy of a non-contiguous table whose gradient flows back dense.

    A sparse COO gradient cannot pass back through an arbitrary view (a transpose of a hybrid
    COO tensor fails inside PyTorch), so a strided tuned table gets its gradient densified.
    """

    @staticmethod
    def forward(weight):
        return weight.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

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


class _FusedStep(torch.autograd.Function):
    """The op whose backward updates the tuned rows in place (see ``ops/fused_optim.py``).

    ``tuned_weight`` is an input so that the backward runs even when the logits need no
    gradient; its gradient is always None (the update took its place). Calls of one table
    that meet in one backward are combined into one step at its end
    (``fused_optim.open_call``).
    """

    @staticmethod
    def forward(ctx, tuned_weight, logits, row, optimizer, state, inputs):
        indices, frozen_weight, seed, uniforms, tau, hard, noise = inputs
        # An unused gates output reaches the backward as None, not as a zero tensor that
        # would be allocated, filled and read for nothing (the backward handles None).
        ctx.set_materialize_grads(False)
        ctx.row, ctx.optimizer, ctx.state, ctx.inputs = row, optimizer, state, inputs
        ctx.tuned_weight = tuned_weight
        # The backward reads the table's rows for the logit gradient: they must be the rows
        # this forward read (see _check_unchanged).
        ctx.version = tuned_weight._version
        ctx.call = fused_optim.open_call(tuned_weight)
        ctx.logits_shape = logits.shape
        if row.is_reference:
            with torch.enable_grad():
                # A 16-bit table is read through a float32 copy, so that its row sums reach the
                # update in float32, as the kernels' are (the output is rounded as before).
                t_leaf = tuned_weight.detach()
                if t_leaf.dtype in (torch.float16, torch.bfloat16):
                    t_leaf = t_leaf.float()
                t_leaf.requires_grad_()
                l_leaf = logits.detach().requires_grad_()
                out, gates = reference_gated_embedding(
                    indices, frozen_weight, t_leaf, l_leaf, tau=tau, hard=hard, noise=noise,
                    seed=seed, uniforms=uniforms, sparse=True)
                out = out.to(tuned_weight.dtype)
            ctx.graph = (out, gates, t_leaf, l_leaf)
            ctx.gates = gates.detach()
            return out.detach(), gates.detach()
        ctx.logits2d = logits.detach().reshape(-1, 2).contiguous()
        out, gates = row.ops()[0](indices, frozen_weight, tuned_weight.detach(), ctx.logits2d,
                                  seed, uniforms, tau, hard, noise, True)
        # A detached alias: the output itself on ctx is a reference cycle (ctx -> gates -> its
        # grad_fn, this ctx) that kept every step's outputs, the [N, D] rows among them, until
        # Python's cyclic garbage collector ran (measured: 6 MB more heap per step at
        # B = 4096, F = 24, D = 16, and page faults on every step).
        ctx.gates = gates.detach()
        return out, gates

    @staticmethod
    def _check_unchanged(ctx, weight) -> None:
        if weight._version != ctx.version:
            raise RuntimeError(
                "gated_embedding with optimizer=: the tuned table changed between this call's "
                "forward and its backward (an earlier backward through this call, or an "
                "in-place edit), so the logit gradient would read updated rows. Run one "
                "backward per call, and no in-place edit of the table before it")

    @staticmethod
    def _updated(weight) -> None:
        # The kernels write the rows through a pointer: tell autograd the table changed, so
        # that any later backward which saved it refuses (as for an in-place op).
        torch.autograd.graph.increment_version(weight)

    @staticmethod
    def backward(ctx, grad_out, grad_gates):
        fused_optim.refuse_double_backward("gated_embedding")
        indices, frozen_weight, seed, uniforms, tau, hard, noise = ctx.inputs
        row, weight = ctx.row, ctx.tuned_weight
        _FusedStep._check_unchanged(ctx, weight)
        shared = ctx.call.shared or fused_optim.updates_accumulated()
        ctx.call.done = True
        # No update: paused, a frozen table, or a loss that reads only the gates (the rows'
        # gradient is None then, and a plain optimizer would skip the table: no zero-gradient
        # step that Adam's moments would still move the rows by).
        no_update = (fused_optim.updates_paused() or not ctx.needs_input_grad[0]
                     or grad_out is None)
        if row.is_reference:
            out, gates, t_leaf, l_leaf = ctx.graph
            g_t, g_l = torch.autograd.grad(
                (out, gates), (t_leaf, l_leaf),
                (torch.zeros_like(out) if grad_out is None else grad_out,
                 torch.zeros_like(gates) if grad_gates is None else grad_gates))
            rows, values = g_t._indices()[0], g_t._values()
            if shared:  # handed on in the table dtype, as the kernels' sparse backward does
                values = values.to(weight.dtype)
        elif (row.fused_backward is not None and weight.device.type in row.update_devices
              and not fused_optim.updates_are_redirected() and not shared):
            # The kernel updates the touched rows itself; no gradient rows leave it. (Under a
            # redirect -- data-parallel training -- the rows go to it below instead, to be
            # combined with the other ranks' before one update.)
            n, dim = indices.shape[0], weight.shape[1]
            grad_out = weight.new_zeros((n, dim)) if grad_out is None else grad_out
            opt = ctx.optimizer
            if no_update:
                g_l = row.ops()[1](
                    grad_out.reshape(n, dim).contiguous(),
                    None if grad_gates is None else grad_gates.reshape(n, 2).contiguous(),
                    indices, frozen_weight, weight.detach(), ctx.logits2d, seed, uniforms, tau,
                    hard, noise, True)[1]
            else:
                with fused_optim._step_undone_on_error(ctx.state):
                    g_l = row.fused_backward()(
                        grad_out.reshape(n, dim).contiguous(),
                        None if grad_gates is None else grad_gates.reshape(n, 2).contiguous(),
                        indices, frozen_weight, weight.detach(), ctx.logits2d, seed, uniforms,
                        tau, hard, noise, *opt.kernel_args(weight, ctx.state))
                _FusedStep._updated(weight)
            grad_logits = g_l.reshape(ctx.logits_shape) if ctx.needs_input_grad[1] else None
            return None, grad_logits, None, None, None, None
        else:
            n, dim = indices.shape[0], weight.shape[1]
            grad_out = weight.new_zeros((n, dim)) if grad_out is None else grad_out
            values, g_l, rows = row.ops()[1](
                grad_out.reshape(n, dim).contiguous(),
                None if grad_gates is None else grad_gates.reshape(n, 2).contiguous(),
                indices, frozen_weight, weight.detach(), ctx.logits2d, seed, uniforms, tau,
                hard, noise, True)
        opt = ctx.optimizer
        if not row.coalesced:
            rows, values = fused_optim.combine_rows(rows, values, deterministic=opt.deterministic)
        if hard and not row.touched_only:
            keep = fused_optim.touched_rows_mask(rows, indices, ctx.gates)
            rows, values = rows[keep], values[keep]
        if no_update:
            pass
        elif shared:
            fused_optim.defer_update(opt, weight, rows, values, ctx.state, bump_version=True)
        else:
            with torch.no_grad():
                opt.apply(weight.detach(), rows, values, ctx.state)
            if not fused_optim.updates_are_redirected():
                _FusedStep._updated(weight)
        grad_logits = g_l.reshape(ctx.logits_shape) if ctx.needs_input_grad[1] else None
        return None, grad_logits, None, None, None, None


def _eval_rows(indices, frozen_weight, tuned_weight, logits, tau):
    """Hard gates without noise and without gradients: read only each lookup's chosen row."""
    pick = (logits[..., 1] - logits[..., 0]) / tau > 0  # the contract's x > 0; NaN -> frozen
    flat_pick = pick.reshape(-1)
    flat = indices.reshape(-1)
    dim = tuned_weight.shape[1]
    out = tuned_weight.new_empty((flat.shape[0], dim))
    out[flat_pick] = tuned_weight.index_select(0, flat[flat_pick])
    out[~flat_pick] = quant.frozen_rows(frozen_weight, flat[~flat_pick], tuned_weight.dtype)
    gates = torch.stack((~pick, pick), dim=-1).to(torch.float32)
    return out.reshape(*indices.shape, dim), gates


def _func_transform_backend(backend: str, optimizer) -> str:
    """The backend under a torch.func transform: PyTorch's custom ops (the kernels' form) do
    not reach torch.func's autograd, the reference's autograd functions do; ``auto`` picks the
    reference there, a kernel backend named by the caller is an error that says so."""
    if not validate.under_func_transform():
        return backend
    if optimizer is not None:
        raise ValueError(validate.FUSED_UNDER_FUNC_TRANSFORM.format(
            what="gated_embedding with optimizer="))
    if backend == registry.AUTO:
        return "reference"
    row = registry.REGISTRY.get(backend)
    if row is not None and not row.is_reference:
        raise ValueError(f"backend {backend!r} cannot run under a torch.func transform "
                         "(torch.func.grad, vjp, ...): PyTorch's custom ops, the kernels' "
                         "form, do not support them; use backend='reference' (or 'auto', "
                         "which picks it under a transform)")
    return backend


def _auto_for_float64(backend: str, *tensors) -> str:
    """``auto`` with a float64 table or logits: the reference, the backend that serves them."""
    if backend == registry.AUTO and any(t is not None and t.dtype == torch.float64
                                        for t in tensors):
        return "reference"
    return backend


def _checked_reference_indices(indices, num_rows: int):
    """The reference's indices after the contract's range check. Under torch.compile the
    check is the ``checked_indices`` op, which the graph keeps and runs (the Python check
    would be skipped there, and the compiled gather's own bounds error names no position)."""
    if torch.compiler.is_compiling():
        return torch.ops.autoft_fast.checked_indices(indices, num_rows)
    validate.check_index_range(indices, num_rows)
    return indices


def _checked_reference_bag_values(values, offsets, num_rows: int):
    """As :func:`_checked_reference_indices`, for a bag's values and offsets."""
    if torch.compiler.is_compiling():
        return torch.ops.autoft_fast.checked_bag_values(values, offsets, num_rows)
    validate.check_bag_data(values, offsets, num_rows)
    return values


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _prepare_call(resolve, backend, device, frozen_weight, tuned_weight, logits, uniforms,
                  tau, seed, hard, noise, sparse):
    """The option checks and the backend choice that the lookup and the bag op share:
    returns (backend row, tau, seed tensor, hard, noise, sparse, tuned_weight to use)."""
    tau = validate.check_tau(tau)
    seed = validate.check_seed(seed)
    hard = validate.check_flag("hard", hard)
    noise = validate.check_flag("noise", noise)
    sparse = validate.check_flag("sparse", sparse)
    if uniforms is not None and noise:
        validate.check_uniform_range(uniforms)
    low_precision = validate.is_low_precision_frozen(frozen_weight, tuned_weight)
    try:
        row = registry.REGISTRY[resolve(backend, device, low_precision)]
    except registry.LowPrecisionNotServed as exc:
        raise validate.low_precision_not_served(exc.backend, frozen_weight, tuned_weight,
                                                exc.served) from None
    if not row.is_reference and (frozen_weight.dtype == torch.float64 or logits.dtype == torch.float64):
        raise TypeError(f"float64 tables or logits are served by the 'reference' backend only, "
                        f"not {row.name!r}")
    if sparse and not tuned_weight.is_contiguous() and tuned_weight.requires_grad:
        tuned_weight = _DenseGradThroughView.apply(tuned_weight)
    return row, tau, _seed_tensor(seed, noise, uniforms), hard, noise, sparse, tuned_weight


def gated_embedding(indices, frozen_weight, tuned_weight, logits, *, tau=1.0, hard=True,
                    noise=True, seed=None, uniforms=None, sparse=False, backend="auto",
                    optimizer=None, optimizer_state=None):
    """Mix frozen and tuned embedding rows per lookup with a Gumbel-softmax gate.

    Returns ``(out, gates)``: ``out`` of shape ``indices.shape + (D,)`` in the tuned table's
    dtype, ``gates`` of shape ``indices.shape + (2,)`` (float32; one-hot when ``hard``).
    ``frozen_weight`` may be stored in lower precision than ``tuned_weight``: bfloat16 /
    float16 under a float32 tuned table, or an int8 row-quantised table ``[V, D + 2]``
    (:func:`autoft_fast.ops.quant.quantize_int8`); the result is then that of the float32
    table :func:`autoft_fast.ops.quant.dequantize` gives back.
    Gradients reach ``tuned_weight`` (dense, or a COO tensor when ``sparse=True``) and
    ``logits`` (straight-through when ``hard``); ``frozen_weight`` never gets one.
    See docs/op-contract.md for the exact semantics.

    ``optimizer`` (a :class:`~autoft_fast.ops.fused_optim.FusedOptimizer`) with its
    ``optimizer_state`` (``optimizer.new_state(tuned_weight)``) fuses the optimizer into the
    backward: the backward updates the touched rows of ``tuned_weight`` in place and gives it
    no gradient (``sparse`` is then ignored); the logits get their ordinary gradient.
    Without gradients (``torch.no_grad()``, or nothing requiring one), hard gates and no
    noise read only the chosen row of each lookup and save nothing for a backward.

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
    backend = _auto_for_float64(_func_transform_backend(backend, optimizer), frozen_weight,
                                tuned_weight, logits)
    row = registry.REGISTRY.get(backend) if backend != registry.AUTO else None
    validate.check_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                          reference=row is not None and row.is_reference)
    row, tau, seed_t, hard, noise, sparse, tuned_weight = _prepare_call(
        _resolve_backend, backend, indices.device, frozen_weight, tuned_weight, logits,
        uniforms, tau, seed, hard, noise, sparse)

    if optimizer is not None:
        # Where no backward can run (gradients disabled: no_grad, inference_mode), nothing
        # is updated: the plain call, which saves nothing (the reference's fused step builds
        # a graph inside enable_grad, which inference_mode refuses); arguments still checked.
        if torch.is_grad_enabled():
            return _fused(row, indices, frozen_weight, tuned_weight, logits, seed_t, uniforms,
                          tau, hard, noise, optimizer, optimizer_state)
        _check_optimizer(optimizer, optimizer_state, tuned_weight)
        optimizer = optimizer_state = None
    if optimizer_state is not None:
        raise ValueError("optimizer_state is given without optimizer: pass the FusedOptimizer "
                         "whose state it is")
    if row.is_reference:
        indices = _checked_reference_indices(indices, frozen_weight.shape[0])
        if hard and not noise and not _needs_grad(tuned_weight, logits):
            return _eval_rows(indices, frozen_weight, tuned_weight, logits, tau)
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


def _check_optimizer(optimizer, state, tuned_weight) -> None:
    if not isinstance(optimizer, fused_optim.FusedOptimizer):
        raise TypeError(f"optimizer must be a FusedOptimizer or None, got {type(optimizer).__name__}")
    optimizer.check_state(tuned_weight, state)


# Run eagerly under torch.compile (a graph break): the call's bookkeeping (open_call, which
# finds the calls of one table that meet in one backward) is Python state that a traced graph
# would run once at trace time and never again, so two compiled calls of one table would each
# update it in their own backward, and the second would find the rows changed.
@torch.compiler.disable
def _fused(row, indices, frozen_weight, tuned_weight, logits, seed_t, uniforms, tau, hard,
           noise, optimizer, state):
    _check_optimizer(optimizer, state, tuned_weight)
    if tuned_weight.requires_grad and not tuned_weight.is_leaf:
        raise ValueError("tuned_weight must be a leaf tensor (a Parameter) when optimizer is "
                         "given: the backward updates it in place, and the update of a "
                         "computed tensor would never reach the weights it came from")
    if not tuned_weight.is_contiguous():
        raise ValueError("tuned_weight must be contiguous when optimizer is given (the backward "
                         f"updates its rows in place), got strides {tuned_weight.stride()}")
    if row.is_reference:
        indices = _checked_reference_indices(indices, frozen_weight.shape[0])
        inputs = (indices, frozen_weight.detach(), seed_t, uniforms, tau, hard, noise)
        return _FusedStep.apply(tuned_weight, logits, row, optimizer, state, inputs)
    shape, dim = indices.shape, tuned_weight.shape[1]
    flat_uniforms = None if (uniforms is None or not noise) else uniforms.reshape(-1).contiguous()
    inputs = (indices.reshape(-1).contiguous(), frozen_weight.detach().contiguous(), seed_t,
              flat_uniforms, tau, hard, noise)
    out, gates = _FusedStep.apply(tuned_weight, logits, row, optimizer, state, inputs)
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
        if not isinstance(uniforms, torch.Tensor) or uniforms.dtype != torch.float32:
            got = uniforms.dtype if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
            raise TypeError(f"uniforms must be a float32 tensor, got {got}")
        if tuple(uniforms.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"uniforms must have the shape of logits without its last axis "
                             f"{tuple(logits.shape[:-1])}, got {tuple(uniforms.shape)}")
        validate.check_uniform_range(uniforms)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = straight_through_gates(logits.to(compute), tau=tau, hard=hard, noise=noise,
                               seed=_seed_tensor(seed, noise, uniforms), uniforms=uniforms)
    return z


@torch.compiler.assume_constant_result
def _resolve_bag_backend(backend: str, device: torch.device, low_precision: bool) -> str:
    """As :func:`_resolve_backend`, for the bag op (its ops resolved outside the trace)."""
    row = registry.resolve_bag(backend, device, low_precision)
    if not row.is_reference:
        row.bag_ops()
    return row.name


def gated_embedding_bag(values, offsets, frozen_weight, tuned_weight, logits, *,
                        per_sample_weights=None, mode="mean", tau=1.0, hard=True, noise=True,
                        seed=None, uniforms=None, sparse=False, backend="auto", optimizer=None):
    """Gate whole bags of lookups (multi-hot fields): one gate per bag, pooled rows mixed.

    Bag b is ``values[offsets[b]:offsets[b + 1]]`` (``offsets``: B + 1 non-decreasing entries
    from 0 to ``len(values)``). Its frozen rows and its tuned rows are pooled separately, by
    ``mode`` "sum" or "mean" (the mean divides by the bag's length; an empty bag pools to
    zeros), optionally weighted by ``per_sample_weights`` (one float32 per value), and mixed by
    one gate drawn from ``logits[b]`` as :func:`gated_embedding` draws a lookup's (the noise
    stream indexed by bag): ``out[b] = z0 * pool(frozen) + z1 * pool(tuned)``.
    Returns ``(out [B, D], gates [B, 2])``. Gradients reach ``tuned_weight`` (dense, or COO
    with ``sparse=True``) and ``logits``, straight-through when ``hard``.
    See docs/op-contract.md, "Bags". ``optimizer`` (the fused optimizer) is not served by the
    bag op: passing one raises a ValueError.

    Example::

        >>> import torch, autoft_fast
        >>> frozen = torch.randn(100, 8)
        >>> tuned = frozen.clone().requires_grad_()
        >>> values, offsets = torch.tensor([3, 7, 7, 42]), torch.tensor([0, 3, 3, 4])
        >>> logits = torch.zeros(3, 2, requires_grad=True)
        >>> out, gates = autoft_fast.gated_embedding_bag(values, offsets, frozen, tuned, logits,
        ...                                               mode="mean", seed=0)
        >>> out.shape, bool(out[1].eq(0).all())
        (torch.Size([3, 8]), True)
        >>> out.sum().backward()
    """
    if optimizer is not None:
        raise ValueError("gated_embedding_bag does not fuse an optimizer into its backward "
                         "(optimizer must be None): give tuned_weight an ordinary gradient")
    backend = _auto_for_float64(_func_transform_backend(backend, None), frozen_weight,
                                tuned_weight, logits)
    row = registry.REGISTRY.get(backend) if backend != registry.AUTO else None
    validate.check_bag_inputs(values, offsets, per_sample_weights, frozen_weight, tuned_weight,
                              logits, uniforms, reference=row is not None and row.is_reference)
    mode_index = validate.check_bag_mode(mode)
    row, tau, seed_t, hard, noise, sparse, tuned_weight = _prepare_call(
        _resolve_bag_backend, backend, values.device, frozen_weight, tuned_weight, logits,
        uniforms, tau, seed, hard, noise, sparse)
    if (not row.is_reference and per_sample_weights is not None
            and per_sample_weights.requires_grad and torch.is_grad_enabled()):
        raise ValueError(f"gated_embedding_bag: backend {row.name!r} gives per_sample_weights no "
                         "gradient; pass per_sample_weights.detach(), or backend='reference' "
                         "for its gradient")
    if row.is_reference:
        values = _checked_reference_bag_values(values, offsets, frozen_weight.shape[0])
        return reference_gated_embedding_bag(
            values, offsets, frozen_weight, tuned_weight, logits,
            per_sample_weights=per_sample_weights, mode=mode, tau=tau, hard=hard, noise=noise,
            seed=seed_t, uniforms=uniforms, sparse=sparse)
    return row.bag_ops()[0](
        values.contiguous(), offsets.contiguous(),
        None if per_sample_weights is None else per_sample_weights.contiguous(),
        frozen_weight.detach().contiguous(), tuned_weight.contiguous(), logits.contiguous(),
        seed_t, None if (uniforms is None or not noise) else uniforms.contiguous(),
        tau, hard, noise, mode_index, sparse)
