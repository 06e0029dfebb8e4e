// The noise stream, format v1 (SPEC section 3), for host and device code.
//
// One header serves the C++ CPU kernels and the CUDA kernels (NOISYOPS_HD is __host__ __device__
// under nvcc), so the CPU tests exercise the exact code the GPU runs. Pure C++, no torch headers.
//
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (element >> 2, instance mod 2^32, instance >> 32, (4*layer_key + purpose) mod 2^32)
//   u_i     = float(x_i) * 4.6566127342e-10f, x_i = int32(word_i), x_i = -x_i - 1 if x_i < 0
//   (n0, n1) = box_muller(u0, u1), (n2, n3) = box_muller(u2, u3); element e takes n[e mod 4].
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NOISYOPS_HD __host__ __device__ __forceinline__
#else
#define NOISYOPS_HD inline
#endif

namespace noisyops {

enum Purpose : uint32_t { kPurposeAdd = 0, kPurposeMul = 1, kPurposeOut = 2 };

struct U32x4 { uint32_t x, y, z, w; };
struct F32x4 { float x, y, z, w; };

NOISYOPS_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 (Salmon et al. 2011), as Random123 and Triton's tl.philox.
NOISYOPS_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.x, &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, c.z, &hi1, &lo1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Triton's uint_to_uniform_float for 32-bit words.
NOISYOPS_HD float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = (x < 0) ? (-x - 1) : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal, in float32.
NOISYOPS_HD void box_muller(float a, float b, float* n0, float* n1) {
  a = a < 1.0e-7f ? 1.0e-7f : a;
  const float theta = 6.283185307179586f * b;
  const float r = sqrtf(-2.0f * logf(a));
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(theta, &s, &c);
  *n0 = r * c;
  *n1 = r * s;
#else
  *n0 = r * cosf(theta);
  *n1 = r * sinf(theta);
#endif
}

// The counter-independent part of a stream: key and the instance / layer words of the counter.
struct Stream {
  uint32_t k0, k1, c1, c2, c3;
  NOISYOPS_HD Stream(uint64_t seed, uint64_t layer_key, uint32_t purpose, uint64_t instance)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)),
        c1(static_cast<uint32_t>(instance)), c2(static_cast<uint32_t>(instance >> 32)),
        c3(static_cast<uint32_t>(4 * layer_key + purpose)) {}

  // The four words of counter group g (elements 4g .. 4g+3).
  NOISYOPS_HD U32x4 words(uint64_t group) const {
    return philox4x32_10(U32x4{static_cast<uint32_t>(group), c1, c2, c3}, k0, k1);
  }
  // The four normals of counter group g (elements 4g .. 4g+3): both Box-Muller outputs used.
  NOISYOPS_HD F32x4 normals4(uint64_t group) const {
    const U32x4 w = words(group);
    F32x4 n;
    box_muller(uint_to_uniform(w.x), uint_to_uniform(w.y), &n.x, &n.y);
    box_muller(uint_to_uniform(w.z), uint_to_uniform(w.w), &n.z, &n.w);
    return n;
  }
  // The normal of one element (computes its whole group; prefer normals4 in loops).
  NOISYOPS_HD float normal(uint64_t element) const {
    const F32x4 n = normals4(element >> 2);
    switch (element & 3) {
      case 0: return n.x;
      case 1: return n.y;
      case 2: return n.z;
      default: return n.w;
    }
  }
};

}  // namespace noisyops
