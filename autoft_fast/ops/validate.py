"""Every user-input check of the op contract, in one place and one message style.

The public function runs these first so that every backend raises the same exception with
the same words; the Triton host code runs them too for direct callers of its
``torch.ops.autoft_fast.*`` ops (:func:`check_kernel_inputs`). The C++ kernels repeat the cheap
checks in csrc/gated_common.h with the same wording.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .quant import INT8_EXTRA_BYTES, frozen_dim, is_quantised

INDEX_DTYPES = (torch.int32, torch.int64)
TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The reference also computes in float64: it is the oracle of the tests and of gradcheck.
REFERENCE_TABLE_DTYPES = TABLE_DTYPES + (torch.float64,)


def frozen_dtypes_for(tuned_dtype: torch.dtype) -> tuple:
    """The frozen-table dtypes a tuned table of ``tuned_dtype`` can be paired with.

    The tuned dtype itself, int8 row-quantised tables (ops/quant.py), and bfloat16 / float16
    under a float32 tuned table. Which backends read the lower-precision ones: the registry's
    ``low_precision_frozen`` column.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.validate import frozen_dtypes_for
        >>> frozen_dtypes_for(torch.bfloat16)
        (torch.bfloat16, torch.int8)
    """
    lower = (torch.bfloat16, torch.float16) if tuned_dtype == torch.float32 else ()
    return (tuned_dtype,) + lower + (torch.int8,)


def is_low_precision_frozen(frozen_weight: torch.Tensor, tuned_weight: torch.Tensor) -> bool:
    """Whether the frozen table is stored in another dtype than the tuned one."""
    return frozen_weight.dtype != tuned_weight.dtype


def low_precision_not_served(backend: str, frozen_weight, tuned_weight, served=None) -> TypeError:
    """The one wording for a backend asked to read a frozen table of another dtype than the tuned one."""
    which = f"backends that do: {served}" if served is not None else "backend='auto' picks one that does"
    return TypeError(f"backend {backend!r} does not read a frozen_weight of dtype "
                     f"{_names([frozen_weight.dtype])} with a tuned_weight of dtype "
                     f"{_names([tuned_weight.dtype])}; {which}")


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# The kernels compute x = (d + l) / tau in float32: tau must be a normal float32 number.
TAU_MIN, TAU_MAX = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)


def check_tau(tau) -> float:
    """``tau`` as a float: a real number (not a string or bool; a NumPy scalar is one),
    positive, finite and within float32's normal range (the kernels compute in float32)."""
    if isinstance(tau, torch.Tensor) and tau.numel() == 1 and tau.dtype.is_floating_point:
        tau = float(tau)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive finite number, got {tau!r} ({type(tau).__name__})")
    value = float(tau)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tau = {tau!r} must be a positive finite number")
    if not TAU_MIN <= value <= TAU_MAX:
        raise ValueError(f"tau = {tau!r} is outside float32's range, in which the gates are "
                         f"computed: give {TAU_MIN:.4g} <= tau <= {TAU_MAX:.4g}")
    return value


def check_flag(name: str, value) -> bool:
    """A bool option (``hard``, ``noise``, ``sparse``): a bool (NumPy's too), never a string
    or a number."""
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point:
            raise TypeError(f"seed must be an integer, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)  # a NumPy integer too
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed = {seed} must be a 63-bit non-negative integer (0 <= seed < 2**63)")
    return seed


def check_inputs(indices, frozen_weight, tuned_weight, logits, uniforms, *, reference: bool) -> None:
    """Shapes, dtypes and devices of the op's tensors (not the index range: see check_index_range).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.validate import check_inputs
        >>> f = torch.zeros(4, 2)
        >>> check_inputs(torch.tensor([1]), f, f, torch.zeros(1, 2), None, reference=False)
    """
    for name, t in (("indices", indices), ("frozen_weight", frozen_weight),
                    ("tuned_weight", tuned_weight), ("logits", logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    table_dtypes = REFERENCE_TABLE_DTYPES if reference else TABLE_DTYPES
    for name, t in (("frozen_weight", frozen_weight), ("tuned_weight", tuned_weight)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [V, D] table, got shape {tuple(t.shape)}")
        if t.is_sparse:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if tuned_weight.dtype not in table_dtypes:
        hint = ("; float64 tables are served by backend='reference' only"
                if tuned_weight.dtype == torch.float64 and not reference else "")
        raise TypeError(f"tuned_weight must be one of {_names(table_dtypes)}, got "
                        f"{tuned_weight.dtype}{hint}")
    frozen_ok = frozen_dtypes_for(tuned_weight.dtype)
    if frozen_weight.dtype not in frozen_ok:
        raise TypeError(
            f"frozen_weight must be one of {_names(frozen_ok)} (the same dtype as tuned_weight, "
            f"{_names([tuned_weight.dtype])}, or a lower precision), got {frozen_weight.dtype}")
    dim = frozen_dim(frozen_weight)
    if (frozen_weight.shape[0], dim) != tuple(tuned_weight.shape):
        if is_quantised(frozen_weight):
            # Its shape alone can look right: [V, D] where [V, D + extra] was meant.
            raise ValueError(
                f"frozen_weight is an int8 table of shape {tuple(frozen_weight.shape)}, which "
                f"holds rows of D = {dim} (an int8 table stores [V, D + {INT8_EXTRA_BYTES}]: "
                f"D values, then the float16 row scale); tuned_weight is "
                f"{tuple(tuned_weight.shape)}: quantise the frozen table with "
                "quantize_int8 rather than casting it to int8")
        raise ValueError(
            f"frozen_weight and tuned_weight must have the same [V, D] shape, got "
            f"{tuple(frozen_weight.shape)} and {tuple(tuned_weight.shape)}")
    expected = tuple(indices.shape) + (2,)
    if tuple(logits.shape) != expected:
        raise ValueError(f"logits must have shape indices.shape + (2,) = {expected}, got {tuple(logits.shape)}")
    logit_dtypes = (torch.float32, torch.float64) if reference else (torch.float32,)
    if logits.dtype not in logit_dtypes:
        raise TypeError(f"logits must be {_names(logit_dtypes)}, got {logits.dtype}")
    tensors = [("indices", indices), ("frozen_weight", frozen_weight),
               ("tuned_weight", tuned_weight), ("logits", logits)]
    if uniforms is not None:
        if not isinstance(uniforms, torch.Tensor):
            raise TypeError(f"uniforms must be a torch.Tensor or None, got {type(uniforms).__name__}")
        if tuple(uniforms.shape) != tuple(indices.shape):
            raise ValueError(
                f"uniforms must have the shape of indices {tuple(indices.shape)}, got {tuple(uniforms.shape)}")
        if uniforms.dtype != torch.float32:
            raise TypeError(f"uniforms must be float32, got {uniforms.dtype}")
        tensors.append(("uniforms", uniforms))
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"all tensors must be on one device, got {where}")


def _no_data(t: torch.Tensor) -> bool:
    """True where a data-dependent check cannot run: while compiling, or on meta tensors."""
    return torch.compiler.is_compiling() or t.device.type == "meta"


def check_uniform_range(uniforms: torch.Tensor) -> None:
    # A data-dependent check would break a torch.compile graph: compiled code skips it.
    if _no_data(uniforms):
        return
    if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        bad = torch.nonzero(~((uniforms.reshape(-1) >= 0) & (uniforms.reshape(-1) < 1)))[0, 0].item()
        raise ValueError(f"uniforms[{bad}] = {uniforms.reshape(-1)[bad].item()} is outside [0, 1)")


def index_error(position: int, value: int, num_rows: int) -> IndexError:
    return IndexError(f"indices[{position}] = {value} is out of range for a table of {num_rows} rows")


def check_index_range(indices: torch.Tensor, num_rows: int) -> None:
    """Raise the contract's IndexError naming the first bad flat position."""
    if indices.numel() == 0 or _no_data(indices):
        return  # nothing to read here (compiling, meta): see checked_indices for a traced check
    flat = indices.reshape(-1)
    bad = (flat < 0) | (flat >= num_rows)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0].item())
        raise index_error(pos, int(flat[pos].item()), num_rows)


def check_kernel_inputs(indices, frozen_weight, tuned_weight, logits, seed, uniforms, tau, *,
                        backend: str, low_precision_frozen: bool = False) -> None:
    """The kernel-level form (flat [N] indices, a 0-dim int64 CPU seed tensor) of the checks.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.validate import check_kernel_inputs
        >>> f = torch.zeros(4, 2)
        >>> check_kernel_inputs(torch.tensor([1]), f, f, torch.zeros(1, 2), torch.tensor(0), None, 1.0,
        ...                     backend="triton")
    """
    if isinstance(indices, torch.Tensor) and indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (N lookups) for the kernel op, got shape {tuple(indices.shape)}")
    check_inputs(indices, frozen_weight, tuned_weight, logits, uniforms, reference=False)
    if not low_precision_frozen and is_low_precision_frozen(frozen_weight, tuned_weight):
        raise low_precision_not_served(backend, frozen_weight, tuned_weight)
    if not (isinstance(seed, torch.Tensor) and seed.dim() == 0 and seed.dtype == torch.int64
            and seed.device.type == "cpu"):
        got = (f"shape {tuple(seed.shape)}, dtype {seed.dtype}, device {seed.device}"
               if isinstance(seed, torch.Tensor) else type(seed).__name__)
        raise TypeError(f"seed must be a 0-dim int64 CPU tensor, got {got}")
    check_tau(tau)


def check_grads(grad_out, grad_gates, indices, tuned_weight) -> None:
    """The backward's incoming gradients at kernel level: grad_out [N, D], grad_gates [N, 2]."""
    n, d = indices.shape[0], tuned_weight.shape[1]
    if tuple(grad_out.shape) != (n, d):
        raise ValueError(f"grad_out must have shape [{n}, {d}], got shape {tuple(grad_out.shape)}")
    if grad_out.dtype not in (tuned_weight.dtype, torch.float32):
        raise TypeError(f"grad_out must have the dtype of tuned_weight ({tuned_weight.dtype}) or "
                        f"float32, got dtype {grad_out.dtype}")
    if grad_gates is not None:
        if tuple(grad_gates.shape) != (n, 2):
            raise ValueError(f"grad_gates must have shape [{n}, 2], got shape {tuple(grad_gates.shape)}")
        if grad_gates.dtype != torch.float32:
            raise TypeError(f"grad_gates must be float32, got dtype {grad_gates.dtype}")
    for name, t in (("grad_out", grad_out), ("grad_gates", grad_gates)):
        if t is not None and t.device != indices.device:
            raise ValueError(f"all tensors must be on one device, got {name} on {t.device}, "
                             f"indices on {indices.device}")


def check_seed_value(value: int) -> int:
    """A seed read from its tensor: the 63-bit range of :func:`check_seed`."""
    return check_seed(int(value))


def device_not_served(backend: str, name: str, device, served: str) -> ValueError:
    """The one wording for a backend asked to run on a device it does not serve."""
    return ValueError(f"backend {backend!r} does not serve {name} on device {device}: "
                      f"it serves {served}")


# ---------------------------------------------------------------------------------------------
# Bags (multi-hot fields): values + offsets, docs/op-contract.md "Bags"
# ---------------------------------------------------------------------------------------------

def check_bag_mode(mode) -> int:
    """The index in ``interface.BAG_MODES`` of pooling ``mode`` ("sum" or "mean").

    Example::

        >>> from autoft_fast.ops.validate import check_bag_mode
        >>> check_bag_mode("mean")
        1
    """
    from .interface import BAG_MODES

    if not isinstance(mode, str) or mode not in BAG_MODES:
        raise ValueError(f"mode = {mode!r} is not one of {list(BAG_MODES)}")
    return BAG_MODES.index(mode)


def check_bag_inputs(values, offsets, per_sample_weights, frozen_weight, tuned_weight, logits,
                     uniforms, *, reference: bool) -> None:
    """Shapes, dtypes and devices of the bag op's tensors (not their data: see check_bag_data).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.validate import check_bag_inputs
        >>> f = torch.zeros(4, 2)
        >>> check_bag_inputs(torch.tensor([1, 2]), torch.tensor([0, 2]), None, f, f,
        ...                  torch.zeros(1, 2), None, reference=False)
    """
    for name, t in (("values", values), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if offsets.shape[0] < 1:
        raise ValueError("offsets must hold B + 1 entries (0, the end of each bag), got an empty tensor")
    bags = offsets.shape[0] - 1
    # The shapes first, in the bag op's words (the lookup checks below name indices).
    if isinstance(logits, torch.Tensor) and tuple(logits.shape) != (bags, 2):
        raise ValueError(f"logits must have shape [B, 2] = {(bags, 2)} (one gate per bag; B + 1 "
                         f"= {bags + 1} offsets), got {tuple(logits.shape)}")
    if isinstance(uniforms, torch.Tensor) and tuple(uniforms.shape) != (bags,):
        raise ValueError(f"uniforms must have shape [B] = {(bags,)} (one per bag; B + 1 = "
                         f"{bags + 1} offsets), got {tuple(uniforms.shape)}")
    # The lookup checks on the tables, logits [B, 2] and uniforms [B], with the bags as lookups.
    check_inputs(values.new_empty((bags,)), frozen_weight, tuned_weight, logits, uniforms,
                 reference=reference)
    tensors = [("values", values), ("offsets", offsets), ("tuned_weight", tuned_weight)]
    if per_sample_weights is not None:
        if not isinstance(per_sample_weights, torch.Tensor):
            raise TypeError(f"per_sample_weights must be a torch.Tensor or None, got "
                            f"{type(per_sample_weights).__name__}")
        if tuple(per_sample_weights.shape) != tuple(values.shape):
            raise ValueError(f"per_sample_weights must have the shape of values {tuple(values.shape)}, "
                             f"got {tuple(per_sample_weights.shape)}")
        ok = (torch.float32, torch.float64) if reference else (torch.float32,)
        if per_sample_weights.dtype not in ok:
            raise TypeError(f"per_sample_weights must be {_names(ok)}, got {per_sample_weights.dtype}")
        tensors.append(("per_sample_weights", per_sample_weights))
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_bag_data(values: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> None:
    """Offsets start at 0, never decrease and end at len(values); every value is a row of the table."""
    if _no_data(offsets):
        return
    length = values.shape[0]
    first, last = int(offsets[0].item()), int(offsets[-1].item())
    if first != 0:
        raise ValueError(f"offsets[0] = {first} must be 0 (bag 0 starts at the first value)")
    if offsets.shape[0] > 1:
        step = offsets[1:] - offsets[:-1]
        if bool((step < 0).any()):
            b = int(torch.nonzero(step < 0)[0, 0].item())
            raise ValueError(f"offsets must be non-decreasing, got offsets[{b}] = "
                             f"{int(offsets[b].item())} > offsets[{b + 1}] = {int(offsets[b + 1].item())}")
    if last != length:
        raise ValueError(f"offsets[-1] = {last} must equal len(values) = {length}")
    if length:
        bad = (values < 0) | (values >= num_rows)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0, 0].item())
            raise IndexError(f"values[{pos}] = {int(values[pos].item())} is out of range for a "
                             f"table of {num_rows} rows")


def under_func_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is running this call (never
    while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


FUSED_UNDER_FUNC_TRANSFORM = (
    "{what} updates the table inside the backward, which a torch.func transform "
    "(torch.func.grad, ...) cannot run: call it without a fused optimizer and step on the "
    "gradient the transform returns")
