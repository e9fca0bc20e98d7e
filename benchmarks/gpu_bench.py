"""GPU benchmark and sanity check of the gated embedding op (run by benchmarks/gpu_check.sh).

In one run: the card's device-to-device copy bandwidth, a quick correctness pass of every
backend against the reference (plus the CUDA-only behaviours: deterministic gradients, an
out-of-range index that leaves the context usable), then, per shape and per provider
(eager PyTorch, torch.compile of eager, autoft_fast's triton and cuda backends), forward and
full-step times, effective bandwidth on the minimal bytes, the fraction of the copy bandwidth
and the ratios to eager and to torch.compile; the fused kernels' own device time comes from
the profiler. Ends with the project's GPU targets (forward and backward against a copy of the
same bytes) as measured numbers. Then the bag op (multi-hot fields, ``gated_embedding_bag``): a
correctness pass of each backend that serves bags against the reference, and per bag shape
and provider (two ``F.embedding_bag`` calls mixed by the same gates in eager PyTorch, the
reference backend, and autoft_fast's triton and cuda bag kernels) forward and full-step times,
effective bandwidth and the ratio to eager; the kernels' device time from the profiler.

Byte model (minimal bytes; indices, logits and gates are left out, they are < 3% at D=16):

- forward: per lookup two rows read (frozen, tuned) and one written: 3 * D * itemsize.
  A hard-gate kernel reads one row only, so it can exceed "100%" of this model's floor.
- full step (forward, backward, SGD on the touched tuned rows and on the logits): forward
  3 rows + backward 3 rows read (grad_out, frozen, tuned) + the tuned row updated in place
  (read + write): 8 * D * itemsize per lookup.
- bags: per value two rows read (frozen, tuned), per bag one row written, forward
  (2 * L + B) * D * itemsize; the full step adds per value three rows (the two tables again and
  the tuned row updated: read + write, counted as 2) and per bag the grad_out row:
  (6 * L + 2 * B) * D * itemsize.

Example::

    python benchmarks/gpu_bench.py --dry-run                     # plan only, any machine
    python benchmarks/gpu_bench.py --device cpu --shapes 64:4:16:1000 --no-compile  # CPU smoke
    python benchmarks/gpu_bench.py                                # the target shapes on a GPU
    python benchmarks/gpu_bench.py --device cpu --shapes 64:4:16:1000 --bag-shapes 64:2:8:1000:3 \
        --no-compile --target-s 0.01 --copy-mb 8                  # CPU smoke of both parts
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

FOUNDATION = ["4096:24:16:1000000", "4096:24:64:1000000", "4096:24:16:100000"]
LARGE = ["65536:26:64:10000000", "65536:26:128:10000000"]
# Hot rows: 98,304 lookups on 16 rows, about 6,000 per row (a field of a few values), where the
# fused update and the deterministic gradient sum each row in pieces of 128 sorted lookups.
HOT = ["4096:24:16:16"]
FWD_ROWS = 3
STEP_ROWS = 8
# B:F:D:V:LEN: B instances, F multi-hot fields (B * F bags), bag lengths uniform in
# [0, 2 * LEN] (mean LEN), V rows.
BAG_SHAPES = ["4096:4:16:1000000:20", "4096:4:64:1000000:20", "16384:8:64:10000000:20"]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'B:F:D:V' -> (batch, fields, dim, rows), all positive."""
    parts = text.split(":")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or min(vals) <= 0:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not B:F:D:V with four positive integers (e.g. 4096:24:16:1000000)")
    return vals  # type: ignore[return-value]


def parse_bag_shape(text: str) -> tuple[int, int, int, int, int]:
    """'B:F:D:V:LEN' -> (batch, fields, dim, rows, mean bag length), all positive."""
    parts = text.split(":")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 5 or min(vals) <= 0:
        raise argparse.ArgumentTypeError(
            f"bag shape {text!r} is not B:F:D:V:LEN with five positive integers "
            f"(e.g. 4096:4:16:1000000:20)")
    return vals  # type: ignore[return-value]


class Clock:
    """Times a callable: CUDA events over a loop on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, target_s: float):
        self.cuda = device.startswith("cuda")
        self.target_s = target_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(100, max(3, self.target_s / once)))
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps


def copy_bandwidth(device: str, clock: Clock, nbytes: int) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = clock(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


def kernel_ms(fn, patterns, device: str, reps: int = 5) -> float | None:
    """Mean device time per call of the kernels whose name contains one of ``patterns``."""
    if not device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for ev in prof.key_averages():
        if any(p in ev.key for p in patterns):
            total_us += getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
    return total_us / 1e3 / reps if total_us > 0 else None


# --------------------------------------------------------------------------------------------
# Correctness pass (a quick one; python_tests is the real suite)
# --------------------------------------------------------------------------------------------


def check_backends(device: str, backends: list[str]) -> bool:
    """Each backend vs the reference on a few shapes; CUDA-only behaviours. Prints PASS/FAIL."""
    import autoft_fast

    ok_all = True
    gen = torch.Generator().manual_seed(3)
    cases = [(257, 16, 1000, torch.float32, torch.int64, True, False),
             (300, 64, 50, torch.bfloat16, torch.int32, False, True),
             (129, 60, 7, torch.float16, torch.int64, True, True),
             (64, 3, 5, torch.float32, torch.int32, False, False)]
    for backend in backends:
        for n, d, v, dt, it, hard, sparse in cases:
            idx = torch.randint(0, v, (n,), generator=gen).to(it)
            frozen = torch.randn(v, d, generator=gen).to(dt)
            tuned0 = torch.randn(v, d, generator=gen).to(dt)
            logits0 = torch.randn(n, 2, generator=gen)
            g = torch.randn(n, d, generator=gen).to(dt)
            h = torch.randn(n, 2, generator=gen)
            res = {}
            for name, dev in ((backend, device), ("reference", "cpu")):
                tuned = tuned0.to(dev, copy=True).requires_grad_()
                logits = logits0.to(dev, copy=True).requires_grad_()
                out, gates = autoft_fast.gated_embedding(
                    idx.to(dev), frozen.to(dev), tuned, logits, tau=0.8, hard=hard,
                    seed=123456789, sparse=sparse, backend=name)
                (out.float() * g.to(dev).float()).sum().add((gates * h.to(dev)).sum()).backward()
                gt = tuned.grad.to_dense() if tuned.grad.is_sparse else tuned.grad
                res[name] = [x.detach().float().cpu() for x in (out, gates, gt, logits.grad)]
            tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dt]
            errs = [(a - b).abs().max().item() if a.numel() else 0.0
                    for a, b in zip(res[backend], res["reference"])]
            flips = int((res[backend][1] != res["reference"][1]).any(-1).sum()) if hard else 0
            # A hard gate may flip at a near-tie (contract); each flip moves that lookup's row.
            ok = flips <= 1 and (flips > 0 or all(e <= tol * 10 for e in errs))
            ok_all &= ok
            print(f"  {'PASS' if ok else 'FAIL'} {backend:7s} n={n} D={d} V={v} {str(dt)[6:]:8s} "
                  f"{str(it)[6:]} {'hard' if hard else 'soft'} {'sparse' if sparse else 'dense'}: "
                  f"max err out {errs[0]:.2e} gates {errs[1]:.2e} grad_tuned {errs[2]:.2e} "
                  f"grad_logits {errs[3]:.2e} gate flips {flips}")
    if device.startswith("cuda") and "cuda" in backends:
        ok_all &= check_cuda_behaviours(device)
    return ok_all


def check_cuda_behaviours(device: str) -> bool:
    import autoft_fast

    ok_all = True
    idx = torch.randint(0, 8, (50000,), device=device)
    frozen = torch.randn(8, 64, device=device)
    tuned = torch.randn(8, 64, device=device)
    logits = torch.randn(50000, 2, device=device)
    grad = torch.randn(50000, 64, device=device)
    seed = torch.tensor(99)
    bwd = torch.ops.autoft_fast.gated_embedding_bwd
    args = (grad, None, idx, frozen, tuned, logits, seed, None, 1.0, False, True, False)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a = bwd(*args)[0]
        b = bwd(*args)[0]
    finally:
        torch.use_deterministic_algorithms(prev)
    fast = bwd(*args)[0]
    same = torch.equal(a, b)
    close = torch.allclose(a, fast, rtol=1e-4, atol=1e-2)
    print(f"  {'PASS' if same and close else 'FAIL'} cuda deterministic dense grad: bitwise equal "
          f"across runs {same}, matches the atomic path {close} "
          f"(max diff {(a - fast).abs().max().item():.2e})")
    ok_all &= same and close
    bad = idx.clone()
    bad[1234] = 8
    try:
        autoft_fast.gated_embedding(bad, frozen, tuned, logits, backend="cuda")
        raised = "nothing"
    except IndexError as err:
        raised = str(err)
    usable = bool(torch.isfinite(frozen.sum()).item())
    ok = raised.startswith("indices[1234] = 8 is out of range") and usable
    print(f"  {'PASS' if ok else 'FAIL'} cuda out-of-range index: raised {raised!r}; context "
          f"usable afterwards {usable}")
    return ok_all and ok


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def make_providers(backends, compile_mode):
    """name -> (fn(idx, frozen, tuned, logits, sparse) -> out, gradient layout)."""
    import autoft_fast
    from autoft_fast.bench import eager_gated_embedding

    prov = {
        "eager (dense)": (lambda i, f, t, l: eager_gated_embedding(i, f, t, l, 1.0, False)[0], False),
        "eager (sparse)": (lambda i, f, t, l: eager_gated_embedding(i, f, t, l, 1.0, True)[0], True),
    }
    if compile_mode != "off":
        compiled = torch.compile(eager_gated_embedding, dynamic=(compile_mode == "dynamic"))
        prov["torch.compile (dense)"] = (lambda i, f, t, l: compiled(i, f, t, l, 1.0, False)[0], False)
    for b in backends:
        for sparse in (False, True):
            prov[f"{b} ({'sparse' if sparse else 'dense'})"] = (
                lambda i, f, t, l, b=b, s=sparse: autoft_fast.gated_embedding(
                    i, f, t, l, tau=1.0, sparse=s, backend=b)[0], sparse)
        # The optimizer fused into the backward (the trainer's default): the kernel updates the
        # touched tuned rows itself, so the step's SGD only moves the logits.
        for kind in ("sgd", "adam"):
            prov[f"{b} (fused {kind})"] = (_fused_provider(b, kind), True)
    return prov


def _fused_provider(backend: str, kind: str):
    """fn(idx, frozen, tuned, logits) -> out with ``kind`` fused, one state per tuned table."""
    import autoft_fast
    from autoft_fast.ops.fused_optim import FusedOptimizer

    opt = FusedOptimizer(kind, lr=1e-4)
    states: dict = {}

    def fn(i, f, t, l):
        key = (t.data_ptr(), tuple(t.shape))
        if key not in states:
            states.clear()  # one shape at a time: the previous shape's state is let go
            states[key] = opt.new_state(t)
        return autoft_fast.gated_embedding(i, f, t, l, tau=1.0, backend=backend, optimizer=opt,
                                           optimizer_state=states[key])[0]

    return fn


KERNEL_NAMES = {"triton": (["_fwd_kernel"], ["_bwd_kernel", "_pieces_kernel", "_rows_update_kernel"]),
                "cuda": (["forward_kernel"], ["backward_kernel", "segment_pieces_kernel",
                                              "segment_update_kernel"])}


def bench_shape(shape, device, dtype, clock, providers, copy_gbs, backends):
    batch, fields, dim, rows = shape
    n = batch * fields
    elt = torch.empty((), dtype=dtype).element_size()
    fwd_bytes = n * FWD_ROWS * dim * elt
    step_bytes = n * STEP_ROWS * dim * elt
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, rows, (batch, fields), device=device, generator=gen)
    frozen = torch.randn(rows, dim, device=device, generator=gen).to(dtype)
    tuned = torch.nn.Parameter(frozen.clone())
    logits = torch.nn.Parameter(torch.randn(batch, fields, 2, device=device, generator=gen))
    grad_out = torch.randn(batch, fields, dim, device=device, generator=gen).to(dtype)
    opt = torch.optim.SGD([tuned, logits], lr=1e-4)

    results = {}
    for name, (fn, _sparse) in providers.items():
        def fwd():
            with torch.no_grad():
                fn(idx, frozen, tuned, logits)

        def step():
            tuned.grad = None
            logits.grad = None
            fn(idx, frozen, tuned, logits).backward(grad_out)
            opt.step()

        try:
            f_ms = clock(fwd)
            s_ms = clock(step)
        except Exception as err:  # report and go on: one broken provider must not hide the rest
            print(f"  {name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        results[name] = (f_ms, s_ms)

    kernels = {}
    for b in backends:
        fwd_pat, bwd_pat = KERNEL_NAMES.get(b, ([], []))
        name = f"{b} (sparse)"
        if name not in providers or name not in results:
            continue
        fn = providers[name][0]

        def fwd(fn=fn):
            with torch.no_grad():
                fn(idx, frozen, tuned, logits)

        def fwd_bwd(fn=fn):
            tuned.grad = None
            logits.grad = None
            fn(idx, frozen, tuned, logits).backward(grad_out)

        kf = kernel_ms(fwd, fwd_pat, device)
        kb = kernel_ms(fwd_bwd, bwd_pat, device)
        kernels[b] = (kf, kb)
    del frozen, tuned, logits, grad_out, idx, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, kernels, fwd_bytes, step_bytes


def print_table(shape, dtype, results, kernels, fwd_bytes, step_bytes, copy_gbs):
    batch, fields, dim, rows = shape
    print(f"\n## B={batch}, F={fields}, D={dim}, V={rows}, {str(dtype)[6:]} "
          f"(forward {fwd_bytes / 1e6:.1f} MB, step {step_bytes / 1e6:.1f} MB minimal)\n")
    eager = results.get("eager (dense)")
    comp = results.get("torch.compile (dense)")
    print("| provider | fwd ms | fwd GB/s | fwd % copy | fwd vs eager | fwd vs compile | "
          "step ms | step GB/s | step % copy | step vs eager | step vs compile |")
    print("|" + "---|" * 11)

    def ratio(base, mine):
        return "" if base is None else f"{base / mine:.2f}x"

    for name, (f_ms, s_ms) in results.items():
        fg, sg = fwd_bytes / f_ms / 1e6, step_bytes / s_ms / 1e6
        print(f"| {name} | {f_ms:.3f} | {fg:.0f} | {100 * fg / copy_gbs:.0f}% | "
              f"{ratio(eager and eager[0], f_ms)} | {ratio(comp and comp[0], f_ms)} | "
              f"{s_ms:.3f} | {sg:.0f} | {100 * sg / copy_gbs:.0f}% | "
              f"{ratio(eager and eager[1], s_ms)} | {ratio(comp and comp[1], s_ms)} |")
    for b, (kf, kb) in kernels.items():
        parts = []
        if kf:
            g = fwd_bytes / kf / 1e6
            parts.append(f"forward kernel {kf:.3f} ms = {g:.0f} GB/s = {100 * g / copy_gbs:.0f}% of copy")
        if kb:
            # backward kernel: grad_out, frozen and tuned rows read, the sparse row written
            g = n_rows_bytes(fwd_bytes, 4) / kb / 1e6
            parts.append(f"backward kernel {kb:.3f} ms = {g:.0f} GB/s (4 rows/lookup) = "
                         f"{100 * g / copy_gbs:.0f}% of copy")
        if parts:
            print(f"- {b} device time: " + "; ".join(parts))


def n_rows_bytes(fwd_bytes: int, rows: int) -> float:
    return fwd_bytes / FWD_ROWS * rows


def print_targets(all_results, backends, copy_gbs):
    print("\n## GPU targets, large shapes\n")
    for shape, (results, kernels, fwd_bytes, step_bytes) in all_results.items():
        if shape[0] < 65536:
            continue
        label = f"D={shape[2]}"
        eager = results.get("eager (dense)")
        best = {}
        for b in backends:
            r = results.get(f"{b} (sparse)")
            if r is None:
                continue
            kf = kernels.get(b, (None, None))[0]
            fwd_frac = fwd_bytes / (kf or r[0]) / 1e6 / copy_gbs
            step_frac = step_bytes / r[1] / 1e6 / copy_gbs
            print(f"- {label} {b}: forward {100 * fwd_frac:.0f}% of copy "
                  f"({'kernel' if kf else 'wall'}; target >= 75%) "
                  f"{'MET' if fwd_frac >= 0.75 else 'MISSED'}; step {100 * step_frac:.0f}% "
                  f"(target >= 60%) {'MET' if step_frac >= 0.6 else 'MISSED'}"
                  + (f"; step vs eager dense {eager[1] / r[1]:.1f}x (target >= 10x) "
                     f"{'MET' if eager[1] / r[1] >= 10 else 'MISSED'}" if eager else ""))
            best[b] = r[1]
        if len(best) == 2:
            (b1, t1), (b2, t2) = sorted(best.items(), key=lambda kv: kv[1])
            print(f"- {label} step: {b1} {t1:.3f} ms, {b2} {t2:.3f} ms: {b2} slower by "
                  f"{100 * (t2 / t1 - 1):.0f}% (target within 20%) "
                  f"{'MET' if t2 / t1 <= 1.2 else 'MISSED'}")


# --------------------------------------------------------------------------------------------
# The bag op (multi-hot fields)
# --------------------------------------------------------------------------------------------


def random_bags(batch_fields: int, rows: int, mean_len: int, device: str, gen: torch.Generator):
    """(values [L], offsets [B + 1]) of ``batch_fields`` bags, lengths uniform in [0, 2 * mean_len]."""
    lengths = torch.randint(0, 2 * mean_len + 1, (batch_fields,), generator=gen)
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)))
    values = torch.randint(0, rows, (int(offsets[-1]),), generator=gen)
    return values.to(device), offsets.to(device)


def check_bag_backends(device: str, backends: list[str]) -> bool:
    """Each bag backend vs the reference on a few cases (empty bags included). Prints PASS/FAIL."""
    import autoft_fast

    ok_all = True
    gen = torch.Generator().manual_seed(5)
    cases = [(300, 16, 1000, 6, torch.float32, "mean", True, False, False),
             (257, 64, 50, 3, torch.bfloat16, "sum", False, True, True),
             (129, 60, 7, 9, torch.float16, "mean", True, True, False),
             (64, 3, 5, 2, torch.float32, "sum", False, False, True)]
    for backend in backends:
        for bags, d, v, mean_len, dt, mode, hard, sparse, weighted in cases:
            values, offsets = random_bags(bags, v, mean_len, "cpu", gen)
            w = torch.rand(values.shape[0], generator=gen) + 0.5 if weighted else None
            frozen = torch.randn(v, d, generator=gen).to(dt)
            tuned0 = torch.randn(v, d, generator=gen).to(dt)
            logits0 = torch.randn(bags, 2, generator=gen)
            g = torch.randn(bags, d, generator=gen).to(dt)
            h = torch.randn(bags, 2, generator=gen)
            res = {}
            for name, dev in ((backend, device), ("reference", "cpu")):
                tuned = tuned0.to(dev, copy=True).requires_grad_()
                logits = logits0.to(dev, copy=True).requires_grad_()
                out, gates = autoft_fast.gated_embedding_bag(
                    values.to(dev), offsets.to(dev), frozen.to(dev), tuned, logits,
                    per_sample_weights=None if w is None else w.to(dev), mode=mode, tau=0.8,
                    hard=hard, seed=123456789, sparse=sparse, backend=name)
                (out.float() * g.to(dev).float()).sum().add((gates * h.to(dev)).sum()).backward()
                gt = tuned.grad.to_dense() if tuned.grad.is_sparse else tuned.grad
                res[name] = [x.detach().float().cpu() for x in (out, gates, gt, logits.grad)]
            tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dt]
            errs = [(a - b).abs().max().item() / max(1.0, b.abs().max().item()) if a.numel() else 0.0
                    for a, b in zip(res[backend], res["reference"])]
            flips = int((res[backend][1] != res["reference"][1]).any(-1).sum()) if hard else 0
            ok = flips <= 1 and (flips > 0 or all(e <= tol * 10 for e in errs))
            ok_all &= ok
            print(f"  {'PASS' if ok else 'FAIL'} {backend:9s} bags={bags} D={d} V={v} "
                  f"L={values.shape[0]} {str(dt)[6:]:8s} {mode} {'hard' if hard else 'soft'} "
                  f"{'sparse' if sparse else 'dense'}{' weighted' if weighted else ''}: max rel err "
                  f"out {errs[0]:.2e} gates {errs[1]:.2e} grad_tuned {errs[2]:.2e} grad_logits "
                  f"{errs[3]:.2e} gate flips {flips}")
    return ok_all


def eager_gated_bag(values, offsets, frozen, tuned, logits, mode, sparse):
    """The bag op in careful eager PyTorch: two F.embedding_bag calls mixed by the op's gates."""
    import torch.nn.functional as F

    import autoft_fast

    z = autoft_fast.gumbel_gates(logits, tau=1.0, seed=0)
    starts = offsets[:-1]
    pf = F.embedding_bag(values, frozen, starts, mode=mode)
    pt = F.embedding_bag(values, tuned, starts, mode=mode, sparse=sparse)
    return z[:, :1] * pf + z[:, 1:] * pt


def make_bag_providers(backends, mode):
    """name -> fn(values, offsets, frozen, tuned, logits) -> out."""
    import autoft_fast

    prov = {
        "eager embedding_bag (dense)": lambda v, o, f, t, l: eager_gated_bag(v, o, f, t, l, mode, False),
        "eager embedding_bag (sparse)": lambda v, o, f, t, l: eager_gated_bag(v, o, f, t, l, mode, True),
    }
    for b in backends:
        for sparse in (False, True):
            prov[f"{b} (sparse)" if sparse else f"{b} (dense)"] = (
                lambda v, o, f, t, l, b=b, s=sparse: autoft_fast.gated_embedding_bag(
                    v, o, f, t, l, mode=mode, tau=1.0, sparse=s, backend=b)[0])
    return prov


BAG_KERNEL_NAMES = {"triton": (["_bag_fwd_kernel"], ["_bag_bwd_kernel"]),
                    "cuda": (["bag_forward_kernel"], ["bag_backward_kernel"])}


def bench_bag_shape(shape, device, dtype, clock, providers, backends):
    """Forward and full-step ms per provider, and the bag kernels' device time, at one bag shape."""
    batch, fields, dim, rows, mean_len = shape
    gen = torch.Generator().manual_seed(1)
    values, offsets = random_bags(batch * fields, rows, mean_len, device, gen)
    bags, length = batch * fields, values.shape[0]
    elt = torch.empty((), dtype=dtype).element_size()
    fwd_bytes = (2 * length + bags) * dim * elt
    step_bytes = (6 * length + 2 * bags) * dim * elt
    frozen = torch.randn(rows, dim, device=device).to(dtype)
    tuned = torch.nn.Parameter(frozen.clone())
    logits = torch.nn.Parameter(torch.randn(bags, 2, device=device))
    grad_out = torch.randn(bags, dim, device=device).to(dtype)
    opt = torch.optim.SGD([tuned, logits], lr=1e-4)
    results = {}
    for name, fn in providers.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(values, offsets, frozen, tuned, logits)

        def step(fn=fn):
            tuned.grad = None
            logits.grad = None
            fn(values, offsets, frozen, tuned, logits).backward(grad_out)
            opt.step()

        try:
            results[name] = (clock(fwd), clock(step))
        except Exception as err:  # report and go on: one broken provider must not hide the rest
            print(f"  {name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    kernels = {}
    for b in backends:
        fwd_pat, bwd_pat = BAG_KERNEL_NAMES.get(b, ([], []))
        fn = providers.get(f"{b} (sparse)")
        if fn is None or f"{b} (sparse)" not in results:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                fn(values, offsets, frozen, tuned, logits)

        def fwd_bwd(fn=fn):
            tuned.grad = None
            logits.grad = None
            fn(values, offsets, frozen, tuned, logits).backward(grad_out)

        kernels[b] = (kernel_ms(fwd, fwd_pat, device), kernel_ms(fwd_bwd, bwd_pat, device))
    del frozen, tuned, logits, grad_out, values, offsets, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, kernels, fwd_bytes, step_bytes, bags, length


def print_bag_table(shape, dtype, mode, res, copy_gbs):
    results, kernels, fwd_bytes, step_bytes, bags, length = res
    batch, fields, dim, rows, mean_len = shape
    print(f"\n## bags: B={batch}, F={fields} ({bags} bags, {length} values, mean length "
          f"{length / max(bags, 1):.1f}), D={dim}, V={rows}, {str(dtype)[6:]}, {mode} "
          f"(forward {fwd_bytes / 1e6:.1f} MB, step {step_bytes / 1e6:.1f} MB minimal)\n")
    eager = results.get("eager embedding_bag (dense)")
    print("| provider | fwd ms | fwd GB/s | fwd % copy | fwd vs eager | "
          "step ms | step GB/s | step % copy | step vs eager |")
    print("|" + "---|" * 9)
    for name, (f_ms, s_ms) in results.items():
        fg, sg = fwd_bytes / f_ms / 1e6, step_bytes / s_ms / 1e6
        fr = f"{eager[0] / f_ms:.2f}x" if eager else ""
        sr = f"{eager[1] / s_ms:.2f}x" if eager else ""
        print(f"| {name} | {f_ms:.3f} | {fg:.0f} | {100 * fg / copy_gbs:.0f}% | {fr} | "
              f"{s_ms:.3f} | {sg:.0f} | {100 * sg / copy_gbs:.0f}% | {sr} |")
    for b, (kf, kb) in kernels.items():
        parts = []
        if kf:
            g = fwd_bytes / kf / 1e6
            parts.append(f"bag forward kernel {kf:.3f} ms = {g:.0f} GB/s = {100 * g / copy_gbs:.0f}% of copy")
        if kb:
            # the backward kernel reads both tables per value and grad_out per bag, writes a row per value
            g = (3 * length + bags) * dim * torch.empty((), dtype=dtype).element_size() / kb / 1e6
            parts.append(f"bag backward kernel {kb:.3f} ms = {g:.0f} GB/s (3 rows/value) = "
                         f"{100 * g / copy_gbs:.0f}% of copy")
        if parts:
            print(f"- {b} device time: " + "; ".join(parts))


def main(argv=None) -> int:
    """Run the GPU check's benchmark; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="B:F:D:V",
                   help="default: the foundation shapes, the large ones and a hot-row one")
    p.add_argument("--backends", nargs="*", default=None,
                   help="autoft_fast backends (default: triton and cuda where available)")
    p.add_argument("--compile", default="dynamic", choices=["dynamic", "static", "off"],
                   help="torch.compile baseline: one dynamic-shape compile (default, keeps the run "
                        "short), one compile per shape, or none")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    p.add_argument("--target-s", type=float, default=0.2, help="seconds of timing per measurement")
    p.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth copy")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="stop starting new shapes after this many seconds")
    p.add_argument("--bag-shapes", nargs="*", type=parse_bag_shape, default=None,
                   metavar="B:F:D:V:LEN", help="bag op shapes (B * F bags of mean length LEN); "
                   "default: " + " ".join(BAG_SHAPES) + "; none given: skip the bag op")
    p.add_argument("--bag-mode", default="mean", choices=["sum", "mean"], help="bag pooling")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness passes")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (any machine)")
    args = p.parse_args(argv)
    if args.copy_mb < 1 or args.target_s <= 0 or args.budget_s <= 0:
        p.error("--copy-mb must be >= 1, and --target-s and --budget-s > 0")
    if args.backends:
        from autoft_fast.ops.registry import backend_names
        unknown = [b for b in args.backends if b not in backend_names()]
        if unknown:
            p.error(f"--backends: unknown {unknown} (known: {', '.join(backend_names())})")
    shapes = args.shapes or [parse_shape(s) for s in FOUNDATION + LARGE + HOT]
    bag_shapes = [parse_bag_shape(s) for s in BAG_SHAPES] if args.bag_shapes is None else args.bag_shapes
    dtype = getattr(torch, args.dtype)

    print(f"# gated embedding GPU check: torch {torch.__version__}, device {args.device}, "
          f"{args.dtype}")
    print(f"# byte model: forward {FWD_ROWS} rows/lookup (2 read, 1 written); full step "
          f"{STEP_ROWS} rows/lookup (forward 3, backward reads 3, tuned-row update 2)")
    if args.dry_run:
        for s in shapes:
            b, f, d, v = s
            elt = torch.empty((), dtype=dtype).element_size()
            print(f"plan: B={b} F={f} D={d} V={v}: {b * f} lookups, tables "
                  f"{2 * v * d * elt / 1e9:.2f} GB, forward {b * f * FWD_ROWS * d * elt / 1e6:.1f} MB")
        for b, f, d, v, n in bag_shapes:
            elt = torch.empty((), dtype=dtype).element_size()
            print(f"plan: bags B={b} F={f} D={d} V={v} LEN={n}: {b * f} bags, about {b * f * n} "
                  f"values, tables {2 * v * d * elt / 1e9:.2f} GB, {args.bag_mode} pooling")
        print(f"plan: compile baseline {args.compile}, budget {args.budget_s:.0f} s")
        return 0

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke run or --dry-run", file=sys.stderr)
        return 2
    import autoft_fast

    backends = args.backends
    if backends is None:
        backends = [b for b in autoft_fast.available_backends(args.device)
                    if b in ("triton", "cuda", "cpu")]
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()}, backends {backends}")
    t_start = time.perf_counter()
    clock = Clock(args.device, args.target_s)
    copy_gbs = copy_bandwidth(args.device, clock, args.copy_mb * 2**20)
    print(f"# copy bandwidth: {copy_gbs:.0f} GB/s ({args.copy_mb} MB device-to-device copy, "
          "read + write counted)")

    ok = True
    if not args.skip_check:
        print("\n## correctness pass (vs reference)\n")
        ok = check_backends(args.device, backends)

    providers = make_providers(backends, args.compile)
    all_results = {}
    for shape in shapes:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            print(f"\n(skipping B:F:D:V={':'.join(map(str, shape))}: {elapsed:.0f} s used of the "
                  f"{args.budget_s:.0f} s budget)")
            continue
        t0 = time.perf_counter()
        res = bench_shape(shape, args.device, dtype, clock, providers, copy_gbs, backends)
        all_results[shape] = res
        print_table(shape, dtype, res[0], res[1], res[2], res[3], copy_gbs)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print_targets(all_results, [b for b in backends if b in ("triton", "cuda")], copy_gbs)

    from autoft_fast.ops import registry

    bag_backends = [b for b in backends if b in registry.bag_backends(args.device)]
    if bag_shapes:
        print(f"\n# bag op: backends {bag_backends}")
        if not args.skip_check:
            print("\n## bag correctness pass (vs reference)\n")
            ok &= check_bag_backends(args.device, bag_backends)
        bag_providers = make_bag_providers(bag_backends + ["reference"], args.bag_mode)
        for shape in bag_shapes:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                print(f"\n(skipping bags B:F:D:V:LEN={':'.join(map(str, shape))}: {elapsed:.0f} s "
                      f"used of the {args.budget_s:.0f} s budget)")
                continue
            t0 = time.perf_counter()
            res = bench_bag_shape(shape, args.device, dtype, clock, bag_providers, bag_backends)
            print_bag_table(shape, dtype, args.bag_mode, res, copy_gbs)
            print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s; correctness passes "
          f"{'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
