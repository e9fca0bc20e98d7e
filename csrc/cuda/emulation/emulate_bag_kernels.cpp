// Runs the CUDA backend's bag kernels (gated_bag_kernels.cuh, unchanged) on the CPU through the
// launch-grid emulation of emulation.h, so that CI without a GPU tests their logic.
//
// Driven by python_tests/test_bag_gpu_backends.py, which builds it with the host compiler:
//   emulate_bag_kernels B V D dtype(0 f32, 1 bf16, 2 f16) idx64 vec1 hard noise(0 none, 1 seed,
//                       2 uniforms) grad(0 atomic, 1 sparse, 2 deterministic) mean weights
//                       max_len duplicates seed tau with_grad_gates out_dir
// Bag b gets a length drawn in [0, max_len] (bag 1 is always empty); `duplicates` makes every
// value the same row. It draws the inputs from a fixed xorshift stream, runs forward and backward
// as the host code of gated_bag_cuda.cu would launch them, and writes inputs and outputs as raw
// float32 / int64 files for the test to compare with the reference.
#include "emulation.h"

#include "gated_bag_kernels.cuh"
#include "launch_shape.h"

using autoft::pick_group;


template <typename scalar_t, typename index_t, int VEC>
int run(int64_t B, int64_t V, int64_t D, bool hard, int noise_mode, int grad_mode, bool mean,
        bool with_weights, int64_t max_len, bool duplicates, uint64_t seed, float tau, bool with_gg,
        const std::string& out) {
  std::vector<int64_t> offsets(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = b == 1 ? 0 : static_cast<int64_t>(urand() * (max_len + 1)) % (max_len + 1);
    offsets[b + 1] = offsets[b] + len;
  }
  const int64_t L = offsets[B];
  const int64_t hot = static_cast<int64_t>(urand() * V) % V;
  std::vector<int64_t> values64(L);
  for (auto& v : values64) v = duplicates ? hot : static_cast<int64_t>(urand() * V) % V;
  std::vector<index_t> values(values64.begin(), values64.end());
  std::vector<float> weights(L);
  for (auto& w : weights) w = static_cast<float>(urand() + 0.5);
  std::vector<scalar_t> frozen(V * D), tuned(V * D);
  for (auto& x : frozen) x = static_cast<scalar_t>(static_cast<float>(nrand()));
  for (auto& x : tuned) x = static_cast<scalar_t>(static_cast<float>(nrand()));
  std::vector<float> logits(2 * B), uniforms(B), gg(2 * B), go(B * D);
  for (auto& x : logits) x = static_cast<float>(nrand());
  for (auto& x : uniforms) x = static_cast<float>(urand());
  for (auto& x : gg) x = static_cast<float>(nrand());
  for (auto& x : go) x = static_cast<float>(nrand());
  autoft::NoiseSource src{noise_mode != 0, seed, noise_mode == 2 ? uniforms.data() : nullptr};
  const int G = pick_group(D, VEC);
  const unsigned blocks = static_cast<unsigned>((B + kLookupsPerBlock - 1) / kLookupsPerBlock);
  const float* wp = with_weights ? weights.data() : nullptr;
  const float* ggp = with_gg ? gg.data() : nullptr;
  const bool wide = sizeof(index_t) == 8;
  std::vector<scalar_t> o(B * D);
  std::vector<float> gates(2 * B, -7.f), glog(2 * B, -7.f), dense(V * D, 0.f), value32(L * D, -7.f);
  std::vector<scalar_t> sparse(L * D);
  launch(blocks, bag_forward_kernel<scalar_t, VEC>, (const void*)values.data(), wide,
         (const int64_t*)offsets.data(), wp, mean, (const scalar_t*)frozen.data(),
         (const scalar_t*)tuned.data(), (const float*)logits.data(), src, tau, hard, B, D, G,
         o.data(), gates.data());
  if (grad_mode == 1) {
    launch(blocks, bag_backward_kernel<scalar_t, scalar_t, VEC, GradMode::kSparse>,
           (const float*)go.data(), ggp, (const void*)values.data(), wide,
           (const int64_t*)offsets.data(), wp, mean, (const scalar_t*)frozen.data(),
           (const scalar_t*)tuned.data(), (const float*)logits.data(), src, tau, hard, B, D, G,
           (float*)nullptr, sparse.data(), glog.data());
  } else if (grad_mode == 0) {
    launch(blocks, bag_backward_kernel<scalar_t, float, VEC, GradMode::kAtomic>,
           (const float*)go.data(), ggp, (const void*)values.data(), wide,
           (const int64_t*)offsets.data(), wp, mean, (const scalar_t*)frozen.data(),
           (const scalar_t*)tuned.data(), (const float*)logits.data(), src, tau, hard, B, D, G,
           dense.data(), (float*)nullptr, glog.data());
  } else {
    launch(blocks, bag_backward_kernel<scalar_t, float, VEC, GradMode::kDeterministic>,
           (const float*)go.data(), ggp, (const void*)values.data(), wide,
           (const int64_t*)offsets.data(), wp, mean, (const scalar_t*)frozen.data(),
           (const scalar_t*)tuned.data(), (const float*)logits.data(), src, tau, hard, B, D, G,
           (float*)nullptr, value32.data(), glog.data());
    std::vector<int64_t> order(L);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return values64[a] < values64[b]; });
    std::vector<int64_t> rows(L);
    for (int64_t q = 0; q < L; ++q) rows[q] = values64[order[q]];
    std::vector<float> ones(L, 1.0f);
    const int gpb = kThreads / G;
    if (L > 0) {
      const EmulatedPieces<float, VEC> pieces(rows.data(), order.data(), ones.data(), value32.data(), L,
                                              D, G, true);
      launch(static_cast<unsigned>((L + gpb - 1) / gpb), segment_sum_kernel<float, VEC>,
             (const int64_t*)rows.data(), (const int64_t*)order.data(), (const float*)ones.data(),
             (const float*)value32.data(), L, D, G, pieces.sum_ptr(), pieces.touched_ptr(),
             dense.data());
    }
  }
  dump(out + "/values.bin", values64);
  dump(out + "/offsets.bin", offsets);
  dump(out + "/weights.bin", weights);
  dump(out + "/frozen.bin", to_f(frozen.data(), frozen.size()));
  dump(out + "/tuned.bin", to_f(tuned.data(), tuned.size()));
  dump(out + "/logits.bin", logits);
  dump(out + "/uniforms.bin", uniforms);
  dump(out + "/gg.bin", gg);
  dump(out + "/go.bin", go);
  dump(out + "/out.bin", to_f(o.data(), o.size()));
  dump(out + "/gates.bin", gates);
  dump(out + "/glog.bin", glog);
  if (grad_mode == 1) dump(out + "/gtuned.bin", to_f(sparse.data(), sparse.size()));
  else dump(out + "/gtuned.bin", dense);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 18) {
    fprintf(stderr, "usage: see the comment at the top of emulate_bag_kernels.cpp\n");
    return 2;
  }
  const int64_t B = atoll(argv[1]), V = atoll(argv[2]), D = atoll(argv[3]);
  const int dt = atoi(argv[4]);
  const bool i64 = atoi(argv[5]), vec1 = atoi(argv[6]), hard = atoi(argv[7]);
  const int noise_mode = atoi(argv[8]), grad_mode = atoi(argv[9]);
  const bool mean = atoi(argv[10]), weights = atoi(argv[11]);
  const int64_t max_len = atoll(argv[12]);
  const bool dup = atoi(argv[13]);
  const uint64_t seed = strtoull(argv[14], nullptr, 10);
  const float tau = atof(argv[15]);
  const bool gg = atoi(argv[16]);
  const std::string out = argv[17];
  rng ^= seed * 2654435761ull + B;
  auto go = [&](auto table_tag, auto index_tag) {
    using S = decltype(table_tag);
    using I = decltype(index_tag);
    constexpr int VV = 16 / sizeof(S);
    const int vec = vec1 ? 1 : VV;
    if (D % vec != 0) { fprintf(stderr, "D not a multiple of the vector\n"); return 3; }
    return vec1 ? run<S, I, 1>(B, V, D, hard, noise_mode, grad_mode, mean, weights, max_len, dup, seed, tau, gg, out)
                : run<S, I, VV>(B, V, D, hard, noise_mode, grad_mode, mean, weights, max_len, dup, seed, tau, gg, out);
  };
  auto with_index = [&](auto t) { return i64 ? go(t, int64_t{}) : go(t, int32_t{}); };
  if (dt == 0) return with_index(float{});
  if (dt == 1) return with_index(c10::BFloat16{});
  return with_index(c10::Half{});
}
