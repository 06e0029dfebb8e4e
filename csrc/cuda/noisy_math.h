// Per-element math of the CUDA path, for host AND device (NOISYOPS_HD), no torch headers.
//
// The CUDA kernels (kernels.cu) are thin loops around these functions, and the same functions are
// compiled for the host by nvcc into the host fallbacks of noisyops._C_cuda (CPU tensors), so the
// tests on a machine without a GPU run the exact formulas the GPU runs. Everything is float32 with
// no FMA contraction (setup.py passes --fmad=false), in the reference's operation order:
//
//   weight pre-pass (SPEC section 1, noisyops.reference.weight_quantized / weight_noisy):
//     Wc = clamp(W, lo, hi), Wq = Q(Wc; lo, hi, bits)          only when clip
//     Wn = Wq * (1 + eta_mul * eps')                            when eta_mul > 0  (purpose 1)
//     Wn = Wn + sigma * eps                                     when eta > 0      (purpose 2 = 0)
//     eps, eps' at element = flat row-major weight index; four normals per Philox call
//   output tile (noisyops.reference._forward, per crossbar tile t):
//     v  = y_t[s] + out_noise * eps''(instance(n), t*numel + logical(s))   (purpose 2)
//     m  = lo <= v <= hi                                        (straight-through bit)
//     yq = Q(v; lo, hi, bits)
//     acc = (t == 0 ? yq : acc + yq);  out = acc + bias[c] at the last tile
//   s is the STORAGE index of the dense output (NCHW or NHWC); logical(s) the row-major NCHW index.
#pragma once
#include <stdint.h>

#include "noisyops/philox.h"
#include "noisyops/quantize.h"

namespace noisyops {
namespace cudapath {

enum Sampling : int { kPerCall = 0, kPerSample = 1, kPerInstance = 2 };
constexpr uint64_t kSampleStride = 1ull << 24;  // per_sample: instance = counter * 2^24 + s

// ---- weight pre-pass --------------------------------------------------------------------------
struct PrepassParams {
  uint64_t seed;
  uint64_t layer_key;
  float lo, hi;     // weight range, float32 as the reference casts it
  float sigma;      // additive std eta*(hi - lo), float32
  float eta_mul;    // multiplicative eta
  int clip;         // clip to [lo, hi] and quantize (w_clip)
  int bits;         // weight bits (0 = no quantizer), used only with clip
  int add;          // eta > 0
  int mul;          // eta_mul > 0
};

// Clip/quantize the (up to) four weights of counter group `group` and add their noise in place.
NOISYOPS_HD void prepass_apply4(const PrepassParams& p, uint64_t instance, uint64_t group, float v[4]) {
  if (p.clip) {
    const Quantizer q(p.lo, p.hi, p.bits);
    for (int j = 0; j < 4; ++j) v[j] = q(clamp_range(v[j], p.lo, p.hi));
  }
  if (p.mul) {
    const F32x4 n = Stream(p.seed, p.layer_key, kPurposeMul, instance).normals4(group);
    v[0] = v[0] * (1.0f + p.eta_mul * n.x);
    v[1] = v[1] * (1.0f + p.eta_mul * n.y);
    v[2] = v[2] * (1.0f + p.eta_mul * n.z);
    v[3] = v[3] * (1.0f + p.eta_mul * n.w);
  }
  if (p.add) {
    const F32x4 n = Stream(p.seed, p.layer_key, kPurposeAdd, instance).normals4(group);
    v[0] = v[0] + p.sigma * n.x;
    v[1] = v[1] + p.sigma * n.y;
    v[2] = v[2] + p.sigma * n.z;
    v[3] = v[3] + p.sigma * n.w;
  }
}

// ---- output layout and instances --------------------------------------------------------------
struct OutLayout {
  int64_t numel;        // elements of y (one tile)
  int64_t C;            // channels (conv) / features (linear)
  int64_t HW;           // spatial size (1 for linear)
  int64_t per_sample;   // numel / batch
  int channels_last;    // storage NHWC (conv only)
};

// Row-major logical (NCHW) index of storage index s.
NOISYOPS_HD int64_t logical_index(const OutLayout& l, int64_t s) {
  if (!l.channels_last) return s;
  const int64_t chw = l.C * l.HW;
  const int64_t n = s / chw;
  const int64_t r = s - n * chw;
  const int64_t hw = r / l.C;
  const int64_t c = r - hw * l.C;
  return n * chw + c * l.HW + hw;
}

// Channel (bias index) of storage index s.
NOISYOPS_HD int64_t channel_of(const OutLayout& l, int64_t s) {
  return l.channels_last ? s % l.C : (s / l.HW) % l.C;
}

struct Instances {
  int sampling;          // Sampling
  uint64_t counter;      // per_call / per_sample call counter
  const int64_t* ids;    // per_instance: chip id of each sample (same memory space as the data)
};

NOISYOPS_HD uint64_t sample_instance(const Instances& in, int64_t sample) {
  if (in.sampling == kPerInstance) return static_cast<uint64_t>(in.ids[sample]);
  if (in.sampling == kPerSample) return in.counter * kSampleStride + static_cast<uint64_t>(sample);
  return in.counter;
}

// ---- output tile --------------------------------------------------------------------------------
struct OutTileParams {
  uint64_t seed;
  uint64_t layer_key;
  float noise;          // out_noise (absolute std), 0 = off
  Quantizer q;          // output quantizer (q.on = out_bits > 0)
  int64_t tile;         // tile index t
  OutLayout layout;
  Instances inst;
};

// Noise and quantize element s of tile t (value v). *pass = straight-through bit (lo <= v <= hi).
NOISYOPS_HD float out_tile_value(const OutTileParams& p, int64_t s, float v, bool* pass) {
  if (p.noise > 0.0f) {
    const int64_t li = logical_index(p.layout, s);
    const uint64_t inst = sample_instance(p.inst, li / p.layout.per_sample);
    const float eps = Stream(p.seed, p.layer_key, kPurposeOut, inst)
                          .normal(static_cast<uint64_t>(p.tile * p.layout.numel + li));
    v = v + p.noise * eps;
  }
  *pass = p.q.passes(v);
  return p.q(v);
}

// Accumulate tile value yq into the digital sum; returns the value to store (acc or final).
NOISYOPS_HD float out_tile_accumulate(float yq, bool first, float acc_prev, bool last,
                                      const float* bias, int64_t channel) {
  float a = first ? yq : acc_prev + yq;
  if (last && bias != nullptr) a = a + bias[channel];
  return a;
}

// ---- straight-through masks -------------------------------------------------------------------
// grad * 1{lo <= ref <= hi} as the reference writes it: g * mask (so g = NaN stays NaN).
NOISYOPS_HD float ste_range(float g, float ref, float lo, float hi) {
  return g * ((ref >= lo && ref <= hi) ? 1.0f : 0.0f);
}

// grad * bit s of the packed mask words (LSB first, storage order).
NOISYOPS_HD float ste_bits(float g, const int32_t* words, int64_t s) {
  const uint32_t w = static_cast<uint32_t>(words[s >> 5]);
  return g * (((w >> (s & 31)) & 1u) ? 1.0f : 0.0f);
}

}  // namespace cudapath
}  // namespace noisyops
