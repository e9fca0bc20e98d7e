// Device code of the CUDA backend of the gated embedding op: the kernels and their helpers.
// The host side (checks, launch configuration, registration) is gated_embedding_cuda.cu, which
// describes the layout of the work and the gradient accumulation strategies.
//
// Device-only includes on purpose: this header needs nothing from ATen, so the kernels can
// also be compiled alone (for example by a host-side emulation of the launch grid in a test).
#pragma once

#include "../philox.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace autoft {
namespace gated_cuda {

constexpr int kThreads = 256;
constexpr int kLookupsPerBlock = 64;  // a multiple of 4: no Philox call straddles two blocks
constexpr int kGateThreads = kLookupsPerBlock / 4;

enum class GradMode : int { kAtomic = 0, kSparse = 1, kDeterministic = 2 };

// sigmoid(x), sigmoid(-x) and their product from one exp(-|x|): the product is formed
// directly, never as y * (1 - y), so it keeps its relative precision for a nearly certain gate.
// A NaN x gives NaN in all three (x >= 0 is false), and a hard gate then picks the frozen row.
struct SoftGate {
  float y0;
  float y1;
  float y0y1;
};

__device__ __forceinline__ SoftGate soft_gate(float x) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  const bool positive = x >= 0.0f;
  SoftGate s;
  s.y0 = positive ? e * r : r;
  s.y1 = positive ? r : e * r;
  s.y0y1 = e * r * r;
  return s;
}

struct NoiseArgs {
  bool noise;
  uint64_t seed;
  const float* uniforms;  // overrides the seed when not null
};

// Logistic noise of lookups n0 .. n0 + 3 (n0 % 4 == 0); entries past N are left 0.
__device__ __forceinline__ void group_noise(const NoiseArgs& src, int64_t n0, int64_t N,
                                            float l[4]) {
  l[0] = l[1] = l[2] = l[3] = 0.0f;
  if (!src.noise) {
    return;
  }
  if (src.uniforms != nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (n0 + k < N) {
        l[k] = logistic_noise(src.uniforms[n0 + k]);
      }
    }
  } else {
    const Philox4 r = philox4x32_10(src.seed, static_cast<uint64_t>(n0) >> 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      l[k] = logistic_noise(philox_uniform(r.w[k]));
    }
  }
}

// VEC consecutive elements <-> floats, in 16-byte transactions when VEC fills them (the host
// picks VEC > 1 only for 16-byte aligned rows), element by element otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[VEC]) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (VEC >= kPer16 && VEC % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / kPer16; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + c * kPer16);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) {
        v[c * kPer16 + i] = static_cast<float>(e[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] = static_cast<float>(p[i]);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[VEC]) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (VEC >= kPer16 && VEC % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / kPer16; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) {
        e[i] = static_cast<T>(v[c * kPer16 + i]);
      }
      *reinterpret_cast<uint4*>(p + c * kPer16) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      p[i] = static_cast<T>(v[i]);
    }
  }
}

// Sum over the G lanes of a group (G divides 32 and groups are lane-aligned, so xor offsets
// below G stay inside the group). Every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const index_t* __restrict__ indices, const scalar_t* __restrict__ frozen,
                   const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                   NoiseArgs src, float tau, bool hard, int64_t N, int64_t D, int G,
                   scalar_t* __restrict__ out, float* __restrict__ gates) {
  __shared__ float s_z0[kLookupsPerBlock];
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  if (threadIdx.x < kGateThreads) {
    const int64_t n0 = base + 4 * threadIdx.x;
    float l[4];
    group_noise(src, n0, N, l);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t n = n0 + k;
      const int j = 4 * threadIdx.x + k;
      if (n < N) {
        const SoftGate s = soft_gate((logits[2 * n + 1] - logits[2 * n] + l[k]) / tau);
        float z0 = s.y0;
        float z1 = s.y1;
        if (hard) {
          z1 = s.y1 > 0.5f ? 1.0f : 0.0f;
          z0 = 1.0f - z1;
        }
        gates[2 * n] = z0;
        gates[2 * n + 1] = z1;
        s_z0[j] = z0;
        s_z1[j] = z1;
        s_row[j] = static_cast<int64_t>(indices[n]);
      }
    }
  }
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const int64_t n = base + j;
    if (n >= N) {
      break;
    }
    const int64_t row = s_row[j];
    scalar_t* o = out + n * D;
    if (hard) {
      // Only the chosen row is read: the hard forward is a pure gather.
      const scalar_t* src_row = (s_z1[j] > 0.5f ? tuned : frozen) + row * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float v[VEC];
        load_floats<scalar_t, VEC>(src_row + c, v);
        store_floats<scalar_t, VEC>(o + c, v);
      }
    } else {
      const float z0 = s_z0[j];
      const float z1 = s_z1[j];
      const scalar_t* f_row = frozen + row * D;
      const scalar_t* t_row = tuned + row * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float f[VEC];
        float t[VEC];
        load_floats<scalar_t, VEC>(f_row + c, f);
        load_floats<scalar_t, VEC>(t_row + c, t);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          f[i] = z0 * f[i] + z1 * t[i];
        }
        store_floats<scalar_t, VEC>(o + c, f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, typename grad_t, int VEC, GradMode MODE>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const grad_t* __restrict__ grad_out, const float* __restrict__ grad_gates,
                    const index_t* __restrict__ indices, const scalar_t* __restrict__ frozen,
                    const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                    NoiseArgs src, float tau, bool hard, int64_t N, int64_t D, int G,
                    float* __restrict__ dense_grad,     // kAtomic: [V, D] float32, zeroed
                    scalar_t* __restrict__ sparse_grad,  // kSparse: [N, D]
                    float* __restrict__ z1_out,          // kDeterministic: [N]
                    float* __restrict__ grad_logits) {
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ float s_y0y1[kLookupsPerBlock];
  __shared__ float s_gate_term[kLookupsPerBlock];  // the grad_gates part of d logit1
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  if (threadIdx.x < kGateThreads) {
    const int64_t n0 = base + 4 * threadIdx.x;
    float l[4];
    group_noise(src, n0, N, l);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t n = n0 + k;
      const int j = 4 * threadIdx.x + k;
      if (n < N) {
        const SoftGate s = soft_gate((logits[2 * n + 1] - logits[2 * n] + l[k]) / tau);
        const float z1 = hard ? (s.y1 > 0.5f ? 1.0f : 0.0f) : s.y1;
        s_z1[j] = z1;
        s_y0y1[j] = s.y0y1;
        s_gate_term[j] =
            grad_gates != nullptr ? s.y0y1 * (grad_gates[2 * n + 1] - grad_gates[2 * n]) / tau : 0.0f;
        s_row[j] = static_cast<int64_t>(indices[n]);
        if constexpr (MODE == GradMode::kDeterministic) {
          z1_out[n] = z1;
        }
      }
    }
  }
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  // Every group runs the same number of iterations (powers of two), so the shuffles below see
  // whole warps; lookups past N contribute zeros instead of leaving the loop.
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const int64_t n = base + j;
    const bool valid = n < N;
    float a0 = 0.0f;
    float a1 = 0.0f;
    if (valid) {
      const int64_t row = s_row[j];
      const float z1 = s_z1[j];
      const scalar_t* f_row = frozen + row * D;
      const scalar_t* t_row = tuned + row * D;
      const grad_t* g_row = grad_out + n * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float g[VEC];
        float f[VEC];
        float t[VEC];
        load_floats<grad_t, VEC>(g_row + c, g);
        load_floats<scalar_t, VEC>(f_row + c, f);
        load_floats<scalar_t, VEC>(t_row + c, t);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          a0 += g[i] * f[i];
          a1 += g[i] * t[i];
          g[i] *= z1;
        }
        if constexpr (MODE == GradMode::kSparse) {
          store_floats<scalar_t, VEC>(sparse_grad + n * D + c, g);
        } else if constexpr (MODE == GradMode::kAtomic) {
          if (z1 != 0.0f) {  // a hard gate that chose the frozen row adds nothing
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              atomicAdd(dense_grad + row * D + c + i, g[i]);
            }
          }
        }
      }
    }
    a0 = group_sum(a0, G);
    a1 = group_sum(a1, G);
    if (valid && lane == 0) {
      const float d1 = s_y0y1[j] * (a1 - a0) / tau + s_gate_term[j];
      grad_logits[2 * n] = -d1;
      grad_logits[2 * n + 1] = d1;
    }
  }
}

// Deterministic dense gradient: sorted_rows / order come from a stable sort of the indices, so
// each row's lookups are contiguous and in lookup order. The group that finds the start of a
// segment sums it, alone and in order, and writes the row.
template <typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                       const float* __restrict__ z1, const grad_t* __restrict__ grad_out,
                       int64_t N, int64_t D, int G, float* __restrict__ dense_grad) {
  const int groups_per_block = kThreads / G;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (p >= N) {
    return;
  }
  const int64_t row = sorted_rows[p];
  if (p > 0 && sorted_rows[p - 1] == row) {
    return;
  }
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
    for (int64_t q = p; q < N && sorted_rows[q] == row; ++q) {
      const int64_t n = order[q];
      const float w = z1[n];
      if (w != 0.0f) {
        float g[VEC];
        load_floats<grad_t, VEC>(grad_out + n * D + c, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc[i] += w * g[i];
        }
      }
    }
    store_floats<float, VEC>(dense_grad + row * D + c, acc);
  }
}

}  // namespace gated_cuda
}  // namespace autoft
