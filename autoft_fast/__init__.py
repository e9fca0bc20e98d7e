"""autoft_fast: AutoFT transfer learning for CTR models, on fused gated-embedding kernels.

Example::

    >>> import torch, autoft_fast
    >>> emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(1000, 16))
    >>> out, gates = emb(torch.randint(0, 1000, (4, 3)), torch.zeros(4, 3, 2))
    >>> out.shape
    torch.Size([4, 3, 16])
"""

import os as _os
import sys as _sys


def _started_as_cli() -> bool:
    argv = list(getattr(_sys, "orig_argv", _sys.argv))
    if _sys.argv and _os.path.basename(_sys.argv[0]).startswith("autoft-fast"):
        return True
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("autoft_fast", "autoft_fast.cli")


if _started_as_cli():
    # OpenMP reads its wait policy once, when torch loads it (the import below): idle
    # threads that spin steal the cores another busy process needs; passive ones sleep.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .modules import GatedEmbedding, keep_sparse_grad_coalesced
from .ops import (available_backends, backend_names, check_backend_name, gated_embedding,
                  gated_embedding_bag, gumbel_gates, reference_gated_embedding)

__version__ = "0.1.0"

__all__ = ["GatedEmbedding", "available_backends", "backend_names", "check_backend_name",
           "keep_sparse_grad_coalesced", "gated_embedding", "gated_embedding_bag", "gumbel_gates",
           "reference_gated_embedding", "__version__"]
