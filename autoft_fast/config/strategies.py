"""The transfer strategies as a table: one row per strategy says what happens to each part.

The parts are the embeddings (every feature-indexed table: the shared embedding table and
DeepFM's first-order weights) and the interaction stack (every other parameter: MLP and
cross layers and the output layer). Each part is

- ``tuned``: copied from the pre-trained model and trained on the target;
- ``frozen``: copied and kept fixed (eval mode too: a fixed function, bit for bit);
- ``gated``: a frozen and a tuned copy, mixed per instance by the policy's gates;
- ``ungated``: the part a single-policy strategy does not gate; ``autoft.ungated`` says
  whether it is ``tuned`` or ``frozen``.

``fresh`` builds a new base model (nothing pre-trained); ``l2sp`` adds the L2-SP penalty
toward the pre-trained weights to every trained parameter. models/transfer.py reads this
table; a new strategy is a new row.

Example:
    >>> STRATEGY_TABLE["autoft_field"].field_policy, STRATEGY_TABLE["autoft_field"].layer_policy
    (True, False)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "STRATEGY_TABLE", "STRATEGIES", "FIELD_GATED", "LAYER_GATED",
           "PART_MODES"]

PART_MODES = ("tuned", "frozen", "gated", "ungated")


@dataclass(frozen=True)
class Strategy:
    """One row of the strategy table (see the module docstring).

    Example:
        >>> STRATEGY_TABLE["freeze_dnn"].part("stack", "tune")
        'frozen'
    """

    name: str
    embeddings: str
    stack: str
    fresh: bool = False
    l2sp: bool = False
    doc: str = ""

    def __post_init__(self):
        for part in ("embeddings", "stack"):
            if getattr(self, part) not in PART_MODES:
                raise ValueError(f"strategy {self.name!r}: {part} = {getattr(self, part)!r} "
                                 f"is not one of {PART_MODES}")

    def part(self, which: str, ungated: str) -> str:
        """``tuned``, ``frozen`` or ``gated`` for ``which`` (``embeddings`` or ``stack``),
        with ``ungated`` (``tune`` or ``freeze``, the autoft.ungated key) applied."""
        mode = getattr(self, which)
        if mode == "ungated":
            return "tuned" if ungated == "tune" else "frozen"
        return mode

    @property
    def field_policy(self) -> bool:
        """Whether a per-instance, per-field gate chooses frozen or tuned embedding rows."""
        return self.embeddings == "gated"

    @property
    def layer_policy(self) -> bool:
        """Whether a per-instance gate chooses the frozen or the tuned copy of each layer."""
        return self.stack == "gated"

    @property
    def has_policy(self) -> bool:
        """Whether the strategy has a policy network (field or layer gates)."""
        return self.field_policy or self.layer_policy

    @property
    def needs_pretrained(self) -> bool:
        """Every strategy but a fresh one starts from the pre-trained model."""
        return not self.fresh

    @property
    def trains(self) -> bool:
        """Whether anything is trained on the target (False: evaluation only)."""
        return self.fresh or any(m != "frozen" for m in (self.embeddings, self.stack))


_ROWS = (
    Strategy("target_only", "tuned", "tuned", fresh=True,
             doc="the base model from scratch on the target (no transfer)"),
    Strategy("source_only", "frozen", "frozen",
             doc="nothing: the pre-trained model evaluated on the target"),
    Strategy("finetune_all", "tuned", "tuned", doc="every parameter, initialised from the source"),
    Strategy("freeze_embedding", "frozen", "tuned", doc="the interaction stack; embeddings frozen"),
    Strategy("freeze_dnn", "tuned", "frozen", doc="the embeddings; interaction stack frozen"),
    Strategy("l2sp", "tuned", "tuned", l2sp=True,
             doc="every parameter, with an L2-SP penalty toward the source weights"),
    Strategy("autoft_layer", "ungated", "gated", doc="layer-wise policy only (SpotTune carried over)"),
    Strategy("autoft_field", "gated", "ungated", doc="field-wise policy only"),
    Strategy("autoft", "gated", "gated", doc="both policies"),
)

STRATEGY_TABLE: dict[str, Strategy] = {s.name: s for s in _ROWS}
STRATEGIES = tuple(STRATEGY_TABLE)
FIELD_GATED = tuple(s.name for s in _ROWS if s.field_policy)
LAYER_GATED = tuple(s.name for s in _ROWS if s.layer_policy)
