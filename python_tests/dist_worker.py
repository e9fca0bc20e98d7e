"""One rank of the data-parallel tests (run once per rank with RANK / WORLD_SIZE set, as
torchrun sets them; or in one process without them, for the one-process reference).

    python python_tests/dist_worker.py OUT_DIR

Trains a small gated-embedding model with the Trainer in each table mode (dense, sparse COO,
fused Adam, fused SGD, fused Adam inside the C++ kernel's backward) without Gumbel noise, so that a two-process run must equal the
one-process run on the same global batches to float rounding, and saves each rank's final
weights to OUT_DIR/<mode>-rank<r>.pt. Mode "resume" trains 2 epochs, interrupted after the
first and resumed from the checkpoint.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from autoft_fast.config.sections import TrainConfig
from autoft_fast.data.tensors import TensorData
from autoft_fast.modules import GatedEmbedding
from autoft_fast.ops import _extension as ext
from autoft_fast.train.trainer import Trainer, TrainingInterrupted

V, D, F = 30, 4, 3
# Steps of 32, 32 and 7 rows: an uneven split of the last batch (3 and 4 rows). Mode
# "empty_shard" has 65 rows (a last batch of 1: rank 0's shard is empty) and no batch norm.
# "batch_norm" has 67 rows and batch norm: a last batch of 3 rows would leave a rank one row,
# on which BatchNorm cannot train, so it joins the batch before it.
ROWS, BATCH = 71, 32
MODES = {"dense": {}, "sparse": {"sparse": True},
         "fused_adam": {"optimizer": "adam", "lr": 0.05},
         "fused_sgd": {"optimizer": "sgd", "lr": 0.05}}
if ext.has_kernel("CPU"):
    # The C++ kernel updates in its backward: under data parallelism it must hand the rows to
    # the ranks' combined update instead.
    MODES["fused_adam_cpu_kernel"] = {"optimizer": "adam", "lr": 0.05, "backend": "cpu"}


class TinyGated(nn.Module):
    """Per-field gated lookups, a policy and a head with batch norm; no noise."""

    def __init__(self, norm: bool = True, **table):
        super().__init__()
        self.emb = GatedEmbedding(V, D, **{"backend": "reference", **table})
        with torch.no_grad():
            self.emb.tuned_weight.copy_(self.emb.frozen_weight)
        self.policy = nn.Linear(F, F * 2)
        self.norm = nn.BatchNorm1d(F * D) if norm else nn.Identity()
        self.head = nn.Linear(F * D, 1)

    def forward(self, batch):
        x = batch.sparse.float() / V
        logits = self.policy(x).reshape(-1, F, 2) + torch.tensor([0.0, 0.3])
        out, _ = self.emb(batch.sparse, logits, noise=False)
        return self.head(self.norm(out.reshape(len(batch), -1))).reshape(-1)


def tiny_data(seed: int = 0, rows: int = ROWS) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, V, (rows, F), generator=g)
    sparse[:, 0] = 7  # every batch repeats one row: duplicate indices across ranks
    label = (torch.rand(rows, generator=g) < 0.4).float()
    return TensorData(sparse, None, None, label, torch.zeros(rows, dtype=torch.int64))


def train(mode: str, out: Path) -> dict:
    torch.manual_seed(0)
    model = TinyGated(norm=mode == "batch_norm", **MODES.get(mode, {}))
    cfg = TrainConfig(epochs=2, batch_size=BATCH, lr=0.05, patience=5)
    data = tiny_data(rows={"empty_shard": 65, "batch_norm": 67}.get(mode, ROWS))
    ckpt = out / f"{mode}-last.pt"
    if mode == "resume":
        def stop(epoch, entry):
            if epoch == 1:
                raise TrainingInterrupted("stopped after epoch 1")
        try:
            Trainer(model, cfg, checkpoint_path=ckpt, seed=3, progress=False,
                    on_epoch_end=stop).fit(data, data)
        except TrainingInterrupted:
            pass
        torch.manual_seed(0)
        model = TinyGated(norm=False)
        Trainer(model, cfg, checkpoint_path=ckpt, seed=3, progress=False).fit(
            data, data, resume=True)
    else:
        Trainer(model, cfg, checkpoint_path=ckpt, seed=3, progress=False).fit(data, data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(out: str) -> None:
    out = Path(out)
    rank = int(os.environ.get("RANK", 0))
    for mode in (*MODES, "resume", "empty_shard", "batch_norm"):
        torch.save(train(mode, out), out / f"{mode}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
