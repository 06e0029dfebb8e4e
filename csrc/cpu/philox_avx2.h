// Eight Philox4x32-10 streams at once with AVX2, and the Box-Muller normals of SPEC section 3.
//
// Bit-identical words and uniforms to csrc/include/noisyops/philox.h (tested against it and the
// torch reference); normals use SLEEF's 3.5-ulp logf/sincosf (`u35`, exported by libtorch_cpu), so
// they agree with the scalar / reference normals within a few ulp (max 5 over 2^24 normals, against
// 3 with the 1-ulp `u10` functions, which are 1.43x slower per thread: docs/benchmarks_cpu.md, item 5).
// Without AVX2 the scalar header is used.
#pragma once
#include <stdint.h>

#include "noisyops/philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#include <sleef.h>
#define NOISYOPS_CPU_AVX2 1
#endif

namespace noisyops {
namespace cpu {

// The 4 normals of each of the 8 counter groups g0 .. g0+7, element-ordered:
// out[4*j + l] = normal of element 4*(g0+j) + l.
inline void normals32(const Stream& s, uint64_t g0, float* out) {
#if defined(NOISYOPS_CPU_AVX2)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0))), lane);
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(s.c1));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(s.c2));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(s.c3));
  uint32_t k0 = s.k0, k1 = s.k1;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    // 32x32 -> 64 products of even and odd lanes.
    const __m256i p0e = _mm256_mul_epu32(c0, m0);
    const __m256i p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i p1e = _mm256_mul_epu32(c2, m1);
    const __m256i p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    // lo: low halves; hi: high halves, re-interleaved to lanes.
    const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
    const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), vk0);
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), vk1);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Uniforms: x = int32(word); x = x < 0 ? -x - 1 (= ~x) : x; u = float(x) * 4.6566127342e-10f.
  const __m256 scale = _mm256_set1_ps(4.6566127342e-10f);
  auto uni = [&](__m256i w) {
    const __m256i sign = _mm256_srai_epi32(w, 31);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(w, sign)), scale);
  };
  const __m256 tiny = _mm256_set1_ps(1.0e-7f);
  const __m256 two_pi = _mm256_set1_ps(6.283185307179586f);
  const __m256 m2 = _mm256_set1_ps(-2.0f);
  auto bm = [&](__m256i wa, __m256i wb, __m256* na, __m256* nb) {
    const __m256 ua = uni(wa), ub = uni(wb);
    const __m256 a = _mm256_max_ps(ua, tiny);  // a < 1e-7 ? 1e-7 : a (ua is never NaN)
    const __m256 theta = _mm256_mul_ps(two_pi, ub);
    const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(m2, Sleef_logf8_u35avx2(a)));
    const Sleef___m256_2 sc = Sleef_sincosf8_u35avx2(theta);
    *na = _mm256_mul_ps(r, sc.y);  // r cos
    *nb = _mm256_mul_ps(r, sc.x);  // r sin
  };
  __m256 n0, n1, n2, n3;
  bm(c0, c1, &n0, &n1);
  bm(c2, c3, &n2, &n3);
  // 4x8 -> 8x4 transpose: out[4j + l] = n_l[j].
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1);  // n0[0] n1[0] n0[1] n1[1] | n0[4] n1[4] n0[5] n1[5]
  const __m256 t1 = _mm256_unpackhi_ps(n0, n1);  // n0[2] n1[2] n0[3] n1[3] | ...6, 7
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3);
  const __m256 t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 r0 = _mm256_shuffle_ps(t0, t2, 0x44);  // j=0 | j=4
  const __m256 r1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // j=1 | j=5
  const __m256 r2 = _mm256_shuffle_ps(t1, t3, 0x44);  // j=2 | j=6
  const __m256 r3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // j=3 | j=7
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(r0, r1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
#else
  for (int j = 0; j < 8; ++j) {
    const F32x4 n = s.normals4(g0 + j);
    out[4 * j + 0] = n.x;
    out[4 * j + 1] = n.y;
    out[4 * j + 2] = n.z;
    out[4 * j + 3] = n.w;
  }
#endif
}

// Normals of elements [e0, e0 + n) of one stream into out[0 .. n), any alignment.
inline void normals_range(const Stream& s, uint64_t e0, int64_t n, float* out) {
  float buf[32];
  int64_t i = 0;
  while (i < n) {
    const uint64_t e = e0 + static_cast<uint64_t>(i);
    const uint64_t g = e >> 2;
    const int64_t skip = static_cast<int64_t>(e & 3);
    normals32(s, g, buf);
    const int64_t take = (32 - skip) < (n - i) ? (32 - skip) : (n - i);
    for (int64_t j = 0; j < take; ++j) out[i + j] = buf[skip + j];
    i += take;
  }
}

}  // namespace cpu
}  // namespace noisyops
