// The C++ CPU kernels of the noisy ops (backend `cpu`): everything around the product.
//
// The conv / matmul itself runs in ATen (oneDNN / MKL), called from noisyops/backends/cpu.py.
// These kernels are single passes over memory, OpenMP-parallel, vectorised with AVX2:
//
//   noisy_weights_    Wn[k] = Q_w(clip(W))·(1 + eta_mul·ε'_k) + σ·ε_k for K instance ids at once
//                     (four normals per Philox call, both Box-Muller outputs; SPEC section 3)
//   quantize          xq = Q(x; lo, hi, bits) (input DAC), new tensor or in place
//   ste_mask_         grad *= [lo <= ref <= hi] in place (straight-through mask, no mask tensor)
//   out_noise_        y += σ_out·ε'' (purpose 2; element t·numel(y) + logical row-major index)
//   out_quant_        per tile: pack the bit mask [lo <= y <= hi] in storage order into int32 words,
//                     quantize, and write or accumulate into the tile sum
//   quantize_mask_out backward: xq = Q(x) and the packed bits [lo <= x <= hi] in one pass over x
//   mask_grad_out     g where the packed bit is set, else 0 (out mask, or the input's bits above);
//                     in place when out is g
//
// Quantizer: exactly the reference, lo + rint((clamp(v) - lo) / Δ)·Δ with a true division and
// round-half-even, computed in float32 (float64 for double tensors); the build sets
// -ffp-contract=off so no FMA changes a rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <functional>
#include <type_traits>
#include <vector>

#include "noisyops/philox.h"
#include "noisyops/quantize.h"
#include "philox_avx2.h"

namespace noisyops {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1024;  // elements per work item (multiple of 32)

template <typename T>
struct Q {
  T lo, hi, delta;
  bool on;
  Q(double lo_, double hi_, int64_t bits)
      : lo(static_cast<T>(lo_)), hi(static_cast<T>(hi_)), on(bits > 0) {
    // delta = (hi - lo) / (2^bits - 1) in T, as the reference computes it.
    delta = bits > 0 ? (hi - lo) / static_cast<T>((1u << bits) - 1u) : T(1);
  }
};

template <typename T>
inline T qround(T v) {
  return std::nearbyint(v);
}
template <>
inline float qround<float>(float v) {
  return rintf(v);
}

template <typename T>
inline T quant(T v, T lo, T hi, T delta) {
  if (std::isinf(v)) return v;  // ±Inf propagates (as NaN does through the ternaries)
  const T c = v < lo ? lo : (v > hi ? hi : v);
  return lo + qround<T>((c - lo) / delta) * delta;
}

#if defined(NOISYOPS_CPU_AVX2)
// Q of 8 floats, the same operations in the same order as quant<float> (no FMA):
// NaN stays NaN (max/min return their second operand when one is NaN, as the ternaries do);
// ±Inf is blended back in (Q(±Inf) = ±Inf).
inline __m256 quant8(__m256 v, __m256 lo, __m256 hi, __m256 delta) {
  const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
  const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(c, lo), delta),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 abs_v = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  const __m256 is_inf = _mm256_cmp_ps(abs_v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  return _mm256_blendv_ps(_mm256_add_ps(lo, _mm256_mul_ps(r, delta)), v, is_inf);
}
// clamp(v, lo, hi) of 8 floats, ±Inf passed through (as the weight clip's scalar code), NaN stays NaN.
inline __m256 clamp8(__m256 v, __m256 lo, __m256 hi) {
  const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
  const __m256 abs_v = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  return _mm256_blendv_ps(c, v, _mm256_cmp_ps(abs_v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
}
// 8 mask bits: lo <= v <= hi (false for NaN).
inline uint32_t inrange8(__m256 v, __m256 lo, __m256 hi) {
  const __m256 m = _mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ), _mm256_cmp_ps(v, hi, _CMP_LE_OQ));
  return static_cast<uint32_t>(_mm256_movemask_ps(m));
}
#endif

void check_dense(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, ": expected a dense tensor, got strides ",
              t.strides());
}

// Two dense tensors of one shape with one storage order (strides of size-1 dims do not matter).
bool same_layout(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// ---- where a pass runs ------------------------------------------------------------------------
// Each kernel below is a loop over work items. `for_items` runs it now (at::parallel_for), or, given
// a Passes list, records it: the recorded passes (independent of each other: the backward's out mask
// of the incoming gradient, the re-quantization of x and the noisy weights) then run as one parallel
// region. Fewer regions, fewer barriers: on a shared machine each barrier waits for the slowest,
// possibly descheduled, thread.
struct Passes {
  struct Pass {
    int64_t items, grain;
    std::function<void(int64_t, int64_t)> body;
  };
  std::vector<Pass> list;
  std::vector<torch::Tensor> keep;  // the tensors the recorded passes read and write

  // Runs the recorded passes and clears the list: each thread takes the same share of every pass
  // (items of different passes differ in cost); a pass at most `grain` items long runs whole on one
  // thread, as at::parallel_for would run it inline.
  void run() {
    const int64_t T = at::get_num_threads();
    bool big = false;
    for (const Pass& p : list) big = big || p.items > p.grain;
    if (T <= 1 || !big || at::in_parallel_region()) {
      for (const Pass& p : list) p.body(0, p.items);
    } else {
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          for (const Pass& p : list) {
            if (p.items <= p.grain) {
              if (t == T - 1) p.body(0, p.items);
              continue;
            }
            const int64_t b = p.items * t / T, e = p.items * (t + 1) / T;
            if (b < e) p.body(b, e);
          }
        }
      });
    }
    list.clear();
    keep.clear();
  }
};

template <typename F>
void for_items(Passes* rec, int64_t items, int64_t grain, F body) {
  if (items <= 0) return;
  if (rec == nullptr) {
    at::parallel_for(0, items, grain, body);
  } else {
    rec->list.push_back({items, grain, std::function<void(int64_t, int64_t)>(std::move(body))});
  }
}

// ---- weights ---------------------------------------------------------------------------------
template <typename T>
void noisy_weights_impl(const T* w, T* out, int64_t numel, const std::vector<int64_t>& instances,
                        double lo_, double hi_, bool clip, int64_t bits, double sigma_,
                        double eta_mul_, uint64_t seed, uint64_t layer_key, int64_t channels,
                        int64_t spatial, Passes* rec = nullptr) {
  const T lo = static_cast<T>(lo_), hi = static_cast<T>(hi_);
  const Q<T> q(lo_, hi_, bits);
  // Scalars enter the tensor expressions of the reference in the tensor's dtype.
  const T sigma = static_cast<T>(sigma_), eta_mul = static_cast<T>(eta_mul_);
  const bool add = sigma_ != 0.0, mul = eta_mul_ != 0.0;
  const int64_t K = static_cast<int64_t>(instances.size());
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  // spatial > 1: out[k] is channels-last, element (o, c, s) of the flat row-major index
  // e = (o·channels + c)·spatial + s stored at (o·spatial + s)·channels + c. The block is computed in
  // flat order into `rows` and scattered within the (cache-resident) filters it covers.
  const bool scatter = spatial > 1;
  const int64_t filter = channels * spatial;
  for_items(rec, K * blocks, 1, [=](int64_t begin, int64_t end) {
    alignas(32) float ea[kBlock];
    alignas(32) float em[kBlock];
    alignas(32) T rows[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / blocks, b = item % blocks;
      const int64_t e0 = b * kBlock;
      const int64_t n = std::min(kBlock, numel - e0);
      const uint64_t inst = static_cast<uint64_t>(instances[k]);
      if (add) normals_range(Stream(seed, layer_key, kPurposeAdd, inst), e0, n, ea);
      if (mul) normals_range(Stream(seed, layer_key, kPurposeMul, inst), e0, n, em);
      const T* src = w + e0;
      T* dst = scatter ? rows : out + k * numel + e0;
      int64_t i = 0;
#if defined(NOISYOPS_CPU_AVX2)
      if constexpr (std::is_same_v<T, float>) {  // the scalar loop's operations, 8 lanes at a time
        const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vd = _mm256_set1_ps(q.delta);
        const __m256 one = _mm256_set1_ps(1.0f), vem = _mm256_set1_ps(eta_mul), vs = _mm256_set1_ps(sigma);
        for (; i + 8 <= n; i += 8) {
          __m256 v = _mm256_loadu_ps(src + i);
          if (clip) v = q.on ? quant8(v, vlo, vhi, vd) : clamp8(v, vlo, vhi);
          if (mul) v = _mm256_mul_ps(v, _mm256_add_ps(one, _mm256_mul_ps(vem, _mm256_load_ps(em + i))));
          if (add) v = _mm256_add_ps(v, _mm256_mul_ps(vs, _mm256_load_ps(ea + i)));
          _mm256_storeu_ps(dst + i, v);
        }
      }
#endif
      for (; i < n; ++i) {
        T v = src[i];
        if (clip && !std::isinf(v)) {  // ±Inf (and NaN) pass through the clip and the quantizer
          v = v < lo ? lo : (v > hi ? hi : v);
          if (q.on) v = lo + qround<T>((v - lo) / q.delta) * q.delta;
        }
        if (mul) v = v * (T(1) + eta_mul * static_cast<T>(em[i]));
        if (add) v = v + sigma * static_cast<T>(ea[i]);
        dst[i] = v;
      }
      if (scatter) {
        T* base = out + k * numel + (e0 / filter) * filter;
        int64_t c = (e0 % filter) / spatial, sp = e0 % spatial;
        for (int64_t j = 0; j < n; ++j) {
          base[sp * channels + c] = rows[j];
          if (++sp == spatial) {
            sp = 0;
            if (++c == channels) {
              c = 0;
              base += filter;
            }
          }
        }
      }
    }
  });
}

// out[k] = Wn for instances[k]; w contiguous, out a dense buffer of K·w.numel() elements, both float
// or double. spatial = 1: out[k] row-major like w; spatial = kh·kw > 1 for a conv weight
// [C_out, channels, kh, kw]: out[k] channels-last (element (o, c, r, s) at ((o·kh + r)·kw + s)·channels + c).
void noisy_weights_(torch::Tensor w, torch::Tensor out, std::vector<int64_t> instances, double lo,
                    double hi, bool clip, int64_t bits, double sigma, double eta_mul, uint64_t seed,
                    uint64_t layer_key, int64_t spatial = 1, Passes* rec = nullptr) {
  TORCH_CHECK(w.is_contiguous() && out.is_contiguous(), "noisy_weights_: w and out must be contiguous");
  TORCH_CHECK(w.scalar_type() == out.scalar_type(), "noisy_weights_: dtype mismatch ", w.scalar_type(),
              " vs ", out.scalar_type());
  TORCH_CHECK(spatial >= 1, "noisy_weights_: spatial=", spatial, ": expected >= 1");
  int64_t channels = 1;
  if (spatial > 1) {
    TORCH_CHECK(w.dim() == 4 && w.size(2) * w.size(3) == spatial, "noisy_weights_: spatial=", spatial,
                " needs a conv weight [C_out, C_in, kh, kw] with kh*kw = spatial, got ", w.sizes());
    channels = w.size(1);
  }
  TORCH_CHECK(out.numel() == w.numel() * static_cast<int64_t>(instances.size()),
              "noisy_weights_: out has ", out.numel(), " elements, expected ", w.numel(), " x ",
              instances.size());
  if (w.scalar_type() == torch::kFloat) {
    noisy_weights_impl<float>(w.data_ptr<float>(), out.data_ptr<float>(), w.numel(), instances, lo, hi,
                              clip, bits, sigma, eta_mul, seed, layer_key, channels, spatial, rec);
  } else if (w.scalar_type() == torch::kDouble) {
    noisy_weights_impl<double>(w.data_ptr<double>(), out.data_ptr<double>(), w.numel(), instances, lo,
                               hi, clip, bits, sigma, eta_mul, seed, layer_key, channels, spatial, rec);
  } else {
    TORCH_CHECK(false, "noisy_weights_: w must be float32 or float64, got ", w.scalar_type());
  }
}

// ---- input quantizer ---------------------------------------------------------------------------
// dst = Q(src) elementwise over storage (same strides); computed in float (double for double).
template <typename S, typename C>
void quantize_impl(const S* src, S* dst, int64_t numel, double lo_, double hi_, int64_t bits,
                   Passes* rec = nullptr) {
  const Q<C> q(lo_, hi_, bits);
  for_items(rec, numel, 16384, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = static_cast<S>(quant<C>(static_cast<C>(src[i]), q.lo, q.hi, q.delta));
    }
  });
}

#if defined(NOISYOPS_CPU_AVX2)
template <>
void quantize_impl<float, float>(const float* src, float* dst, int64_t numel, double lo_, double hi_,
                                 int64_t bits, Passes* rec) {
  const Q<float> q(lo_, hi_, bits);
  for_items(rec, (numel + 7) / 8, 2048, [=](int64_t begin, int64_t end) {
    const __m256 lo = _mm256_set1_ps(q.lo), hi = _mm256_set1_ps(q.hi), delta = _mm256_set1_ps(q.delta);
    int64_t i = begin * 8;
    const int64_t stop = std::min(numel, end * 8);
    for (; i + 8 <= stop; i += 8) {
      _mm256_storeu_ps(dst + i, quant8(_mm256_loadu_ps(src + i), lo, hi, delta));
    }
    for (; i < stop; ++i) dst[i] = quant<float>(src[i], q.lo, q.hi, q.delta);
  });
}
#endif

void quantize_into(const torch::Tensor& x, torch::Tensor& out, double lo, double hi, int64_t bits,
                   Passes* rec = nullptr) {
  check_dense(x, "x");
  TORCH_CHECK(same_layout(x, out) && x.scalar_type() == out.scalar_type(), "quantize: out must be like x");
  TORCH_CHECK(bits >= 1 && bits <= 16, "quantize: bits=", bits, ": expected 1..16");
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case torch::kFloat:
      quantize_impl<float, float>(x.data_ptr<float>(), out.data_ptr<float>(), n, lo, hi, bits, rec);
      break;
    case torch::kDouble:
      quantize_impl<double, double>(x.data_ptr<double>(), out.data_ptr<double>(), n, lo, hi, bits, rec);
      break;
    case torch::kBFloat16:
      quantize_impl<at::BFloat16, float>(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), n,
                                         lo, hi, bits, rec);
      break;
    case torch::kHalf:
      quantize_impl<at::Half, float>(x.data_ptr<at::Half>(), out.data_ptr<at::Half>(), n, lo, hi, bits,
                                     rec);
      break;
    default:
      TORCH_CHECK(false, "quantize: unsupported dtype ", x.scalar_type());
  }
}

torch::Tensor quantize(torch::Tensor x, double lo, double hi, int64_t bits) {
  auto out = torch::empty_like(x, at::MemoryFormat::Preserve);
  TORCH_CHECK(same_layout(out, x), "quantize: x must be dense");
  quantize_into(x, out, lo, hi, bits);
  return out;
}

void quantize_(torch::Tensor x, double lo, double hi, int64_t bits) { quantize_into(x, x, lo, hi, bits); }

// out = Q(x) into a preallocated tensor laid out like x (a reused workspace: no page faults).
void quantize_out(torch::Tensor x, torch::Tensor out, double lo, double hi, int64_t bits) {
  check_dense(out, "out");
  quantize_into(x, out, lo, hi, bits);
}

// ---- straight-through mask ---------------------------------------------------------------------
template <typename S, typename C>
void ste_impl(S* g, const S* ref, int64_t numel, double lo_, double hi_) {
  const C lo = static_cast<C>(lo_), hi = static_cast<C>(hi_);
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const C v = static_cast<C>(ref[i]);
      if (!(v >= lo && v <= hi)) g[i] = S(0);
    }
  });
}

// grad[i] = 0 where ref[i] is outside [lo, hi] (comparison in float, double for double tensors).
void ste_mask_(torch::Tensor grad, torch::Tensor ref, double lo, double hi) {
  check_dense(grad, "grad");
  check_dense(ref, "ref");
  TORCH_CHECK(same_layout(grad, ref) && grad.scalar_type() == ref.scalar_type(),
              "ste_mask_: grad and ref must have one shape, layout and dtype");
  const int64_t n = grad.numel();
  switch (grad.scalar_type()) {
    case torch::kFloat:
      ste_impl<float, float>(grad.data_ptr<float>(), ref.data_ptr<float>(), n, lo, hi);
      break;
    case torch::kDouble:
      ste_impl<double, double>(grad.data_ptr<double>(), ref.data_ptr<double>(), n, lo, hi);
      break;
    case torch::kBFloat16:
      ste_impl<at::BFloat16, float>(grad.data_ptr<at::BFloat16>(), ref.data_ptr<at::BFloat16>(), n, lo, hi);
      break;
    case torch::kHalf:
      ste_impl<at::Half, float>(grad.data_ptr<at::Half>(), ref.data_ptr<at::Half>(), n, lo, hi);
      break;
    default:
      TORCH_CHECK(false, "ste_mask_: unsupported dtype ", grad.scalar_type());
  }
}

// ---- output noise ------------------------------------------------------------------------------
// y (float/double, dims [N, d1, d2, d3] after padding to 4-D, any dense strides) += std·ε'' with
// element index t·numel + logical row-major index and the instance id of sample n = ids[n].
template <typename T>
void out_noise_impl(T* y, const std::vector<int64_t>& size, const std::vector<int64_t>& stride,
                    const int64_t* ids, int64_t t, double std_, uint64_t seed, uint64_t layer_key) {
  const int64_t numel = size[0] * size[1] * size[2] * size[3];
  const int64_t per_n = size[1] * size[2] * size[3];
  const int64_t d23 = size[2] * size[3];
  const T sd = static_cast<T>(std_);
  const uint64_t base = static_cast<uint64_t>(t) * static_cast<uint64_t>(numel);
  const bool dense_rowmajor = stride[3] == 1 && stride[2] == size[3] && stride[1] == d23 &&
                              stride[0] == per_n;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float eps[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * kBlock;
      const int64_t n_all = std::min(kBlock, numel - i0);
      // Split the block at sample boundaries (each sample has its own instance id).
      int64_t i = i0;
      while (i < i0 + n_all) {
        const int64_t s = i / per_n;
        const int64_t stop = std::min(i0 + n_all, (s + 1) * per_n);
        const Stream st(seed, layer_key, kPurposeOut, static_cast<uint64_t>(ids[s]));
        normals_range(st, base + static_cast<uint64_t>(i), stop - i, eps + (i - i0));
        i = stop;
      }
      if (dense_rowmajor) {
        T* dst = y + i0;
        for (int64_t j = 0; j < n_all; ++j) dst[j] = dst[j] + sd * static_cast<T>(eps[j]);
      } else {
        for (int64_t j = 0; j < n_all; ++j) {
          int64_t r = i0 + j;
          const int64_t n = r / per_n;
          r -= n * per_n;
          const int64_t c = r / d23;
          r -= c * d23;
          const int64_t h = r / size[3];
          const int64_t w = r - h * size[3];
          T* p = y + n * stride[0] + c * stride[1] + h * stride[2] + w * stride[3];
          *p = *p + sd * static_cast<T>(eps[j]);
        }
      }
    }
  });
}

void out_noise_(torch::Tensor y, torch::Tensor ids, int64_t t, double std_, uint64_t seed,
                uint64_t layer_key) {
  check_dense(y, "y");
  TORCH_CHECK(y.dim() >= 1 && y.dim() <= 4, "out_noise_: y must be 1-D to 4-D, got ", y.sizes());
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.dim() == 1 &&
                  ids.size(0) == y.size(0),
              "out_noise_: ids must be int64 [", y.size(0), "], got ", ids.sizes());
  std::vector<int64_t> size(y.sizes().begin(), y.sizes().end());
  std::vector<int64_t> stride(y.strides().begin(), y.strides().end());
  while (size.size() < 4) {
    size.push_back(1);
    stride.push_back(1);
  }
  if (y.numel() == 0) return;
  if (y.scalar_type() == torch::kFloat) {
    out_noise_impl<float>(y.data_ptr<float>(), size, stride, ids.data_ptr<int64_t>(), t, std_, seed,
                          layer_key);
  } else if (y.scalar_type() == torch::kDouble) {
    out_noise_impl<double>(y.data_ptr<double>(), size, stride, ids.data_ptr<int64_t>(), t, std_, seed,
                           layer_key);
  } else {
    TORCH_CHECK(false, "out_noise_: y must be float32 or float64, got ", y.scalar_type());
  }
}

// ---- output quantizer + packed mask --------------------------------------------------------------
// For storage element i of part: bit i of words = [lo <= part[i] <= hi];
// acc[i] = Q(part[i]) (first tile) or acc[i] + Q(part[i]). acc may alias part.
template <typename T>
void out_quant_impl(const T* part, T* acc, int32_t* words, int64_t numel, double lo_, double hi_,
                    int64_t bits, bool first) {
  const Q<T> q(lo_, hi_, bits);
  const int64_t nwords = (numel + 31) / 32;
  at::parallel_for(0, nwords, 512, [&](int64_t begin, int64_t end) {
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      const int64_t n = std::min<int64_t>(32, numel - i0);
      uint32_t bitsw = 0;
      T qv[32];
      for (int64_t j = 0; j < n; ++j) {
        const T v = part[i0 + j];
        bitsw |= static_cast<uint32_t>(v >= q.lo && v <= q.hi) << j;
        qv[j] = quant<T>(v, q.lo, q.hi, q.delta);
      }
      if (first) {
        for (int64_t j = 0; j < n; ++j) acc[i0 + j] = qv[j];
      } else {
        for (int64_t j = 0; j < n; ++j) acc[i0 + j] = acc[i0 + j] + qv[j];
      }
      words[wd] = static_cast<int32_t>(bitsw);
    }
  });
}

#if defined(NOISYOPS_CPU_AVX2)
template <>
void out_quant_impl<float>(const float* part, float* acc, int32_t* words, int64_t numel, double lo_,
                           double hi_, int64_t bits, bool first) {
  const Q<float> q(lo_, hi_, bits);
  const __m256 lo = _mm256_set1_ps(q.lo), hi = _mm256_set1_ps(q.hi), delta = _mm256_set1_ps(q.delta);
  const int64_t nwords = (numel + 31) / 32;
  const int64_t full = numel / 32;
  at::parallel_for(0, nwords, 256, [&](int64_t begin, int64_t end) {
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      if (wd < full) {
        uint32_t bw = 0;
        for (int j = 0; j < 4; ++j) {
          const __m256 v = _mm256_loadu_ps(part + i0 + 8 * j);
          bw |= inrange8(v, lo, hi) << (8 * j);
          __m256 qv = quant8(v, lo, hi, delta);
          if (!first) qv = _mm256_add_ps(_mm256_loadu_ps(acc + i0 + 8 * j), qv);
          _mm256_storeu_ps(acc + i0 + 8 * j, qv);
        }
        words[wd] = static_cast<int32_t>(bw);
      } else {
        const int64_t n = numel - i0;
        uint32_t bw = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float v = part[i0 + j];
          bw |= static_cast<uint32_t>(v >= q.lo && v <= q.hi) << j;
          const float qv = quant<float>(v, q.lo, q.hi, q.delta);
          acc[i0 + j] = first ? qv : acc[i0 + j] + qv;
        }
        words[wd] = static_cast<int32_t>(bw);
      }
    }
  });
}
#endif

void out_quant_(torch::Tensor part, torch::Tensor acc, torch::Tensor words, double lo, double hi,
                int64_t bits, bool first) {
  check_dense(part, "part");
  TORCH_CHECK(same_layout(part, acc) && part.scalar_type() == acc.scalar_type(),
              "out_quant_: acc must be like part");
  check_dense(acc, "acc");
  TORCH_CHECK(words.scalar_type() == torch::kInt && words.is_contiguous() &&
                  words.numel() == (part.numel() + 31) / 32,
              "out_quant_: words must be int32 contiguous [", (part.numel() + 31) / 32, "]");
  TORCH_CHECK(bits >= 1 && bits <= 16, "out_quant_: bits=", bits, ": expected 1..16");
  if (part.scalar_type() == torch::kFloat) {
    out_quant_impl<float>(part.data_ptr<float>(), acc.data_ptr<float>(), words.data_ptr<int32_t>(),
                          part.numel(), lo, hi, bits, first);
  } else if (part.scalar_type() == torch::kDouble) {
    out_quant_impl<double>(part.data_ptr<double>(), acc.data_ptr<double>(), words.data_ptr<int32_t>(),
                           part.numel(), lo, hi, bits, first);
  } else {
    TORCH_CHECK(false, "out_quant_: part must be float32 or float64, got ", part.scalar_type());
  }
}

// ---- backward: gradient through one tile's output mask ------------------------------------------
// out[i] = bit i of words ? g[i] : 0, i in storage order (g dense, float or double).
// Masked lanes get +0 (AND with the bit mask in AVX2: the same value as the scalar T(0)).
// In place (out == g) and `sparse`, only the words with a cleared bit are touched: the pass then
// costs reading the words and those lines of g, which wins while few words have a cleared bit
// (a pretrained CIFAR ResNet-32: 3-6%) and loses to the dense pass, which the hardware prefetches,
// beyond about a sixth (benchmarks/mask_pass_cpu.py); the caller decides from `cleared_words`.
constexpr uint32_t kAllOnes = 0xFFFFFFFFu;
template <typename T>
void mask_grad_impl(const T* g, T* out, const int32_t* words, int64_t numel, bool sparse,
                    Passes* rec = nullptr) {
  const int64_t nwords = (numel + 31) / 32;
  const bool skip = sparse && g == out;
  for_items(rec, nwords, 512, [=](int64_t begin, int64_t end) {
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      const int64_t n = std::min<int64_t>(32, numel - i0);
      const uint32_t bw = static_cast<uint32_t>(words[wd]);
      if (skip && bw == kAllOnes) continue;  // nothing masked: nothing to write
      for (int64_t j = 0; j < n; ++j) out[i0 + j] = ((bw >> j) & 1u) ? g[i0 + j] : T(0);
    }
  });
}

#if defined(NOISYOPS_CPU_AVX2)
// 8 lanes of a mask word's byte: lane l passes where bit l of the byte is set (all ones), else 0.
inline __m256 bits8_to_mask(uint32_t byte) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane_bit));
}

template <>
void mask_grad_impl<float>(const float* g, float* out, const int32_t* words, int64_t numel, bool sparse,
                           Passes* rec) {
  const int64_t nwords = (numel + 31) / 32;
  const int64_t full = numel / 32;
  const bool skip = sparse && g == out;
  for_items(rec, nwords, 256, [=](int64_t begin, int64_t end) {
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      const uint32_t bw = static_cast<uint32_t>(words[wd]);
      if (skip && bw == kAllOnes) continue;  // nothing masked: nothing to read or write
      if (wd < full) {
        for (int j = 0; j < 4; ++j) {
          const __m256 m = bits8_to_mask((bw >> (8 * j)) & 0xFFu);
          _mm256_storeu_ps(out + i0 + 8 * j, _mm256_and_ps(_mm256_loadu_ps(g + i0 + 8 * j), m));
        }
      } else {
        for (int64_t j = 0; j < numel - i0; ++j) out[i0 + j] = ((bw >> j) & 1u) ? g[i0 + j] : 0.0f;
      }
    }
  });
}
#endif

// out may be g itself (in place).
void mask_grad_out(torch::Tensor g, torch::Tensor words, torch::Tensor out, bool sparse = false,
                   Passes* rec = nullptr) {
  check_dense(g, "g");
  check_dense(out, "out");
  TORCH_CHECK(same_layout(out, g) && out.scalar_type() == g.scalar_type(), "mask_grad_out: out must be like g");
  TORCH_CHECK(words.scalar_type() == torch::kInt && words.is_contiguous() &&
                  words.numel() == (g.numel() + 31) / 32,
              "mask_grad: words must be int32 contiguous [", (g.numel() + 31) / 32, "]");
  if (g.scalar_type() == torch::kFloat) {
    mask_grad_impl<float>(g.data_ptr<float>(), out.data_ptr<float>(), words.data_ptr<int32_t>(), g.numel(),
                          sparse, rec);
  } else if (g.scalar_type() == torch::kDouble) {
    mask_grad_impl<double>(g.data_ptr<double>(), out.data_ptr<double>(), words.data_ptr<int32_t>(),
                           g.numel(), sparse, rec);
  } else {
    TORCH_CHECK(false, "mask_grad: g must be float32 or float64, got ", g.scalar_type());
  }
}

torch::Tensor mask_grad(torch::Tensor g, torch::Tensor words) {
  check_dense(g, "g");
  auto out = torch::empty_like(g, at::MemoryFormat::Preserve);
  mask_grad_out(g, words, out);
  return out;
}

// ---- backward: how many mask words have a cleared bit -----------------------------------------
// What decides between a dense and a sparse mask pass (noisyops/backends/cpu.py).
int64_t count_cleared_words(const int32_t* words, int64_t nwords) {
  return at::parallel_reduce(
      0, nwords, 1 << 14, int64_t(0),
      [=](int64_t begin, int64_t end, int64_t acc) {
        int64_t i = begin;
#if defined(NOISYOPS_CPU_AVX2)
        const __m256i ones = _mm256_set1_epi32(-1);
        for (; i + 8 <= end; i += 8) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + i));
          const int full = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(w, ones)));
          acc += 8 - __builtin_popcount(static_cast<unsigned>(full));
        }
#endif
        for (; i < end; ++i) acc += static_cast<uint32_t>(words[i]) != kAllOnes;
        return acc;
      },
      std::plus<int64_t>());
}

int64_t cleared_words(torch::Tensor words) {
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == torch::kInt && words.is_contiguous(),
              "cleared_words: words must be a contiguous int32 CPU tensor, got ", words.scalar_type(),
              " on ", words.device());
  return count_cleared_words(words.data_ptr<int32_t>(), words.numel());
}

// ---- backward: the out mask on a gradient this backward does not own ------------------------------
// `MaskedBorrow` zeroes g where the mask bit is clear, in place, after copying each touched word's
// 32 elements aside, and `restore()` writes them back bit for bit: the product reads the masked
// gradient without a copy of g. Writes go through the data pointer (no version-counter bump), and
// nothing else reads g in between (the CPU autograd engine runs one node at a time on one thread),
// so the caller's gradient is unchanged when the backward returns. Worth it when few words have a
// cleared bit (the caller decides from `cleared_words`). Words are grouped in blocks of
// kBorrowWords: the touched words of each block are counted when the pass is recorded, so every
// block writes its own slice of one exactly sized buffer.
constexpr int64_t kBorrowWords = 2048;

struct MaskedBorrow {
  torch::Tensor g;
  std::vector<int64_t> offset;  // per block: index of its first touched word in `ids`; blocks + 1
  std::vector<int64_t> ids;     // the words with a cleared bit, ascending
  std::unique_ptr<char[]> saved;  // their 32 original elements each
  int64_t elem = 0;             // bytes per element
  bool restored = false;

  int64_t touched_words() const { return static_cast<int64_t>(ids.size()); }

  // Records (or runs) the masking; `self` keeps the borrow alive until a recorded pass has run.
  template <typename T>
  static void apply(const std::shared_ptr<MaskedBorrow>& self, const int32_t* words, Passes* rec) {
    const int64_t numel = self->g.numel();
    const int64_t nwords = (numel + 31) / 32;
    const int64_t blocks = (nwords + kBorrowWords - 1) / kBorrowWords;
    self->elem = sizeof(T);
    self->offset.assign(blocks + 1, 0);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t w0 = blk * kBorrowWords, w1 = std::min(nwords, w0 + kBorrowWords);
      self->offset[blk + 1] = self->offset[blk] + count_cleared_words(words + w0, w1 - w0);
    }
    self->ids.resize(self->offset[blocks]);
    self->saved.reset(new char[std::max<int64_t>(1, self->offset[blocks] * 32 * sizeof(T))]);  // no zero-fill
    T* gp = self->g.data_ptr<T>();
    for_items(rec, blocks, 1, [=](int64_t begin, int64_t end) {
      MaskedBorrow& me = *self;
      for (int64_t blk = begin; blk < end; ++blk) {
        int64_t k = me.offset[blk];
        if (k == me.offset[blk + 1]) continue;
        const int64_t w1 = std::min(nwords, (blk + 1) * kBorrowWords);
        for (int64_t wd = blk * kBorrowWords; wd < w1; ++wd) {
          const uint32_t bw = static_cast<uint32_t>(words[wd]);
          if (bw == kAllOnes) continue;
          const int64_t i0 = wd * 32;
          const int64_t n = std::min<int64_t>(32, numel - i0);
          T* keep = reinterpret_cast<T*>(me.saved.get()) + k * 32;
          me.ids[k++] = wd;
#if defined(NOISYOPS_CPU_AVX2)
          if constexpr (std::is_same_v<T, float>) {
            if (n == 32) {
              for (int j = 0; j < 4; ++j) {
                const __m256 v = _mm256_loadu_ps(gp + i0 + 8 * j);
                _mm256_storeu_ps(keep + 8 * j, v);
                _mm256_storeu_ps(gp + i0 + 8 * j, _mm256_and_ps(v, bits8_to_mask((bw >> (8 * j)) & 0xFFu)));
              }
              continue;
            }
          }
#endif
          std::memcpy(keep, gp + i0, n * sizeof(T));
          for (int64_t j = 0; j < n; ++j) {
            if (!((bw >> j) & 1u)) gp[i0 + j] = T(0);
          }
        }
      }
    });
  }

  void restore() {
    if (restored) return;
    const int64_t numel = g.numel();
    char* gp = static_cast<char*>(g.data_ptr());
    const int64_t n = touched_words();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t i0 = ids[k] * 32;
        std::memcpy(gp + i0 * elem, saved.get() + k * 32 * elem, std::min<int64_t>(32, numel - i0) * elem);
      }
    });
    restored = true;
    ids.clear();
    saved.reset();
    offset.clear();
  }
};

std::shared_ptr<MaskedBorrow> mask_grad_borrow(torch::Tensor g, torch::Tensor words, Passes* rec = nullptr) {
  check_dense(g, "g");
  TORCH_CHECK(words.scalar_type() == torch::kInt && words.is_contiguous() &&
                  words.numel() == (g.numel() + 31) / 32,
              "mask_grad_borrow: words must be int32 contiguous [", (g.numel() + 31) / 32, "], got ",
              words.scalar_type(), " ", words.sizes());
  auto b = std::make_shared<MaskedBorrow>();
  b->g = g;
  if (g.scalar_type() == torch::kFloat) {
    MaskedBorrow::apply<float>(b, words.data_ptr<int32_t>(), rec);
  } else if (g.scalar_type() == torch::kDouble) {
    MaskedBorrow::apply<double>(b, words.data_ptr<int32_t>(), rec);
  } else {
    TORCH_CHECK(false, "mask_grad_borrow: g must be float32 or float64, got ", g.scalar_type());
  }
  return b;
}

// ---- backward: re-quantize x and pack its straight-through mask, one pass ------------------------
// out[i] = Q(x[i]) and bit i of words = [lo <= x[i] <= hi], i in storage order: the weight gradient
// needs Q(x) anyway, and the bits (1/32 of x) replace a second read of x for the input's mask.
template <typename T>
void quantize_mask_impl(const T* x, T* out, int32_t* words, int64_t numel, double lo_, double hi_,
                        int64_t bits, Passes* rec = nullptr) {
  const Q<T> q(lo_, hi_, bits);
  const int64_t nwords = (numel + 31) / 32;
  for_items(rec, nwords, 512, [=](int64_t begin, int64_t end) {
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      const int64_t n = std::min<int64_t>(32, numel - i0);
      uint32_t bw = 0;
      for (int64_t j = 0; j < n; ++j) {
        const T v = x[i0 + j];
        bw |= static_cast<uint32_t>(v >= q.lo && v <= q.hi) << j;
        out[i0 + j] = quant<T>(v, q.lo, q.hi, q.delta);
      }
      words[wd] = static_cast<int32_t>(bw);
    }
  });
}

#if defined(NOISYOPS_CPU_AVX2)
template <>
void quantize_mask_impl<float>(const float* x, float* out, int32_t* words, int64_t numel, double lo_,
                               double hi_, int64_t bits, Passes* rec) {
  const Q<float> q(lo_, hi_, bits);
  const int64_t nwords = (numel + 31) / 32;
  const int64_t full = numel / 32;
  for_items(rec, nwords, 256, [=](int64_t begin, int64_t end) {
    const __m256 lo = _mm256_set1_ps(q.lo), hi = _mm256_set1_ps(q.hi), delta = _mm256_set1_ps(q.delta);
    for (int64_t wd = begin; wd < end; ++wd) {
      const int64_t i0 = wd * 32;
      uint32_t bw = 0;
      if (wd < full) {
        for (int j = 0; j < 4; ++j) {
          const __m256 v = _mm256_loadu_ps(x + i0 + 8 * j);
          bw |= inrange8(v, lo, hi) << (8 * j);
          _mm256_storeu_ps(out + i0 + 8 * j, quant8(v, lo, hi, delta));
        }
      } else {
        for (int64_t j = 0; j < numel - i0; ++j) {
          const float v = x[i0 + j];
          bw |= static_cast<uint32_t>(v >= q.lo && v <= q.hi) << j;
          out[i0 + j] = quant<float>(v, q.lo, q.hi, q.delta);
        }
      }
      words[wd] = static_cast<int32_t>(bw);
    }
  });
}
#endif

void quantize_mask_out(torch::Tensor x, torch::Tensor out, torch::Tensor words, double lo, double hi,
                       int64_t bits, Passes* rec = nullptr) {
  check_dense(x, "x");
  check_dense(out, "out");
  TORCH_CHECK(same_layout(x, out) && x.scalar_type() == out.scalar_type(),
              "quantize_mask_out: out must have the shape, layout and dtype of x");
  TORCH_CHECK(words.scalar_type() == torch::kInt && words.is_contiguous() &&
                  words.numel() == (x.numel() + 31) / 32,
              "quantize_mask_out: words must be int32 contiguous [", (x.numel() + 31) / 32, "], got ",
              words.scalar_type(), " ", words.sizes());
  TORCH_CHECK(bits >= 1 && bits <= 16, "quantize_mask_out: bits=", bits, ": expected 1..16");
  if (x.scalar_type() == torch::kFloat) {
    quantize_mask_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), words.data_ptr<int32_t>(),
                              x.numel(), lo, hi, bits, rec);
  } else if (x.scalar_type() == torch::kDouble) {
    quantize_mask_impl<double>(x.data_ptr<double>(), out.data_ptr<double>(), words.data_ptr<int32_t>(),
                               x.numel(), lo, hi, bits, rec);
  } else {
    TORCH_CHECK(false, "quantize_mask_out: x must be float32 or float64, got ", x.scalar_type());
  }
}

// ---- stream throughput helper (benchmarks) ---------------------------------------------------------
// Normals of one stream into a float32 tensor, vectorised (the weight kernel's generator).
torch::Tensor normals(uint64_t seed, uint64_t layer_key, int64_t purpose, uint64_t instance, int64_t numel) {
  TORCH_CHECK(numel >= 0, "numel=", numel, ": expected >= 0");
  auto out = torch::empty({numel}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  const Stream s(seed, layer_key, static_cast<uint32_t>(purpose), instance);
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t e0 = b * kBlock;
      normals_range(s, static_cast<uint64_t>(e0), std::min(kBlock, numel - e0), o + e0);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu

void register_cpu_kernels(pybind11::module_& m) {
  using namespace pybind11::literals;
  using cpu::Passes;
  pybind11::class_<Passes>(m, "CpuPasses",
                           "Independent kernels recorded and then run as one parallel region (run())")
      .def(pybind11::init<>())
      .def("noisy_weights_",
           [](Passes& ps, torch::Tensor w, torch::Tensor out, std::vector<int64_t> instances, double lo,
              double hi, bool clip, int64_t bits, double sigma, double eta_mul, uint64_t seed,
              uint64_t layer_key) {
             cpu::noisy_weights_(w, out, instances, lo, hi, clip, bits, sigma, eta_mul, seed, layer_key, 1,
                                 &ps);
             ps.keep.insert(ps.keep.end(), {w, out});
           },
           "record cpu_noisy_weights_", "w"_a, "out"_a, "instances"_a, "lo"_a, "hi"_a, "clip"_a, "bits"_a,
           "sigma"_a, "eta_mul"_a, "seed"_a, "layer_key"_a)
      .def("quantize_out",
           [](Passes& ps, torch::Tensor x, torch::Tensor out, double lo, double hi, int64_t bits) {
             cpu::check_dense(out, "out");
             cpu::quantize_into(x, out, lo, hi, bits, &ps);
             ps.keep.insert(ps.keep.end(), {x, out});
           },
           "record cpu_quantize_out", "x"_a, "out"_a, "lo"_a, "hi"_a, "bits"_a)
      .def("quantize_mask_out",
           [](Passes& ps, torch::Tensor x, torch::Tensor out, torch::Tensor words, double lo, double hi,
              int64_t bits) {
             cpu::quantize_mask_out(x, out, words, lo, hi, bits, &ps);
             ps.keep.insert(ps.keep.end(), {x, out, words});
           },
           "record cpu_quantize_mask_out", "x"_a, "out"_a, "words"_a, "lo"_a, "hi"_a, "bits"_a)
      .def("mask_grad_out",
           [](Passes& ps, torch::Tensor g, torch::Tensor words, torch::Tensor out, bool sparse) {
             cpu::mask_grad_out(g, words, out, sparse, &ps);
             ps.keep.insert(ps.keep.end(), {g, words, out});
           },
           "record cpu_mask_grad_out", "g"_a, "words"_a, "out"_a, "sparse"_a = false)
      .def("mask_grad_borrow",
           [](Passes& ps, torch::Tensor g, torch::Tensor words) {
             auto b = cpu::mask_grad_borrow(g, words, &ps);
             ps.keep.insert(ps.keep.end(), {g, words});
             return b;
           },
           "record cpu_mask_grad_borrow (the returned borrow is filled when run() returns)", "g"_a,
           "words"_a)
      .def("__len__", [](const Passes& ps) { return ps.list.size(); })
      .def("run", &Passes::run, "run the recorded kernels as one parallel region, then clear the list",
           pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<cpu::MaskedBorrow, std::shared_ptr<cpu::MaskedBorrow>>(
      m, "CpuMaskedBorrow", "g masked in place by cpu_mask_grad_borrow; restore() puts g back bit for bit")
      .def("restore", &cpu::MaskedBorrow::restore, "write the saved elements back (idempotent)")
      .def_property_readonly("touched_words", &cpu::MaskedBorrow::touched_words,
                             "words of the mask with a cleared bit (0 after restore)")
      .def_property_readonly("restored", [](const cpu::MaskedBorrow& b) { return b.restored; });
  m.def("cpu_cleared_words", &cpu::cleared_words,
        "number of int32 mask words with at least one cleared bit", "words"_a);
  m.def("cpu_mask_grad_borrow",
        [](torch::Tensor g, torch::Tensor words) { return cpu::mask_grad_borrow(g, words); },
        "g = 0 where the packed mask bit is clear, in place, keeping the overwritten elements for "
        "restore() (no version bump)", "g"_a, "words"_a);
  m.def("cpu_noisy_weights_",
        [](torch::Tensor w, torch::Tensor out, std::vector<int64_t> instances, double lo, double hi,
           bool clip, int64_t bits, double sigma, double eta_mul, uint64_t seed, uint64_t layer_key,
           int64_t spatial) {
          cpu::noisy_weights_(w, out, instances, lo, hi, clip, bits, sigma, eta_mul, seed, layer_key,
                              spatial);
        },
        "out[k] = Q(clip(w))*(1 + eta_mul*eps'_k) + sigma*eps_k for instance ids k (float/double); "
        "spatial = kh*kw > 1 writes each out[k] of a conv weight channels-last",
        "w"_a, "out"_a, "instances"_a, "lo"_a, "hi"_a, "clip"_a, "bits"_a, "sigma"_a, "eta_mul"_a,
        "seed"_a, "layer_key"_a, "spatial"_a = 1);
  m.def("cpu_quantize", &cpu::quantize, "Q(x; lo, hi, bits) as a new tensor like x", "x"_a, "lo"_a,
        "hi"_a, "bits"_a);
  m.def("cpu_quantize_", &cpu::quantize_, "Q(x; lo, hi, bits) in place", "x"_a, "lo"_a, "hi"_a,
        "bits"_a);
  m.def("cpu_quantize_out", &cpu::quantize_out, "out = Q(x; lo, hi, bits), out laid out like x", "x"_a,
        "out"_a, "lo"_a, "hi"_a, "bits"_a);
  m.def("cpu_ste_mask_", &cpu::ste_mask_, "grad = 0 where ref is outside [lo, hi], in place",
        "grad"_a, "ref"_a, "lo"_a, "hi"_a);
  m.def("cpu_out_noise_", &cpu::out_noise_, "y += std * output noise of tile t (purpose 2), in place",
        "y"_a, "ids"_a, "t"_a, "std"_a, "seed"_a, "layer_key"_a);
  m.def("cpu_out_quant_", &cpu::out_quant_,
        "packed straight-through mask of part into words; acc = (first ? 0 : acc) + Q(part)",
        "part"_a, "acc"_a, "words"_a, "lo"_a, "hi"_a, "bits"_a, "first"_a);
  m.def("cpu_mask_grad", &cpu::mask_grad, "g where the packed mask bit is set, else 0 (new tensor)",
        "g"_a, "words"_a);
  m.def("cpu_mask_grad_out",
        [](torch::Tensor g, torch::Tensor words, torch::Tensor out, bool sparse) {
          cpu::mask_grad_out(g, words, out, sparse);
        },
        "out = g where the packed mask bit is set, else 0 (out may be g: in place; sparse=True then "
        "skips the all-ones words, worth it when few words have a cleared bit)",
        "g"_a, "words"_a, "out"_a, "sparse"_a = false);
  m.def("cpu_quantize_mask_out",
        [](torch::Tensor x, torch::Tensor out, torch::Tensor words, double lo, double hi, int64_t bits) {
          cpu::quantize_mask_out(x, out, words, lo, hi, bits);
        },
        "out = Q(x; lo, hi, bits) and words = packed bits [lo <= x <= hi] (storage order), one pass",
        "x"_a, "out"_a, "words"_a, "lo"_a, "hi"_a, "bits"_a);
  m.def("cpu_normals", &cpu::normals, "vectorised float32 normals of one stream [numel]", "seed"_a,
        "layer_key"_a, "purpose"_a, "instance"_a, "numel"_a);
}

}  // namespace noisyops
