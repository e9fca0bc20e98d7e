"""Triton kernels of autoft_fast (installed as ``autoft_fast.kernels``).

Importing this package registers ``autoft_fast::gated_embedding_fwd_triton`` and
``autoft_fast::gated_embedding_bwd_triton`` (and the bag ops
``autoft_fast::gated_embedding_bag_fwd_triton`` / ``_bwd_triton``, and the fused optimizer's
``autoft_fast::rows_update_triton`` / ``gated_embedding_bwd_update_triton``) when Triton is installed; without Triton the import
still succeeds and :func:`is_available` says False. For CPU tests set ``TRITON_INTERPRET=1``
before anything imports triton.

Example::

    >>> from autoft_fast import kernels
    >>> isinstance(kernels.is_available(), bool)
    True
"""

from __future__ import annotations

_IMPORT_ERROR: Exception | None = None
try:
    from . import gated_embedding  # noqa: F401  (registers the ops)
    from . import gated_bag  # noqa: F401  (registers the bag ops)
    from . import rows_update  # noqa: F401  (registers the fused optimizer's update ops)
except Exception as err:  # triton missing or unusable: the package still imports
    gated_embedding = None
    _IMPORT_ERROR = err


def is_available(device: str | None = None) -> bool:
    """Whether the Triton backend can run, on ``device`` ("cuda" or "cpu") if given.

    CUDA tensors need Triton and a GPU; CPU tensors are served only under the interpreter
    (``TRITON_INTERPRET=1``, for tests).

    Example::

        >>> from autoft_fast.kernels import is_available
        >>> is_available("cpu") == (is_available() and interpreting())
        True
    """
    if gated_embedding is None:
        return False
    if device is None:
        return interpreting() or _cuda_available()
    kind = device if isinstance(device, str) else getattr(device, "type", str(device))
    kind = kind.split(":")[0]
    if kind == "cpu":
        return interpreting()
    if kind == "cuda":
        return _cuda_available()
    return False


def interpreting() -> bool:
    """True when the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1).

    Example::

        >>> from autoft_fast.kernels import interpreting
        >>> isinstance(interpreting(), bool)
        True
    """
    return gated_embedding is not None and gated_embedding._interpreting()


def import_error() -> Exception | None:
    """Why the Triton backend failed to import, or None.

    Example::

        >>> from autoft_fast.kernels import import_error
        >>> import_error() is None or isinstance(import_error(), Exception)
        True
    """
    return _IMPORT_ERROR


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["is_available", "interpreting", "import_error"]
