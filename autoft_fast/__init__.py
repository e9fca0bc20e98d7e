"""autoft_fast: AutoFT transfer learning for CTR models, on fused gated-embedding kernels.

Example::

    >>> import torch, autoft_fast
    >>> emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(1000, 16))
    >>> out, gates = emb(torch.randint(0, 1000, (4, 3)), torch.zeros(4, 3, 2))
    >>> out.shape
    torch.Size([4, 3, 16])
"""

from .modules import GatedEmbedding, keep_sparse_grad_coalesced
from .ops import (available_backends, backend_names, check_backend_name, gated_embedding,
                  gumbel_gates, reference_gated_embedding)

__version__ = "0.1.0"

__all__ = ["GatedEmbedding", "available_backends", "backend_names", "check_backend_name",
           "keep_sparse_grad_coalesced", "gated_embedding", "gumbel_gates",
           "reference_gated_embedding", "__version__"]
