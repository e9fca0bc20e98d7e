"""The op's kernel-level interface, declared once: argument names, types and order.

The torch.library schema strings, the fake kernels, the autograd wiring and the Triton
``triton_op`` signatures are all derived from :data:`FWD_ARGS` / :data:`BWD_ARGS`; the C++
kernels register implementations whose C++ signatures the dispatcher checks against the
schema at import. Adding an argument means adding a row here and handling it in each kernel.

Example::

    >>> from autoft_fast.ops.interface import FWD, schema
    >>> schema(FWD).startswith("gated_embedding_fwd(Tensor indices, ")
    True
"""

from __future__ import annotations

import inspect
from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import torch

NAMESPACE = "autoft_fast"


@dataclass(frozen=True)
class Arg:
    """One positional argument of a kernel-level op: its name and type."""

    name: str
    schema_type: str  # as torch.library writes it: "Tensor", "Tensor?", "Tensor(a!)", "float", "bool", "int"

    @property
    def annotation(self):
        if self.schema_type.startswith("Tensor("):  # mutated in place
            return torch.Tensor
        return {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor],
                "float": float, "bool": bool, "int": int}[self.schema_type]


@dataclass(frozen=True)
class OpInterface:
    """An op's name, arguments and number of returned tensors."""

    name: str
    args: tuple[Arg, ...]
    returns: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)


_INPUTS = (
    Arg("indices", "Tensor"),        # [N] int32 / int64
    Arg("frozen_weight", "Tensor"),  # [V, D]
    Arg("tuned_weight", "Tensor"),   # [V, D]
    Arg("logits", "Tensor"),         # [N, 2] float32
    Arg("seed", "Tensor"),           # 0-dim int64 CPU tensor
    Arg("uniforms", "Tensor?"),      # [N] float32, overrides the seed
    Arg("tau", "float"),
    Arg("hard", "bool"),
    Arg("noise", "bool"),
    # The forward ignores it; it is an input so that the autograd formula knows which
    # gradient layout to ask the backward for.
    Arg("sparse", "bool"),
)

FWD = OpInterface("gated_embedding_fwd", _INPUTS, returns=2)  # (out [N, D], gates [N, 2])
# (grad_tuned, grad_logits [N, 2], grad_rows): see docs/internals.md for the two layouts.
BWD = OpInterface("gated_embedding_bwd", (Arg("grad_out", "Tensor"), Arg("grad_gates", "Tensor?"))
                  + _INPUTS, returns=3)

# The backward with the fused optimizer's row update inside it (CPU kernel): the touched tuned
# rows and the rule's state rows are updated in place, no tuned-table gradient leaves the
# kernel; returns grad_logits [N, 2]. ``rule``: the index of the rule in fused_optim.RULES;
# ``state_a`` / ``state_b``: the rule's state tensors in RULES order (empty when it has fewer);
# ``step``: the step count after this step. See docs/internals.md.
# The fused optimizer's arguments of an op that updates rows in place (fused_optim's
# FusedOptimizer.kernel_args): the rule's state tensors, its index in RULES, its hyperparameters
# and the step count after this step.
_UPDATE_ARGS = (Arg("state_a", "Tensor(b!)"), Arg("state_b", "Tensor(c!)"), Arg("rule", "int"),
                Arg("lr", "float"), Arg("eps", "float"), Arg("beta1", "float"),
                Arg("beta2", "float"), Arg("step", "int"))

BWD_UPDATE = OpInterface(
    "gated_embedding_bwd_update",
    (Arg("grad_out", "Tensor"), Arg("grad_gates", "Tensor?"))
    + tuple(Arg(a.name, "Tensor(a!)") if a.name == "tuned_weight" else a
            for a in _INPUTS if a.name != "sparse")
    + _UPDATE_ARGS,
    returns=1)

# The fused optimizer's update of a plain table's rows (CPU kernel): ``values`` [N, D] float32
# holds one gradient row per lookup of row ``indices`` [N]; repeated rows are combined as the
# gated backward combines them (sorted, summed in float32 in lookup order) and the rows of
# ``weight`` and of the rule's state are updated in place; arguments after ``state_b`` as in
# BWD_UPDATE. Returns nothing.
ROWS_UPDATE = OpInterface(
    "rows_update",
    (Arg("indices", "Tensor"), Arg("values", "Tensor"), Arg("weight", "Tensor(a!)"))
    + _UPDATE_ARGS,
    returns=0)

# The contract's uniforms U[0:n] for a seed (CPU kernel; "Random numbers" in
# docs/op-contract.md): the noise of the gates drawn outside the op (layer gates). Returns
# float32 [n], bit-identical to ops/philox.py.
PHILOX_UNIFORMS = OpInterface("philox_uniforms", (Arg("seed", "Tensor"), Arg("n", "int")),
                              returns=1)

FwdArgs = namedtuple("FwdArgs", FWD.names)
BwdUpdateArgs = namedtuple("BwdUpdateArgs", BWD_UPDATE.names)
BwdArgs = namedtuple("BwdArgs", BWD.names)


def schema(op: OpInterface, name: str | None = None) -> str:
    """The torch.library schema string of ``op`` (optionally under another op ``name``)."""
    params = ", ".join(f"{a.schema_type} {a.name}" for a in op.args)
    rets = ", ".join(["Tensor"] * op.returns)
    return f"{name or op.name}({params}) -> ({rets})"


def signature(op: OpInterface) -> inspect.Signature:
    """A Python signature with ``op``'s arguments, for ops declared from Python functions."""
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=a.annotation) for a in op.args]
    returns = {0: None, 1: torch.Tensor}.get(op.returns, tuple[(torch.Tensor,) * op.returns])
    return inspect.Signature(params, return_annotation=returns)


def with_signature(op: OpInterface):
    """Decorator: give a ``fn(*args)`` the signature of ``op`` (so infer_schema derives it).

    Example::

        >>> from autoft_fast.ops.interface import FWD, with_signature
        >>> f = with_signature(FWD)(lambda *args: args)
        >>> list(__import__("inspect").signature(f).parameters)[:2]
        ['indices', 'frozen_weight']
    """
    def wrap(fn):
        sig = signature(op)
        fn.__signature__ = sig
        fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
        fn.__annotations__["return"] = sig.return_annotation
        return fn

    return wrap


# The bag op (multi-hot fields): bag b is values[offsets[b]:offsets[b + 1]], pooled by sum or
# mean (``mode``: the index in BAG_MODES), one gate per bag. See docs/op-contract.md, "Bags".
BAG_MODES = ("sum", "mean")

_BAG_INPUTS = (
    Arg("values", "Tensor"),               # [L] int32 / int64, the bags' row ids back to back
    Arg("offsets", "Tensor"),              # [B + 1] int32 / int64, non-decreasing, 0 .. L
    Arg("per_sample_weights", "Tensor?"),  # [L] float32, one weight per value
    Arg("frozen_weight", "Tensor"),        # [V, D]
    Arg("tuned_weight", "Tensor"),         # [V, D]
    Arg("logits", "Tensor"),               # [B, 2] float32
    Arg("seed", "Tensor"),                 # 0-dim int64 CPU tensor
    Arg("uniforms", "Tensor?"),            # [B] float32, overrides the seed
    Arg("tau", "float"),
    Arg("hard", "bool"),
    Arg("noise", "bool"),
    Arg("mode", "int"),
    Arg("sparse", "bool"),
)

BAG_FWD = OpInterface("gated_embedding_bag_fwd", _BAG_INPUTS, returns=2)  # (out [B, D], gates [B, 2])
# (grad_tuned, grad_logits [B, 2], grad_rows): the two layouts of BWD.
BAG_BWD = OpInterface("gated_embedding_bag_bwd",
                      (Arg("grad_out", "Tensor"), Arg("grad_gates", "Tensor?")) + _BAG_INPUTS,
                      returns=3)

BagFwdArgs = namedtuple("BagFwdArgs", BAG_FWD.names)
BagBwdArgs = namedtuple("BagBwdArgs", BAG_BWD.names)
