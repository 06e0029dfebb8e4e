// noisyops._C_cuda: tensors -> the plain-pointer entry points of kernels.cu.
//
// The only file of the CUDA extension that includes torch headers. Each function checks its
// arguments (dtype, density, device, sizes), then runs the CUDA kernel on the current stream for
// CUDA tensors or the host loop over the same NOISYOPS_HD math for CPU tensors (tests without a
// GPU). Outputs are written into caller-provided tensors, so the Python glue owns every allocation
// and memory format.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"

namespace noisyops {
namespace cudapath {
namespace {

int dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kF32;
    case torch::kFloat16: return kF16;
    case torch::kBFloat16: return kBF16;
    default:
      TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported (expected float32, float16 or bfloat16)");
  }
  return -1;
}

// Dense (non-overlapping and without holes) in some memory order: the kernels walk storage order.
void check_dense(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, ": expected a dense tensor, got sizes ", t.sizes(),
              " strides ", t.strides());
}

void check_same_device(const torch::Tensor& a, const torch::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), nb, " is on ", b.device(), " but ", na, " is on ", a.device());
}

void check_same_order(const torch::Tensor& a, const torch::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides(), nb, " (sizes ", b.sizes(), ", strides ",
              b.strides(), ") must have the sizes and strides of ", na, " (sizes ", a.sizes(), ", strides ",
              a.strides(), ")");
}

struct Exec {
  bool device;
  cudaStream_t stream;
  c10::optional<c10::cuda::CUDAGuard> guard;
  explicit Exec(const torch::Tensor& t) : device(t.is_cuda()), stream(nullptr) {
    TORCH_CHECK(t.is_cuda() || t.is_cpu(), "expected CUDA or CPU tensors, got ", t.device());
    if (device) {
      guard.emplace(t.device());
      stream = at::cuda::getCurrentCUDAStream(t.device().index()).stream();
    }
  }
  void check(int err, const char* what) const {
    TORCH_CHECK(err == 0, "noisyops._C_cuda.", what, ": CUDA error ", err, " (",
                cudaGetErrorString(static_cast<cudaError_t>(err)), ")");
  }
};

void weight_prepass_t(const torch::Tensor& w, torch::Tensor& out, const torch::Tensor& instances, uint64_t seed,
                      uint64_t layer_key, double lo, double hi, double sigma, double eta_mul, bool clip,
                      int64_t bits, bool add, bool mul) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "w: expected a contiguous float32 tensor");
  TORCH_CHECK(instances.scalar_type() == torch::kInt64 && instances.dim() == 1 && instances.is_contiguous(),
              "instances: expected a contiguous int64 [K] tensor, got ", instances.sizes());
  TORCH_CHECK(out.is_contiguous() && out.dim() >= 1 && out.size(0) == instances.size(0) &&
                  out.numel() == instances.size(0) * w.numel(),
              "out: expected a contiguous [K=", instances.size(0), ", *", w.sizes(), "] tensor, got ", out.sizes());
  TORCH_CHECK(bits >= 0 && bits <= 16, "bits=", bits, ": expected 0..16");
  check_same_device(w, out, "w", "out");
  check_same_device(w, instances, "w", "instances");
  Exec ex(w);
  PrepassParams p{seed, layer_key, static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(sigma),
                  static_cast<float>(eta_mul), clip ? 1 : 0, static_cast<int>(bits), add ? 1 : 0, mul ? 1 : 0};
  ex.check(weight_prepass(w.data_ptr<float>(), out.data_ptr(), dtype_code(out, "out"), w.numel(),
                          instances.data_ptr<int64_t>(), instances.size(0), p, ex.device, ex.stream),
           "weight_prepass");
}

void quantize_t(const torch::Tensor& x, torch::Tensor& out, double lo, double hi, int64_t bits) {
  check_dense(x, "x");
  check_same_order(x, out, "x", "out");
  check_same_device(x, out, "x", "out");
  TORCH_CHECK(bits >= 0 && bits <= 16, "bits=", bits, ": expected 0..16");
  Exec ex(x);
  const Quantizer q(static_cast<float>(lo), static_cast<float>(hi), static_cast<int>(bits));
  ex.check(quantize(x.data_ptr(), dtype_code(x, "x"), out.data_ptr(), dtype_code(out, "out"), x.numel(), q,
                    ex.device, ex.stream),
           "quantize");
}

void output_tile_t(const torch::Tensor& y_t, torch::Tensor& acc, torch::Tensor& out, torch::Tensor& mask,
                   const c10::optional<torch::Tensor>& bias, int64_t tile, bool first, bool last, uint64_t seed,
                   uint64_t layer_key, double noise, double lo, double hi, int64_t bits, int64_t channels,
                   int64_t hw, int64_t batch, bool channels_last, int64_t sampling, uint64_t counter,
                   const torch::Tensor& ids) {
  check_dense(y_t, "y_t");
  check_same_order(y_t, out, "y_t", "out");
  check_same_device(y_t, out, "y_t", "out");
  if (!(first && last)) {
    TORCH_CHECK(acc.scalar_type() == torch::kFloat32, "acc: expected float32");
    check_same_order(y_t, acc, "y_t", "acc");
  }
  const int64_t numel = y_t.numel();
  TORCH_CHECK(batch >= 1 && numel % batch == 0, "batch=", batch, ": expected a divisor of numel(y)=", numel);
  TORCH_CHECK(channels >= 1 && hw >= 1 && numel % (channels * hw) == 0, "channels=", channels, ", hw=", hw,
              ": expected channels*hw to divide numel(y)=", numel);
  TORCH_CHECK(sampling >= 0 && sampling <= 2, "sampling=", sampling, ": expected 0, 1 or 2");
  int32_t* mask_ptr = nullptr;
  if (bits > 0) {
    TORCH_CHECK(mask.scalar_type() == torch::kInt32 && mask.is_contiguous() && mask.numel() == (numel + 31) / 32,
                "mask: expected a contiguous int32 [", (numel + 31) / 32, "] tensor, got ", mask.sizes());
    check_same_device(y_t, mask, "y_t", "mask");
    mask_ptr = mask.data_ptr<int32_t>();
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == channels,
                "bias: expected a contiguous float32 [", channels, "] tensor, got ", bias->sizes());
    check_same_device(y_t, *bias, "y_t", "bias");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t* ids_ptr = nullptr;
  if (sampling == kPerInstance) {
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.numel() == batch,
                "ids: expected a contiguous int64 [", batch, "] tensor, got ", ids.sizes());
    check_same_device(y_t, ids, "y_t", "ids");
    ids_ptr = ids.data_ptr<int64_t>();
  }
  Exec ex(y_t);
  OutTileParams p;
  p.seed = seed;
  p.layer_key = layer_key;
  p.noise = static_cast<float>(noise);
  p.q = Quantizer(static_cast<float>(lo), static_cast<float>(hi), static_cast<int>(bits));
  p.tile = tile;
  p.layout = OutLayout{numel, channels, hw, numel / batch, channels_last ? 1 : 0};
  p.inst = Instances{static_cast<int>(sampling), counter, ids_ptr};
  ex.check(output_tile(y_t.data_ptr(), dtype_code(y_t, "y_t"), (first && last) ? nullptr : acc.data_ptr<float>(), out.data_ptr(),
                       dtype_code(out, "out"), mask_ptr, bias_ptr, first, last, p, ex.device, ex.stream),
           "output_tile");
}

void ste_range_t(const torch::Tensor& g, const torch::Tensor& ref, torch::Tensor& out, double lo, double hi) {
  check_dense(g, "g");
  check_same_order(g, ref, "g", "ref");
  check_same_order(g, out, "g", "out");
  check_same_device(g, ref, "g", "ref");
  check_same_device(g, out, "g", "out");
  Exec ex(g);
  ex.check(ste_range_apply(g.data_ptr(), dtype_code(g, "g"), ref.data_ptr(), dtype_code(ref, "ref"), out.data_ptr(),
                           dtype_code(out, "out"), g.numel(), static_cast<float>(lo), static_cast<float>(hi),
                           ex.device, ex.stream),
           "ste_range");
}

void ste_bits_t(const torch::Tensor& g, const torch::Tensor& words, torch::Tensor& out) {
  check_dense(g, "g");
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.is_contiguous() && words.numel() == (g.numel() + 31) / 32,
              "words: expected a contiguous int32 [", (g.numel() + 31) / 32, "] tensor, got ", words.sizes());
  check_same_order(g, out, "g", "out");
  check_same_device(g, words, "g", "words");
  check_same_device(g, out, "g", "out");
  Exec ex(g);
  ex.check(ste_bits_apply(g.data_ptr(), dtype_code(g, "g"), words.data_ptr<int32_t>(), out.data_ptr(),
                          dtype_code(out, "out"), g.numel(), ex.device, ex.stream),
           "ste_bits");
}

}  // namespace
}  // namespace cudapath
}  // namespace noisyops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace noisyops::cudapath;
  m.doc() = "noisyops CUDA kernels (weight pre-pass, activation quantizers, output tiles, STE masks); "
            "CPU tensors run the same math on the host";
  m.def("weight_prepass", &weight_prepass_t,
        "out[k] = Wq(w) * (1 + eta_mul*eps'_k) + sigma*eps_k for instance instances[k]; w float32 contiguous, "
        "out [K, *w.shape] (float32/float16/bfloat16)",
        py::arg("w"), py::arg("out"), py::arg("instances"), py::arg("seed"), py::arg("layer_key"), py::arg("lo"),
        py::arg("hi"), py::arg("sigma"), py::arg("eta_mul"), py::arg("clip"), py::arg("bits"), py::arg("add"),
        py::arg("mul"));
  m.def("quantize", &quantize_t, "out = Q(x; lo, hi, bits) cast to out's dtype (x, out dense, same strides)",
        py::arg("x"), py::arg("out"), py::arg("lo"), py::arg("hi"), py::arg("bits"));
  m.def("output_tile", &output_tile_t,
        "one crossbar tile: noise + quantize y_t (any float dtype, read as float32), packed STE mask, digital sum into acc/out (+bias at "
        "the last tile)",
        py::arg("y_t"), py::arg("acc"), py::arg("out"), py::arg("mask"), py::arg("bias"), py::arg("tile"),
        py::arg("first"), py::arg("last"), py::arg("seed"), py::arg("layer_key"), py::arg("noise"), py::arg("lo"),
        py::arg("hi"), py::arg("bits"), py::arg("channels"), py::arg("hw"), py::arg("batch"),
        py::arg("channels_last"), py::arg("sampling"), py::arg("counter"), py::arg("ids"));
  m.def("ste_range", &ste_range_t, "out = g * 1{lo <= ref <= hi} (g, ref, out: float32/float16/bfloat16, computed in float32)",
        py::arg("g"), py::arg("ref"), py::arg("out"), py::arg("lo"), py::arg("hi"));
  m.def("ste_bits", &ste_bits_t, "out = g * bit i of words (storage order); g, out float32/float16/bfloat16", py::arg("g"),
        py::arg("words"), py::arg("out"));
}
