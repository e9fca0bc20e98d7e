"""The AutoFT policy network: two logits (frozen, tuned) for every gated field and layer."""

from __future__ import annotations

import math

import torch
from torch import nn


class PolicyNetwork(nn.Module):
    """A small MLP from the instance's features to ``[B, num_gates, 2]`` gate logits.

    The last layer's weights start at zero and its bias at the prior ``init_tuned``: every
    gate of an untrained policy is tuned with probability ``init_tuned`` under the Gumbel
    noise in training (the hard rule picks tuned with probability sigmoid(logit1 - logit0)).
    With the default 0.5 the gates are fair coins and the argmax at evaluation is a tie, which
    the op resolves to the frozen path; either way, before training the AutoFT model predicts
    exactly what the pre-trained model does (its two copies are still equal).

    Example::

        >>> policy = PolicyNetwork(in_dim=40, hidden_units=[64], num_gates=7)
        >>> policy(torch.randn(8, 40)).shape
        torch.Size([8, 7, 2])
    """

    def __init__(self, in_dim: int, hidden_units: list[int], num_gates: int,
                 init_tuned: float = 0.5):
        super().__init__()
        if in_dim < 1 or num_gates < 1:
            raise ValueError(f"PolicyNetwork: in_dim = {in_dim} and num_gates = {num_gates} "
                             f"must both be positive")
        if not 0.0 < init_tuned < 1.0:
            raise ValueError(f"PolicyNetwork: init_tuned = {init_tuned!r} must lie strictly "
                             f"between 0 and 1 (the prior probability of the tuned path)")
        parts: list[nn.Module] = []
        for width in hidden_units:
            parts += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.hidden = nn.Sequential(*parts)
        self.out = nn.Linear(in_dim, 2 * num_gates)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():  # logit1 - logit0 = log(p / (1 - p)) on every gate
            self.out.bias.view(num_gates, 2)[:, 1] = math.log(init_tuned / (1.0 - init_tuned))
        self.num_gates = num_gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).view(x.shape[0], self.num_gates, 2)
