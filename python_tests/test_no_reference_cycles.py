"""No step leaves tensors in reference cycles: every tensor of a forward and backward is freed
when its last reference goes, not when Python's cyclic garbage collector next runs. (An op
output kept as a ctx attribute is such a cycle; it held every step's [N, D] rows until a
collection, several MB of heap per step and page faults on the next.)"""

from __future__ import annotations

import gc

import pytest
import torch

import autoft_fast
from autoft_fast.ops.fused_optim import FusedOptimizer

from op_helpers import make_inputs

BACKENDS = autoft_fast.available_backends("cpu")


def tensors_left_in_cycles(fn) -> list[torch.Tensor]:
    """The tensors that only the cyclic collector would free after ``fn()``."""
    gc.collect()
    gc.disable()
    try:
        fn()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _inputs():
    inp = make_inputs((32, 5), 40, 8)
    tuned = inp["tuned"].clone().requires_grad_()
    logits = inp["logits"].clone().requires_grad_()
    return inp, tuned, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused sgd", "fused adam", "sparse", "dense"])
def test_a_gated_step_leaves_no_tensor_in_a_cycle(backend, mode):
    inp, tuned, logits = _inputs()
    opt = FusedOptimizer(mode.split()[1], lr=0.1) if mode.startswith("fused") else None
    state = opt.new_state(tuned) if opt is not None else None

    def step():
        out, gates = autoft_fast.gated_embedding(
            inp["indices"], inp["frozen"], tuned, logits, seed=3, backend=backend,
            sparse=mode == "sparse", optimizer=opt, optimizer_state=state)
        (out.sum() + gates[..., 1].sum()).backward()

    before = tuned.detach().clone()
    assert tensors_left_in_cycles(step) == []
    assert logits.grad is not None
    if opt is not None:
        assert not torch.equal(tuned.detach(), before)  # the step did update the rows
    else:
        assert tuned.grad is not None


@pytest.mark.parametrize("backend", autoft_fast.ops.registry.bag_backends("cpu"))
def test_a_gated_bag_step_leaves_no_tensor_in_a_cycle(backend):
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(30, 4, generator=gen)
    tuned = frozen.clone().requires_grad_()
    logits = torch.randn(6, 2, generator=gen, requires_grad=True)
    values = torch.randint(0, 30, (14,), generator=gen)
    offsets = torch.tensor([0, 2, 2, 5, 9, 12, 14])

    def step():
        out, gates = autoft_fast.gated_embedding_bag(values, offsets, frozen, tuned, logits,
                                                     seed=1, backend=backend)
        out.sum().backward()

    assert tensors_left_in_cycles(step) == []
    assert tuned.grad is not None and logits.grad is not None


@pytest.mark.parametrize("strategy", ["finetune_all", "l2sp", "freeze_dnn", "autoft_layer",
                                      "autoft_field", "autoft"])
def test_a_trainer_step_leaves_no_tensor_in_a_cycle(tmp_path, strategy):
    # The whole model: fused plain tables, gated fields (fused optimizer), gated layers, the
    # policy network.
    from autoft_fast.config import parse_config
    from autoft_fast.data import iterate_batches
    from autoft_fast.models import build_base_model, build_transfer_model
    from autoft_fast.train.runner import load_data
    from autoft_fast.train.trainer import Trainer

    from test_cli import TINY_SYNTHETIC

    cfg = parse_config({"synthetic": TINY_SYNTHETIC, "run_dir": str(tmp_path / "runs"),
                        "model": {"name": "deepfm", "embedding_dim": 4, "hidden_units": [8]},
                        "autoft": {"backend": BACKENDS[-1] if "cpu" not in BACKENDS else "cpu"}})
    bundle = load_data(cfg)
    pre = build_base_model(bundle.feature_map, cfg.model)
    model = build_transfer_model(strategy, pre, bundle.feature_map, cfg.model, cfg.autoft)
    trainer = Trainer(model, cfg.finetune, seed=0, progress=False)
    batch = next(iter(iterate_batches(bundle.splits["target_train"], 64, shuffle=False)))
    model.train()
    names = list(trainer.optimizers)
    trainer._step(batch, names)  # optimizer state made once, outside the check
    assert tensors_left_in_cycles(lambda: trainer._step(batch, names)) == []


def test_a_dropin_step_leaves_no_tensor_in_a_cycle():
    # The drop-in wrapper around a user's own model: gated embeddings, an embedding bag, layers.
    from autoft_fast.dropin import autoft

    class Mine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 4)
            self.bag = torch.nn.EmbeddingBag(20, 4, mode="mean")
            self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 1))

        def forward(self, ids, bag_ids, offsets):
            e = self.emb(ids).flatten(1)
            return self.mlp(torch.cat([e, self.bag(bag_ids, offsets)], 1)).squeeze(1)

    torch.manual_seed(0)
    model = autoft(Mine(), strategy="autoft", backend=BACKENDS[-1] if "cpu" not in BACKENDS
                   else "cpu")
    groups = model.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["model"]}, {"params": groups["policy"]}], lr=1e-2)
    ids, bag_ids = torch.randint(0, 50, (16, 2)), torch.randint(0, 20, (40,))
    offsets, y = torch.arange(0, 40, 40 // 16)[:16], torch.randint(0, 2, (16,)).float()

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(ids, bag_ids, offsets), y) + model.penalty()
        loss.backward()
        opt.step()

    step()
    assert tensors_left_in_cycles(step) == []
