"""Loads the compiled kernels (``autoft_fast._C``) and the Triton kernels, if present.

The package imports without either: it then serves the ``reference`` backend and warns once,
on first use of the op, how to build the fast one.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import library  # noqa: F401  (declares the schemas before any kernel registers)

BUILD_HINT = (
    "autoft_fast's compiled kernels are not built, so the op runs on the slow 'reference' "
    "backend. Build them with: pip install torch==2.13.0 && "
    "pip install --no-build-isolation -e .  (from the autoft_fast source tree)"
)

try:
    from .. import _C  # noqa: F401

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = exc

_triton_kernels = None
TRITON_ERROR: Exception | None = None
_triton_tried = False


def load_triton():
    """Import the Triton kernels on first need (importing triton costs seconds), or None."""
    global _triton_kernels, TRITON_ERROR, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            from .. import kernels

            if kernels.gated_embedding is None:
                raise kernels.import_error()
            _triton_kernels = kernels
        except Exception as exc:  # triton missing, or a release the kernels do not support
            TRITON_ERROR = exc
    return _triton_kernels


_warned = False


def warn_missing_extension_once() -> None:
    global _warned
    if _C is None and not _warned and not os.environ.get("AUTOFT_FAST_QUIET"):
        _warned = True
        warnings.warn(f"{BUILD_HINT} (import error: {EXTENSION_ERROR})", RuntimeWarning, stacklevel=3)


def has_kernel(dispatch_key: str) -> bool:
    """Whether the compiled op has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("autoft_fast::gated_embedding_fwd", dispatch_key)


def triton_usable(device: torch.device) -> bool:
    """Triton serves CUDA tensors, and CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    kernels = load_triton()
    return kernels is not None and kernels.is_available()
