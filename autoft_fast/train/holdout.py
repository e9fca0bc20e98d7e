"""The held-out slice of the target training rows that the AutoFT policy is trained on.

With ``autoft.policy_objective: heldout`` the policy's parameters step on rows the tuned copy
is never fitted to (first-order bi-level training, as DARTS trains its architecture weights):
on the rows the tuned copy is fitted to, the tuned path is never worse, so a policy judged
there learns "always tuned". The validation split stays for early stopping, the test split for
reporting.
"""

from __future__ import annotations

import torch

__all__ = ["split_holdout"]


def split_holdout(data, fraction: float, seed: int):
    """Cut ``data`` (TensorData) at random into ``(fit, holdout)``, ``holdout`` about
    ``fraction`` of the rows (at least one row each when there are two or more rows).

    The cut depends only on ``seed`` and ``len(data)``, so a resumed run cuts the same way.

    Example::

        >>> fit, hold = split_holdout(bundle.splits["target_train"], 0.2, seed=0)
        >>> len(fit) + len(hold) == len(bundle.splits["target_train"])
        True
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction < 1.0:
        raise ValueError(f"policy_holdout = {fraction!r} must be a number in (0, 1)")
    n = len(data)
    if n < 2:
        raise ValueError(f"policy_holdout needs at least 2 target training rows, got {n}")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    perm = torch.randperm(n, generator=g)
    hold, fit = torch.sort(perm[:k]).values, torch.sort(perm[k:]).values
    return data.index(fit), data.index(hold)
