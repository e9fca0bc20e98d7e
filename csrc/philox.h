// Philox4x32-10 counter-based generator and the logistic noise of the gated embedding op.
//
// Shared by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda), and bit-compatible with
// Triton's tl.randint4x / tl.rand, so every backend draws the same uniforms for the same seed
// (docs/op-contract.md, "Random numbers"). Header-only and free of torch includes so that
// nvcc device code and the plain C++ tests can both use it.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AUTOFT_HOST_DEVICE __host__ __device__
#define AUTOFT_INLINE __forceinline__
#else
#define AUTOFT_HOST_DEVICE
#define AUTOFT_INLINE inline __attribute__((always_inline))
#endif

namespace autoft {

// Largest int32 magnitude maps just below 1.0: float(2**31 - 1) * kUniformScale < 1.
constexpr float kUniformScale = 4.6566127342e-10f;

// Where the noise of a lookup comes from (plain data: passed by value to CUDA kernels too).
struct NoiseSource {
  bool noise;
  uint64_t seed;
  const float* uniforms;  // overrides the seed when not null
};

struct Philox4 {
  uint32_t w[4];
};

// High 32 bits of a 32x32 -> 64 bit product (CUDA has __umulhi; a 64-bit multiply is exact
// and just as fast on the host).
AUTOFT_HOST_DEVICE AUTOFT_INLINE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds on a full 128-bit counter and 64-bit key (the published
// generator, so it can be checked against its known-answer vectors).
AUTOFT_HOST_DEVICE AUTOFT_INLINE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                       uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0;
    const uint32_t old_c2 = c2;
    c0 = philox_mulhi(0xCD9E8D57u, old_c2) ^ c1 ^ k0;
    c2 = philox_mulhi(0xD2511F53u, old_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old_c2;
    c3 = 0xD2511F53u * old_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 r;
  r.w[0] = c0;
  r.w[1] = c1;
  r.w[2] = c2;
  r.w[3] = c3;
  return r;
}

// The op's stream: key = (seed lo, seed hi), counter = (offset lo, offset hi, 0, 0).
// One call serves four lookups: lookup n uses word n % 4 of the call with offset n / 4.
AUTOFT_HOST_DEVICE AUTOFT_INLINE Philox4 philox4x32_10(uint64_t seed, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Word -> uniform in [0, 1), as Triton's uint_to_uniform_float: folding the negative int32
// values onto the positive ones keeps U strictly below 1 after the float rounding.
AUTOFT_HOST_DEVICE AUTOFT_INLINE float philox_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) {
    x = ~x;  // = -x - 1, without the signed overflow of -x at INT32_MIN
  }
  return static_cast<float>(x) * kUniformScale;
}

// Standard logistic sample from one uniform: the difference of two Gumbel(0, 1) samples,
// which is all a two-class Gumbel-softmax needs. The 1e-20 keeps U = 0 finite.
AUTOFT_HOST_DEVICE AUTOFT_INLINE float logistic_noise(float u) {
#if defined(__CUDA_ARCH__)
  return logf(u + 1e-20f) - logf(1.0f - u);
#else
  return std::log(u + 1e-20f) - std::log(1.0f - u);
#endif
}

// Uniform of lookup n for a given seed (one Philox call; kernels that walk lookups in groups
// of four call philox4x32_10 once per group instead).
AUTOFT_HOST_DEVICE AUTOFT_INLINE float philox_uniform_at(uint64_t seed, uint64_t n) {
  const Philox4 r = philox4x32_10(seed, n >> 2);
  return philox_uniform(r.w[n & 3u]);
}

}  // namespace autoft
