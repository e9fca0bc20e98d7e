// The CUDA stand-ins of the launch-grid emulation (see emulate_kernels.cpp): threadIdx and
// blockIdx per std::thread, a barrier per block for __syncthreads, a barrier per warp around
// each shuffle and for __syncwarp, std::atomic_ref for atomicAdd, a function-level static for __shared__ memory
// (blocks run one after another), and the inputs' random stream and raw file output. Include
// it before a kernel header; shared by emulate_kernels.cpp and emulate_bag_kernels.cpp.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

struct dim3x { unsigned x, y, z; };
thread_local dim3x threadIdx, blockIdx;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
struct alignas(16) uint4 { unsigned x, y, z, w; };
std::barrier<>* g_block_barrier;
std::barrier<>* g_warp_barriers[8];
float g_warp_buf[8][32];
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int t = threadIdx.x, w = t / 32, l = t % 32;
  g_warp_buf[w][l] = v;
  g_warp_barriers[w]->arrive_and_wait();
  const float r = g_warp_buf[w][l ^ off];
  g_warp_barriers[w]->arrive_and_wait();
  return r;
}
inline void __syncwarp() { g_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

#include "gated_embedding_kernels.cuh"

using namespace autoft::gated_cuda;

template <typename K, typename... Args>
void launch(unsigned blocks, K kernel, Args... args) {
  for (unsigned b = 0; b < blocks; ++b) {
    std::barrier<> bb(kThreads);
    g_block_barrier = &bb;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (int w = 0; w < kThreads / 32; ++w) {
      wb.emplace_back(new std::barrier<>(32));
      g_warp_barriers[w] = wb.back().get();
    }
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < kThreads; ++t) {
      ts.emplace_back([=] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        kernel(args...);
      });
    }
    for (auto& t : ts) t.join();
  }
}

// The long segments' pieces as segment_pieces.cuh launches them: slots only past one window.
template <typename grad_t, int VEC>
struct EmulatedPieces {
  std::vector<float> sum;
  std::vector<int> touched;
  EmulatedPieces(const int64_t* rows, const int64_t* order, const float* z1, const grad_t* grad,
                 int64_t N, int64_t D, int G, bool skip_zero) {
    if (N <= kSegmentWindow) return;
    const int64_t slots = 2 * segment_windows(N);
    sum.assign(slots * D, -7.f);  // never read unless written
    touched.assign(slots, -7);
    const int gpb = kThreads / G;
    launch(static_cast<unsigned>((slots + gpb - 1) / gpb), segment_pieces_kernel<grad_t, VEC>,
           rows, order, z1, grad, N, D, G, skip_zero, sum.data(), touched.data());
  }
  const float* sum_ptr() const { return sum.empty() ? nullptr : sum.data(); }
  const int* touched_ptr() const { return touched.empty() ? nullptr : touched.data(); }
};

static uint64_t rng = 88172645463325252ull;
double urand() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (rng >> 11) * (1.0 / 9007199254740992.0); }
double nrand() { double u1 = std::max(urand(), 1e-12), u2 = urand(); return std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2); }

template <typename T> void dump(const std::string& path, const std::vector<T>& v) {
  FILE* f = fopen(path.c_str(), "wb"); fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
template <typename T> std::vector<float> to_f(const T* p, size_t n) {
  std::vector<float> r(n); for (size_t i = 0; i < n; ++i) r[i] = static_cast<float>(p[i]); return r;
}

