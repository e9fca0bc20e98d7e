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

#include <cstdint>
#include <cstring>

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

}  // namespace vec4
}  // namespace autoft
