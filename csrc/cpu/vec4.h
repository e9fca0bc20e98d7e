// Four-float vectors (GCC/Clang vector extensions) and loads/stores that convert the table
// dtypes to and from float32.
//
// The extension is compiled for the baseline x86-64 / aarch64 ISA (no -mavx2: a wheel must run
// everywhere), where these map to one SSE / NEON register. Written out explicitly because
// gcc's automatic vectorisation of small fixed-size accumulator arrays produced partial stack
// stores and store-forwarding stalls that made the backward several times slower.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace autoft {
namespace vec4 {

typedef float f32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

inline f32x4 splat(float x) {
  return f32x4{x, x, x, x};
}

inline float hsum(f32x4 v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}

template <typename T>
inline f32x4 load(const T* p);

template <>
inline f32x4 load<float>(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <>
inline f32x4 load<c10::BFloat16>(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32: widening is a shift.
  u16x4 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x4 w = __builtin_convertvector(h, u32x4) << 16;
  f32x4 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <>
inline f32x4 load<c10::Half>(const c10::Half* p) {
  return f32x4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
               static_cast<float>(p[3])};
}

// Four int8 values as float32 (exact). With SSE2, sign-extended by two unpacks and a shift
// and converted four at once: gcc turns the generic conversion into four scalar ones there.
inline f32x4 load_i8(const int8_t* p) {
#if defined(__SSE2__)
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  __m128i v = _mm_cvtsi32_si128(word);
  v = _mm_unpacklo_epi8(v, v);   // each byte twice: the value in the high byte of 16 bits
  v = _mm_unpacklo_epi16(v, v);  // ... and of 32 bits
  return reinterpret_cast<f32x4>(_mm_cvtepi32_ps(_mm_srai_epi32(v, 24)));
#else
  typedef int8_t i8x4 __attribute__((vector_size(4)));
  i8x4 q;
  std::memcpy(&q, p, sizeof(q));
  return __builtin_convertvector(q, f32x4);
#endif
}

template <typename T>
inline void store(T* p, f32x4 v);

template <>
inline void store<float>(float* p, f32x4 v) {
  std::memcpy(p, &v, sizeof(v));
}

template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, f32x4 v) {
  // Round to nearest even, NaN -> canonical quiet NaN: the same bits as c10::BFloat16(float).
  u32x4 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x4 rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
  const i32x4 is_nan = v != v;
  const u32x4 out = is_nan ? u32x4{0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u} : rounded;
  const u16x4 h = __builtin_convertvector(out, u16x4);
  std::memcpy(p, &h, sizeof(h));
}

template <>
inline void store<c10::Half>(c10::Half* p, f32x4 v) {
  p[0] = c10::Half(v[0]);
  p[1] = c10::Half(v[1]);
  p[2] = c10::Half(v[2]);
  p[3] = c10::Half(v[3]);
}

// Correctly rounded square roots, four at a time: the same bits as std::sqrt on each lane. A
// scalar std::sqrt in a loop is not vectorised by the compiler (it must keep errno for a
// negative input), which made the fused Adam update compute-bound.
inline f32x4 sqrt(f32x4 x) {
#if defined(__SSE__)
  return (f32x4)_mm_sqrt_ps((__m128)x);
#elif defined(__aarch64__)
  return (f32x4)vsqrtq_f32((float32x4_t)x);
#else
  return f32x4{std::sqrt(x[0]), std::sqrt(x[1]), std::sqrt(x[2]), std::sqrt(x[3])};
#endif
}

// Natural log of four positive normal floats, within ~2 ulp: x = m * 2^e with m in
// [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716, whose
// series to s^9 leaves an error below 1e-9. Lanes outside the positive normal range (0, inf,
// negative, NaN, subnormal) are handed to std::log, so every input gets the libm answer there.
inline f32x4 log(f32x4 x) {
  u32x4 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  i32x4 e = (i32x4)(bits >> 23) - 127;
  const u32x4 mbits = (bits & 0x007fffffu) | 0x3f800000u;
  f32x4 m;
  std::memcpy(&m, &mbits, sizeof(m));
  const i32x4 big = m > splat(1.41421356f);
  m = big ? m * splat(0.5f) : m;
  e = e - big;  // a true mask lane is -1
  const f32x4 s = (m - splat(1.0f)) / (m + splat(1.0f));
  const f32x4 s2 = s * s;
  const f32x4 series =
      s2 * (splat(1.0f / 3) + s2 * (splat(1.0f / 5) + s2 * (splat(1.0f / 7) + s2 * splat(1.0f / 9))));
  const f32x4 log_m = (s + s) + (s + s) * series;
  const f32x4 ef = __builtin_convertvector(e, f32x4);
  // ln 2 split so that e * hi is exact: hi = 0x1.62p-1.
  f32x4 r = ef * splat(0.69140625f) + (log_m + ef * splat(0.0017409306019544601f));
  const i32x4 normal = (x >= splat(1.17549435e-38f)) & (x <= splat(3.40282347e+38f));
  if (!(normal[0] & normal[1] & normal[2] & normal[3])) {
    for (int i = 0; i < 4; ++i) {
      if (!normal[i]) {
        r[i] = std::log(x[i]);
      }
    }
  }
  return r;
}

// exp(t) for t <= 0 (or NaN), within ~2 ulp: t = k ln 2 + r with |r| <= ln2 / 2, exp(r) by its
// Taylor series to r^7 (error < 6e-9), 2^k through the exponent bits. Results below the
// smallest normal float (t < -87) are flushed to 0; NaN stays NaN.
inline f32x4 exp_nonpositive(f32x4 t) {
  const i32x4 tiny = t < splat(-87.0f);
  const f32x4 tc = tiny ? splat(-87.0f) : t;
  // Round to nearest integer by the 1.5 * 2^23 trick (exact for |value| < 2^22).
  const f32x4 kf = (tc * splat(1.44269502f) + splat(12582912.0f)) - splat(12582912.0f);
  const f32x4 r = (tc - kf * splat(0.69140625f)) - kf * splat(0.0017409306019544601f);
  f32x4 p = splat(1.0f / 5040);
  p = splat(1.0f / 720) + r * p;
  p = splat(1.0f / 120) + r * p;
  p = splat(1.0f / 24) + r * p;
  p = splat(1.0f / 6) + r * p;
  p = splat(0.5f) + r * p;
  p = splat(1.0f) + r * p;
  p = splat(1.0f) + r * p;
  const i32x4 k = __builtin_convertvector(kf, i32x4);
  const i32x4 scale_bits = (k + 127) << 23;
  f32x4 scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  f32x4 out = p * scale;
  out = tiny ? splat(0.0f) : out;
  return t != t ? t : out;
}

}  // namespace vec4
}  // namespace autoft
