"""Philox4x32-10 counter-based uniforms, bit-identical to every kernel backend.

The contract (docs/op-contract.md, "Random numbers") fixes the stream: lookup ``n`` takes
word ``n % 4`` of the Philox call whose counter is ``(n // 4) & 0xffffffff, (n // 4) >> 32,
0, 0`` and whose key is ``(seed & 0xffffffff, seed >> 32)``. Numpy's uint64 arithmetic gives
the exact 32x32 -> 64-bit products the rounds need, so this module is the reference stream.

Example::

    >>> from autoft_fast.ops.philox import philox_uniforms
    >>> u = philox_uniforms(seed=1234, n=8)
    >>> u.shape, bool(((u >= 0) & (u < 1)).all())
    ((8,), True)
"""

from __future__ import annotations

import numpy as np
import torch

from . import _extension as ext

# Plain ints (torch.compile traces the torch path with them as constants), numpy copies below.
ROUND_A, ROUND_B, KEY_A, KEY_B = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
# Largest int32 magnitude maps just below 1.0: float32(2**31 - 1) * this < 1.
UNIFORM_SCALE_VALUE = 4.6566127342e-10
_MASK32 = np.uint64(0xFFFFFFFF)
_ROUND_A = np.uint64(ROUND_A)
_ROUND_B = np.uint64(ROUND_B)
_KEY_A = np.uint64(KEY_A)
_KEY_B = np.uint64(KEY_B)
_SHIFT = np.uint64(32)
UNIFORM_SCALE = np.float32(UNIFORM_SCALE_VALUE)
MAX_SEED = 2**63 - 1


def philox4x32_10(seed: int, counters: np.ndarray) -> tuple[np.ndarray, ...]:
    """Four uint32 words per 64-bit counter value, for key = (seed lo, seed hi)."""
    counters = np.asarray(counters, dtype=np.uint64)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    c0 = counters & _MASK32
    c1 = counters >> _SHIFT
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = _ROUND_A * c0  # exact: both factors < 2**32
            p2 = _ROUND_B * c2
            c0, c1, c2, c3 = (
                (p2 >> _SHIFT) ^ c1 ^ k0,
                p2 & _MASK32,
                (p0 >> _SHIFT) ^ c3 ^ k1,
                p0 & _MASK32,
            )
            k0 = (k0 + _KEY_A) & _MASK32
            k1 = (k1 + _KEY_B) & _MASK32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def words_to_uniforms(words: np.ndarray) -> np.ndarray:
    """uint32 words -> float32 uniforms in [0, 1), as Triton's uint_to_uniform_float."""
    x = np.asarray(words, dtype=np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * UNIFORM_SCALE


def philox_uniforms(seed: int, n: int, start: int = 0) -> np.ndarray:
    """Uniforms U[start : start + n] of the contract's stream for ``seed`` (float32 numpy)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed = {seed} must be a 63-bit non-negative integer")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    first_call, last_call = start // 4, (start + n - 1) // 4
    calls = np.arange(first_call, last_call + 1, dtype=np.uint64)
    words = np.stack(philox4x32_10(seed, calls), axis=1).reshape(-1)  # word n%4 of call n//4
    lo = start - 4 * first_call
    return words_to_uniforms(words[lo : lo + n])


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a, b < 2**32, in int64 without overflow."""
    p_lo = a * (b & 0xFFFF)          # < 2**48
    p_hi = a * (b >> 16)             # < 2**48
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (low_sum >> 32), low_sum & 0xFFFFFFFF


def uniforms_tensor(seed, shape, device=None) -> torch.Tensor:
    """The contract's uniforms for a lookup tensor of ``shape`` (row-major), float32.

    Plain torch integer ops (no numpy, no ``.item()``), and the ``seed`` may be a 0-dim int64
    tensor; bit-identical to :func:`philox_uniforms`. Under ``torch.compile`` the same ops run
    as one opaque op of the graph (``autoft_fast::philox_uniforms_torch``): inductor, fusing
    the ten rounds' integer ops into one expression, did not finish compiling them.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.philox import philox_uniforms, uniforms_tensor
        >>> bool((uniforms_tensor(7, (3, 2)).reshape(-1) == torch.from_numpy(philox_uniforms(7, 6))).all())
        True
    """
    n = 1
    for s in shape:
        n *= s
    seed = torch.as_tensor(seed, dtype=torch.int64)
    if torch.compiler.is_compiling():
        return philox_uniforms_torch(seed, n, torch.device(device or "cpu")).reshape(shape)
    return _uniforms_flat(seed, n, device).reshape(shape)


@torch.library.custom_op("autoft_fast::philox_uniforms_torch", mutates_args=())
def philox_uniforms_torch(seed: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """:func:`uniforms_tensor` flat, as one op: what a compiled graph calls (see there).

    Example::

        >>> import torch
        >>> from autoft_fast.ops.philox import philox_uniforms, philox_uniforms_torch
        >>> u = philox_uniforms_torch(torch.tensor(7), 6, torch.device("cpu"))
        >>> bool((u == torch.from_numpy(philox_uniforms(7, 6))).all())
        True
    """
    return _uniforms_flat(seed, n, device)


@philox_uniforms_torch.register_fake
def _(seed, n, device):
    return torch.empty((n,), dtype=torch.float32, device=device)


def _uniforms_flat(seed: torch.Tensor, n: int, device) -> torch.Tensor:
    seed = seed.to(device)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    calls = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = calls & 0xFFFFFFFF, calls >> 32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & 0xFFFFFFFF
        k1 = (k1 + KEY_B) & 0xFFFFFFFF
    words = torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)[:n]  # word n % 4 of call n // 4
    x = torch.where(words >= 2**31, 2**32 - 1 - words, words)  # int32 view, x < 0 -> -x - 1
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE_VALUE, dtype=torch.float32,
                                              device=device)


def uniforms(seed, shape, device=None) -> torch.Tensor:
    """:func:`uniforms_tensor`, from the compiled CPU kernel ``autoft_fast::philox_uniforms``
    where it serves (CPU tensors, the extension built): the same bits, about 20x faster than
    the torch integer ops at a batch's layer gates. The reference backend keeps
    :func:`uniforms_tensor`, so that the oracle does not depend on the kernels.

    Example::

        >>> import torch
        >>> from autoft_fast.ops.philox import uniforms, uniforms_tensor
        >>> bool((uniforms(7, (3, 2)) == uniforms_tensor(7, (3, 2))).all())
        True
    """
    if (device is None or torch.device(device).type == "cpu") and ext.has_kernel("CPU"):
        n = 1
        for s in shape:
            n *= s
        seed = torch.as_tensor(seed, dtype=torch.int64)
        return torch.ops.autoft_fast.philox_uniforms(seed, n).reshape(shape)
    return uniforms_tensor(seed, shape, device=device)


def logistic_noise(u: torch.Tensor) -> torch.Tensor:
    """l = log(U + 1e-20) - log(1 - U): a standard logistic sample (= G1 - G0 of two Gumbels)."""
    return torch.log(u + 1e-20) - torch.log(1 - u)
