"""The gated embedding op: interface, backend registry, reference, validation, public function.

Importing it loads the compiled kernels if they are built (``ops._extension``); the Triton
kernels load on first need.
"""

from . import _extension  # noqa: F401  (loads the kernels before anything uses the op)
from .functional import gated_embedding, gated_embedding_bag, gumbel_gates
from .reference import reference_gated_embedding, reference_gated_embedding_bag
from .registry import available_backends, backend_names, check_backend_name

__all__ = ["available_backends", "backend_names", "check_backend_name", "gated_embedding",
           "gated_embedding_bag", "gumbel_gates", "reference_gated_embedding",
           "reference_gated_embedding_bag"]
