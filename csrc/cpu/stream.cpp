// The noise stream on the CPU (csrc/include/noisyops/philox.h), exposed for tests and benchmarks.
#include <torch/extension.h>

#include "noisyops/philox.h"

namespace noisyops {
namespace {

torch::Tensor stream_words(uint64_t seed, uint64_t layer_key, uint32_t purpose, uint64_t instance,
                           int64_t numel) {
  TORCH_CHECK(numel >= 0, "numel=", numel, ": expected >= 0");
  auto out = torch::empty({numel}, torch::kInt64);
  int64_t* o = out.data_ptr<int64_t>();
  const Stream s(seed, layer_key, purpose, instance);
  const int64_t groups = (numel + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const U32x4 w = s.words(static_cast<uint64_t>(g));
    const uint32_t v[4] = {w.x, w.y, w.z, w.w};
    for (int j = 0; j < 4 && 4 * g + j < numel; ++j) o[4 * g + j] = v[j];
  }
  return out;
}

torch::Tensor stream_uniforms(uint64_t seed, uint64_t layer_key, uint32_t purpose, uint64_t instance,
                              int64_t numel) {
  auto words = stream_words(seed, layer_key, purpose, instance, numel);
  auto out = torch::empty({numel}, torch::kFloat32);
  const int64_t* w = words.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < numel; ++i) o[i] = uint_to_uniform(static_cast<uint32_t>(w[i]));
  return out;
}

// Normals of one stream, element e at out[e]: four normals per Philox call, both Box-Muller outputs.
torch::Tensor stream_normals(uint64_t seed, uint64_t layer_key, uint32_t purpose, uint64_t instance,
                             int64_t numel) {
  TORCH_CHECK(numel >= 0, "numel=", numel, ": expected >= 0");
  auto out = torch::empty({numel}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  const Stream s(seed, layer_key, purpose, instance);
  const int64_t groups = (numel + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const F32x4 n = s.normals4(static_cast<uint64_t>(g));
    const float v[4] = {n.x, n.y, n.z, n.w};
    for (int j = 0; j < 4 && 4 * g + j < numel; ++j) o[4 * g + j] = v[j];
  }
  return out;
}

}  // namespace

void register_stream(pybind11::module_& m) {
  m.def("stream_words", &stream_words, "uint32 Philox words of one stream (as int64) [numel]",
        pybind11::arg("seed"), pybind11::arg("layer_key"), pybind11::arg("purpose"),
        pybind11::arg("instance"), pybind11::arg("numel"));
  m.def("stream_uniforms", &stream_uniforms, "float32 uniforms of one stream [numel]",
        pybind11::arg("seed"), pybind11::arg("layer_key"), pybind11::arg("purpose"),
        pybind11::arg("instance"), pybind11::arg("numel"));
  m.def("stream_normals", &stream_normals, "float32 normals of one stream [numel]",
        pybind11::arg("seed"), pybind11::arg("layer_key"), pybind11::arg("purpose"),
        pybind11::arg("instance"), pybind11::arg("numel"));
}

}  // namespace noisyops
