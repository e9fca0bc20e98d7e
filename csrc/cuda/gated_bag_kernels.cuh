// Device code of the CUDA backend of the gated bag op (multi-hot fields, docs/op-contract.md
// "Bags"): bag b is values[offsets[b]:offsets[b + 1]], pooled by sum or mean, one gate per bag.
// The host side is gated_bag_cuda.cu. Like gated_embedding_kernels.cuh, whose gate stage, row
// chunks and group sums it reuses, it needs nothing from ATen, so the CPU emulation of the
// launch grid (emulation/emulate_bag_kernels.cpp) compiles it unchanged.
//
// Layout of the work: a block of 256 threads owns 64 consecutive bags. Stage 1 is the lookup
// kernels' gate stage with the bags as lookups (one Philox call per four bags, the contract's
// stream indexed by bag). Stage 2: groups of G lanes (as for lookups: G * VEC covers D, up to a
// warp) each take one bag at a time and walk its values in order, pooling the frozen and the
// tuned rows of their VEC columns in float32 registers; a hard forward reads only the chosen
// table's rows. The backward pools both tables again (straight-through: the logit gradient
// needs <g, F[b]> and <g, T[b]>) and, in the same walk, emits each value's tuned-row gradient
// z1[b] * c_i * g[b]: float32 atomics into a [V, D] table (kAtomic), one row per value in the
// table dtype (kSparse: uncoalesced COO rows, as the lookup backward's), or one float32 row per
// value that segment_sum_kernel then sums per table row in value order (kDeterministic).
#pragma once

#include "gated_embedding_kernels.cuh"

#include <cstdint>

namespace autoft {
namespace gated_cuda {

// c_i of value i of a bag of `count` values: w_i (sum) or w_i / len(bag) (mean); w_i = 1
// without per-sample weights. The same float32 operations as the CPU kernel.
__device__ __forceinline__ float bag_value_weight(const float* __restrict__ weights, int64_t i,
                                                  bool mean, int64_t count) {
  const float w = weights != nullptr ? weights[i] : 1.0f;
  return mean ? w / static_cast<float>(count) : w;
}

// The bag a group handles: its value range, or an empty one past the last bag (so that every
// group of a warp still reaches the backward's shuffles), and whether it is stored.
struct BagSlot {
  int64_t b;
  int64_t o0;
  int64_t o1;
  bool ok;

  __device__ __forceinline__ BagSlot(int j, int64_t base, int64_t B, const int64_t* offsets) {
    ok = base + j < B;
    b = ok ? base + j : 0;
    o0 = ok ? offsets[b] : 0;
    o1 = ok ? offsets[b + 1] : 0;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bag_forward_kernel(const void* __restrict__ values, bool idx64,
                       const int64_t* __restrict__ offsets, const float* __restrict__ weights,
                       bool mean, const scalar_t* __restrict__ frozen,
                       const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                       NoiseSource src, float tau, bool hard, int64_t B, int64_t D, int G,
                       scalar_t* __restrict__ out, float* __restrict__ gates) {
  __shared__ float s_z0[kLookupsPerBlock];
  __shared__ float s_z1[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  gate_stage(src, logits, tau, hard, base, B, [&](int j, int64_t b, float z0, float z1, float) {
    gates[2 * b] = z0;
    gates[2 * b + 1] = z1;
    s_z0[j] = z0;
    s_z1[j] = z1;
  });
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const BagSlot bag(j, base, B, offsets);
    if (!bag.ok) {
      break;  // no shuffles in the forward: a group past the last bag may stop
    }
    const float z0 = s_z0[j];
    const float z1 = s_z1[j];
    // A hard gate reads one table only (z is exactly (1, 0) or (0, 1) then).
    const bool read_frozen = !hard || z1 == 0.0f;
    const bool read_tuned = !hard || z1 != 0.0f;
    const int64_t count = bag.o1 - bag.o0;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      float pf[VEC];
      float pt[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        pf[k] = 0.0f;
        pt[k] = 0.0f;
      }
      for (int64_t i = bag.o0; i < bag.o1; ++i) {
        const int64_t row = read_index(values, idx64, i);
        const float w = bag_value_weight(weights, i, mean, count);
        if (read_frozen) {
          RowChunk<scalar_t, VEC> r;
          r.load(frozen + row * D + c);
          float v[VEC];
          r.to_floats(v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            pf[k] += w * v[k];
          }
        }
        if (read_tuned) {
          RowChunk<scalar_t, VEC> r;
          r.load(tuned + row * D + c);
          float v[VEC];
          r.to_floats(v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            pt[k] += w * v[k];
          }
        }
      }
      float o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = hard ? (read_tuned ? pt[k] : pf[k]) : z0 * pf[k] + z1 * pt[k];
      }
      store_floats<scalar_t, VEC>(out + bag.b * D + c, o);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// value_t: the per-value gradient rows' type (kSparse: the table dtype; kDeterministic: float;
// unused by kAtomic). grad_out arrives as float32 [B, D].
template <typename scalar_t, typename value_t, int VEC, GradMode MODE>
__global__ void __launch_bounds__(kThreads)
    bag_backward_kernel(const float* __restrict__ grad_out, const float* __restrict__ grad_gates,
                        const void* __restrict__ values, bool idx64,
                        const int64_t* __restrict__ offsets, const float* __restrict__ weights,
                        bool mean, const scalar_t* __restrict__ frozen,
                        const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                        NoiseSource src, float tau, bool hard, int64_t B, int64_t D, int G,
                        float* __restrict__ dense_grad,     // kAtomic: [V, D] float32, zeroed
                        value_t* __restrict__ value_grad,   // kSparse / kDeterministic: [L, D]
                        float* __restrict__ grad_logits) {
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ float s_y0y1[kLookupsPerBlock];
  __shared__ float s_gate_term[kLookupsPerBlock];  // the grad_gates part of d logit1
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  gate_stage(src, logits, tau, hard, base, B, [&](int j, int64_t b, float, float z1, float y0y1) {
    s_z1[j] = z1;
    s_y0y1[j] = y0y1;
    s_gate_term[j] =
        grad_gates != nullptr ? y0y1 * (grad_gates[2 * b + 1] - grad_gates[2 * b]) / tau : 0.0f;
  });
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  // Every group of a warp runs the same number of iterations (groups divides 64 or exceeds it
  // by whole warps), so the shuffles below see whole warps; a bag past B is walked as empty.
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const BagSlot bag(j, base, B, offsets);
    const float z1 = bag.ok ? s_z1[j] : 0.0f;
    const int64_t count = bag.o1 - bag.o0;
    float a0 = 0.0f;
    float a1 = 0.0f;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      float g[VEC];
      if (bag.ok) {
        RowChunk<float, VEC> raw;
        raw.load(grad_out + bag.b * D + c);
        raw.to_floats(g);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          g[k] = 0.0f;
        }
      }
      float pf[VEC];
      float pt[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        pf[k] = 0.0f;
        pt[k] = 0.0f;
      }
      for (int64_t i = bag.o0; i < bag.o1; ++i) {
        const int64_t row = read_index(values, idx64, i);
        const float w = bag_value_weight(weights, i, mean, count);
        RowChunk<scalar_t, VEC> f_raw;
        RowChunk<scalar_t, VEC> t_raw;
        f_raw.load(frozen + row * D + c);
        t_raw.load(tuned + row * D + c);
        float f[VEC];
        float t[VEC];
        f_raw.to_floats(f);
        t_raw.to_floats(t);
        const float cz = z1 * w;
        float v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pf[k] += w * f[k];
          pt[k] += w * t[k];
          v[k] = cz * g[k];
        }
        if constexpr (MODE == GradMode::kAtomic) {
          if (z1 != 0.0f) {  // a hard gate that chose the frozen rows adds nothing
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              atomicAdd(dense_grad + row * D + c + k, v[k]);
            }
          }
        } else {
          store_floats<value_t, VEC>(value_grad + i * D + c, v);
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a0 += g[k] * pf[k];
        a1 += g[k] * pt[k];
      }
    }
    a0 = group_sum(a0, G);
    a1 = group_sum(a1, G);
    if (bag.ok && lane == 0) {
      const float d1 = s_y0y1[j] * (a1 - a0) / tau + s_gate_term[j];
      grad_logits[2 * bag.b] = -d1;
      grad_logits[2 * bag.b + 1] = d1;
    }
  }
}

}  // namespace gated_cuda
}  // namespace autoft
