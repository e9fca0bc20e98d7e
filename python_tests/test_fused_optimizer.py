"""The optimizer fused into the backward: equal to the plain optimizer on the dense gradient."""

from __future__ import annotations

import pytest
import torch

import autoft_fast
from autoft_fast.ops.fused_optim import RULES, FusedOptimizer, fused_updates_paused

from op_helpers import case_generator, make_inputs

BACKENDS = [b for b in autoft_fast.available_backends("cpu")]


def _loss(out, gates, inp):
    return (out.double() * inp["grad_out"].double()).sum() + \
        (gates.double() * inp["grad_gates"].double()).sum()


def _dense_step(inp, backend="reference"):
    """The reference op's dense gradients, the touched rows and the logit gradient."""
    tuned = inp["tuned"].clone().requires_grad_()
    logits = inp["logits"].clone().requires_grad_()
    out, gates = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], tuned, logits,
                                             seed=inp["seed"], backend=backend)
    _loss(out, gates, inp).backward()
    used = inp["indices"].reshape(-1)[gates.detach().reshape(-1, 2)[:, 1] != 0]
    return tuned.grad, torch.unique(used.long()), logits.grad, out.detach()


def _fused_step(inp, opt, state, tuned, backend):
    logits = inp["logits"].clone().requires_grad_()
    out, gates = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], tuned, logits,
                                             seed=inp["seed"], backend=backend, optimizer=opt,
                                             optimizer_state=state)
    _loss(out, gates, inp).backward()
    return logits.grad, out.detach()


def _plain_optimizer(kind, param, lr):
    if kind == "sgd":
        return torch.optim.SGD([param], lr=lr, foreach=False)
    if kind == "adam":
        return torch.optim.SparseAdam([param], lr=lr)
    return None


def _rowwise_adagrad_dense(weight, acc, grad, lr, eps=1e-10):
    # Written out on the dense gradient: rows with a zero gradient change nothing.
    acc += (grad * grad).mean(dim=1)
    weight -= lr * grad / (acc.sqrt() + eps).unsqueeze(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dim,duplicates", [(1, False), (3, True), (16, False), (17, False)])
def test_fused_step_equals_plain_optimizer_on_dense_gradient(backend, kind, index_dtype, dim,
                                                             duplicates):
    lr = 0.05
    gen = case_generator("fused", backend, kind, index_dtype, dim, duplicates)
    opt = FusedOptimizer(kind, lr=lr)
    tuned = make_inputs((8, 5), 40, dim, gen=gen)["tuned"].clone().requires_grad_()
    state = opt.new_state(tuned)
    ref_param = torch.nn.Parameter(tuned.detach().clone())
    plain = _plain_optimizer(kind, ref_param, lr)
    acc = torch.zeros(40)
    for step in range(3):  # several steps: the lazy state must carry over
        inp = make_inputs((8, 5), 40, dim, gen=gen, index_dtype=index_dtype,
                          duplicates=duplicates, seed=100 + step)
        inp["tuned"] = ref_param.detach()
        grad, touched, want_glogits, want_out = _dense_step(inp)
        got_glogits, got_out = _fused_step(inp, opt, state, tuned, backend)
        if kind == "rowwise_adagrad":
            with torch.no_grad():
                _rowwise_adagrad_dense(ref_param, acc, grad, lr)
        else:
            ref_param.grad = grad if kind == "sgd" else torch.sparse_coo_tensor(
                touched[None], grad[touched], grad.shape)
            plain.step()
        assert tuned.grad is None  # the update took the gradient's place
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_glogits, want_glogits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tuned.detach(), ref_param.detach(), rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3
    if kind == "adam":
        exp_avg = plain.state[ref_param]["exp_avg"]
        torch.testing.assert_close(state["exp_avg"], exp_avg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hard", [False, True])
def test_a_16_bit_table_steps_as_the_reference_does(backend, kind, dtype, hard):
    # A 16-bit tuned table: in one call the row sums reach the update in float32 on every
    # backend (the kernels sum in float32 and never round the sum); calls that meet in one
    # backward hand on each call's sums in the table dtype, on every backend alike. The
    # reference once rounded a single call's sums too, so the cpu kernel's step differed
    # from it (seen in the row-wise Adagrad state).
    gen = case_generator("fused-16", backend, kind, str(dtype), hard)
    inp = make_inputs((6, 7), 5, 8, table_dtype=dtype, gen=gen, duplicates=False)
    idx = inp["indices"]
    coef = inp["grad_out"].float()

    def run(name, split):
        t = inp["tuned"].clone().requires_grad_()
        opt = FusedOptimizer(kind, lr=0.05)
        state = opt.new_state(t)
        grads = []
        for step in range(2):
            parts = [(idx[:3], inp["logits"][:3]), (idx[3:], inp["logits"][3:])] if split \
                else [(idx, inp["logits"])]
            loss = 0
            for k, (i, lg) in enumerate(parts):
                lg = lg.clone().requires_grad_()
                out, _ = autoft_fast.gated_embedding(i, inp["frozen"], t, lg, hard=hard,
                                                     seed=inp["seed"] + 7 * k + step,
                                                     backend=name, optimizer=opt,
                                                     optimizer_state=state)
                c = coef[:3] if split and k == 0 else coef[3:] if split else coef
                loss = loss + (out.float() * c).sum()
                grads.append(lg)
            loss.backward()
        return t.detach().float(), {k: v.clone() for k, v in state.items()}, \
            [g.grad for g in grads]

    for split in (False, True):
        want_w, want_s, want_g = run("reference", split)
        got_w, got_s, got_g = run(backend, split)
        for k in want_s:
            torch.testing.assert_close(got_s[k].float(), want_s[k].float(), rtol=2e-6,
                                       atol=1e-7, msg=f"{k}, split={split}")
        torch.testing.assert_close(got_w, want_w, rtol=1e-2, atol=1e-3)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_fused_adam_first_step_equals_dense_adam():
    inp = make_inputs((16, 4), 30, 8, gen=case_generator("adam-dense"))
    grad, _, _, _ = _dense_step(inp)
    p = torch.nn.Parameter(inp["tuned"].clone())
    p.grad = grad
    torch.optim.Adam([p], lr=0.01).step()
    opt = FusedOptimizer("adam", lr=0.01)
    tuned = inp["tuned"].clone().requires_grad_()
    _fused_step(inp, opt, opt.new_state(tuned), tuned, "reference")
    torch.testing.assert_close(tuned.detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_at_d1_is_torch_adagrad():
    inp = make_inputs((32,), 10, 1, gen=case_generator("adagrad-d1"))
    grad, _, _, _ = _dense_step(inp)
    p = torch.nn.Parameter(inp["tuned"].clone())
    p.grad = grad
    torch.optim.Adagrad([p], lr=0.1, eps=1e-10).step()
    opt = FusedOptimizer("rowwise_adagrad", lr=0.1)
    tuned = inp["tuned"].clone().requires_grad_()
    _fused_step(inp, opt, opt.new_state(tuned), tuned, "cpu" if "cpu" in BACKENDS else "reference")
    torch.testing.assert_close(tuned.detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_is_bit_identical_run_to_run(backend):
    results = []
    for _ in range(2):
        gen = case_generator("determinism", backend)
        opt = FusedOptimizer("adam", lr=0.01, deterministic=True)
        inp = make_inputs((64, 6), 50, 7, gen=gen)
        tuned = inp["tuned"].clone().requires_grad_()
        state = opt.new_state(tuned)
        for step in range(2):
            _fused_step(dict(inp, seed=step), opt, state, tuned, backend)
        results.append((tuned.detach().clone(), state["exp_avg_sq"].clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_paused_updates_leave_table_and_state_alone():
    inp = make_inputs((8, 3), 20, 4, gen=case_generator("paused"))
    opt = FusedOptimizer("adam", lr=0.1)
    tuned = inp["tuned"].clone().requires_grad_()
    state = opt.new_state(tuned)
    with fused_updates_paused():
        glogits, _ = _fused_step(inp, opt, state, tuned, "reference")
    assert torch.equal(tuned.detach(), inp["tuned"])
    assert not state["exp_avg"].any()
    assert glogits.abs().sum() > 0  # the logits still got their gradient


def test_module_fused_state_in_state_dict_and_resume_is_exact():
    gen = case_generator("module-resume")
    table = torch.randn(30, 5, generator=gen)
    batches = [(torch.randint(0, 30, (12, 3), generator=gen),
                torch.randn(12, 3, 2, generator=gen)) for _ in range(4)]

    def train(emb, steps):
        for idx, lg in steps:
            out, gates = emb(idx, lg.clone().requires_grad_(), seed=7)
            (out.square().sum() + gates[..., 1].sum()).backward()

    whole = autoft_fast.GatedEmbedding.from_pretrained(table, optimizer="adam", lr=0.05)
    train(whole, batches)
    first = autoft_fast.GatedEmbedding.from_pretrained(table, optimizer="adam", lr=0.05)
    train(first, batches[:2])
    sd = first.state_dict()
    assert {"optimizer_exp_avg", "optimizer_exp_avg_sq", "optimizer_step"} <= set(sd)
    assert int(sd["optimizer_step"]) == 2
    resumed = autoft_fast.GatedEmbedding.from_pretrained(table, optimizer="adam", lr=0.05)
    resumed.load_state_dict(sd)
    train(resumed, batches[2:])
    assert torch.equal(resumed.tuned_weight, whole.tuned_weight)
    assert torch.equal(resumed.optimizer_exp_avg, whole.optimizer_exp_avg)
    assert not torch.equal(whole.tuned_weight, whole.frozen_weight)


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ValueError, match="optimizer = 'lamb'"):
        FusedOptimizer("lamb", lr=0.1)
    with pytest.raises(ValueError, match="lr = -1"):
        FusedOptimizer("sgd", lr=-1)
    with pytest.raises(ValueError, match="optimizer = 'lamb'"):
        autoft_fast.GatedEmbedding(10, 2, optimizer="lamb")
    with pytest.raises(ValueError, match="lr"):
        autoft_fast.GatedEmbedding(10, 2, optimizer="sgd")
    opt = FusedOptimizer("adam", lr=0.1)
    w = torch.zeros(10, 2, requires_grad=True)
    state = opt.new_state(w)
    del state["exp_avg"]
    with pytest.raises(ValueError, match="'exp_avg'"):
        autoft_fast.gated_embedding(torch.tensor([1]), torch.zeros(10, 2), w, torch.zeros(1, 2),
                                    optimizer=opt, optimizer_state=state)
    with pytest.raises(TypeError, match="optimizer must be a FusedOptimizer"):
        autoft_fast.gated_embedding(torch.tensor([1]), torch.zeros(10, 2), w, torch.zeros(1, 2),
                                    optimizer="adam", optimizer_state={})
    for step in (torch.zeros(3, dtype=torch.int64), torch.zeros(()), 0):
        bad = dict(opt.new_state(w), step=step)
        with pytest.raises(ValueError, match=r"optimizer_state\['step'\] must be a 0-dim int64"):
            autoft_fast.gated_embedding(torch.tensor([1]), torch.zeros(10, 2), w,
                                        torch.zeros(1, 2), optimizer=opt, optimizer_state=bad)
    with pytest.raises(TypeError, match="lr must be a real number, got str"):
        FusedOptimizer("sgd", lr="0.1")
    with pytest.raises(TypeError, match="lr must be a real number, got bool"):
        FusedOptimizer("sgd", lr=True)


def test_a_learning_rate_from_numpy_or_a_tensor_is_a_learning_rate():
    # A schedule's value often comes as a NumPy scalar or a 0-dim tensor: taken as a float.
    import numpy as np
    emb = autoft_fast.GatedEmbedding(10, 2, optimizer="adam", lr=np.float32(0.5))
    assert isinstance(emb.fused_optimizer.lr, float) and emb.fused_optimizer.lr == 0.5
    for lr in (np.float32(0.25), torch.tensor(0.25), np.int64(0)):
        emb.set_lr(lr)
        assert type(emb.fused_optimizer.lr) is float and emb.fused_optimizer.lr == float(lr)
    with pytest.raises(ValueError, match="lr = .*must be a finite number >= 0"):
        emb.set_lr(np.float32("nan"))


class _GatedToy(torch.nn.Module):
    """A toy CTR model with one gated table, asking the Trainer for a fused table optimizer."""

    embedding_optimizer = "fused_adam"

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(50, 4, generator=gen))
        self.policy = torch.nn.Parameter(torch.zeros(2))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, b):
        logits = self.policy.expand(*b.x.shape, 2)
        out, _ = self.emb(b.x, logits, seed=int(b.x.sum()))
        return self.head(out.sum(1)).squeeze(-1)


def _toy_ids(n, seed):
    from test_train import Toy
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 3), generator=g)
    y = ((x % 2).sum(1) > 1).float()
    return Toy(x, y, torch.zeros(n, dtype=torch.long))


def test_trainer_uses_fused_optimizer_and_resume_is_exact(tmp_path):
    from test_train import TrainingInterrupted, make_trainer
    train, valid = _toy_ids(600, 1), _toy_ids(200, 2)
    cfg = {"epochs": 3, "patience": 5}
    torch.manual_seed(0)
    straight = _GatedToy()
    make_trainer(straight, tmp_path / "a", cfg=cfg, seed=7).fit(train, valid)
    assert straight.emb.fused_optimizer.kind == "adam"
    assert straight.emb.tuned_weight.grad is None
    assert int(straight.emb.optimizer_step) > 0
    assert not torch.equal(straight.emb.tuned_weight, straight.emb.frozen_weight)

    def kill(epoch, _):
        if epoch == 1:
            raise TrainingInterrupted("simulated kill")

    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        make_trainer(_GatedToy(), tmp_path / "b", cfg=cfg, seed=7, on_epoch_end=kill).fit(
            train, valid)
    resumed = _GatedToy()
    make_trainer(resumed, tmp_path / "b", cfg=cfg, seed=7).fit(train, valid, resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_attach_fused_optimizers_rejects_unknown_name():
    from autoft_fast.modules import attach_fused_optimizers
    with pytest.raises(ValueError, match="embedding_optimizer = 'fused_lamb'"):
        attach_fused_optimizers(torch.nn.Linear(2, 2), "fused_lamb", lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("hard", [False, True])
def test_calls_of_one_table_in_one_backward_are_one_step(backend, kind, hard):
    # Two calls of one fused table meeting in one backward (negative sampling, a table shared
    # by two fields): neither may read rows the other's update changed, and the step is one
    # optimizer step on their combined row sums: the step of one call with both lookups.
    gen = torch.Generator().manual_seed(5)
    pretrained = torch.randn(9, 4, generator=gen)
    logits = torch.randn(7, 2, generator=gen)
    idx = torch.tensor([0, 1, 2, 2, 0, 3, 8])
    coef = torch.randn(7, 4, generator=gen)

    def module():
        return autoft_fast.GatedEmbedding.from_pretrained(pretrained, optimizer=kind, lr=0.1,
                                                          backend=backend)

    split, joint = module(), module()
    for step in range(2):  # the second step reads the first's state
        lp = logits[:3].clone().requires_grad_()
        ln = logits[3:].clone().requires_grad_()
        pos, _ = split(idx[:3], lp, hard=hard, noise=False)
        neg, _ = split(idx[3:], ln, hard=hard, noise=False)
        ((pos * coef[:3]).sum() - (neg * coef[3:]).sum()).backward()
        lj = logits.clone().requires_grad_()
        out, _ = joint(idx, lj, hard=hard, noise=False)
        sign = torch.tensor([1.0] * 3 + [-1.0] * 4).unsqueeze(1)
        (out * coef * sign).sum().backward()
        torch.testing.assert_close(torch.cat([lp.grad, ln.grad]), lj.grad)
        torch.testing.assert_close(split.tuned_weight.detach(), joint.tuned_weight.detach())
        for name, buf in joint.state_dict().items():
            torch.testing.assert_close(split.state_dict()[name], buf, msg=name)
    assert not torch.equal(joint.tuned_weight.detach(), pretrained)


@pytest.mark.parametrize("plain", [False, True])
def test_compiled_calls_of_one_table_in_one_backward_are_one_step(plain):
    # torch.compile (without fullgraph) of a step with two calls of one fused table: the
    # compiled step equals the eager one, rows, logit gradients and state, step after step.
    # (Traced, the calls' bookkeeping ran once at trace time only: the first compiled
    # backward updated the table and the second refused it, half a step applied.)
    from autoft_fast.ops.fused_optim import Lookup
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    pre = torch.randn(12, 4, generator=gen)
    idx = torch.randint(0, 12, (5, 2), generator=gen)

    def step(emb, lg):
        if plain:
            a, b = (emb.lookup([Lookup(i)])[0] for i in (idx, idx.flip(0)))
        else:
            a, _ = emb(idx, lg, noise=False)
            b, _ = emb(idx.flip(0), lg, noise=False)
        return ((a + 0.5 * b) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager")
    eager_emb, comp_emb = (autoft_fast.GatedEmbedding.from_pretrained(pre, optimizer="adam",
                                                                      lr=0.1) for _ in range(2))
    for _ in range(3):
        lg = torch.randn(5, 2, 2, generator=gen)
        le, lc = lg.clone().requires_grad_(), lg.clone().requires_grad_()
        step(eager_emb, le).backward()
        compiled(comp_emb, lc).backward()
        torch.testing.assert_close(comp_emb.tuned_weight.detach(), eager_emb.tuned_weight.detach())
        if not plain:
            torch.testing.assert_close(lc.grad, le.grad)
        for name, buf in eager_emb.state_dict().items():
            torch.testing.assert_close(comp_emb.state_dict()[name], buf, msg=name)
    assert int(comp_emb.optimizer_step) == 3
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant,inside", [(False, "both"), (False, "second"),
                                               (True, "both")])
def test_shared_calls_under_checkpointing_are_one_step(reentrant, inside):
    # Checkpointing recomputes a segment's forward in the backward; reentrant checkpointing
    # runs that segment's backward as a backward nested in the outer one. Two calls of one
    # table in the segment, or (non-reentrant) one outside and one inside it, still make one
    # step, as without checkpointing. (Reentrant with the calls split between inside and
    # outside is two steps: the segment's first forward runs without gradients, so the two
    # calls never meet; docs/op-contract.md says so.)
    from torch.utils.checkpoint import checkpoint
    pre = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))

    def run(ckpt):
        emb = autoft_fast.GatedEmbedding.from_pretrained(pre, optimizer="adam", lr=0.1)
        logits = torch.zeros(3, 2, requires_grad=True)

        def first(lg):
            return (emb(torch.tensor([0, 1, 2]), lg, noise=False, hard=False)[0]
                    * torch.arange(4.0)).sum()

        def second(lg):
            return -emb(torch.tensor([2, 3, 3]), lg, noise=False, hard=False)[0].sum()

        def both(lg):
            return first(lg) + second(lg)

        if not ckpt:
            loss = both(logits)
        elif inside == "both":
            loss = checkpoint(both, logits, use_reentrant=reentrant)
        else:
            loss = checkpoint(second, logits, use_reentrant=reentrant) + first(logits) * 1.0
        loss.backward()
        return emb.tuned_weight.detach(), logits.grad, int(emb.optimizer_step)

    plain, nested = run(False), run(True)
    torch.testing.assert_close(nested[0], plain[0])
    torch.testing.assert_close(nested[1], plain[1])
    assert nested[2] == plain[2] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_whose_partner_never_runs_backward_still_takes_its_step(backend):
    # A call left open (a forward whose graph was never run backward) shares nothing with a
    # later call's backward: that backward's step is its own, applied at the end of it.
    emb = autoft_fast.GatedEmbedding.from_pretrained(torch.zeros(5, 2), optimizer="sgd",
                                                     lr=1.0, backend=backend)
    kept, _ = emb(torch.tensor([4]), torch.zeros(1, 2, requires_grad=True), noise=False)
    out, _ = emb(torch.tensor([1, 1]), torch.tensor([[-9.0, 9.0]] * 2), noise=False)
    out.sum().backward()
    want = torch.zeros(5, 2)
    want[1] = -2.0  # two lookups of row 1, each gradient 1, lr 1
    assert torch.equal(emb.tuned_weight.detach(), want)
    del kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_changed_before_its_backward_is_refused_not_read_stale(backend):
    # A second backward through one call would read rows its first backward updated (a
    # wrong logit gradient); so would a backward after an in-place edit of the table. Every
    # backend refuses both, as autograd refuses a tensor edited in place.
    message = "the tuned table changed between this call's forward and its backward"
    emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(6, 4), optimizer="sgd",
                                                     lr=1.0, backend=backend)
    out, _ = emb(torch.tensor([0, 1, 1]), torch.randn(3, 2, requires_grad=True), noise=False)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        out.sum().backward()
    # One call per step, step after step: no complaint, and the rows do move.
    before = emb.tuned_weight.detach().clone()
    for _ in range(3):
        out, _ = emb(torch.tensor([0, 1, 1]), torch.tensor([[-9.0, 9.0]] * 3), noise=False)
        out.sum().backward()
    assert not torch.equal(before[:2], emb.tuned_weight.detach()[:2])
    # An in-place edit between forward and backward: refused too.
    logits = torch.randn(3, 2, requires_grad=True)
    out, _ = emb(torch.tensor([0, 1, 2]), logits, hard=False, noise=False)
    with torch.no_grad():
        emb.tuned_weight.add_(1.0)
    with pytest.raises(RuntimeError, match=message):
        out.sum().backward()


def test_a_computed_tuned_table_is_refused_with_an_optimizer():
    base = torch.randn(5, 3, requires_grad=True)
    opt = FusedOptimizer("sgd", lr=0.1)
    tuned = base * 1.0
    with pytest.raises(ValueError, match="tuned_weight must be a leaf tensor"):
        autoft_fast.gated_embedding(torch.tensor([0, 1]), base.detach(), tuned,
                                    torch.randn(2, 2), optimizer=opt,
                                    optimizer_state=opt.new_state(tuned))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(RULES))
def test_a_loss_on_the_gates_alone_leaves_the_table_and_its_state(backend, kind):
    # As a plain optimizer skips a table whose gradient is None: no step at all (fused Adam
    # would otherwise move every touched row by its moments on a zero gradient).
    torch.manual_seed(3)
    frozen = torch.randn(30, 4)
    tuned = (frozen + torch.randn(30, 4)).requires_grad_()
    opt = FusedOptimizer(kind, lr=0.1)
    state = opt.new_state(tuned.detach())
    idx = torch.randint(0, 30, (64,))
    for _ in range(2):  # two real steps first, so that the moments are nonzero
        logits = torch.randn(64, 2)
        out, _ = autoft_fast.gated_embedding(idx, frozen, tuned, logits, seed=1, backend=backend,
                                             optimizer=opt, optimizer_state=state)
        out.sum().backward()
    before = tuned.detach().clone()
    saved = {k: v.clone() for k, v in state.items()}
    logits = torch.randn(64, 2, requires_grad=True)
    _, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, seed=2, backend=backend,
                                           optimizer=opt, optimizer_state=state)
    gates[:, 1].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.equal(tuned.detach(), before)
    for k, v in state.items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("how", ["gated", "plain"])
def test_create_graph_through_a_fused_call_is_refused_before_any_update(backend, how):
    from autoft_fast.ops.fused_optim import Lookup, fused_lookup
    torch.manual_seed(0)
    idx = torch.tensor([[1, 2], [2, 3]])
    opt = FusedOptimizer("sgd", lr=0.1)
    if how == "gated":
        emb = autoft_fast.GatedEmbedding(10, 4, backend=backend, optimizer="sgd", lr=0.1)
        logits = torch.zeros(2, 2, 2, requires_grad=True)
        out, _ = emb(idx, logits, noise=False, hard=False)
        table, wrt = emb.tuned_weight, logits
    else:
        table = torch.randn(10, 4, requires_grad=True)
        weights = torch.ones(2, 2, requires_grad=True)
        out = fused_lookup(table, [Lookup(idx, weights, True)], opt, opt.new_state(table))[0]
        wrt = weights
    before = table.detach().clone()
    with pytest.raises(RuntimeError, match="with optimizer= has no double backward.*no update "
                                           "was made"):
        torch.autograd.grad((out ** 2).sum(), wrt, create_graph=True)
    assert torch.equal(table.detach(), before)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_non_contiguous_optimizer_state_is_refused_at_the_call_with_nothing_counted(backend):
    # It was accepted by the forward and refused by the kernel inside backward(), after the
    # step had been counted (the reference took it and updated it).
    torch.manual_seed(0)
    v, d = 6, 3
    opt = FusedOptimizer("adam", lr=0.1)
    tuned = torch.randn(v, d, requires_grad=True)
    state = opt.new_state(tuned)
    state["exp_avg"] = torch.zeros(d, v).t()
    with pytest.raises(ValueError, match=r"optimizer_state\['exp_avg'\] must be contiguous "
                                         r"\(strides \(1, 6\)\)"):
        autoft_fast.gated_embedding(torch.tensor([[1, 2]]), tuned.detach().clone(), tuned,
                                    torch.zeros(1, 2, 2), optimizer=opt, optimizer_state=state,
                                    backend=backend, noise=False)
    assert int(state["step"]) == 0


def test_a_kernel_that_raises_gives_back_the_step_it_counted():
    from autoft_fast.ops import fused_optim
    state = {"step": torch.tensor(4)}
    with pytest.raises(RuntimeError, match="kernel failed"):
        with fused_optim._step_undone_on_error(state):
            state["step"].add_(1)
            raise RuntimeError("kernel failed")
    assert int(state["step"]) == 4
