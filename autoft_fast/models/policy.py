"""The AutoFT policy network: two logits (frozen, tuned) for every gated field and layer."""

from __future__ import annotations

import torch
from torch import nn


class PolicyNetwork(nn.Module):
    """A small MLP from the instance's features to ``[B, num_gates, 2]`` gate logits.

    The last layer starts at zero, so an untrained policy has no preference: every gate is a
    fair coin under Gumbel noise in training, and the argmax at evaluation is a tie, which the
    op resolves to the frozen path, so before training the AutoFT model predicts exactly
    what the pre-trained model does.

    Example::

        >>> policy = PolicyNetwork(in_dim=40, hidden_units=[64], num_gates=7)
        >>> policy(torch.randn(8, 40)).shape
        torch.Size([8, 7, 2])
    """

    def __init__(self, in_dim: int, hidden_units: list[int], num_gates: int):
        super().__init__()
        if in_dim < 1 or num_gates < 1:
            raise ValueError(f"PolicyNetwork: in_dim = {in_dim} and num_gates = {num_gates} "
                             f"must both be positive")
        parts: list[nn.Module] = []
        for width in hidden_units:
            parts += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.hidden = nn.Sequential(*parts)
        self.out = nn.Linear(in_dim, 2 * num_gates)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.num_gates = num_gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).view(x.shape[0], self.num_gates, 2)
