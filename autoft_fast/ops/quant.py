"""Frozen tables in lower precision: float16 / bfloat16 copies and int8 row-quantised tables.

The frozen table never gets a gradient, so it can be stored in fewer bytes than the tuned one;
the kernels widen (and dequantise) its rows to float32 as they read them. Every value the op
computes from a low-precision frozen table equals what it computes from the float32 table
:func:`dequantize` gives back (the tests check every backend that way).

The int8 layout (``frozen_dtype="int8"``), one row of ``D + 2`` bytes per table row (an int8
tensor ``[V, D + 2]``)::

    bytes 0 .. D - 1   q[r, d], int8 in [-127, 127]
    bytes D, D + 1     scale[r], float16 (the host's byte order, as ``Tensor.view`` reads it)
    f[r, d] = float(q[r, d]) * float(scale[r])      (exact in float32: 7 x 11 significant bits)

Symmetric quantisation (no per-row bias): with float16 scales a row costs D + 2 bytes, at D = 16
18 bytes against 64 for float32, 0.28x (a per-row float16 bias as well would be 20 bytes, 0.31x).
The scale is max_d |w[r, d]| / 127 rounded *up* to float16, so every q fits without clipping and

    |w[r, d] - f[r, d]| <= scale[r] / 2 <= max_d |w[r, d]| / 254 * (1 + 2**-10) + 2**-25

(the last term is half the float16 subnormal step, for rows with max |w| below 0.008).
bfloat16 / float16 copies round each value to nearest: relative error 2**-8 / 2**-11.

Example::

    >>> import torch
    >>> from autoft_fast.ops.quant import dequantize, quantize_int8
    >>> w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    >>> q = quantize_int8(w)
    >>> tuple(q.shape), q.dtype
    ((2, 5), torch.int8)
    >>> bool(((dequantize(q) - w).abs() <= 1 / 254 * (1 + 2**-10)).all())
    True
"""

from __future__ import annotations

import torch

INT8_EXTRA_BYTES = 2  # the float16 scale at the end of each int8 row
INT8_MAX = 127
# The names of the autoft.frozen_dtype key and of GatedEmbedding(frozen_dtype=...).
FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int8": torch.int8}
QUANTISED_DTYPES = (torch.int8,)


def is_quantised(frozen_weight: torch.Tensor) -> bool:
    """Whether ``frozen_weight`` is an int8 row-quantised table (the layout above)."""
    return frozen_weight.dtype in QUANTISED_DTYPES


def frozen_dim(frozen_weight: torch.Tensor) -> int:
    """The embedding width D that ``frozen_weight`` stores (its column count less the scale)."""
    extra = INT8_EXTRA_BYTES if is_quantised(frozen_weight) else 0
    return frozen_weight.shape[-1] - extra


def _scales_up(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 rounded up to float16 (so amax / scale <= 127 exactly)."""
    s = amax.double() / INT8_MAX
    h = s.to(torch.float16)
    low = h.double() < s
    if bool(low.any()):
        bits = h.view(torch.int16)
        # Positive finite float16: the next representable value up is the next integer bit pattern.
        h = torch.where(low, (bits + 1).view(torch.float16), h)
    return h


def quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """Row-wise symmetric int8 quantisation of a ``[V, D]`` float table: int8 ``[V, D + 2]``.

    Raises ValueError for non-finite values or a row whose scale float16 cannot hold
    (max |w| above 8.3e6). See the module docstring for the layout and the error bound.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.quant import quantize_int8
        >>> quantize_int8(torch.tensor([[127.0, -1.0]]))[0, :2].tolist()
        [127, -1]
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        got = (f"shape {tuple(weight.shape)}, dtype {weight.dtype}" if isinstance(weight, torch.Tensor)
               else type(weight).__name__)
        raise ValueError(f"weight must be a 2-D [V, D] floating-point table, got {got}")
    v, d = weight.shape
    packed = torch.empty(v, d + INT8_EXTRA_BYTES, dtype=torch.int8, device=weight.device)
    # Row blocks: the float64 working copies stay small ([block, D]) however large the table.
    for start in range(0, v, _QUANT_BLOCK):
        stop = min(v, start + _QUANT_BLOCK)
        packed[start:stop] = _quantize_rows(weight.detach()[start:stop], start)
    return packed


_QUANT_BLOCK = 1 << 16  # rows quantised at a time


def _quantize_rows(weight: torch.Tensor, first_row: int) -> torch.Tensor:
    """:func:`quantize_int8` of a block of rows (``first_row``: the block's first row, for errors)."""
    w = weight.double()
    if w.numel() and not bool(torch.isfinite(w).all()):
        row = first_row + int(torch.nonzero(~torch.isfinite(w))[0, 0])
        raise ValueError(f"weight row {row} has a non-finite value; it cannot be quantised to int8")
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = _scales_up(amax)
    if bool(torch.isinf(scale).any()):
        i = int(torch.nonzero(torch.isinf(scale))[0, 0])
        raise ValueError(f"weight row {first_row + i} has max |w| = {float(amax[i])}, too large "
                         f"for a float16 int8 scale (at most {65504.0 * INT8_MAX:g})")
    sd = scale.double()
    q = torch.where(sd[:, None] > 0, torch.round(w / sd.clamp_min(1e-300)[:, None]), 0.0)
    q = q.clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    packed = torch.empty(w.shape[0], w.shape[1] + INT8_EXTRA_BYTES, dtype=torch.int8,
                         device=weight.device)
    packed[:, :w.shape[1]] = q
    packed[:, w.shape[1]:] = scale.reshape(-1, 1).view(torch.int8)
    return packed


def int8_scales(packed: torch.Tensor) -> torch.Tensor:
    """The float16 per-row scales ``[...]`` of int8 rows ``[..., D + 2]``."""
    # A copy of its own, not .contiguous(): a slice of one row (or none) already counts as
    # contiguous, at an odd storage offset when D is odd, which a view as float16 refuses.
    scales = packed[..., -INT8_EXTRA_BYTES:].clone(memory_format=torch.contiguous_format)
    return scales.view(torch.float16).squeeze(-1)


def dequantize(frozen_weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The values the kernels read from ``frozen_weight`` (any frozen dtype), as ``dtype``.

    Works on a whole table or on gathered rows (any leading shape). For an int8 table this
    is q * scale computed in float32, exactly as the kernels compute it.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.quant import dequantize, quantize_int8
        >>> dequantize(quantize_int8(torch.tensor([[127.0, -2.0]]))).tolist()
        [[127.0, -2.0]]
    """
    if not is_quantised(frozen_weight):
        return frozen_weight.to(dtype)
    q = frozen_weight[..., :-INT8_EXTRA_BYTES].to(torch.float32)
    return (q * int8_scales(frozen_weight).to(torch.float32).unsqueeze(-1)).to(dtype)


def frozen_rows(frozen_weight: torch.Tensor, indices: torch.Tensor, dtype=torch.float32):
    """``frozen_weight``'s rows at ``indices`` (any shape), dequantised: ``indices.shape + (D,)``.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.quant import frozen_rows
        >>> frozen_rows(torch.eye(3, dtype=torch.bfloat16), torch.tensor([2])).tolist()
        [[0.0, 0.0, 1.0]]
    """
    flat = frozen_weight.index_select(0, indices.reshape(-1).long())
    return dequantize(flat, dtype).reshape(*indices.shape, frozen_dim(frozen_weight))


def check_frozen_dtype(name) -> torch.dtype:
    """The torch dtype of a ``frozen_dtype`` name (one of :data:`FROZEN_DTYPES`), or a ValueError."""
    if isinstance(name, torch.dtype):
        for key, value in FROZEN_DTYPES.items():
            if value == name:
                return value
    if isinstance(name, str) and name in FROZEN_DTYPES:
        return FROZEN_DTYPES[name]
    raise ValueError(f"frozen_dtype = {name!r} is not one of {list(FROZEN_DTYPES)}")


def to_frozen_dtype(weight: torch.Tensor, frozen_dtype) -> torch.Tensor:
    """``weight`` ``[V, D]`` stored as the frozen table of ``frozen_dtype`` (a name or a dtype).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.quant import to_frozen_dtype
        >>> to_frozen_dtype(torch.zeros(4, 16), "int8").shape
        torch.Size([4, 18])
    """
    dtype = check_frozen_dtype(frozen_dtype)
    if dtype == torch.int8:
        return quantize_int8(weight)
    return weight.detach().to(dtype).clone()
