// CUDA kernels of the CUDA path: weight pre-pass, activation quantizer, output tile (noise +
// quantizer + bit-packed straight-through mask + digital tile sum + bias), straight-through masks.
//
// No torch headers (this file compiles in seconds): binding.cpp adapts tensors to these entry
// points. Each kernel is a grid-stride loop around a NOISYOPS_HD function of noisy_math.h; each
// entry point also has a host loop over the same function (device = false), which is how the tests
// on a GPU-less machine run this file's math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels.h"

namespace noisyops {
namespace cudapath {
namespace {

constexpr int kThreads = 256;          // multiple of 32: output_tile packs one mask word per warp
constexpr int64_t kMaxBlocks = 1 << 16;

int64_t blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

// Storage conversions (round-to-nearest-even, as torch's .to()).
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static NOISYOPS_HD float load(float v) { return v; }
  static NOISYOPS_HD float store(float v) { return v; }
};
template <> struct Cvt<__half> {
  static NOISYOPS_HD float load(__half v) { return __half2float(v); }
  static NOISYOPS_HD __half store(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static NOISYOPS_HD float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static NOISYOPS_HD __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Call f.template operator()<T>() with T the storage type of dtype code `dt`.
template <typename F> int with_dtype(int dt, F&& f) {
  switch (dt) {
    case kF32: return f(static_cast<float*>(nullptr));
    case kF16: return f(static_cast<__half*>(nullptr));
    case kBF16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int launched() { return static_cast<int>(cudaGetLastError()); }

// ---- weight pre-pass ----------------------------------------------------------------------------
template <typename TOut>
NOISYOPS_HD void prepass_group(const float* w, TOut* out, int64_t numel, uint64_t instance, int64_t g,
                               const PrepassParams& p) {
  const int64_t e0 = 4 * g;
  float v[4];
  for (int j = 0; j < 4; ++j) v[j] = (e0 + j < numel) ? w[e0 + j] : 0.0f;
  prepass_apply4(p, instance, static_cast<uint64_t>(g), v);
  for (int j = 0; j < 4; ++j)
    if (e0 + j < numel) out[e0 + j] = Cvt<TOut>::store(v[j]);
}

template <typename TOut>
__global__ void __launch_bounds__(kThreads) prepass_kernel(const float* __restrict__ w, TOut* __restrict__ out,
                                                           int64_t numel, const int64_t* __restrict__ instances,
                                                           int64_t K, PrepassParams p) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const uint64_t instance = static_cast<uint64_t>(instances[k]);
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride)
      prepass_group(w, out + k * numel, numel, instance, g, p);
  }
}

// ---- activation quantizer -------------------------------------------------------------------------
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const TIn* __restrict__ x, TOut* __restrict__ out,
                                                            int64_t n, Quantizer q) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = Cvt<TOut>::store(q(Cvt<TIn>::load(x[i])));
}

// ---- output tile --------------------------------------------------------------------------------
template <typename TIn, typename TOut>
NOISYOPS_HD float output_element(const TIn* y_t, float* acc, TOut* out, const float* bias, bool first,
                                 bool last, const OutTileParams& p, int64_t s, bool* pass) {
  const float yq = out_tile_value(p, s, Cvt<TIn>::load(y_t[s]), pass);
  const float a = out_tile_accumulate(yq, first, first ? 0.0f : acc[s], last, bias,
                                      bias != nullptr ? channel_of(p.layout, s) : 0);
  if (last) out[s] = Cvt<TOut>::store(a);
  else acc[s] = a;
  return a;
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads) output_tile_kernel(const TIn* __restrict__ y_t, float* acc,
                                                               TOut* out, int32_t* __restrict__ mask,
                                                               const float* __restrict__ bias, int first,
                                                               int last, OutTileParams p) {
  const int64_t n = p.layout.numel;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // base is a multiple of 32: one warp = one mask word, bit `lane` = element base + lane.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < n;
       base += stride) {
    const int64_t s = base + lane;
    bool pass = false;
    if (s < n) output_element(y_t, acc, out, bias, first != 0, last != 0, p, s, &pass);
    const unsigned bits = __ballot_sync(0xffffffffu, pass);
    if (mask != nullptr && lane == 0) mask[base >> 5] = static_cast<int32_t>(bits);
  }
}

// ---- straight-through masks -------------------------------------------------------------------
template <typename TG, typename TRef, typename TOut>
__global__ void __launch_bounds__(kThreads) ste_range_kernel(const TG* __restrict__ g, const TRef* __restrict__ ref,
                                                             TOut* __restrict__ out, int64_t n, float lo, float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = Cvt<TOut>::store(ste_range(Cvt<TG>::load(g[i]), Cvt<TRef>::load(ref[i]), lo, hi));
}

template <typename TG, typename TOut>
__global__ void __launch_bounds__(kThreads) ste_bits_kernel(const TG* __restrict__ g, const int32_t* __restrict__ words,
                                                            TOut* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = Cvt<TOut>::store(ste_bits(Cvt<TG>::load(g[i]), words, i));
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------------
int weight_prepass(const float* w, void* out, int out_dtype, int64_t numel, const int64_t* instances,
                   int64_t K, const PrepassParams& p, bool device, cudaStream_t stream) {
  return with_dtype(out_dtype, [&](auto* tag) -> int {
    using TOut = std::remove_pointer_t<decltype(tag)>;
    TOut* o = static_cast<TOut*>(out);
    const int64_t groups = (numel + 3) / 4;
    if (numel == 0 || K == 0) return 0;
    if (!device) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t g = 0; g < groups; ++g)
          prepass_group(w, o + k * numel, numel, static_cast<uint64_t>(instances[k]), g, p);
      return 0;
    }
    const dim3 grid(static_cast<unsigned>(blocks_for(groups)), static_cast<unsigned>(K < 65535 ? K : 65535));
    prepass_kernel<TOut><<<grid, kThreads, 0, stream>>>(w, o, numel, instances, K, p);
    return launched();
  });
}

int quantize(const void* x, int x_dtype, void* out, int out_dtype, int64_t n, const Quantizer& q, bool device,
             cudaStream_t stream) {
  return with_dtype(x_dtype, [&](auto* tin) -> int {
    using TIn = std::remove_pointer_t<decltype(tin)>;
    return with_dtype(out_dtype, [&](auto* tout) -> int {
      using TOut = std::remove_pointer_t<decltype(tout)>;
      const TIn* xi = static_cast<const TIn*>(x);
      TOut* o = static_cast<TOut*>(out);
      if (n == 0) return 0;
      if (!device) {
        for (int64_t i = 0; i < n; ++i) o[i] = Cvt<TOut>::store(q(Cvt<TIn>::load(xi[i])));
        return 0;
      }
      quantize_kernel<TIn, TOut><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(xi, o, n, q);
      return launched();
    });
  });
}

int output_tile(const void* y_t, int y_dtype, float* acc, void* out, int out_dtype, int32_t* mask,
                const float* bias, bool first, bool last, const OutTileParams& p, bool device, cudaStream_t stream) {
  return with_dtype(y_dtype, [&](auto* tin) -> int {
    using TIn = std::remove_pointer_t<decltype(tin)>;
    return with_dtype(out_dtype, [&](auto* tag) -> int {
      using TOut = std::remove_pointer_t<decltype(tag)>;
      const TIn* y = static_cast<const TIn*>(y_t);
      TOut* o = static_cast<TOut*>(out);
      const int64_t n = p.layout.numel;
      if (n == 0) return 0;
      if (!device) {
        const int64_t words = (n + 31) / 32;
        for (int64_t wd = 0; wd < words; ++wd) {
          uint32_t bits = 0;
          for (int j = 0; j < 32 && 32 * wd + j < n; ++j) {
            bool pass = false;
            output_element(y, acc, o, bias, first, last, p, 32 * wd + j, &pass);
            if (pass) bits |= 1u << j;
          }
          if (mask != nullptr) mask[wd] = static_cast<int32_t>(bits);
        }
        return 0;
      }
      output_tile_kernel<TIn, TOut><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
          y, acc, o, mask, bias, first ? 1 : 0, last ? 1 : 0, p);
      return launched();
    });
  });
}

int ste_range_apply(const void* g, int g_dtype, const void* ref, int ref_dtype, void* out, int out_dtype, int64_t n,
                    float lo, float hi, bool device, cudaStream_t stream) {
  return with_dtype(g_dtype, [&](auto* tg) -> int {
    using TG = std::remove_pointer_t<decltype(tg)>;
    return with_dtype(ref_dtype, [&](auto* tr) -> int {
      using TRef = std::remove_pointer_t<decltype(tr)>;
      return with_dtype(out_dtype, [&](auto* to) -> int {
        using TOut = std::remove_pointer_t<decltype(to)>;
        const TG* gi = static_cast<const TG*>(g);
        const TRef* r = static_cast<const TRef*>(ref);
        TOut* o = static_cast<TOut*>(out);
        if (n == 0) return 0;
        if (!device) {
          for (int64_t i = 0; i < n; ++i)
            o[i] = Cvt<TOut>::store(ste_range(Cvt<TG>::load(gi[i]), Cvt<TRef>::load(r[i]), lo, hi));
          return 0;
        }
        ste_range_kernel<TG, TRef, TOut><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
            gi, r, o, n, lo, hi);
        return launched();
      });
    });
  });
}

int ste_bits_apply(const void* g, int g_dtype, const int32_t* words, void* out, int out_dtype, int64_t n,
                   bool device, cudaStream_t stream) {
  return with_dtype(g_dtype, [&](auto* tg) -> int {
    using TG = std::remove_pointer_t<decltype(tg)>;
    return with_dtype(out_dtype, [&](auto* to) -> int {
      using TOut = std::remove_pointer_t<decltype(to)>;
      const TG* gi = static_cast<const TG*>(g);
      TOut* o = static_cast<TOut*>(out);
      if (n == 0) return 0;
      if (!device) {
        for (int64_t i = 0; i < n; ++i) o[i] = Cvt<TOut>::store(ste_bits(Cvt<TG>::load(gi[i]), words, i));
        return 0;
      }
      ste_bits_kernel<TG, TOut><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(gi, words, o, n);
      return launched();
    });
  });
}

}  // namespace cudapath
}  // namespace noisyops
