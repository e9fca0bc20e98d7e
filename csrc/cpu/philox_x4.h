// Four Philox4x32-10 calls at once (consecutive counters, one key), for the CPU kernel: the
// scalar generator's chain of 32x32->64 multiplies was the largest part of the noisy hard
// forward once the rows were prefetched. SSE2 (baseline x86-64) does two lanes per multiply
// (pmuludq); elsewhere the scalar generator of philox.h runs four times. Bit-identical to
// philox.h either way (checked in csrc/tests/test_kernels.cpp).
#pragma once

#include "../philox.h"
#include "vec4.h"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace autoft {

// words[q] = the four output words of the call with counter call0 + q (q = 0..3), that is the
// words of lookups 4 (call0 + q) .. 4 (call0 + q) + 3.
inline void philox4x32_10_x4(uint64_t seed, uint64_t call0, vec4::u32x4 words[4]) {
#if defined(__SSE2__)
  alignas(16) uint32_t lo[4], hi[4];
  for (int q = 0; q < 4; ++q) {
    const uint64_t c = call0 + static_cast<uint64_t>(q);
    lo[q] = static_cast<uint32_t>(c);
    hi[q] = static_cast<uint32_t>(c >> 32);
  }
  __m128i c0 = _mm_load_si128(reinterpret_cast<const __m128i*>(lo));
  __m128i c1 = _mm_load_si128(reinterpret_cast<const __m128i*>(hi));
  __m128i c2 = _mm_setzero_si128();
  __m128i c3 = _mm_setzero_si128();
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const __m128i mul_a = _mm_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m128i mul_b = _mm_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    // 32x32->64 products of lanes 0, 2 and (shifted down) lanes 1, 3.
    const __m128i p0_even = _mm_mul_epu32(c0, mul_a);
    const __m128i p0_odd = _mm_mul_epu32(_mm_srli_epi64(c0, 32), mul_a);
    const __m128i p2_even = _mm_mul_epu32(c2, mul_b);
    const __m128i p2_odd = _mm_mul_epu32(_mm_srli_epi64(c2, 32), mul_b);
    // Gather the low and the high halves back into lane order 0, 1, 2, 3.
    const __m128i lo0 = _mm_unpacklo_epi32(_mm_shuffle_epi32(p0_even, 0x08),
                                           _mm_shuffle_epi32(p0_odd, 0x08));
    const __m128i hi0 = _mm_unpacklo_epi32(_mm_shuffle_epi32(p0_even, 0x0D),
                                           _mm_shuffle_epi32(p0_odd, 0x0D));
    const __m128i lo2 = _mm_unpacklo_epi32(_mm_shuffle_epi32(p2_even, 0x08),
                                           _mm_shuffle_epi32(p2_odd, 0x08));
    const __m128i hi2 = _mm_unpacklo_epi32(_mm_shuffle_epi32(p2_even, 0x0D),
                                           _mm_shuffle_epi32(p2_odd, 0x0D));
    const __m128i new_c0 =
        _mm_xor_si128(_mm_xor_si128(hi2, c1), _mm_set1_epi32(static_cast<int>(k0)));
    const __m128i new_c2 =
        _mm_xor_si128(_mm_xor_si128(hi0, c3), _mm_set1_epi32(static_cast<int>(k1)));
    c0 = new_c0;
    c1 = lo2;
    c2 = new_c2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Lanes are calls, registers are words: transpose so that words[q] holds call q's words.
  const __m128i t0 = _mm_unpacklo_epi32(c0, c1);  // c0[0] c1[0] c0[1] c1[1]
  const __m128i t1 = _mm_unpacklo_epi32(c2, c3);  // c2[0] c3[0] c2[1] c3[1]
  const __m128i t2 = _mm_unpackhi_epi32(c0, c1);  // c0[2] c1[2] c0[3] c1[3]
  const __m128i t3 = _mm_unpackhi_epi32(c2, c3);  // c2[2] c3[2] c2[3] c3[3]
  const __m128i r[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1),
                        _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)};
  for (int q = 0; q < 4; ++q) {
    std::memcpy(&words[q], &r[q], sizeof(words[q]));
  }
#else
  for (int q = 0; q < 4; ++q) {
    const Philox4 r = philox4x32_10(seed, call0 + static_cast<uint64_t>(q));
    words[q] = vec4::u32x4{r.w[0], r.w[1], r.w[2], r.w[3]};
  }
#endif
}

}  // namespace autoft
