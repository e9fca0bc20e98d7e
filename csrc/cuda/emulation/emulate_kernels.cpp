// Runs the CUDA backend's kernels (gated_embedding_kernels.cuh, unchanged) on the CPU by
// emulating their launch grid, so that CI without a GPU tests the kernels' logic and not only
// that they compile: one std::thread per CUDA thread, a barrier per block for __syncthreads, a
// barrier per warp around each shuffle (a lane that skipped a shuffle its warp runs would hang
// here, as it is undefined on the device), std::atomic_ref for atomicAdd. Blocks run one after
// another, so a function-level static stands in for __shared__ memory.
//
// Driven by python_tests/test_cuda_specific.py, which builds it with the host compiler:
//   emulate_kernels N V D dtype(0 f32, 1 bf16, 2 f16) idx64 grad_f32 vec1 hard noise(0 none,
//                   1 seed, 2 uniforms) mode(0 atomic, 1 sparse, 2 deterministic, 3 deterministic
//                   on three hot rows, 4 + r the fused optimizer's update by rule r: 4 sgd,
//                   5 rowwise_adagrad, 6 adam, at step 3 with lr 0.05 from a random state;
//                   7 + r that update on three hot rows)
//                   seed tau with_grad_gates out_dir
// It draws the inputs from a fixed xorshift stream, runs forward and backward as the host code
// of gated_embedding_cuda.cu would launch them, and writes inputs and outputs as raw float32 /
// int64 files for the test to compare with the reference.
#include "emulation.h"
#include "launch_shape.h"

using autoft::pick_group;

// Same rule as the host code: four lookups in flight per group when each group walks at least
// four.
int pick_unroll(int G) { return kLookupsPerBlock / (kThreads / G) >= 4 ? 4 : 1; }

template <typename scalar_t, typename index_t, typename grad_t, int VEC, int U>
int run(int64_t N, int64_t V, int64_t D, bool hard, int noise_mode, int mode, uint64_t seed,
        float tau, bool with_gg, const std::string& out) {
  std::vector<int64_t> idx64(N);
  for (auto& i : idx64) i = static_cast<int64_t>(urand() * V) % V;
  if (mode == 3 || mode >= 7) for (auto& i : idx64) i %= 3;  // hot rows
  std::vector<index_t> idx(idx64.begin(), idx64.end());
  std::vector<scalar_t> frozen(V * D), tuned(V * D);
  for (auto& x : frozen) x = static_cast<scalar_t>(static_cast<float>(nrand()));
  for (auto& x : tuned) x = static_cast<scalar_t>(static_cast<float>(nrand()));
  std::vector<float> logits(2 * N), uniforms(N), gg(2 * N);
  for (auto& x : logits) x = static_cast<float>(nrand());
  for (auto& x : uniforms) x = static_cast<float>(urand());
  for (auto& x : gg) x = static_cast<float>(nrand());
  std::vector<grad_t> go(N * D);
  for (auto& x : go) x = static_cast<grad_t>(static_cast<float>(nrand()));
  autoft::NoiseSource src{noise_mode != 0, seed, noise_mode == 2 ? uniforms.data() : nullptr};
  const int G = pick_group(D, VEC);
  const unsigned blocks = static_cast<unsigned>((N + kLookupsPerBlock - 1) / kLookupsPerBlock);
  std::vector<scalar_t> o(N * D);
  std::vector<float> gates(2 * N, -7.f), glog(2 * N, -7.f), dense(V * D, 0.f), z1(N, -7.f);
  std::vector<scalar_t> sparse(N * D);
  const std::vector<scalar_t> tuned0 = tuned;  // the update (modes 4..6) rewrites `tuned`
  const int rule = mode >= 4 ? (mode - 4) % 3 : -1;
  std::vector<float> state_a(rule == 1 ? V : V * D), state_b(V * D);
  for (auto& x : state_a) x = static_cast<float>(rule == 1 ? urand() : 0.1 * nrand());
  for (auto& x : state_b) x = static_cast<float>(0.1 * urand());
  const std::vector<float> state_a0 = state_a, state_b0 = state_b;
  const bool wide_idx = sizeof(index_t) == 8;
  if (pick_unroll(G) != U) return 4;  // the caller instantiates the host's choice
  launch(blocks, forward_kernel<scalar_t, VEC, U>, (const void*)idx.data(), wide_idx, frozen.data(), tuned.data(),
         logits.data(), src, tau, hard, N, D, G, o.data(), gates.data());
  const float* ggp = with_gg ? gg.data() : nullptr;
  if (mode == 1) {
    launch(blocks, backward_kernel<scalar_t, grad_t, VEC, U, GradMode::kSparse>, go.data(), ggp,
           (const void*)idx.data(), wide_idx, frozen.data(), tuned.data(), logits.data(), src, tau, hard, N, D, G,
           (float*)nullptr, sparse.data(), (float*)nullptr, glog.data());
  } else if (mode == 0) {
    launch(blocks, backward_kernel<scalar_t, grad_t, VEC, U, GradMode::kAtomic>, go.data(), ggp,
           (const void*)idx.data(), wide_idx, frozen.data(), tuned.data(), logits.data(), src, tau, hard, N, D, G,
           dense.data(), (scalar_t*)nullptr, (float*)nullptr, glog.data());
  } else {
    launch(blocks, backward_kernel<scalar_t, grad_t, VEC, U, GradMode::kDeterministic>, go.data(), ggp,
           (const void*)idx.data(), wide_idx, frozen.data(), tuned.data(), logits.data(), src, tau, hard, N, D, G,
           (float*)nullptr, (scalar_t*)nullptr, z1.data(), glog.data());
    std::vector<int64_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx64[a] < idx64[b]; });
    std::vector<int64_t> rows(N);
    for (int64_t q = 0; q < N; ++q) rows[q] = idx64[order[q]];
    const int gpb = kThreads / G;
    if (mode >= 4) {
      // As gated_embedding_bwd_update_cuda: rule_hyper's formulas, step 3.
      const double lr = 0.05, beta1 = 0.9, beta2 = 0.999, step = 3;
      RowRule u;
      u.rule = rule;
      u.lr = static_cast<float>(lr);
      u.eps = rule == 2 ? 1e-8f : (rule == 1 ? 1e-10f : 0.0f);
      u.one_minus_beta1 = static_cast<float>(1.0 - beta1);
      u.one_minus_beta2 = static_cast<float>(1.0 - beta2);
      u.neg_step_size = static_cast<float>(
          -(lr * std::sqrt(1.0 - std::pow(beta2, step)) / (1.0 - std::pow(beta1, step))));
      u.state_a = state_a.data();
      u.state_b = state_b.data();
      const EmulatedPieces<grad_t, VEC> pieces(rows.data(), order.data(), z1.data(), go.data(), N, D, G,
                                               hard);
      launch(static_cast<unsigned>((N + gpb - 1) / gpb), segment_update_kernel<scalar_t, grad_t, VEC>,
             (const int64_t*)rows.data(), (const int64_t*)order.data(), (const float*)z1.data(),
             (const grad_t*)go.data(), N, D, G, hard, u, pieces.sum_ptr(), pieces.touched_ptr(),
             tuned.data());
    } else {
      const EmulatedPieces<grad_t, VEC> pieces(rows.data(), order.data(), z1.data(), go.data(), N, D, G,
                                               true);
      launch(static_cast<unsigned>((N + gpb - 1) / gpb), segment_sum_kernel<grad_t, VEC>,
             (const int64_t*)rows.data(), (const int64_t*)order.data(), (const float*)z1.data(),
             (const grad_t*)go.data(), N, D, G, pieces.sum_ptr(), pieces.touched_ptr(), dense.data());
    }
  }
  dump(out + "/idx.bin", idx64);
  dump(out + "/frozen.bin", to_f(frozen.data(), frozen.size()));
  dump(out + "/tuned.bin", to_f(tuned0.data(), tuned0.size()));
  if (mode >= 4) {
    dump(out + "/tuned_new.bin", to_f(tuned.data(), tuned.size()));
    dump(out + "/state_a0.bin", state_a0);
    dump(out + "/state_b0.bin", state_b0);
    dump(out + "/state_a.bin", state_a);
    dump(out + "/state_b.bin", state_b);
  }
  dump(out + "/logits.bin", logits);
  dump(out + "/uniforms.bin", uniforms);
  dump(out + "/gg.bin", gg);
  dump(out + "/go.bin", to_f(go.data(), go.size()));
  dump(out + "/out.bin", to_f(o.data(), o.size()));
  dump(out + "/gates.bin", gates);
  dump(out + "/glog.bin", glog);
  if (mode == 1) dump(out + "/gtuned.bin", to_f(sparse.data(), sparse.size()));
  else dump(out + "/gtuned.bin", dense);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 15) {
    fprintf(stderr, "usage: see the comment at the top of emulate_kernels.cpp\n");
    return 2;
  }
  const int64_t N = atoll(argv[1]), V = atoll(argv[2]), D = atoll(argv[3]);
  const int dt = atoi(argv[4]); const bool i64 = atoi(argv[5]), gf32 = atoi(argv[6]), vec1 = atoi(argv[7]);
  const bool hard = atoi(argv[8]); const int noise_mode = atoi(argv[9]), mode = atoi(argv[10]);
  const uint64_t seed = strtoull(argv[11], nullptr, 10); const float tau = atof(argv[12]);
  const bool gg = atoi(argv[13]); const std::string out = argv[14];
  rng ^= seed * 2654435761ull + N;
  auto go = [&](auto table_tag, auto index_tag, auto grad_tag) {
    using S = decltype(table_tag); using I = decltype(index_tag); using Gt = decltype(grad_tag);
    constexpr int VV = 16 / sizeof(S);
    const int vec = vec1 ? 1 : VV;
    if (D % vec != 0) { fprintf(stderr, "D not a multiple of the vector\n"); return 3; }
    const bool u4 = pick_unroll(pick_group(D, vec)) == 4;
    if (vec1) {
      return u4 ? run<S, I, Gt, 1, 4>(N, V, D, hard, noise_mode, mode, seed, tau, gg, out)
                : run<S, I, Gt, 1, 1>(N, V, D, hard, noise_mode, mode, seed, tau, gg, out);
    }
    return u4 ? run<S, I, Gt, VV, 4>(N, V, D, hard, noise_mode, mode, seed, tau, gg, out)
              : run<S, I, Gt, VV, 1>(N, V, D, hard, noise_mode, mode, seed, tau, gg, out);
  };
  auto with_index = [&](auto t) {
    using S = decltype(t);
    auto with_grad = [&](auto it) { return gf32 ? go(t, it, float{}) : go(t, it, S{}); };
    return i64 ? with_grad(int64_t{}) : with_grad(int32_t{});
  };
  if (dt == 0) return with_index(float{});
  if (dt == 1) return with_index(c10::BFloat16{});
  return with_index(c10::Half{});
}
