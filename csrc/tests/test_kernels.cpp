// C++ checks of the CPU kernels, independent of Python: the Philox generator against the
// published known-answer vectors and against a plain 64-bit re-derivation, and the forward /
// backward against a naive per-lookup computation written here. Run by `ctest` (CMakeLists.txt).
#include "cpu/gated_embedding_cpu.h"
#include "cpu/philox_x4.h"
#include "cpu/vec4.h"
#include "philox.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <string>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what.c_str());
    ++failures;
  }
}

// Random123's known-answer vectors for Philox4x32-10 (counter, key -> output).
void test_philox_known_answers() {
  struct Kat {
    uint32_t c[4];
    uint32_t k[2];
    uint32_t out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& kat : kats) {
    const autoft::Philox4 r =
        autoft::philox4x32_10(kat.c[0], kat.c[1], kat.c[2], kat.c[3], kat.k[0], kat.k[1]);
    for (int i = 0; i < 4; ++i) {
      check(r.w[i] == kat.out[i], "philox known answer word " + std::to_string(i));
    }
  }
}

// The op's stream re-derived with 64-bit products and the contract's key/counter layout.
void test_philox_stream_layout() {
  const uint64_t seed = (uint64_t{1} << 62) + 987654321u;
  for (uint64_t offset : {uint64_t{0}, uint64_t{1}, uint64_t{123456789}, uint64_t{1} << 35}) {
    uint64_t c[4] = {offset & 0xffffffffu, offset >> 32, 0, 0};
    uint64_t k[2] = {seed & 0xffffffffu, seed >> 32};
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = 0xD2511F53ull * c[0];
      const uint64_t p2 = 0xCD9E8D57ull * c[2];
      const uint64_t n0 = (p2 >> 32) ^ c[1] ^ k[0];
      const uint64_t n2 = (p0 >> 32) ^ c[3] ^ k[1];
      c[0] = n0;
      c[1] = p2 & 0xffffffffu;
      c[2] = n2;
      c[3] = p0 & 0xffffffffu;
      k[0] = (k[0] + 0x9E3779B9ull) & 0xffffffffu;
      k[1] = (k[1] + 0xBB67AE85ull) & 0xffffffffu;
    }
    const autoft::Philox4 r = autoft::philox4x32_10(seed, offset);
    for (int i = 0; i < 4; ++i) {
      check(r.w[i] == c[i], "philox stream word " + std::to_string(i) + " at offset " +
                                std::to_string(offset));
    }
  }
  // Word -> uniform: both extremes stay in [0, 1).
  check(autoft::philox_uniform(0u) == 0.0f, "uniform of word 0");
  check(autoft::philox_uniform(0xffffffffu) == 0.0f, "uniform of word 0xffffffff");
  const float top = autoft::philox_uniform(0x7fffffffu);
  check(top < 1.0f && top > 0.99f, "uniform of word 0x7fffffff below 1");
  check(autoft::philox_uniform(0x80000000u) == top, "uniform of word 0x80000000 folds onto 0x7fffffff");
  check(std::isfinite(autoft::logistic_noise(0.0f)) && std::isfinite(autoft::logistic_noise(top)),
        "logistic noise finite at both ends");
}

// The four-calls-at-once generator of the CPU kernel against the scalar one, also where the
// counter's low word wraps.
void test_philox_x4() {
  const uint64_t seed = (uint64_t{1} << 62) + 31337u;
  for (uint64_t call0 : {uint64_t{0}, uint64_t{4}, uint64_t{0xfffffffe}, uint64_t{1} << 40}) {
    autoft::vec4::u32x4 words[4];
    autoft::philox4x32_10_x4(seed, call0, words);
    for (int q = 0; q < 4; ++q) {
      const autoft::Philox4 r = autoft::philox4x32_10(seed, call0 + q);
      for (int k = 0; k < 4; ++k) {
        check(words[q][k] == r.w[k], "philox x4 call " + std::to_string(call0 + q) + " word " +
                                         std::to_string(k));
      }
    }
  }
}

// Distance in units in the last place between two finite floats of the same sign.
int64_t ulps(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::llabs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

// The kernels' 4-lane log and exp against libm over the ranges the gates use.
void test_vector_math() {
  int64_t worst_log = 0, worst_exp = 0;
  for (uint32_t word = 0; word < (1u << 31); word += 9973u) {  // every uniform magnitude
    const float u = autoft::philox_uniform(word);
    for (float v : {u + 1e-20f, 1.0f - u}) {
      const float got = autoft::vec4::log(autoft::vec4::splat(v))[0];
      const float want = static_cast<float>(std::log(static_cast<double>(v)));
      worst_log = std::max(worst_log, std::fabs(want) < 1e-30f ? 0 : ulps(got, want));
    }
  }
  for (float t = -87.0f; t <= 0.0f; t += 0.00137f) {
    const float got = autoft::vec4::exp_nonpositive(autoft::vec4::splat(t))[0];
    const float want = static_cast<float>(std::exp(static_cast<double>(t)));
    worst_exp = std::max(worst_exp, ulps(got, want));
  }
  std::printf("vector log: worst %lld ulp, vector exp: worst %lld ulp\n", (long long)worst_log,
              (long long)worst_exp);
  check(worst_log <= 4, "vector log within 4 ulp");
  check(worst_exp <= 4, "vector exp within 4 ulp");
  const autoft::vec4::f32x4 odd = {0.0f, -1.0f, INFINITY, NAN};
  const autoft::vec4::f32x4 logs = autoft::vec4::log(odd);
  check(std::isinf(logs[0]) && logs[0] < 0 && std::isnan(logs[1]) && std::isinf(logs[2]) &&
            std::isnan(logs[3]),
        "vector log of 0, -1, inf, NaN as libm");
  const autoft::vec4::f32x4 exps =
      autoft::vec4::exp_nonpositive(autoft::vec4::f32x4{-INFINITY, -100.0f, 0.0f, NAN});
  check(exps[0] == 0.0f && exps[1] == 0.0f && exps[2] == 1.0f && std::isnan(exps[3]),
        "vector exp of -inf, -100, 0, NaN");
}

// Naive forward/backward of one configuration, compared with the kernels.
void test_against_naive(at::ScalarType dtype, bool hard, bool noise, bool use_uniforms) {
  const int64_t N = 203, V = 17, D = 7;  // odd sizes: partial Philox groups and vector tails
  at::manual_seed(7);
  const at::Tensor indices = at::randint(0, V, {N}, at::kLong);
  const at::Tensor frozen = at::randn({V, D}).to(dtype);
  const at::Tensor tuned = at::randn({V, D}).to(dtype);
  const at::Tensor logits = at::randn({N, 2});
  const at::Tensor grad_out = at::randn({N, D}).to(dtype);
  const at::Tensor grad_gates = at::randn({N, 2});
  const at::Tensor uniforms = at::rand({N});
  const int64_t seed_value = 424242;
  const at::Tensor seed = at::scalar_tensor(seed_value, at::kLong);
  const double tau = 0.7;
  std::optional<at::Tensor> u;
  if (use_uniforms) {
    u = uniforms;
  }
  auto [out, gates] = autoft::gated_embedding_fwd_cpu(indices, frozen, tuned, logits, seed, u, tau,
                                                       hard, noise, false);
  auto [grad_dense, grad_logits, no_rows] = autoft::gated_embedding_bwd_cpu(
      grad_out, grad_gates, indices, frozen, tuned, logits, seed, u, tau, hard, noise, false);
  auto [grad_values, grad_logits2, grad_row_ids] = autoft::gated_embedding_bwd_cpu(
      grad_out, grad_gates, indices, frozen, tuned, logits, seed, u, tau, hard, noise, true);
  check(no_rows.numel() == 0, "dense mode returns no row ids");

  const at::Tensor f32_frozen = frozen.to(at::kFloat), f32_tuned = tuned.to(at::kFloat);
  const at::Tensor f32_grad = grad_out.to(at::kFloat);
  at::Tensor want_dense = at::zeros({V, D}, at::kDouble);
  const auto idx = indices.accessor<int64_t, 1>();
  const float tol = dtype == at::kFloat ? 1e-5f : 2e-2f;
  for (int64_t n = 0; n < N; ++n) {
    double l = 0.0;
    if (noise) {
      const double U = use_uniforms ? uniforms[n].item<double>()
                                    : autoft::philox_uniform(autoft::philox4x32_10(
                                          static_cast<uint64_t>(seed_value), n / 4).w[n % 4]);
      l = std::log(U + 1e-20) - std::log(1.0 - U);
    }
    const double x = (logits[n][1].item<double>() - logits[n][0].item<double>() + l) / tau;
    const double y1 = 1.0 / (1.0 + std::exp(-x)), y0 = 1.0 / (1.0 + std::exp(x));
    const double z1 = hard ? (y1 > 0.5 ? 1.0 : 0.0) : y1, z0 = hard ? 1.0 - z1 : y0;
    check(std::fabs(gates[n][1].item<double>() - z1) < 1e-5, "gate " + std::to_string(n));
    double a0 = 0, a1 = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double f = f32_frozen[idx[n]][d].item<double>(), t = f32_tuned[idx[n]][d].item<double>();
      const double g = f32_grad[n][d].item<double>();
      const double want = z0 * f + z1 * t;
      check(std::fabs(out[n][d].item<double>() - want) <= tol * (1 + std::fabs(want)),
            "out " + std::to_string(n));
      a0 += g * f;
      a1 += g * t;
      want_dense[idx[n]][d] += z1 * g;
    }
    const double h = grad_gates[n][1].item<double>() - grad_gates[n][0].item<double>();
    const double want_gl = y0 * y1 * ((a1 - a0) + h) / tau;
    check(std::fabs(grad_logits[n][1].item<double>() - want_gl) <= 1e-4 * (1 + std::fabs(want_gl)),
          "grad_logits " + std::to_string(n));
    check(grad_logits[n][0].item<double>() == -grad_logits[n][1].item<double>(),
          "grad_logits antisymmetric");
  }
  check(at::allclose(grad_dense.to(at::kDouble), want_dense, tol, tol), "dense grad_tuned");
  // Sparse mode: sorted unique rows (coalesced) whose values scatter to the dense gradient.
  const int64_t U = grad_row_ids.numel();
  check(U <= N && grad_values.size(0) == U, "sparse gradient has at most one row per lookup");
  for (int64_t s = 1; s < U; ++s) {
    check(grad_row_ids[s - 1].item<int64_t>() < grad_row_ids[s].item<int64_t>(),
          "sparse rows sorted and unique");
  }
  const at::Tensor scattered = at::zeros({V, D}, at::kDouble)
                                   .index_add_(0, grad_row_ids, grad_values.to(at::kDouble));
  check(at::allclose(scattered, want_dense, tol, tol), "sparse grad_tuned scatters to dense");
  check(at::equal(grad_logits, grad_logits2), "grad_logits equal in both modes");
}

// Every lookup on one row: the dense gradient is the exact sum, computed without races.
void test_all_duplicates() {
  const int64_t N = 20001, V = 1000, D = 16;
  const at::Tensor indices = at::full({N}, 321, at::kInt);
  const at::Tensor table = at::randn({V, D});
  const at::Tensor logits = at::full({N, 2}, 0.0f);
  logits.select(1, 1).fill_(50.0f);  // every hard gate picks the tuned row
  const at::Tensor grad_out = at::randn({N, D});
  const at::Tensor seed = at::scalar_tensor(int64_t{5}, at::kLong);
  auto [grad, gl, rows] = autoft::gated_embedding_bwd_cpu(grad_out, std::nullopt, indices, table, table,
                                                    logits, seed, std::nullopt, 1.0, true, false,
                                                    false);
  const at::Tensor want = grad_out.to(at::kDouble).sum(0);
  check(at::allclose(grad[321].to(at::kDouble), want, 1e-4, 1e-3), "all-duplicate row sum");
  check(grad.abs().sum().item<double>() == grad[321].abs().sum().item<double>(),
        "all-duplicate: other rows stay zero");
}

void test_bad_index() {
  const at::Tensor indices = at::tensor({0, 3, 9, -1}, at::kLong);
  const at::Tensor table = at::randn({5, 4});
  const at::Tensor logits = at::zeros({4, 2});
  const at::Tensor seed = at::scalar_tensor(int64_t{1}, at::kLong);
  bool raised = false;
  try {
    autoft::gated_embedding_fwd_cpu(indices, table, table, logits, seed, std::nullopt, 1.0, true,
                                    true, false);
  } catch (const c10::IndexError& e) {
    raised = std::string(e.what_without_backtrace()).find(
                 "indices[2] = 9 is out of range for a table of 5 rows") != std::string::npos;
  }
  check(raised, "out-of-range index raises IndexError naming the first bad position");
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_philox_stream_layout();
  test_philox_x4();
  test_vector_math();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (bool hard : {true, false}) {
      test_against_naive(dtype, hard, true, false);
      test_against_naive(dtype, hard, true, true);
      test_against_naive(dtype, hard, false, false);
    }
  }
  test_all_duplicates();
  test_bad_index();
  if (failures == 0) {
    std::printf("all C++ kernel checks passed\n");
    return 0;
  }
  std::printf("%d C++ kernel checks failed\n", failures);
  return 1;
}
