"""A plain-PyTorch DeepFM, written the way CTR libraries write it, and AutoFT around it.

The model holds one ``nn.Embedding`` per field in an ``nn.ModuleDict`` (as FuxiCTR and
DeepCTR-Torch do), a first-order part (a 1-wide embedding per field plus a bias), an FM over
the field embeddings and an MLP of ``nn.Linear``. ``finetune_plain`` is the user's own
training loop; ``finetune_autoft`` is the same loop after the drop-in change (two changed
lines, see docs/dropin.md).

Run it::

    python examples/deepfm_plain.py

Example::

    >>> import torch
    >>> model = DeepFM({"user": 20, "item": 30, "site": 5})
    >>> model(torch.randint(0, 5, (4, 3))).shape
    torch.Size([4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import autoft_fast.dropin


class DeepFM(nn.Module):
    """DeepFM over categorical fields; ``x`` is ``[B, F]`` ids in the order of ``vocab_sizes``.

    Example::

        >>> DeepFM({"a": 10, "b": 10}, embedding_dim=4)(torch.zeros(2, 2, dtype=torch.long)).shape
        torch.Size([2])
    """

    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 8, hidden=(32, 16)):
        super().__init__()
        self.fields = list(vocab_sizes)
        self.embedding = nn.ModuleDict({f: nn.Embedding(v, embedding_dim) for f, v in vocab_sizes.items()})
        self.first_order = nn.ModuleDict({f: nn.Embedding(v, 1) for f, v in vocab_sizes.items()})
        self.bias = nn.Parameter(torch.zeros(1))
        layers, width = [], len(vocab_sizes) * embedding_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = torch.stack([self.embedding[f](x[:, i]) for i, f in enumerate(self.fields)], dim=1)
        linear = sum(self.first_order[f](x[:, i]) for i, f in enumerate(self.fields)).squeeze(1)
        fm = 0.5 * (emb.sum(dim=1).pow(2) - emb.pow(2).sum(dim=1)).sum(dim=1)
        dnn = self.mlp(emb.flatten(1)).squeeze(1)
        return linear + fm + dnn + self.bias


def synthetic_batches(vocab_sizes: dict[str, int], n_batches: int, batch_size: int, shift: float, seed: int):
    """Batches ``(x, y)`` drawn with ``seed``; the click rule is fixed, moved by ``shift`` on the target.

    Example::

        >>> x, y = synthetic_batches({"a": 10}, 1, 4, 0.0, seed=0)[0]
        >>> x.shape, y.shape
        (torch.Size([4, 1]), torch.Size([4]))
    """
    rule = torch.Generator().manual_seed(12345)
    score = {f: torch.randn(v, generator=rule) for f, v in vocab_sizes.items()}
    moved = {f: torch.randn(v, generator=rule) for f, v in vocab_sizes.items()}
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.stack([torch.randint(0, v, (batch_size,), generator=g) for v in vocab_sizes.values()], dim=1)
        logit = sum(score[f][x[:, i]] + shift * moved[f][x[:, i]] for i, f in enumerate(vocab_sizes))
        y = (torch.rand(batch_size, generator=g) < torch.sigmoid(logit)).float()
        out.append((x, y))
    return out


def finetune_plain(model, batches, lr=1e-3):
    """The user's own fine-tuning loop: Adam on every parameter, BCE on the logits.

    Example::

        >>> m = DeepFM({"a": 10, "b": 10})
        >>> _ = finetune_plain(m, synthetic_batches({"a": 10, "b": 10}, 2, 8, 0.5, seed=0))
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in batches:
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def finetune_autoft(model, batches, lr=1e-3):
    """The same loop after the drop-in change: AutoFT around ``model``, the policy at 10 x lr.

    Example::

        >>> m = DeepFM({"a": 10, "b": 10})
        >>> m = finetune_autoft(m, synthetic_batches({"a": 10, "b": 10}, 2, 8, 0.5, seed=0))
        >>> type(m).__name__
        'AutoFTModel'
    """
    model = autoft_fast.dropin.autoft(model, strategy="autoft")
    optimizer = torch.optim.Adam([{"params": model.parameter_groups()["model"]}, {"params": model.parameter_groups()["policy"], "lr": 10 * lr}], lr=lr)
    model.train()
    for x, y in batches:
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    ranks = scores.argsort().argsort().double() + 1
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    """Pre-train on a source domain, then fine-tune plainly and with AutoFT on a target."""
    torch.manual_seed(0)
    vocab = {"user": 200, "item": 300, "site": 10}
    source = synthetic_batches(vocab, 300, 256, shift=0.0, seed=1)
    target = synthetic_batches(vocab, 40, 64, shift=1.0, seed=1)
    test = synthetic_batches(vocab, 20, 256, shift=1.0, seed=2)
    pretrained = finetune_plain(DeepFM(vocab), source, lr=3e-3)
    state = pretrained.state_dict()
    for name, run in (("finetune_all", finetune_plain), ("autoft", finetune_autoft)):
        model = DeepFM(vocab)
        model.load_state_dict(state)
        model = run(model, target).eval()
        with torch.no_grad():
            scores = torch.cat([model(x) for x, _ in test])
        print(f"{name:14s} target test AUC {_auc(scores, torch.cat([y for _, y in test])):.4f}")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]
                            + " Takes no options: it trains on a small synthetic world and "
                              "prints each loop's target test AUC.").parse_args()
    main()
