// Launch API of the CUDA kernels (kernels.cu): plain pointers, no torch headers.
//
// Every entry point runs on the device (a CUDA kernel on `stream`) when `device` is true, else on
// the host (a serial loop over the same NOISYOPS_HD functions, for tests without a GPU). Dense
// tensors only; `dtype` codes name the storage type of a buffer. Returns a cudaError_t value
// (0 = success; the host path always succeeds).
#pragma once
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "noisy_math.h"

namespace noisyops {
namespace cudapath {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// out[k, i] = pre-pass(w[i]) for instance instances[k]; w float32 [numel], out [K, numel] in out_dtype.
int weight_prepass(const float* w, void* out, int out_dtype, int64_t numel, const int64_t* instances,
                   int64_t K, const PrepassParams& p, bool device, cudaStream_t stream);

// out[i] = Q(float(x[i]); q) cast to out_dtype (q.on = false copies/casts).
int quantize(const void* x, int x_dtype, void* out, int out_dtype, int64_t n, const Quantizer& q,
             bool device, cudaStream_t stream);

// One crossbar tile of the output: noise + quantize float(y_t) (y_dtype, storage order), packed
// mask words into mask (int32 [ceil(numel/32)] or null), digital sum into acc (float32) or, at the
// last tile, acc + bias into out (out_dtype). first/last: t == 0 / t == T-1.
int output_tile(const void* y_t, int y_dtype, float* acc, void* out, int out_dtype, int32_t* mask,
                const float* bias, bool first, bool last, const OutTileParams& p, bool device,
                cudaStream_t stream);

// out[i] = float(g[i]) * 1{lo <= float(ref[i]) <= hi}, out in out_dtype.
int ste_range_apply(const void* g, int g_dtype, const void* ref, int ref_dtype, void* out, int out_dtype,
                    int64_t n, float lo, float hi, bool device, cudaStream_t stream);

// out[i] = float(g[i]) * bit i of words (storage order), out in out_dtype.
int ste_bits_apply(const void* g, int g_dtype, const int32_t* words, void* out, int out_dtype, int64_t n,
                   bool device, cudaStream_t stream);

}  // namespace cudapath
}  // namespace noisyops
