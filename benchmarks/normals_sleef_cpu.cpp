// Normals per second of the AVX2 Philox + Box-Muller loop (csrc/cpu/philox_avx2.h), one thread,
// 2^24 normals, one line per repeat (3 repeats); writes them to $OUTF for an ulp check against the
// reference (docs/benchmarks_cpu.md, issue 12 item 5). Build and run from the repository root:
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -mavx2 -mfma -ffp-contract=off -Icsrc/include -Icsrc/cpu -I$T/include \
//       benchmarks/normals_sleef_cpu.cpp -o /tmp/normals -L$T/lib -ltorch_cpu -lc10 -Wl,-rpath,$T/lib
//   OUTF=/tmp/normals.bin /tmp/normals
#include <chrono>
#include <cstdio>
#include <cmath>
#include <vector>
#include "philox_avx2.h"
using namespace noisyops;
int main() {
  Stream s(123, 7, 0, 5);
  const int64_t n = 1 << 24;
  std::vector<float> out(n);
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t g = 0; g < n / 4; g += 8) cpu::normals32(s, g, out.data() + 4 * g);
    auto t1 = std::chrono::steady_clock::now();
    double sec = std::chrono::duration<double>(t1 - t0).count();
    printf("%.3e normals/s (1 thread)\n", n / sec);
  }
  FILE* f = fopen(getenv("OUTF") ? getenv("OUTF") : "/tmp/normals.bin", "wb"); fwrite(out.data(), 4, n, f); fclose(f);
}
