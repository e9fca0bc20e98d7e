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

// Logistic noise of lookups n0 .. n0 + 3 (n0 % 4 == 0); entries past N are left 0.
__device__ __forceinline__ void group_noise(const NoiseSource& src, int64_t n0, int64_t N,
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

// The gate stage of both kernels, written once: the first kGateThreads threads of a block each
// take four consecutive lookups (one Philox call), form x = (d + l) / tau and its soft gates,
// and the hard choice by the contract's rule x > 0 (NaN and an exact tie pick the frozen row).
// `visit(j, n, z0, z1, y0y1)` stores what a kernel keeps of lookup n (slot j of the block).
template <typename Visit>
__device__ __forceinline__ void gate_stage(const NoiseSource& src, const float* __restrict__ logits,
                                           float tau, bool hard, int64_t base, int64_t N,
                                           Visit&& visit) {
  if (threadIdx.x >= kGateThreads) {
    return;
  }
  const int64_t n0 = base + 4 * threadIdx.x;
  float l[4];
  group_noise(src, n0, N, l);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t n = n0 + k;
    if (n < N) {
      const float x = (logits[2 * n + 1] - logits[2 * n] + l[k]) / tau;
      const SoftGate s = soft_gate(x);
      const float z1 = hard ? (x > 0.0f ? 1.0f : 0.0f) : s.y1;
      const float z0 = hard ? 1.0f - z1 : s.y0;
      visit(4 * static_cast<int>(threadIdx.x) + k, n, z0, z1, s.y0y1);
    }
  }
}

// VEC consecutive elements of a row, kept in their storage type so that a load is only issued
// here and waited for where the values are first used: the U rows a lane fetches are then all in
// flight at once. 16-byte transactions when VEC fills them (the host picks VEC > 1 only for
// 16-byte aligned rows), element by element otherwise.
template <typename T, int VEC>
struct RowChunk {
  static constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  static constexpr bool kVector = VEC >= kPer16 && VEC % kPer16 == 0;
  static constexpr int kWords = kVector ? VEC / kPer16 : 1;
  uint4 raw[kWords];
  T elem[kVector ? 1 : VEC];

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVector) {
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        raw[w] = reinterpret_cast<const uint4*>(p)[w];
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        elem[i] = p[i];
      }
    }
  }

  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kVector) {
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        reinterpret_cast<uint4*>(p)[w] = raw[w];
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        p[i] = elem[i];
      }
    }
  }

  __device__ __forceinline__ void to_floats(float (&v)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if constexpr (kVector) {
        v[i] = static_cast<float>(reinterpret_cast<const T*>(raw)[i]);
      } else {
        v[i] = static_cast<float>(elem[i]);
      }
    }
  }
};

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
      reinterpret_cast<uint4*>(p)[c] = raw;
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

// Indices arrive as int32 or int64; only stage 1 reads them, so a runtime switch is cheaper
// than doubling every kernel instantiation.
__device__ __forceinline__ int64_t read_index(const void* indices, bool idx64, int64_t n) {
  return idx64 ? static_cast<const int64_t*>(indices)[n]
               : static_cast<int64_t>(static_cast<const int32_t*>(indices)[n]);
}

// The U lookups a group handles together in stage 2: lookup j0 + u * groups of the block. A
// lookup past the batch reads row 0 and lookup 0 (both exist: N > 0, and the host's range check
// then implies V > 0) and is never stored, so that the loads stay unconditional.
template <int U>
struct LookupSet {
  int64_t n[U];
  int64_t row[U];
  bool ok[U];

  __device__ __forceinline__ LookupSet(int j0, int groups, int64_t base, int64_t N,
                                       const int64_t* s_row) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * groups;
      ok[u] = j < kLookupsPerBlock && base + j < N;
      n[u] = ok[u] ? base + j : 0;
      row[u] = ok[u] ? s_row[j] : 0;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// U lookups in flight per group (1 or 4, chosen by the host so that every group runs the same
// number of iterations).
template <typename scalar_t, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const void* __restrict__ indices, bool idx64,
                   const scalar_t* __restrict__ frozen, const scalar_t* __restrict__ tuned,
                   const float* __restrict__ logits, NoiseSource src, float tau, bool hard,
                   int64_t N, int64_t D, int G, scalar_t* __restrict__ out,
                   float* __restrict__ gates) {
  __shared__ float s_z0[kLookupsPerBlock];
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  gate_stage(src, logits, tau, hard, base, N, [&](int j, int64_t n, float z0, float z1, float) {
    gates[2 * n] = z0;
    gates[2 * n + 1] = z1;
    s_z0[j] = z0;
    s_z1[j] = z1;
    s_row[j] = read_index(indices, idx64, n);
  });
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  for (int j0 = group; j0 < kLookupsPerBlock; j0 += groups * U) {
    const LookupSet<U> set(j0, groups, base, N, s_row);
    float z0[U];
    float z1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = set.ok[u] ? j0 + u * groups : 0;
      z0[u] = s_z0[j];
      z1[u] = s_z1[j];
    }
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      if (hard) {
        // Only the chosen row is read, and copied bit for bit: the hard forward is a gather.
        RowChunk<scalar_t, VEC> r[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          r[u].load((z1[u] > 0.5f ? tuned : frozen) + set.row[u] * D + c);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (set.ok[u]) {
            r[u].store(out + set.n[u] * D + c);
          }
        }
      } else {
        RowChunk<scalar_t, VEC> f[U];
        RowChunk<scalar_t, VEC> t[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          f[u].load(frozen + set.row[u] * D + c);
          t[u].load(tuned + set.row[u] * D + c);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float a[VEC];
          float b[VEC];
          f[u].to_floats(a);
          t[u].to_floats(b);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            a[i] = z0[u] * a[i] + z1[u] * b[i];
          }
          if (set.ok[u]) {
            store_floats<scalar_t, VEC>(out + set.n[u] * D + c, a);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename grad_t, int VEC, int U, GradMode MODE>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const grad_t* __restrict__ grad_out, const float* __restrict__ grad_gates,
                    const void* __restrict__ indices, bool idx64,
                    const scalar_t* __restrict__ frozen, const scalar_t* __restrict__ tuned,
                    const float* __restrict__ logits, NoiseSource src, float tau, bool hard,
                    int64_t N, int64_t D, int G,
                    float* __restrict__ dense_grad,     // kAtomic: [V, D] float32, zeroed
                    scalar_t* __restrict__ sparse_grad,  // kSparse: [N, D]
                    float* __restrict__ z1_out,          // kDeterministic: [N]
                    float* __restrict__ grad_logits) {
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ float s_y0y1[kLookupsPerBlock];
  __shared__ float s_gate_term[kLookupsPerBlock];  // the grad_gates part of d logit1
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  gate_stage(src, logits, tau, hard, base, N, [&](int j, int64_t n, float, float z1, float y0y1) {
    s_z1[j] = z1;
    s_y0y1[j] = y0y1;
    s_gate_term[j] =
        grad_gates != nullptr ? y0y1 * (grad_gates[2 * n + 1] - grad_gates[2 * n]) / tau : 0.0f;
    s_row[j] = read_index(indices, idx64, n);
    if constexpr (MODE == GradMode::kDeterministic) {
      z1_out[n] = z1;
    }
  });
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  // Every group runs the same number of iterations (the host picks U so), so the shuffles below
  // see whole warps; lookups past N are computed on stand-in rows and never written.
  for (int j0 = group; j0 < kLookupsPerBlock; j0 += groups * U) {
    const LookupSet<U> set(j0, groups, base, N, s_row);
    float z1[U];
    float a0[U];
    float a1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      z1[u] = s_z1[set.ok[u] ? j0 + u * groups : 0];
      a0[u] = 0.0f;
      a1[u] = 0.0f;
    }
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      RowChunk<grad_t, VEC> g_raw[U];
      RowChunk<scalar_t, VEC> f_raw[U];
      RowChunk<scalar_t, VEC> t_raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        g_raw[u].load(grad_out + set.n[u] * D + c);
        f_raw[u].load(frozen + set.row[u] * D + c);
        t_raw[u].load(tuned + set.row[u] * D + c);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float g[VEC];
        float f[VEC];
        float t[VEC];
        g_raw[u].to_floats(g);
        f_raw[u].to_floats(f);
        t_raw[u].to_floats(t);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          a0[u] += g[i] * f[i];
          a1[u] += g[i] * t[i];
          g[i] *= z1[u];
        }
        if constexpr (MODE == GradMode::kSparse) {
          if (set.ok[u]) {
            store_floats<scalar_t, VEC>(sparse_grad + set.n[u] * D + c, g);
          }
        } else if constexpr (MODE == GradMode::kAtomic) {
          if (set.ok[u] && z1[u] != 0.0f) {  // a hard gate that chose the frozen row adds nothing
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              atomicAdd(dense_grad + set.row[u] * D + c + i, g[i]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      a0[u] = group_sum(a0[u], G);
      a1[u] = group_sum(a1[u], G);
      if (set.ok[u] && lane == 0) {
        const int j = j0 + u * groups;
        const float d1 = s_y0y1[j] * (a1[u] - a0[u]) / tau + s_gate_term[j];
        grad_logits[2 * set.n[u]] = -d1;
        grad_logits[2 * set.n[u] + 1] = d1;
      }
    }
  }
}

// Long segments. The sorted lookups are cut into windows of kSegmentWindow positions. A row's
// segment that lies inside one window is summed by one group, alone and in lookup order. A
// segment that crosses a window boundary (a hot row: a field of few values, or every lookup on
// one row) would make that one group walk it serially while the rest of the grid idles, so it
// is summed in pieces instead: its run within each window is one piece, which
// segment_pieces_kernel sums in lookup order into a float32 slot, and the segment's group adds
// its piece sums in window order. The serial walk is then at most kSegmentWindow lookups plus
// one slot per window. Run-to-run identity holds (the cut depends only on the sort); only a
// segment that crosses a boundary is summed in another order than one serial sum (float32
// rounding). Slots, two per window w: 2w for the piece that starts at the window's first
// position (when its segment crosses a boundary), 2w + 1 for the piece of the window's last
// segment when that segment starts after the window's first position and runs on into the
// next window.
constexpr int64_t kSegmentWindow = 128;

__host__ __device__ __forceinline__ int64_t segment_windows(int64_t N) {
  return (N + kSegmentWindow - 1) / kSegmentWindow;
}

// acc += w * p[0 .. VEC).
template <typename T, int VEC>
__device__ __forceinline__ void add_chunk(const T* p, float w, float (&acc)[VEC]) {
  RowChunk<T, VEC> raw;
  raw.load(p);
  float v[VEC];
  raw.to_floats(v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    acc[i] += w * v[i];
  }
}

// acc += w * grad[n] over chunk [c, c + VEC) of the lookups n = order[q] at the sorted
// positions q = begin, begin + 1, ... below `limit` that hold `row`, in that order (w = z1[n],
// or 1 without z1). `skip_zero`: a lookup of weight 0 adds nothing and does not touch.
// Returns whether a lookup touched.
template <typename grad_t, int VEC>
__device__ __forceinline__ bool add_run(const int64_t* __restrict__ sorted_rows,
                                        const int64_t* __restrict__ order,
                                        const float* __restrict__ z1,
                                        const grad_t* __restrict__ grad, int64_t D, int64_t row,
                                        int64_t begin, int64_t limit, int64_t c, bool skip_zero,
                                        float (&acc)[VEC]) {
  bool touched = false;
  for (int64_t q = begin; q < limit && sorted_rows[q] == row; ++q) {
    const int64_t n = order[q];
    const float w = z1 != nullptr ? z1[n] : 1.0f;
    if (skip_zero && w == 0.0f) {
      continue;
    }
    touched = true;
    add_chunk<grad_t, VEC>(grad + n * D + c, w, acc);
  }
  return touched;
}

// The first slot of the segment of `row` that starts at sorted position p, or -1 when the
// segment lies inside one window (then it is summed serially).
__device__ __forceinline__ int64_t first_piece_slot(const int64_t* __restrict__ sorted_rows,
                                                    int64_t N, int64_t p, int64_t row) {
  const int64_t w = p / kSegmentWindow;
  const int64_t next = (w + 1) * kSegmentWindow;
  if (next >= N || sorted_rows[next] != row) {
    return -1;
  }
  return p == w * kSegmentWindow ? 2 * w : 2 * w + 1;
}

// acc += the piece sums of chunk [c, c + VEC) of the long segment of `row` that starts at p,
// in window order from slot `first`; returns whether a piece was touched.
template <int VEC>
__device__ __forceinline__ bool add_pieces(const int64_t* __restrict__ sorted_rows, int64_t N,
                                           int64_t D, int64_t p, int64_t row, int64_t first,
                                           const float* __restrict__ piece_sum,
                                           const int* __restrict__ piece_touched, int64_t c,
                                           float (&acc)[VEC]) {
  bool touched = false;
  int64_t slot = first;
  for (int64_t w = p / kSegmentWindow + 1;; ++w) {
    touched = touched || piece_touched[slot] != 0;
    add_chunk<float, VEC>(piece_sum + slot * D + c, 1.0f, acc);
    if (w * kSegmentWindow >= N || sorted_rows[w * kSegmentWindow] != row) {
      return touched;
    }
    slot = 2 * w;
  }
}

// The pieces of the long segments: group g takes slot g (window g / 2) and, when the slot
// belongs to a segment that crosses a window boundary, sums that piece's weighted rows
// w * grad[n] (w = z1[n], or 1 without z1) in lookup order into piece_sum[g] and writes
// piece_touched[g]. `skip_zero`: a lookup of weight 0 adds nothing and does not touch.
// Launched over 2 * segment_windows(N) groups before the segment kernels, when N exceeds a
// window; slots of no long segment are neither written nor read.
template <typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_pieces_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                          const float* __restrict__ z1, const grad_t* __restrict__ grad, int64_t N,
                          int64_t D, int G, bool skip_zero, float* __restrict__ piece_sum,
                          int* __restrict__ piece_touched) {
  const int groups_per_block = kThreads / G;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (g >= 2 * segment_windows(N)) {
    return;
  }
  const int64_t w0 = (g / 2) * kSegmentWindow;
  const int64_t w1 = w0 + kSegmentWindow < N ? w0 + kSegmentWindow : N;
  // The piece: the positions from `begin` on that hold `row`, up to the window's end.
  int64_t begin;
  int64_t row;
  if (g % 2 == 0) {
    row = sorted_rows[w0];
    const bool from_before = w0 > 0 && sorted_rows[w0 - 1] == row;
    const bool into_next = w1 < N && sorted_rows[w1] == row;
    if (!from_before && !into_next) {
      return;  // a segment inside this window: its own group sums it
    }
    begin = w0;
  } else {
    if (w1 >= N) {
      return;
    }
    row = sorted_rows[w1 - 1];
    if (sorted_rows[w1] != row) {
      return;  // the window's last segment ends in it
    }
    begin = w1 - 1;
    while (begin > w0 && sorted_rows[begin - 1] == row) {
      --begin;
    }
    if (begin == w0) {
      return;  // that segment's piece in this window is slot 2w
    }
  }
  bool touched = false;
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
    touched = add_run<grad_t, VEC>(sorted_rows, order, z1, grad, D, row, begin, w1, c,
                                   skip_zero, acc) || touched;
    store_floats<float, VEC>(piece_sum + g * D + c, acc);
  }
  if (lane == 0) {
    piece_touched[g] = touched ? 1 : 0;
  }
}

// Deterministic dense gradient: sorted_rows / order come from a stable sort of the indices, so
// each row's lookups are contiguous and in lookup order. The group that finds the start of a
// segment sums it, alone and in order (a long segment from its piece sums), and writes the row.
template <typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                       const float* __restrict__ z1, const grad_t* __restrict__ grad_out,
                       int64_t N, int64_t D, int G, const float* __restrict__ piece_sum,
                       const int* __restrict__ piece_touched, float* __restrict__ dense_grad) {
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
  const int64_t first = first_piece_slot(sorted_rows, N, p, row);
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
    if (first >= 0) {
      add_pieces<VEC>(sorted_rows, N, D, p, row, first, piece_sum, piece_touched, c, acc);
    } else {
      add_run<grad_t, VEC>(sorted_rows, order, z1, grad_out, D, row, p, N, c,
                           /*skip_zero=*/true, acc);
    }
    store_floats<float, VEC>(dense_grad + row * D + c, acc);
  }
}

// The fused optimizer's rule (ops/fused_optim.py RULES; rule 0 sgd, 1 rowwise_adagrad, 2 adam)
// with the hyperparameters as the CPU kernel forms them (make_row_update).
struct RowRule {
  int rule;
  float lr, eps, one_minus_beta1, one_minus_beta2, neg_step_size;  // adam: -lr sqrt(bc2) / bc1
  float* state_a;  // adagrad: sum [V]; adam: exp_avg [V, D]
  float* state_b;  // adam: exp_avg_sq [V, D]
};

// The fused optimizer's update: sorted_rows / order come from a stable sort of the lookups by
// row, so each row's lookups are contiguous and in lookup order. The group that finds the start
// of a segment sums its weighted gradients w * grad[n] (w = z1[n], or 1 without z1) alone and in
// order, and updates the row of `weight` and of the rule's state in place with the CPU kernel's
// float32 formulas (apply_row_update); a long segment adds its piece sums instead (see
// kSegmentWindow). `hard`: a lookup of weight 0 adds nothing, and a row whose every lookup has
// weight 0 (its hard gates all chose the frozen row) is left as it is.
// Row-wise Adagrad sums the squares of the row over the group's lanes (every lane of a warp
// reaches that shuffle), then sums the segment a second time, in the same order, to update.
template <typename scalar_t, typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_update_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                          const float* __restrict__ z1, const grad_t* __restrict__ grad,
                          int64_t N, int64_t D, int G, bool hard, RowRule u,
                          const float* __restrict__ piece_sum,
                          const int* __restrict__ piece_touched, scalar_t* __restrict__ weight) {
  const int groups_per_block = kThreads / G;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const bool starts = p < N && (p == 0 || sorted_rows[p - 1] != sorted_rows[p]);
  const int64_t row = starts ? sorted_rows[p] : -1;
  bool touched = false;
  const int64_t first = starts ? first_piece_slot(sorted_rows, N, p, row) : -1;
  // acc = the segment's sum of chunk [c, c + VEC).
  auto segment_sum = [&](int64_t c, float (&acc)[VEC]) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
    if (first >= 0) {
      touched = add_pieces<VEC>(sorted_rows, N, D, p, row, first, piece_sum, piece_touched, c,
                                acc) || touched;
      return;
    }
    touched = add_run<grad_t, VEC>(sorted_rows, order, z1, grad, D, row, p, N, c, hard, acc) ||
              touched;
  };
  const int64_t stride = static_cast<int64_t>(G) * VEC;
  float denom = 1.0f;
  if (u.rule == 1) {
    // Every lane reads the row's sum before the warp barrier below and lane 0 writes it after,
    // so no lane sees the new value.
    const float old_sum = starts ? u.state_a[row] : 0.0f;
    float sq = 0.0f;
    if (starts) {
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += stride) {
        float acc[VEC];
        segment_sum(c, acc);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sq += acc[i] * acc[i];
        }
      }
    }
    sq = group_sum(sq, G);
    // The shuffle orders no memory access: the barrier makes every lane's read of the old sum
    // happen before lane 0's write (all 32 lanes of the warp arrive here).
    __syncwarp();
    const float a = old_sum + sq / static_cast<float>(D);
    if (starts && (touched || !hard) && lane == 0) {
      u.state_a[row] = a;
    }
    denom = sqrtf(a) + u.eps;
  }
  if (!starts) {
    return;
  }
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += stride) {
    float g[VEC];
    segment_sum(c, g);
    if (hard && !touched) {
      return;  // every lookup of the row chose the frozen row (the same for all chunks)
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t e = row * D + c + i;
      const float w = static_cast<float>(weight[e]);
      float nw;
      if (u.rule == 0) {
        nw = w + (-u.lr) * g[i];
      } else if (u.rule == 1) {
        nw = w - (u.lr * g[i]) / denom;  // IEEE division and sqrtf: nvcc's defaults
      } else {
        const float mn = u.state_a[e] + (g[i] - u.state_a[e]) * u.one_minus_beta1;
        const float vn = u.state_b[e] + (g[i] * g[i] - u.state_b[e]) * u.one_minus_beta2;
        u.state_a[e] = mn;
        u.state_b[e] = vn;
        nw = w + u.neg_step_size * (mn / (sqrtf(vn) + u.eps));
      }
      weight[e] = static_cast<scalar_t>(nw);
    }
  }
}

}  // namespace gated_cuda
}  // namespace autoft
