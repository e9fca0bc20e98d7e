"""The noise stream, checked against Philox4x32-10 written out here in plain Python integers."""

import math
import struct

import numpy as np
import pytest
import torch

from autoft_fast.ops.philox import philox_uniforms

M32 = 0xFFFFFFFF


def philox_words(seed: int, counter: int) -> list[int]:
    """One Philox4x32-10 block, from its published definition (Salmon et al., SC'11)."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    c = [counter & M32, (counter >> 32) & M32, 0, 0]
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c


def word_to_uniform(word: int) -> float:
    x = word - (1 << 32) if word >= (1 << 31) else word
    if x < 0:
        x = -x - 1
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    return f32(f32(float(x)) * f32(4.6566127342e-10))


def expected_uniforms(seed: int, n: int, start: int = 0) -> list[float]:
    return [word_to_uniform(philox_words(seed, k // 4)[k % 4]) for k in range(start, start + n)]


def test_known_answer_zero_key():
    # Random123's published known-answer vector for philox4x32-10 with zero key and counter.
    assert philox_words(0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**32 - 1, 2**32, 2**62 + 7, 2**63 - 1])
def test_uniforms_bit_identical(seed):
    got = philox_uniforms(seed, 37)
    assert got.dtype == np.float32
    assert got.tolist() == expected_uniforms(seed, 37)


def test_offsets_beyond_32_bits():
    start = 4 * (2**32 + 3) + 1  # the call counter's high word is non-zero here
    assert philox_uniforms(99, 9, start=start).tolist() == expected_uniforms(99, 9, start=start)


def test_uniform_range_and_spread():
    u = philox_uniforms(5, 100_000)
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_seed_none_follows_torch_manual_seed():
    import autoft_fast

    f = torch.randn(50, 4)
    idx = torch.randint(0, 50, (200,))
    logits = torch.zeros(200, 2)

    def draw():
        torch.manual_seed(7)
        return autoft_fast.gated_embedding(idx, f, f.clone(), logits, hard=False)[1]

    a, b = draw(), draw()
    assert torch.equal(a, b)
    assert not torch.equal(a, autoft_fast.gated_embedding(idx, f, f.clone(), logits, hard=False)[1])


def test_kernel_backends_draw_the_contract_stream(backend_device):
    """Recover U from each backend's soft gate (logits 0, tau 1: y1 = sigmoid(l)) and compare."""
    import autoft_fast

    backend, device = backend_device
    n = 12 if backend == "triton" else 1001
    seed = 2**40 + 17
    f = torch.zeros(3, 1, device=device)
    out, gates = autoft_fast.gated_embedding(torch.zeros(n, dtype=torch.long, device=device), f,
                                             f.clone(), torch.zeros(n, 2, device=device),
                                             hard=False, seed=seed, backend=backend)
    u = torch.tensor(expected_uniforms(seed, n), dtype=torch.float64)
    y1 = torch.sigmoid(torch.log(u + 1e-20) - torch.log(1 - u))
    torch.testing.assert_close(gates[:, 1].cpu().double(), y1, rtol=2e-6, atol=1e-7)
    assert math.isclose(float(gates.sum()), n, rel_tol=1e-5)


@pytest.mark.skipif(not __import__("autoft_fast.ops._extension", fromlist=["x"]).has_kernel("CPU"),
                    reason="the compiled CPU extension is not built")
def test_the_compiled_uniforms_are_the_stream_bit_for_bit():
    # autoft_fast::philox_uniforms (the models' layer-gate noise) against the torch-ops and
    # numpy forms of the contract's stream, over call boundaries and a 63-bit seed.
    import torch
    from autoft_fast.ops.philox import philox_uniforms, uniforms, uniforms_tensor
    for seed, n in [(0, 0), (0, 1), (7, 6), (2**63 - 1, 4097), (123456789012, 30001)]:
        got = torch.ops.autoft_fast.philox_uniforms(torch.tensor(seed), n)
        assert got.dtype == torch.float32 and tuple(got.shape) == (n,)
        assert torch.equal(got, uniforms_tensor(seed, (n,)))
        assert torch.equal(got, torch.from_numpy(philox_uniforms(seed, n)))
    assert torch.equal(uniforms(11, (5, 3)), uniforms_tensor(11, (5, 3)))
    with pytest.raises(ValueError, match="n must be >= 0"):
        torch.ops.autoft_fast.philox_uniforms(torch.tensor(1), -1)
    with pytest.raises(ValueError, match="non-negative 63-bit"):
        torch.ops.autoft_fast.philox_uniforms(torch.tensor(-3), 4)
