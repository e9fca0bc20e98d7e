"""The gated embedding op: schemas, reference, validation and the public function."""

from .functional import available_backends, gated_embedding, gumbel_gates
from .reference import reference_gated_embedding

__all__ = ["available_backends", "gated_embedding", "gumbel_gates", "reference_gated_embedding"]
