// Fused CPU kernels of the gated embedding op (docs/op-contract.md, docs/internals.md).
//
// Forward: per lookup, draw the logistic noise from Philox (one call per four lookups), form
// the gate and write the output row; a hard gate copies the chosen row and never loads the
// other one. Backward: regenerate the same noise from (seed, n), so the forward saves nothing
// but its inputs, then compute the logit gradients and the tuned-table gradient in one pass;
// the table gradient groups the lookups by row (keys row << 32 | lookup, scattered into buckets
// by the row's top bits, each bucket then sorted on its own), so repeated rows are summed in
// float32 by exactly one thread each, in lookup order, with no atomics.
#include "../gated_common.h"
#include "../philox.h"
#include "gated_embedding_cpu.h"
#include "philox_x4.h"
#include "vec4.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace autoft {
namespace {

// Lookups are processed in blocks: first the gates of a whole block (compute, with prefetches
// of the rows they need), then its rows (memory). A multiple of 4, so that no Philox call is
// split between blocks, and small enough that the prefetched rows stay in L1/L2.
constexpr int64_t kBlock = 64;
static_assert(kBlock % 16 == 0, "a block starts on a four-call Philox batch");

// Blocks per parallel task: enough work (~32k table elements touched) to amortise the task
// overhead.
inline int64_t block_grain(int64_t D) {
  return std::max<int64_t>(1, 32768 / (kBlock * std::max<int64_t>(D, 1)));
}

// Prefetch the cache lines of a row's first 256 bytes; the hardware prefetcher follows longer
// rows. Every line the bytes touch, counted from the line the row starts in: a row that does
// not start on a line (an int8 row is D + 2 bytes long) can end in the next line, and an int8
// row keeps its scale in its last two bytes.
template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  constexpr uintptr_t kLine = 64;
  const int64_t bytes = std::min<int64_t>(static_cast<int64_t>(sizeof(T)) * D, 256);
  if (bytes <= 0) {
    return;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes) - 1) & ~(kLine - 1);
  for (uintptr_t line = begin & ~(kLine - 1); line <= last; line += kLine) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
  }
}

// Prefetch calls prefetch_bytes makes for rows of up to `bytes` bytes (at most 256).
inline int64_t prefetch_lines(int64_t bytes) {
  return (std::min<int64_t>(bytes, 256) + 63) / 64;
}

// Prefetch every line of the `len` bytes at p (up to 256), with a count of calls fixed by
// `lines` (prefetch_lines of the longest row the call site sees) rather than by len, so that
// a row whose length depends on a random gate costs no branch: the calls at p, p + 64, ...,
// clamped to the last byte, and one at the last byte (repeats of a line merge).
inline void prefetch_bytes(const void* p, int64_t len, int64_t lines) {
  const char* c = static_cast<const char*>(p);
  const int64_t last = std::min<int64_t>(len, 256) - 1;
  for (int64_t k = 0; k < lines; ++k) {
    __builtin_prefetch(c + std::min<int64_t>(64 * k, last), 0, 3);
  }
  __builtin_prefetch(c + last, 0, 3);
}

// The inputs of the gates of the (up to) four lookups n0 .. n0 + count - 1 (n0 % 4 == 0): the
// logit difference d and the two terms of the logistic noise l = log(a) - log(b),
// a = U + 1e-20, b = 1 - U (a = b = 1, l = 0, without noise). `words` are the group's Philox
// words when the seeded stream is in use (drawn four calls at a time by the caller).
struct GateInputs {
  vec4::f32x4 d;
  vec4::f32x4 a;
  vec4::f32x4 b;
};

inline GateInputs gate_inputs(const NoiseSource& src, const float* logits, int64_t n0,
                              int64_t count, const vec4::u32x4& words) {
  using vec4::f32x4;
  using vec4::splat;
  GateInputs in;
  in.d = splat(0.0f);
  for (int64_t j = 0; j < count; ++j) {
    in.d[j] = logits[2 * (n0 + j) + 1] - logits[2 * (n0 + j)];
  }
  f32x4 u = splat(0.0f);  // also the value of lanes past N
  if (src.noise) {
    if (src.uniforms != nullptr) {
      for (int64_t j = 0; j < count; ++j) {
        u[j] = src.uniforms[n0 + j];
      }
    } else {
      vec4::i32x4 w = (vec4::i32x4)words;
      w = w < 0 ? ~w : w;  // philox_uniform, four at a time
      u = __builtin_convertvector(w, f32x4) * splat(kUniformScale);
    }
    in.a = u + splat(1e-20f);
    in.b = splat(1.0f) - u;
  } else {
    in.a = splat(1.0f);
    in.b = splat(1.0f);
  }
  return in;
}

// -|v|, by setting the sign bit.
inline vec4::f32x4 neg_abs(vec4::f32x4 v) {
  vec4::u32x4 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits |= 0x80000000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The hard choice, lanes -1 (tuned) or 0 (frozen): the contract's rule x = (d + l) / tau > 0.
// Fast path: x > 0 means log(a) - log(b) > -d, that is a > b * exp(-d): one exp instead of two
// logs, an exp and two divisions, which made the noisy hard forward compute-bound. Where the
// two sides of that comparison are within rounding of each other (exp(-d) rounds to 1 for
// |d| < 6e-8, yet d / tau can be far from 0 at a small tau), x is formed as soft_gates forms
// it and its sign decides. Forward and backward both decide here, so they always agree. NaN
// compares false (the frozen row), and an exact tie goes to the frozen row.
inline vec4::i32x4 hard_pick(const GateInputs& in, bool noise, float tau) {
  using vec4::splat;
  if (!noise) {
    // Without noise the rule itself is one division and a compare (the evaluation path).
    return (in.d / splat(tau)) > splat(0.0f);
  }
  const vec4::f32x4 e = vec4::exp_nonpositive(neg_abs(in.d));  // exp(-|d|), no overflow
  const vec4::i32x4 d_positive = in.d >= splat(0.0f);
  const vec4::f32x4 lhs = d_positive ? in.a : in.a * e;
  const vec4::f32x4 rhs = d_positive ? in.b * e : in.b;
  const vec4::i32x4 fast = lhs > rhs;
  const vec4::f32x4 gap = lhs - rhs;
  const vec4::f32x4 tol = splat(1e-6f) * (lhs > rhs ? lhs : rhs);
  const vec4::i32x4 near = (gap <= tol) & (gap >= -tol);
  if (!(near[0] | near[1] | near[2] | near[3])) {
    return fast;
  }
  vec4::f32x4 x = in.d;
  if (noise) {
    x = x + (vec4::log(in.a) - vec4::log(in.b));
  }
  x = x / splat(tau);
  return near ? (x > splat(0.0f)) : fast;
}

// The soft gates:
//   x = (d + log(a) - log(b)) / tau,  y1 = sigmoid(x), y0 = sigmoid(-x), y0y1 = y0 * y1,
// all from one exp of -|x|. y0 * y1 is formed as a product, never as y * (1 - y), so it keeps
// its relative precision when a gate is nearly certain. NaN in x reaches all three outputs.
struct GateGroup {
  vec4::f32x4 y0;
  vec4::f32x4 y1;
  vec4::f32x4 y0y1;
};

inline GateGroup soft_gates(const GateInputs& in, bool noise, float tau) {
  using vec4::f32x4;
  using vec4::splat;
  f32x4 x = in.d;
  if (noise) {
    x = x + (vec4::log(in.a) - vec4::log(in.b));
  }
  x = x / splat(tau);
  const f32x4 e = vec4::exp_nonpositive(neg_abs(x));
  const f32x4 r = splat(1.0f) / (splat(1.0f) + e);
  const f32x4 er = e * r;
  const vec4::i32x4 positive = x >= splat(0.0f);  // false for NaN
  GateGroup g;
  g.y1 = positive ? r : er;
  g.y0 = positive ? er : r;
  g.y0y1 = er * r;
  return g;
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Frozen rows. A frozen table is either of the tuned dtype, of a lower-precision float dtype
// (widened as it is read), or int8 row-quantised: D int8 values, then the row's float16 scale
// (ops/quant.py), each value read as float(q) * scale, exactly the dequantised table's value.
template <typename frozen_t>
constexpr bool kQuantised = std::is_same_v<frozen_t, int8_t>;

// Elements per stored frozen row.
template <typename frozen_t>
inline int64_t frozen_stride(int64_t D) {
  return kQuantised<frozen_t> ? D + kInt8ExtraBytes : D;
}

// The row's scale (1 for float rows; the memcpy reads it at any alignment, D may be odd).
template <typename frozen_t>
inline float frozen_scale(const frozen_t* row, int64_t D) {
  if constexpr (kQuantised<frozen_t>) {
    c10::Half h;
    std::memcpy(&h, row + D, sizeof(h));
    return static_cast<float>(h);
  } else {
    (void)row;
    (void)D;
    return 1.0f;
  }
}

// Four frozen values as float32.
template <typename frozen_t>
inline vec4::f32x4 load_frozen(const frozen_t* p, float scale) {
  if constexpr (kQuantised<frozen_t>) {
    return vec4::load_i8(p) * vec4::splat(scale);
  } else {
    (void)scale;
    return vec4::load(p);
  }
}

template <typename frozen_t>
inline float frozen_value(const frozen_t* p, float scale) {
  if constexpr (kQuantised<frozen_t>) {
    return static_cast<float>(*p) * scale;
  } else {
    (void)scale;
    return to_float(*p);
  }
}

// o = the frozen row, in the tuned dtype.
template <typename frozen_t, typename scalar_t>
inline void widen_row(const frozen_t* f, int64_t D, scalar_t* o) {
  const float scale = frozen_scale(f, D);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    vec4::store(o + d, load_frozen(f + d, scale));
  }
  for (; d < D; ++d) {
    o[d] = static_cast<scalar_t>(frozen_value(f + d, scale));
  }
}

// Keeps the smallest out-of-range position seen by any thread; the error is raised after the
// parallel loop (throwing inside it would lose the position order).
class BadIndex {
 public:
  void record(int64_t pos) {
    int64_t cur = first_.load(std::memory_order_relaxed);
    while ((cur < 0 || pos < cur) &&
           !first_.compare_exchange_weak(cur, pos, std::memory_order_relaxed)) {
    }
  }
  template <typename index_t>
  void raise_if_any(const index_t* indices, int64_t V) const {
    const int64_t pos = first_.load();
    if (pos >= 0) {
      throw_index_out_of_range(pos, static_cast<int64_t>(indices[pos]), V);
    }
  }

 private:
  std::atomic<int64_t> first_{-1};
};

template <typename index_t>
inline bool in_range(index_t idx, int64_t V) {
  return static_cast<uint64_t>(static_cast<int64_t>(idx)) < static_cast<uint64_t>(V);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// o = f, inline: a libc memcpy call per short row costs more than the copy itself.
template <typename scalar_t>
inline void copy_row(const scalar_t* f, int64_t D, scalar_t* o) {
  const int64_t bytes = static_cast<int64_t>(sizeof(scalar_t)) * D;
  const char* src = reinterpret_cast<const char*>(f);
  char* dst = reinterpret_cast<char*>(o);
  // The common row sizes as fixed-size copies: their loads issue together, where the loop
  // below waits on its trip count (the forward of a D = 16 float32 table ran about 20 %
  // faster so).
  switch (bytes) {
    case 32:
      std::memcpy(dst, src, 32);
      return;
    case 64:
      std::memcpy(dst, src, 64);
      return;
    case 128:
      std::memcpy(dst, src, 128);
      return;
    case 256:
      std::memcpy(dst, src, 256);
      return;
    default:
      break;
  }
  int64_t b = 0;
  for (; b + 16 <= bytes; b += 16) {
    std::memcpy(dst + b, src + b, 16);
  }
  for (; b < bytes; b += static_cast<int64_t>(sizeof(scalar_t))) {
    std::memcpy(dst + b, src + b, sizeof(scalar_t));
  }
}

// o = y0 * f + y1 * t in float32, converted to the table dtype.
template <typename frozen_t, typename scalar_t>
inline void mix_rows(const frozen_t* f, const scalar_t* t, float y0, float y1, int64_t D,
                     scalar_t* o) {
  const vec4::f32x4 w0 = vec4::splat(y0);
  const vec4::f32x4 w1 = vec4::splat(y1);
  const float scale = frozen_scale(f, D);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    vec4::store(o + d, w0 * load_frozen(f + d, scale) + w1 * vec4::load(t + d));
  }
  for (; d < D; ++d) {
    o[d] = static_cast<scalar_t>(y0 * frozen_value(f + d, scale) + y1 * to_float(t[d]));
  }
}

template <typename scalar_t, typename frozen_t, typename index_t>
void forward_kernel(const index_t* indices, const frozen_t* frozen, const scalar_t* tuned,
                    const float* logits, const NoiseSource& src, float tau, bool hard, int64_t N,
                    int64_t V, int64_t D, scalar_t* out, float* gates, BadIndex& bad) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const bool seeded = src.noise && src.uniforms == nullptr;
  // Tables of one dtype: a hard gate's row is a copy from either table (branch-free choice).
  constexpr bool kSameType = std::is_same_v<frozen_t, scalar_t>;
  const int64_t FS = frozen_stride<frozen_t>(D);
  at::parallel_for(0, blocks, block_grain(D), [&](int64_t bbegin, int64_t bend) {
    bool seen_bad = false;
    const void* first_row[kBlock];   // the row to copy (hard) or the frozen row (soft)
    // Hard, tables of two dtypes: the block's lookups that copy a tuned row and those that
    // widen a frozen one, so that phase 2 runs two loops instead of a branch on random gates.
    uint8_t tuned_list[kBlock];
    uint8_t frozen_list[kBlock];
    static_assert(kBlock <= 256, "block positions are kept in uint8_t");
    const int64_t tuned_bytes = static_cast<int64_t>(sizeof(scalar_t)) * D;
    const int64_t frozen_bytes = static_cast<int64_t>(sizeof(frozen_t)) * FS;
    const int64_t row_lines = prefetch_lines(std::max(tuned_bytes, frozen_bytes));
    const scalar_t* const tables[2] = {reinterpret_cast<const scalar_t*>(frozen), tuned};
    float w0[kBlock];
    float w1[kBlock];
    for (int64_t b = bbegin; b < bend; ++b) {
      const int64_t n0 = b * kBlock;
      const int64_t nb = std::min<int64_t>(kBlock, N - n0);
      int64_t n_tuned = 0;
      int64_t n_frozen = 0;
      // Phase 1: gates. Compute-bound; prefetching the rows the gates choose lets their cache
      // misses overlap this work instead of serialising behind it.
      vec4::u32x4 words[4] = {};
      for (int64_t i0 = 0; i0 < nb; i0 += 4) {
        const int64_t count = std::min<int64_t>(4, nb - i0);
        if (seeded && i0 % 16 == 0) {
          philox4x32_10_x4(src.seed, static_cast<uint64_t>(n0 + i0) >> 2, words);
        }
        const GateInputs in = gate_inputs(src, logits, n0 + i0, count, words[(i0 / 4) % 4]);
        // Hard: only the choice is needed, without branches (a random gate mispredicts half
        // the time). Soft: the gates.
        GateGroup s;
        vec4::i32x4 pick = {0, 0, 0, 0};  // lanes: 0 or -1
        if (hard) {
          pick = hard_pick(in, src.noise, tau);
          s.y1 = pick ? vec4::splat(1.0f) : vec4::splat(0.0f);
          s.y0 = vec4::splat(1.0f) - s.y1;
        } else {
          s = soft_gates(in, src.noise, tau);
        }
        for (int64_t j = 0; j < count; ++j) {
          const int64_t i = i0 + j;
          const int64_t n = n0 + i;
          const index_t idx = indices[n];
          if (!in_range(idx, V)) {
            if (!seen_bad) {  // chunks are contiguous: the first bad one is the chunk's smallest
              bad.record(n);
              seen_bad = true;
            }
            first_row[i] = nullptr;
            continue;
          }
          const int64_t row = static_cast<int64_t>(idx) * D;
          const frozen_t* frow = frozen + static_cast<int64_t>(idx) * FS;
          if (hard) {
            gates[2 * n] = s.y0[j];
            gates[2 * n + 1] = s.y1[j];
            if constexpr (kSameType) {
              first_row[i] = tables[pick[j] & 1] + row;  // the other row is never read
              prefetch_row(static_cast<const scalar_t*>(first_row[i]), D);
            } else {
              // Branch-free: both lists are written, only the chosen one's count moves on.
              const bool take = pick[j] != 0;
              const void* chosen = take ? static_cast<const void*>(tuned + row)
                                        : static_cast<const void*>(frow);
              first_row[i] = chosen;
              prefetch_bytes(chosen, take ? tuned_bytes : frozen_bytes, row_lines);
              tuned_list[n_tuned] = static_cast<uint8_t>(i);
              frozen_list[n_frozen] = static_cast<uint8_t>(i);
              n_tuned += take ? 1 : 0;
              n_frozen += take ? 0 : 1;
            }
          } else {
            // sigmoid(-x) rather than 1 - y1: the small gate keeps its relative precision.
            gates[2 * n] = s.y0[j];
            gates[2 * n + 1] = s.y1[j];
            w0[i] = s.y0[j];
            w1[i] = s.y1[j];
            first_row[i] = frow;
            prefetch_row(frow, FS);
            prefetch_row(tuned + row, D);
          }
        }
      }
      // Phase 2: rows. A short loop of independent loads, so many misses are in flight.
      if constexpr (!kSameType) {
        if (hard) {
          // z is exactly one-hot: the chosen row, a frozen one widened to the tuned dtype.
          for (int64_t k = 0; k < n_tuned; ++k) {
            const int64_t i = tuned_list[k];
            copy_row(static_cast<const scalar_t*>(first_row[i]), D, out + (n0 + i) * D);
          }
          for (int64_t k = 0; k < n_frozen; ++k) {
            const int64_t i = frozen_list[k];
            widen_row(static_cast<const frozen_t*>(first_row[i]), D, out + (n0 + i) * D);
          }
          continue;
        }
      }
      for (int64_t i = 0; i < nb; ++i) {
        const void* f = first_row[i];
        if (f == nullptr) {
          continue;
        }
        scalar_t* o = out + (n0 + i) * D;
        const frozen_t* frow = static_cast<const frozen_t*>(f);
        if (hard) {
          // z is exactly one-hot, so the output is the chosen row, bit for bit (a frozen row
          // of another dtype: its value widened to the tuned dtype).
          copy_row(static_cast<const scalar_t*>(f), D, o);  // one dtype (two: above)
        } else {
          mix_rows(frow, tuned + ((frow - frozen) / FS) * D, w0[i], w1[i], D, o);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// <g, f> and <g, t> in float32, four lanes at a time.
template <typename grad_t, typename frozen_t, typename scalar_t>
inline void two_dots(const grad_t* g, const frozen_t* f, const scalar_t* t, int64_t D, float& a0,
                     float& a1) {
  vec4::f32x4 p0 = vec4::splat(0.0f);
  vec4::f32x4 p1 = vec4::splat(0.0f);
  const float scale = frozen_scale(f, D);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const vec4::f32x4 gv = vec4::load(g + d);
    p0 += gv * load_frozen(f + d, scale);
    p1 += gv * vec4::load(t + d);
  }
  float s0 = vec4::hsum(p0);
  float s1 = vec4::hsum(p1);
  for (; d < D; ++d) {
    const float gv = to_float(g[d]);
    s0 += gv * frozen_value(f + d, scale);
    s1 += gv * to_float(t[d]);
  }
  a0 = s0;
  a1 = s1;
}

// two_dots for D = 4 * NV, unrolled: the same lane-wise products and sums in the same order.
template <int NV, typename grad_t, typename frozen_t, typename scalar_t>
inline void two_dots_fixed(const grad_t* g, const frozen_t* f, const scalar_t* t, float& a0,
                           float& a1) {
  vec4::f32x4 p0 = vec4::splat(0.0f);
  vec4::f32x4 p1 = vec4::splat(0.0f);
  const float scale = frozen_scale(f, 4 * NV);
  for (int v = 0; v < NV; ++v) {
    const vec4::f32x4 gv = vec4::load(g + 4 * v);
    p0 += gv * load_frozen(f + 4 * v, scale);
    p1 += gv * vec4::load(t + 4 * v);
  }
  a0 = vec4::hsum(p0);
  a1 = vec4::hsum(p1);
}

template <typename grad_t, typename frozen_t, typename scalar_t>
inline void two_dots_any(const grad_t* g, const frozen_t* f, const scalar_t* t, int64_t D,
                         float& a0, float& a1) {
  switch (D) {
    case 8:
      two_dots_fixed<2>(g, f, t, a0, a1);
      break;
    case 16:
      two_dots_fixed<4>(g, f, t, a0, a1);
      break;
    case 32:
      two_dots_fixed<8>(g, f, t, a0, a1);
      break;
    default:
      two_dots(g, f, t, D, a0, a1);
  }
}

// How the lookups that reach the tuned table are grouped by row. The lookup pass runs as
// `tasks` contiguous ranges of blocks; each emits the keys (row << 32 | lookup) of its tuned
// lookups, in lookup order, and counts them per bucket (the row's top bits). A parallel scatter
// then puts every bucket's keys together, and each bucket is sorted on its own: keys are
// unique, so sorting whole keys orders the rows and, within a row, the lookups. Nothing is
// serial but two prefix sums over the buckets.
struct KeyPlan {
  int shift = 0;          // bucket = row >> shift
  int64_t buckets = 1;
  int64_t tasks = 1;
  int64_t blocks = 0;
  int64_t task_block(int64_t t) const { return blocks * t / tasks; }  // first block of task t
};

KeyPlan make_key_plan(int64_t N, int64_t V, int64_t D) {
  KeyPlan p;
  int row_bits = 0;
  while (row_bits < 32 && (uint64_t{1} << row_bits) < static_cast<uint64_t>(V)) {
    ++row_bits;
  }
  int n_bits = 0;
  while (n_bits < 40 && (int64_t{1} << n_bits) < N) {
    ++n_bits;
  }
  // About eight lookups per bucket, at most 8192 buckets (a 64 kB histogram per task).
  const int bucket_bits = std::min(row_bits, std::clamp(n_bits - 3, 0, 13));
  p.shift = row_bits - bucket_bits;
  p.buckets = int64_t{1} << bucket_bits;
  p.blocks = (N + kBlock - 1) / kBlock;
  const int64_t grain = block_grain(D);
  p.tasks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (p.blocks + grain - 1) / grain));
  return p;
}

// Where the lookup pass puts the keys; keys == nullptr when they are not wanted.
struct KeySink {
  uint64_t* keys;    // [N]: task t writes its keys from position task_block(t) * kBlock on
  int64_t* hist;     // [tasks, buckets]
  int64_t* counts;   // [tasks]
};

// Pass over lookups: logit gradients, the tuned weights z1 that the per-row sums need (soft
// gates only: a hard gate's z1 is 0 or 1, and only the lookups with z1 = 1 are keyed), and the
// keys of the lookups that reach the tuned table.
template <typename scalar_t, typename frozen_t, typename grad_t, typename index_t>
void backward_lookup_kernel(const grad_t* grad_out, const float* grad_gates, const index_t* indices,
                            const frozen_t* frozen, const scalar_t* tuned, const float* logits,
                            const NoiseSource& src, float tau, bool hard, int64_t N, int64_t V,
                            int64_t D, float* grad_logits, float* z1_out, BadIndex& bad,
                            const KeyPlan& plan, const KeySink& sink) {
  // z1 is needed per lookup for soft gates, or when the keys are not built.
  const bool keep_z1 = !hard || sink.keys == nullptr;
  const bool seeded = src.noise && src.uniforms == nullptr;
  const int64_t FS = frozen_stride<frozen_t>(D);
  at::parallel_for(0, plan.tasks, 1, [&](int64_t tbegin, int64_t tend) {
    for (int64_t task = tbegin; task < tend; ++task) {
      bool seen_bad = false;
      int64_t rows[kBlock];
      uint64_t ids[kBlock];
      float z1s[kBlock];
      float scale[kBlock];  // y0 * y1 / tau
      const int64_t bbegin = plan.task_block(task);
      const int64_t bend = plan.task_block(task + 1);
      uint64_t* const kout = sink.keys != nullptr ? sink.keys + bbegin * kBlock : nullptr;
      int64_t* const hist = sink.keys != nullptr ? sink.hist + task * plan.buckets : nullptr;
      const int shift = plan.shift;
      int64_t kc = 0;
      if (hist != nullptr) {
        std::fill(hist, hist + plan.buckets, int64_t{0});
      }
      for (int64_t b = bbegin; b < bend; ++b) {
        const int64_t n0 = b * kBlock;
        const int64_t nb = std::min<int64_t>(kBlock, N - n0);
        // Phase 1: regenerate the gates, prefetch both rows (the straight-through gradient needs
        // <g, f> and <g, t> even when the hard gate read only one of them).
        vec4::u32x4 words[4] = {};
        for (int64_t i0 = 0; i0 < nb; i0 += 4) {
          const int64_t count = std::min<int64_t>(4, nb - i0);
          if (seeded && i0 % 16 == 0) {
            philox4x32_10_x4(src.seed, static_cast<uint64_t>(n0 + i0) >> 2, words);
          }
          const GateInputs in = gate_inputs(src, logits, n0 + i0, count, words[(i0 / 4) % 4]);
          const GateGroup s = soft_gates(in, src.noise, tau);
          const vec4::f32x4 sc = s.y0y1 / vec4::splat(tau);  // the same IEEE division, 4 at once
          // The forward's choice, by the same rule.
          const vec4::f32x4 z1 =
              hard ? (hard_pick(in, src.noise, tau) ? vec4::splat(1.0f) : vec4::splat(0.0f)) : s.y1;
          for (int64_t j = 0; j < count; ++j) {
            const int64_t i = i0 + j;
            const int64_t n = n0 + i;
            const index_t idx = indices[n];
            if (!in_range(idx, V)) {
              if (!seen_bad) {
                bad.record(n);
                seen_bad = true;
              }
              rows[i] = -1;
              continue;
            }
            z1s[i] = z1[j];
            scale[i] = sc[j];
            ids[i] = static_cast<uint64_t>(idx);
            rows[i] = static_cast<int64_t>(idx) * D;
            prefetch_row(frozen + static_cast<int64_t>(idx) * FS, FS);
            prefetch_row(tuned + rows[i], D);
          }
        }
        // Phase 2: dot products and gradient rows.
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t row = rows[i];
          if (row < 0) {
            continue;
          }
          const int64_t n = n0 + i;
          const grad_t* gr = grad_out + n * D;
          float a0, a1;
          two_dots_any(gr, frozen + static_cast<int64_t>(ids[i]) * FS, tuned + row, D, a0, a1);
          float diff = a1 - a0;
          if (grad_gates != nullptr) {
            diff += grad_gates[2 * n + 1] - grad_gates[2 * n];
          }
          const float gl = scale[i] * diff;
          grad_logits[2 * n] = -gl;
          grad_logits[2 * n + 1] = gl;
          if (keep_z1) {
            z1_out[n] = z1s[i];
          }
          if (kout != nullptr) {
            // Branch-free: a random hard gate would mispredict half the time.
            const int64_t take = (!hard || z1s[i] != 0.0f) ? 1 : 0;
            kout[kc] = (ids[i] << 32) | static_cast<uint64_t>(n);
            kc += take;
            hist[ids[i] >> shift] += take;
          }
        }
      }
      if (sink.counts != nullptr) {
        sink.counts[task] = kc;
      }
    }
  });
}

// A fresh dense gradient table is mostly page faults (a 64 MB table is 16384 4 kB pages, each
// faulted and zeroed by the kernel: 15 of 16 ms at V = 1M, D = 16): ask for transparent huge
// pages on its 2 MB-aligned interior before it is first touched (4.6 ms). Advice only, and only
// from 32 MB on, where glibc gives the block its own mapping (its largest dynamic mmap
// threshold), so the advice ends with the tensor and never reaches the shared heap.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < (size_t{32} << 20)) {
    return;
  }
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > b) {
    (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

// At least this many keys per parallel chunk of buckets.
inline int64_t bucket_grain(int64_t buckets, int64_t M) {
  return std::max<int64_t>(1, buckets * 2048 / std::max<int64_t>(M, 1));
}

// The keys of the tuned lookups, sorted (by row, then lookup). Bucket k spans
// [bucket_start[k], bucket_start[k + 1]) and holds segment_start[k] .. segment_start[k + 1] - 1,
// the ordinals of its distinct rows.
struct SortedKeys {
  std::unique_ptr<uint64_t[]> keys;
  std::unique_ptr<int64_t[]> bucket_start;
  std::unique_ptr<int64_t[]> segment_start;
  int64_t M = 0;
};

// Scatters the lookup pass's keys by bucket (task order, then key order: stable), sorts each
// bucket and counts its distinct rows.
SortedKeys sort_keys(const KeyPlan& plan, const KeySink& sink) {
  constexpr int64_t kRankSortMax = 16;
  const int64_t B = plan.buckets;
  SortedKeys out;
  out.bucket_start.reset(new int64_t[B + 1]);
  out.segment_start.reset(new int64_t[B + 1]);
  int64_t run = 0;
  for (int64_t k = 0; k < B; ++k) {
    out.bucket_start[k] = run;
    for (int64_t t = 0; t < plan.tasks; ++t) {
      const int64_t c = sink.hist[t * B + k];
      sink.hist[t * B + k] = run;
      run += c;
    }
  }
  out.bucket_start[B] = run;
  const int64_t M = run;
  out.M = M;
  out.keys.reset(new uint64_t[std::max<int64_t>(M, 1)]);
  uint64_t* sorted = out.keys.get();
  const int shift = plan.shift;
  at::parallel_for(0, plan.tasks, 1, [&](int64_t tbegin, int64_t tend) {
    for (int64_t t = tbegin; t < tend; ++t) {
      const uint64_t* src = sink.keys + plan.task_block(t) * kBlock;
      int64_t* pos = sink.hist + t * B;
      for (int64_t j = 0; j < sink.counts[t]; ++j) {
        const uint64_t key = src[j];
        sorted[pos[(key >> 32) >> shift]++] = key;
      }
    }
  });
  int64_t* unique = out.segment_start.get() + 1;  // counts first, prefix sums below
  at::parallel_for(0, B, bucket_grain(B, M), [&](int64_t kbegin, int64_t kend) {
    for (int64_t k = kbegin; k < kend; ++k) {
      uint64_t* a = sorted + out.bucket_start[k];
      const int64_t m = out.bucket_start[k + 1] - out.bucket_start[k];
      if (m == 0) {
        unique[k] = 0;
        continue;
      }
      if (shift > 0) {  // otherwise the bucket is one row, already in lookup order
        if (m <= kRankSortMax) {
          // Branch-free rank sort (an insertion sort mispredicts on these random keys).
          uint64_t r[kRankSortMax];
          for (int64_t i = 0; i < m; ++i) {
            int64_t rank = 0;
            for (int64_t j = 0; j < m; ++j) {
              rank += a[j] < a[i] ? 1 : 0;
            }
            r[rank] = a[i];
          }
          std::copy(r, r + m, a);
        } else {
          std::sort(a, a + m);
        }
      }
      int64_t u = 1;
      for (int64_t i = 1; i < m; ++i) {
        u += ((a[i] >> 32) != (a[i - 1] >> 32)) ? 1 : 0;
      }
      unique[k] = u;
    }
  });
  out.segment_start[0] = 0;
  for (int64_t k = 0; k < B; ++k) {
    out.segment_start[k + 1] += out.segment_start[k];
  }
  return out;
}

// The fused optimizer's row update (autoft_fast/ops/fused_optim.py RULES, the same formulas in
// the same float32 operations): applied to a touched row as soon as its gradient sum is made,
// so no gradient row is ever stored. Rules by index in RULES: 0 sgd, 1 rowwise_adagrad, 2 adam.
struct RowUpdate {
  int64_t rule;
  float lr, eps, one_minus_beta1, one_minus_beta2, neg_step_size;  // adam: -lr sqrt(bc2) / bc1
  void* weight;                                                   // [V, D] tuned table
  float* state_a;  // adagrad: sum [V]; adam: exp_avg [V, D]
  float* state_b;  // adam: exp_avg_sq [V, D]
};

template <typename scalar_t>
inline void apply_row_update(const RowUpdate& u, int64_t row, const float* g, int64_t D) {
  scalar_t* w = static_cast<scalar_t*>(u.weight) + row * D;
  if (u.rule == 0) {
    for (int64_t d = 0; d < D; ++d) {
      w[d] = static_cast<scalar_t>(to_float(w[d]) + (-u.lr) * g[d]);
    }
  } else if (u.rule == 1) {
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      sq += g[d] * g[d];
    }
    const float acc = u.state_a[row] + sq / static_cast<float>(D);
    u.state_a[row] = acc;
    const float denom = std::sqrt(acc) + u.eps;
    for (int64_t d = 0; d < D; ++d) {
      w[d] = static_cast<scalar_t>(to_float(w[d]) - (u.lr * g[d]) / denom);
    }
  } else {
    float* m = u.state_a + row * D;
    float* v = u.state_b + row * D;
    // Four lanes at a time, the same float32 operations as the scalar tail below.
    const vec4::f32x4 b1 = vec4::splat(u.one_minus_beta1);
    const vec4::f32x4 b2 = vec4::splat(u.one_minus_beta2);
    const vec4::f32x4 step = vec4::splat(u.neg_step_size);
    const vec4::f32x4 eps = vec4::splat(u.eps);
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      const vec4::f32x4 gv = vec4::load(g + d);
      const vec4::f32x4 mo = vec4::load(m + d);
      const vec4::f32x4 vo = vec4::load(v + d);
      const vec4::f32x4 mn = mo + (gv - mo) * b1;
      const vec4::f32x4 vn = vo + (gv * gv - vo) * b2;
      vec4::store(m + d, mn);
      vec4::store(v + d, vn);
      vec4::store(w + d, vec4::load(w + d) + step * (mn / (vec4::sqrt(vn) + eps)));
    }
    for (; d < D; ++d) {
      const float mn = m[d] + (g[d] - m[d]) * u.one_minus_beta1;
      const float vn = v[d] + (g[d] * g[d] - v[d]) * u.one_minus_beta2;
      m[d] = mn;
      v[d] = vn;
      w[d] = static_cast<scalar_t>(to_float(w[d]) + u.neg_step_size * (mn / (std::sqrt(vn) + u.eps)));
    }
  }
}

// acc += w * g (acc in float32).
template <typename grad_t>
inline void axpy_row(const grad_t* g, float w, int64_t D, float* acc) {
  const vec4::f32x4 wv = vec4::splat(w);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    vec4::store(acc + d, vec4::load(acc + d) + wv * vec4::load(g + d));
  }
  for (; d < D; ++d) {
    acc[d] += w * to_float(g[d]);
  }
}

// Each row summed in float32 in lookup order by one thread: exact, deterministic, no atomics.
// Dense mode writes row r of an uninitialised [V, D] table, and zeros to the rows between (each
// chunk of buckets owns a range of rows); sparse mode writes the s-th distinct row to row s of a
// compact [U, D] table and its id to out_rows[s] (sorted, unique: coalesced). z1 == nullptr: every keyed lookup has weight 1 (hard gates; 1 * g is g
// exactly, so this is the same sum).
// update != nullptr (sparse mode only): each row's sum updates the tuned row in place instead
// of being written out (out, out_rows unused).
template <typename scalar_t, typename grad_t>
void sum_rows(const SortedKeys& sk, const KeyPlan& plan, const grad_t* grad_out, const float* z1,
              int64_t V, int64_t D, bool dense, scalar_t* out, int64_t* out_rows,
              const RowUpdate* update = nullptr) {
  constexpr int64_t kAhead = 16;  // keys between a prefetch and its use
  const uint64_t* keys = sk.keys.get();
  // Dense mode also zero-fills the rows between the summed ones (counted as one key per 32
  // elements of work), so that every byte of the table is written once, by one thread.
  const int64_t work = sk.M + (dense ? V * D / 32 : 0);
  at::parallel_for(0, plan.buckets, bucket_grain(plan.buckets, work),
                   [&](int64_t kbegin, int64_t kend) {
    std::vector<float> acc(D);
    // Dense: the rows of these buckets, and the first one not written yet.
    const int64_t rend =
        kend == plan.buckets ? V : std::min<int64_t>(V, kend << plan.shift);
    int64_t next_row = std::min<int64_t>(V, kbegin << plan.shift);
    auto zero_rows_to = [&](int64_t r) {
      if (r > next_row) {
        std::memset(static_cast<void*>(out + next_row * D), 0,
                    sizeof(scalar_t) * static_cast<size_t>((r - next_row) * D));
      }
    };
    const int64_t pend = sk.bucket_start[kend];
    int64_t p = sk.bucket_start[kbegin];
    int64_t s = sk.segment_start[kbegin];
    // With an update, the rows it rewrites (the table's and the rule's state) are random too:
    // fetched as far ahead as the gradient rows, so their misses overlap the summing.
    auto prefetch_update = [&](uint64_t key) {
      if (update == nullptr) {
        return;
      }
      const int64_t r = static_cast<int64_t>(key >> 32);
      prefetch_row(static_cast<const scalar_t*>(update->weight) + r * D, D);
      if (update->rule == 1) {
        __builtin_prefetch(update->state_a + r, 0, 3);
      } else if (update->rule == 2) {
        prefetch_row(update->state_a + r * D, D);
        prefetch_row(update->state_b + r * D, D);
      }
    };
    for (int64_t q = p; q < std::min(p + kAhead, pend); ++q) {
      prefetch_row(grad_out + static_cast<int64_t>(keys[q] & 0xffffffffu) * D, D);
      prefetch_update(keys[q]);
    }
    // NV > 0: D = 4 * NV, the row's sum kept in NV registers (the same additions, lane by
    // lane, as axpy_row into memory); NV = 0: any D.
    auto walk = [&](auto nv_tag) {
      constexpr int NV = decltype(nv_tag)::value;
      while (p < pend) {
        const uint64_t row = keys[p] >> 32;
        vec4::f32x4 a[NV > 0 ? NV : 1];
        if constexpr (NV > 0) {
          for (int v = 0; v < NV; ++v) {
            a[v] = vec4::splat(0.0f);
          }
        } else {
          std::fill(acc.begin(), acc.end(), 0.0f);
        }
        do {
          if (p + kAhead < pend) {
            const int64_t na = static_cast<int64_t>(keys[p + kAhead] & 0xffffffffu);
            prefetch_row(grad_out + na * D, D);
            prefetch_update(keys[p + kAhead]);
            if (z1 != nullptr) {
              __builtin_prefetch(z1 + na, 0, 3);
            }
          }
          const int64_t n = static_cast<int64_t>(keys[p] & 0xffffffffu);
          const float w = z1 != nullptr ? z1[n] : 1.0f;
          if constexpr (NV > 0) {
            const vec4::f32x4 wv = vec4::splat(w);
            const grad_t* g = grad_out + n * (4 * NV);
            for (int v = 0; v < NV; ++v) {
              a[v] = a[v] + wv * vec4::load(g + 4 * v);
            }
          } else {
            axpy_row(grad_out + n * D, w, D, acc.data());
          }
          ++p;
        } while (p < pend && (keys[p] >> 32) == row);
        if constexpr (NV > 0) {
          std::memcpy(acc.data(), a, sizeof(a));
        }
        if (update != nullptr) {
          apply_row_update<scalar_t>(*update, static_cast<int64_t>(row), acc.data(), D);
          continue;
        }
        scalar_t* o;
        if (!dense) {
          o = out + s * D;
          out_rows[s] = static_cast<int64_t>(row);
          ++s;
        } else {
          zero_rows_to(static_cast<int64_t>(row));
          next_row = static_cast<int64_t>(row) + 1;
          o = out + static_cast<int64_t>(row) * D;
        }
        for (int64_t d = 0; d < D; ++d) {
          o[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    };
    switch (D) {
      case 4:
        walk(std::integral_constant<int, 1>{});
        break;
      case 8:
        walk(std::integral_constant<int, 2>{});
        break;
      case 16:
        walk(std::integral_constant<int, 4>{});
        break;
      case 32:
        walk(std::integral_constant<int, 8>{});
        break;
      default:
        walk(std::integral_constant<int, 0>{});
    }
    if (dense) {
      zero_rows_to(rend);
    }
  });
}

// The fallback when N or V does not fit the 32-bit halves of a key (N or V >= 2^32): lookup
// numbers sorted by row with std::stable_sort, then summed as above, one row per segment.
template <typename index_t>
std::vector<int64_t> order_by_row(const index_t* indices, const float* z1, bool hard, int64_t N) {
  std::vector<int64_t> order;
  for (int64_t n = 0; n < N; ++n) {
    if (!hard || z1[n] != 0.0f) {
      order.push_back(n);
    }
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return indices[a] < indices[b]; });
  return order;
}

template <typename scalar_t, typename grad_t, typename index_t>
void sum_rows_unpacked(const std::vector<int64_t>& order, const index_t* indices,
                       const grad_t* grad_out, const float* z1, int64_t D, scalar_t* out,
                       int64_t* out_rows) {
  std::vector<float> acc(D);
  const int64_t M = static_cast<int64_t>(order.size());
  int64_t s = 0;
  for (int64_t p = 0; p < M;) {
    const int64_t row = static_cast<int64_t>(indices[order[p]]);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (; p < M && static_cast<int64_t>(indices[order[p]]) == row; ++p) {
      axpy_row(grad_out + order[p] * D, z1[order[p]], D, acc.data());
    }
    scalar_t* o = out + (out_rows != nullptr ? s : row) * D;
    if (out_rows != nullptr) {
      out_rows[s] = row;
    }
    ++s;
    for (int64_t d = 0; d < D; ++d) {
      o[d] = static_cast<scalar_t>(acc[d]);
    }
  }
}

template <typename index_t>
int64_t count_rows(const std::vector<int64_t>& order, const index_t* indices) {
  int64_t u = 0;
  for (size_t p = 0; p < order.size(); ++p) {
    u += (p == 0 || indices[order[p]] != indices[order[p - 1]]) ? 1 : 0;
  }
  return u;
}


// Calls f with a value of the frozen table's C++ type for a tuned table of type scalar_t: the
// tuned type, int8_t (row-quantised), or c10::BFloat16 / c10::Half under a float32 tuned table
// (checked before by check_gated_inputs).
template <typename scalar_t, typename F>
void dispatch_frozen(at::ScalarType frozen, F&& f) {
  if (frozen == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else if (frozen == at::kChar) {
    f(int8_t{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (frozen == at::kBFloat16) {
      f(c10::BFloat16{});
    } else {
      TORCH_CHECK_TYPE(frozen == at::kHalf, "unsupported frozen table dtype ", frozen);
      f(c10::Half{});
    }
  } else {
    TORCH_CHECK_TYPE(false, "unsupported frozen table dtype ", frozen);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_embedding_fwd_cpu(
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise,
    bool sparse) {
  // `sparse` only tells the autograd formula which gradient layout to ask the backward for.
  (void)sparse;
  const GatedSizes s = check_gated_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                                          tau, c10::DeviceType::CPU, /*low_precision_frozen=*/true);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor frozen = frozen_weight.contiguous();
  const at::Tensor tuned = tuned_weight.contiguous();
  const at::Tensor lg = logits.contiguous();
  at::Tensor uniforms_c;
  const NoiseSource src = make_noise_source(seed, uniforms, noise, uniforms_c);

  at::Tensor out = at::empty({s.N, s.D}, tuned.options());
  at::Tensor gates = at::empty({s.N, 2}, lg.options());
  if (s.N == 0) {
    return {out, gates};
  }
  BadIndex bad;
  dispatch_index(idx.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* ip = idx.const_data_ptr<index_t>();
    dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_frozen<scalar_t>(frozen.scalar_type(), [&](auto frozen_tag) {
        using frozen_t = decltype(frozen_tag);
        forward_kernel<scalar_t, frozen_t, index_t>(
            ip, frozen.const_data_ptr<frozen_t>(), tuned.const_data_ptr<scalar_t>(),
            lg.const_data_ptr<float>(), src, static_cast<float>(tau), hard, s.N, s.V, s.D,
            out.mutable_data_ptr<scalar_t>(), gates.mutable_data_ptr<float>(), bad);
      });
    });
    bad.raise_if_any(ip, s.V);
  });
  return {out, gates};
}

namespace {

// The backward; with `update` (sparse mode) the touched tuned rows are updated in place and no
// gradient rows are returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse, const RowUpdate* update) {
  const GatedSizes s = check_gated_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                                          tau, c10::DeviceType::CPU, /*low_precision_frozen=*/true);
  check_grad_inputs(grad_out, grad_gates, indices, tuned_weight, s, c10::DeviceType::CPU);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor frozen = frozen_weight.contiguous();
  const at::Tensor tuned = tuned_weight.contiguous();
  const at::Tensor lg = logits.contiguous();
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gg;
  if (grad_gates.has_value()) {
    gg = grad_gates->contiguous();
  }
  at::Tensor uniforms_c;
  const NoiseSource src = make_noise_source(seed, uniforms, noise, uniforms_c);

  at::Tensor grad_logits = at::empty({s.N, 2}, lg.options());
  const auto row_options = idx.options().dtype(at::kLong);
  if (s.N == 0) {
    if (sparse) {
      return {at::empty({0, s.D}, tuned.options()), grad_logits, at::empty({0}, row_options)};
    }
    return {at::zeros({s.V, s.D}, tuned.options()), grad_logits, at::empty({0}, row_options)};
  }
  // The per-lookup tuned weight z1 (soft gates, or the unpacked fallback), between the lookup
  // pass and the per-row sums; the keys of the tuned lookups and their bucket counts.
  const bool packed = s.V <= (int64_t{1} << 32) && s.N <= (int64_t{1} << 32);
  std::unique_ptr<float[]> z1(new float[(hard && packed) ? 1 : s.N]);
  const KeyPlan plan = make_key_plan(s.N, s.V, s.D);
  std::unique_ptr<uint64_t[]> keys(packed ? new uint64_t[s.N] : nullptr);
  std::unique_ptr<int64_t[]> hist(packed ? new int64_t[plan.tasks * plan.buckets] : nullptr);
  std::unique_ptr<int64_t[]> counts(packed ? new int64_t[plan.tasks] : nullptr);
  const KeySink sink{keys.get(), hist.get(), counts.get()};
  at::Tensor grad_tuned;
  at::Tensor grad_rows = at::empty({0}, row_options);
  BadIndex bad;
  dispatch_index(idx.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* ip = idx.const_data_ptr<index_t>();
    dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      auto run = [&](auto grad_tag) {
        using grad_t = decltype(grad_tag);
        const grad_t* gp = go.const_data_ptr<grad_t>();
        dispatch_frozen<scalar_t>(frozen.scalar_type(), [&](auto frozen_tag) {
          using frozen_t = decltype(frozen_tag);
          backward_lookup_kernel<scalar_t, frozen_t, grad_t, index_t>(
              gp, gg.defined() ? gg.const_data_ptr<float>() : nullptr, ip,
              frozen.const_data_ptr<frozen_t>(), tuned.const_data_ptr<scalar_t>(),
              lg.const_data_ptr<float>(), src, static_cast<float>(tau), hard, s.N, s.V,
              s.D, grad_logits.mutable_data_ptr<float>(), z1.get(), bad, plan, sink);
        });
        bad.raise_if_any(ip, s.V);
        if (!packed) {
          const std::vector<int64_t> order = order_by_row(ip, z1.get(), hard, s.N);
          if (update != nullptr) {
            // Rare (N or V >= 2^32): the row sums are made first, then applied.
            const int64_t U = count_rows(order, ip);
            at::Tensor sums = at::empty({U, s.D}, tuned.options().dtype(at::kFloat));
            at::Tensor rows = at::empty({U}, row_options);
            sum_rows_unpacked<float, grad_t, index_t>(order, ip, gp, z1.get(), s.D,
                                                      sums.mutable_data_ptr<float>(),
                                                      rows.mutable_data_ptr<int64_t>());
            for (int64_t u = 0; u < U; ++u) {
              apply_row_update<scalar_t>(*update, rows.const_data_ptr<int64_t>()[u],
                                         sums.const_data_ptr<float>() + u * s.D, s.D);
            }
          } else if (sparse) {
            const int64_t U = count_rows(order, ip);
            grad_tuned = at::empty({U, s.D}, tuned.options());
            grad_rows = at::empty({U}, row_options);
            sum_rows_unpacked<scalar_t, grad_t, index_t>(order, ip, gp, z1.get(), s.D,
                                                         grad_tuned.mutable_data_ptr<scalar_t>(),
                                                         grad_rows.mutable_data_ptr<int64_t>());
          } else {
            grad_tuned = at::zeros({s.V, s.D}, tuned.options());
            sum_rows_unpacked<scalar_t, grad_t, index_t>(
                order, ip, gp, z1.get(), s.D, grad_tuned.mutable_data_ptr<scalar_t>(), nullptr);
          }
          return;
        }
        const SortedKeys sk = sort_keys(plan, sink);
        const float* weights = hard ? nullptr : z1.get();
        if (update != nullptr) {
          sum_rows<scalar_t, grad_t>(sk, plan, gp, weights, s.V, s.D, /*dense=*/false, nullptr,
                                     nullptr, update);
        } else if (sparse) {
          const int64_t U = sk.segment_start[plan.buckets];
          grad_tuned = at::empty({U, s.D}, tuned.options());
          grad_rows = at::empty({U}, row_options);
          sum_rows<scalar_t, grad_t>(sk, plan, gp, weights, s.V, s.D, /*dense=*/false,
                                     grad_tuned.mutable_data_ptr<scalar_t>(),
                                     grad_rows.mutable_data_ptr<int64_t>());
        } else {
          // Uninitialised: sum_rows writes every row, the summed ones and zeros between them.
          grad_tuned = at::empty({s.V, s.D}, tuned.options());
          advise_huge_pages(grad_tuned.mutable_data_ptr(), grad_tuned.nbytes());
          sum_rows<scalar_t, grad_t>(sk, plan, gp, weights, s.V, s.D, /*dense=*/true,
                                     grad_tuned.mutable_data_ptr<scalar_t>(), nullptr);
        }
      };
      if (go.scalar_type() == tuned.scalar_type()) {
        run(scalar_t{});
      } else {
        run(float{});
      }
    });
  });
  return {grad_tuned, grad_logits, grad_rows};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse) {
  return backward_cpu(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, seed,
                      uniforms, tau, hard, noise, sparse, nullptr);
}

namespace {

// The fused optimizer's RowUpdate for `weight` [V, D] and the rule's state, after checking them.
RowUpdate make_row_update(at::Tensor& weight, const char* weight_name, at::Tensor& state_a,
                          at::Tensor& state_b, int64_t rule, double lr, double eps, double beta1,
                          double beta2, int64_t step) {
  check_row_update(weight, weight_name, state_a, state_b, rule, step, c10::DeviceType::CPU);
  const RuleHyper h = rule_hyper(lr, eps, beta1, beta2, step);
  RowUpdate u;
  u.rule = rule;
  u.lr = h.lr;
  u.eps = h.eps;
  u.one_minus_beta1 = h.one_minus_beta1;
  u.one_minus_beta2 = h.one_minus_beta2;
  u.neg_step_size = h.neg_step_size;
  u.weight = weight.mutable_data_ptr();
  u.state_a = rule >= 1 ? state_a.mutable_data_ptr<float>() : nullptr;
  u.state_b = rule == 2 ? state_b.mutable_data_ptr<float>() : nullptr;
  return u;
}

}  // namespace

at::Tensor gated_embedding_bwd_update_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, at::Tensor& state_a, at::Tensor& state_b, int64_t rule,
    double lr, double eps, double beta1, double beta2, int64_t step) {
  const RowUpdate u = make_row_update(tuned_weight, "tuned_weight", state_a, state_b, rule, lr,
                                      eps, beta1, beta2, step);
  auto result = backward_cpu(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits,
                             seed, uniforms, tau, hard, noise, /*sparse=*/true, &u);
  return std::get<1>(result);
}


// The fused optimizer's update of the rows of a plain table from one gradient row per lookup:
// values[n] is lookup n's gradient row (already weighted), for row indices[n]. Repeated rows
// are combined exactly as the gated backward combines them (keys sorted by row, then lookup;
// each row summed in float32 in lookup order by one thread), then updated in place.
void rows_update_cpu(const at::Tensor& indices, const at::Tensor& values, at::Tensor& weight,
                     at::Tensor& state_a, at::Tensor& state_b, int64_t rule, double lr,
                     double eps, double beta1, double beta2, int64_t step) {
  const GatedSizes s = check_rows_update_inputs(indices, values, weight, c10::DeviceType::CPU);
  const int64_t N = s.N;
  const int64_t V = s.V;
  const int64_t D = s.D;
  const RowUpdate u = make_row_update(weight, "weight", state_a, state_b, rule, lr, eps, beta1,
                                      beta2, step);
  if (N == 0) {
    return;
  }
  TORCH_CHECK_VALUE(V <= (int64_t{1} << 32) && N <= (int64_t{1} << 32),
                    "rows_update needs fewer than 2^32 rows and lookups, got V = ", V, ", N = ", N);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor vals = values.contiguous();
  const KeyPlan plan = make_key_plan(N, V, D);
  std::unique_ptr<uint64_t[]> keys(new uint64_t[N]);
  std::unique_ptr<int64_t[]> hist(new int64_t[plan.tasks * plan.buckets]());
  std::unique_ptr<int64_t[]> counts(new int64_t[plan.tasks]);
  const KeySink sink{keys.get(), hist.get(), counts.get()};
  BadIndex bad;
  dispatch_index(idx.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* ip = idx.const_data_ptr<index_t>();
    at::parallel_for(0, plan.tasks, 1, [&](int64_t tbegin, int64_t tend) {
      for (int64_t t = tbegin; t < tend; ++t) {
        const int64_t n0 = plan.task_block(t) * kBlock;
        const int64_t n1 = std::min<int64_t>(N, plan.task_block(t + 1) * kBlock);
        uint64_t* out = sink.keys + n0;
        int64_t* h = sink.hist + t * plan.buckets;
        int64_t j = 0;
        for (int64_t n = n0; n < n1; ++n) {
          const index_t r = ip[n];
          if (!in_range(r, V)) {
            bad.record(n);
            break;
          }
          const uint64_t row = static_cast<uint64_t>(r);
          out[j++] = (row << 32) | static_cast<uint64_t>(n);
          ++h[row >> plan.shift];
        }
        sink.counts[t] = j;
      }
    });
    bad.raise_if_any(ip, V);
  });
  const SortedKeys sk = sort_keys(plan, sink);
  dispatch_table(weight.scalar_type(), [&](auto table_tag) {
    using scalar_t = decltype(table_tag);
    sum_rows<scalar_t, float>(sk, plan, vals.const_data_ptr<float>(), nullptr, V, D,
                              /*dense=*/false, nullptr, nullptr, &u);
  });
}

// The contract's uniforms U[0:n] for `seed` (op-contract.md, "Random numbers"): call c of the
// stream gives U[4c .. 4c + 3]. For gates drawn outside the op (the models' layer gates).
at::Tensor philox_uniforms_cpu(const at::Tensor& seed, int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got n = ", n);
  at::Tensor out = at::empty({n}, seed.options().dtype(at::kFloat).device(at::kCPU));
  if (n == 0) {
    return out;
  }
  const uint64_t s = read_seed(seed);
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, (n + 3) / 4, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Philox4 r = philox4x32_10(s, static_cast<uint64_t>(c));
      for (int64_t k = 0; k < 4 && 4 * c + k < n; ++k) {
        o[4 * c + k] = philox_uniform(r.w[k]);
      }
    }
  });
  return out;
}

}  // namespace autoft

TORCH_LIBRARY_IMPL(autoft_fast, CPU, m) {
  m.impl("philox_uniforms", &autoft::philox_uniforms_cpu);
  m.impl("gated_embedding_fwd", &autoft::gated_embedding_fwd_cpu);
  m.impl("gated_embedding_bwd", &autoft::gated_embedding_bwd_cpu);
  m.impl("gated_embedding_bwd_update", &autoft::gated_embedding_bwd_update_cpu);
  m.impl("rows_update", &autoft::rows_update_cpu);
}
