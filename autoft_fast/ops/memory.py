"""Memory for large CPU tables: fresh pages advised for transparent huge pages (Linux).

Embedding lookups read rows at random: with 4 kB pages nearly every row of a table larger than
the TLB's reach (a few MB) costs a page walk. With 2 MB pages a 64 MB table is 32 TLB entries.
benchmarks/RESULTS.md ("Huge-page tables") records what it changes on the project's machine.

The advice has to come before the pages are first touched (the kernel then backs the faults
with huge pages; pages already present stay small), so the tables are built in fresh memory:
:func:`empty` gives an untouched tensor with the advice given, :func:`copy` fills one from a
tensor. Only CPU tensors of at least :data:`MIN_BYTES` are advised: glibc gives a block that
large its own mapping, so the advice covers that tensor alone and ends with it. Elsewhere
(other devices, smaller tensors, other systems, or ``AUTOFT_FAST_HUGE_PAGES=0`` in the
environment) both functions are plain ``torch.empty`` / ``clone``. The advice is a hint: with
THP set to ``never`` the kernel ignores it, and nothing else changes.

Example::

    >>> import torch
    >>> from autoft_fast.ops import memory
    >>> t = memory.copy(torch.ones(3, 2))  # small: an ordinary copy
    >>> t.tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

# glibc's largest dynamic mmap threshold on 64-bit systems: blocks from here on are mmapped.
MIN_BYTES = 32 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_ENV = "AUTOFT_FAST_HUGE_PAGES"

_libc = None


def enabled() -> bool:
    """Whether tables are advised: on Linux unless ``AUTOFT_FAST_HUGE_PAGES=0``."""
    return sys.platform.startswith("linux") and os.environ.get(_ENV, "1") != "0"


def _madvise(address: int, length: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def advise(t: torch.Tensor) -> bool:
    """Advise huge pages for the 2 MB-aligned interior of ``t``'s storage; True if given.

    Only pages not yet touched are affected. Called by :func:`empty`; exposed for tensors a
    caller allocates itself.
    """
    nbytes = t.untyped_storage().nbytes()
    if t.device.type != "cpu" or nbytes < MIN_BYTES or not enabled():
        return False
    start = t.untyped_storage().data_ptr()
    begin = (start + _HUGE - 1) & ~(_HUGE - 1)
    end = (start + nbytes) & ~(_HUGE - 1)
    return end > begin and _madvise(begin, end - begin)


def empty(shape, *, dtype=None, device=None) -> torch.Tensor:
    """``torch.empty(shape)``, in memory advised for huge pages where that applies."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise(t)
    return t


def zeros(shape, *, dtype=None, device=None) -> torch.Tensor:
    """``torch.zeros(shape)``, in memory advised for huge pages where that applies."""
    return empty(shape, dtype=dtype, device=device).zero_()


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` (never an alias), in memory advised for huge pages."""
    out = empty(t.shape, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


def wanted(t: torch.Tensor) -> bool:
    """Whether :func:`copy` would place ``t`` in advised memory (CPU, large, enabled)."""
    return t.device.type == "cpu" and t.untyped_storage().nbytes() >= MIN_BYTES and enabled()


def deepcopy_module(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(module)`` whose large CPU parameters and buffers are advised copies.

    The copies are made first and handed to deepcopy through its memo, so no table is
    copied twice (peak memory: the module plus one copy, as with plain deepcopy).
    """
    import copy as _copy

    memo: dict[int, object] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        # Only tensors that own their whole storage: deepcopy keeps views of one storage
        # sharing it, which separate copies would not.
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == t.untyped_storage().nbytes())
        if id(t) in memo or not wanted(t) or not whole:
            continue
        c = copy(t.detach())
        if isinstance(t, torch.nn.Parameter):
            c = torch.nn.Parameter(c, requires_grad=t.requires_grad)
        memo[id(t)] = c
    return _copy.deepcopy(module, memo)
