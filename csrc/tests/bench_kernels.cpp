// Timing loop of the CPU kernels at the benchmark size (B=4096 x F=24 lookups, D=16, V=1M),
// next to two at::index_select of the rows, the floor any fused forward competes with.
// Usage: autoft_fast_bench [threads] [dtype: f32|bf16]
// Prints the fastest of the repetitions: on a shared machine the median mostly measures the
// neighbours.
#include "cpu/gated_embedding_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace {

double best_ms(const std::function<void()>& f, int reps) {
  f();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts.front();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    at::set_num_threads(std::atoi(argv[1]));
  }
  const at::ScalarType dtype = (argc > 2 && std::strcmp(argv[2], "bf16") == 0) ? at::kBFloat16 : at::kFloat;
  const int64_t N = 4096 * 24, D = 16, V = 1000000;
  at::manual_seed(0);
  const at::Tensor frozen = at::randn({V, D}).to(dtype), tuned = at::randn({V, D}).to(dtype);
  const at::Tensor indices = at::randint(0, V, {N}, at::kLong);
  const at::Tensor logits = at::randn({N, 2});
  const at::Tensor grad_out = at::randn({N, D}).to(dtype);
  const at::Tensor seed = at::scalar_tensor(int64_t{123}, at::kLong);

  const double sel = best_ms([&] {
    at::index_select(frozen, 0, indices);
    at::index_select(tuned, 0, indices);
  }, 30);
  std::printf("threads=%d N=%lld D=%lld V=%lld dtype=%s\n", at::get_num_threads(), (long long)N,
              (long long)D, (long long)V, dtype == at::kFloat ? "f32" : "bf16");
  std::printf("%-34s %8.3f ms\n", "index_select x2", sel);
  // The same into preallocated outputs: with two fresh 6 MB results per call, glibc may hand
  // back new pages each time and the page faults then dominate the floor.
  at::Tensor out_f = at::empty({N, D}, frozen.options()), out_t = at::empty({N, D}, tuned.options());
  const double sel_out = best_ms([&] {
    at::index_select_out(out_f, frozen, 0, indices);
    at::index_select_out(out_t, tuned, 0, indices);
  }, 30);
  std::printf("%-34s %8.3f ms\n", "index_select_out x2 (preallocated)", sel_out);
  for (bool hard : {true, false}) {
    for (bool noise : {true, false}) {
      const double t = best_ms([&] {
        autoft::gated_embedding_fwd_cpu(indices, frozen, tuned, logits, seed, std::nullopt, 1.0,
                                        hard, noise, false);
      }, 30);
      std::printf("fwd hard=%d noise=%d %15s %8.3f ms  (%.2fx index_select x2)\n", hard, noise, "",
                  t, t / sel);
    }
  }
  for (bool sparse : {true, false}) {
    const double t = best_ms([&] {
      autoft::gated_embedding_bwd_cpu(grad_out, std::nullopt, indices, frozen, tuned, logits, seed,
                                      std::nullopt, 1.0, true, true, sparse);
    }, sparse ? 30 : 10);
    std::printf("bwd hard=1 noise=1 sparse=%d %9s %8.3f ms\n", sparse, "", t);
  }
  return 0;
}
