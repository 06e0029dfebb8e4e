"""Build noisyops: the C++ CPU extension always, the CUDA extension where a CUDA torch and nvcc are.

Switches (environment variables):
  NOISYOPS_SKIP_CUDA=1        do not build the CUDA extension even where it could be built
  TORCH_CUDA_ARCH_LIST        CUDA archs to compile for (default "8.0;9.0": A100, H100)
  MAX_JOBS                    parallel compile jobs (ninja), as torch's cpp_extension reads it
  NOISYOPS_CPU_ARCH_FLAGS     CPU flags (default: "-mavx2 -mfma" where the build machine has AVX2)
  CUDA_HOME                   the CUDA toolkit; found from the real nvcc when unset
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The real toolkit folder. `nvcc` on PATH may be a wrapper script (`exec /x/bin/nvcc "$@"`),
    which torch's own guess (dirname of dirname of `which nvcc`) gets wrong."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: follow the nvcc it runs
                candidates += re.findall(rb"(/[^\s\"']+/bin/nvcc)", head)
            else:
                candidates.append(real.encode())
        except OSError:
            pass
    candidates += [p.encode() for p in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)]
    for c in candidates:
        c = c.decode()
        if os.path.isfile(c) and os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(c)), "include")):
            return os.path.dirname(os.path.dirname(c))
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # no GPU here to detect archs from

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cpu_arch_flags():
    if "NOISYOPS_CPU_ARCH_FLAGS" in os.environ:
        return os.environ["NOISYOPS_CPU_ARCH_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if " avx2 " in flags and " fma " in flags:
            return ["-mavx2", "-mfma"]
    except OSError:
        pass
    return []


def _nvidia_wheel_includes():
    """curand/cublas headers can come from the `nvidia-*` wheels rather than the toolkit."""
    dirs = []
    for base in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/cu*/include"):
            dirs += [d for d in glob.glob(os.path.join(base, pattern)) if os.path.isdir(d)]
    return sorted(set(dirs))


INCLUDE = [os.path.join(HERE, "csrc", "include")]
# -ffp-contract=off: no FMA contraction, so the CPU quantizer and noise match the reference bit for bit.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"] + _cpu_arch_flags()


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


ext_modules = [
    CppExtension(
        "noisyops._C",
        _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]

# nvcc: -Xptxas -v prints registers/spills per kernel; -warn-spills + --warning-as-error make a register
# spill fail the build. --fmad=false: no FMA contraction, so the CUDA quantizer and noise arithmetic
# round like the reference (and the host fallbacks of the same code) bit for bit.
NVCC_FLAGS = ["-O3", "--fmad=false", "-Xptxas=-v,-warn-spills,--warning-as-error",
              "-Xcompiler=-ffp-contract=off", "--expt-relaxed-constexpr"]

cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) +
                    glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
CUDA_REASON = None
if os.environ.get("NOISYOPS_SKIP_CUDA", "0") not in ("", "0"):
    CUDA_REASON = "NOISYOPS_SKIP_CUDA is set"
elif torch.version.cuda is None:
    CUDA_REASON = "torch is a CPU-only build"
elif CUDA_HOME is None:
    CUDA_REASON = "no CUDA toolkit (nvcc) found"
elif not cuda_sources:
    CUDA_REASON = "no CUDA sources"
if CUDA_REASON is None:
    ext_modules.append(
        CUDAExtension(
            "noisyops._C_cuda",
            cuda_sources,
            include_dirs=INCLUDE + _nvidia_wheel_includes(),
            extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"],
                                "nvcc": NVCC_FLAGS},
        )
    )
else:
    print(f"noisyops: not building the CUDA extension: {CUDA_REASON}", file=sys.stderr)

setup(
    name="noisyops",
    version="0.1.0",
    description="Fused noisy analog-hardware ops (quantize, Philox weight noise, matmul) for PyTorch",
    packages=find_packages(include=["noisyops", "noisyops.*"]) + ["noisyops.kernels"],
    package_dir={"noisyops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["noisyops-info=noisyops.info:main"]},
)
