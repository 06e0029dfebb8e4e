// The uniform quantizer and straight-through masks of SPEC section 1, for host and device code.
//
//   Q(v; lo, hi, b) = lo + round((clamp(v, lo, hi) - lo) / delta) * delta,  delta = (hi - lo) / (2^b - 1)
//
// round is round-half-to-even (rint / nearbyint in the default rounding mode), as torch.round.
// The division is a true division (not a multiply by 1/delta) so every backend rounds ties alike.
// The straight-through mask is 1 where lo <= v <= hi (gradient passes), 0 where v saturated.
// Non-finite values propagate: Q(NaN) = NaN (the comparisons are false) and Q(±Inf) = ±Inf, so a
// fault in the input is never turned into a finite level; their mask bit is 0.
#pragma once
#include <math.h>
#include "philox.h"

namespace noisyops {

struct Quantizer {
  float lo, hi, delta;
  bool on;
  NOISYOPS_HD Quantizer() : lo(0.f), hi(0.f), delta(1.f), on(false) {}
  NOISYOPS_HD Quantizer(float lo_, float hi_, int bits)
      : lo(lo_), hi(hi_), delta(bits > 0 ? (hi_ - lo_) / static_cast<float>((1u << bits) - 1u) : 1.f),
        on(bits > 0) {}

  NOISYOPS_HD float operator()(float v) const {
    if (!on || fabsf(v) == INFINITY) return v;
    const float c = v < lo ? lo : (v > hi ? hi : v);
    return lo + rintf((c - lo) / delta) * delta;
  }
  // Gradient passes (straight-through) where the value was inside the range.
  NOISYOPS_HD bool passes(float v) const { return !on || (v >= lo && v <= hi); }
};

// The weight clip: ±Inf and NaN pass through, as in the quantizer.
NOISYOPS_HD float clamp_range(float v, float lo, float hi) {
  return fabsf(v) == INFINITY ? v : (v < lo ? lo : (v > hi ? hi : v));
}

}  // namespace noisyops
