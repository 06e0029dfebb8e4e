"""The CUDA extension `noisyops._C_cuda` and the ``cuda`` backend, checked without a GPU.

* build: the extension exists where nvcc and a CUDA torch exist, exposes its functions, its fat
  binary holds sm_80 and sm_90 code (``cuobjdump``), and ptxas reports 0 spill bytes for every
  kernel with the build's own nvcc flags (read from setup.py);
* host math: the kernels' ``__host__ __device__`` code compiled for the host (CPU tensors) against
  `noisyops.stream` / `noisyops.reference`: uniforms-derived normals within a few ulp (bit-identical
  to the CPU extension, which includes the same header), quantizers exact;
* the ``cuda`` backend's kernels called directly with CPU tensors (cuDNN replaced by torch's CPU
  conv, the CUDA kernels by their host loops) against the reference: every sampling mode, tiles,
  quantizers, channels-last, groups, forward and backward;
* an nvcc ``-x cu`` host harness proving the shared headers build under nvcc for the host.

What needs a GPU (the kernels' device code running) is not checked here; see docs/cuda.md.
"""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from noisyops import _ext, dispatch, reference as R, stream
from noisyops.params import PER_CALL, PER_INSTANCE, PER_SAMPLE, OpParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
FUNCTIONS = ("weight_prepass", "quantize", "output_tile", "ste_range", "ste_bits")
ARCHS = ("sm_80", "sm_90")


def _cuda_home():
    """The toolkit setup.py uses (CUDA_HOME or the real nvcc behind a wrapper)."""
    sys.path.insert(0, REPO)
    try:
        src = open(os.path.join(REPO, "setup.py")).read()
        tree = ast.parse(src)
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_find_cuda_home")
        ns = {"os": os, "re": re, "glob": glob, "shutil": shutil}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
        return ns["_find_cuda_home"]()
    finally:
        sys.path.pop(0)


def _nvcc_flags():
    """``NVCC_FLAGS`` of setup.py (the flags the pip build uses)."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS")


CUDA_HOME = _cuda_home()
CAN_BUILD = torch.version.cuda is not None and CUDA_HOME is not None and bool(CUDA_SOURCES)
NO_BUILD = f"no CUDA build here (torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"


def _nvcc():
    return os.path.join(CUDA_HOME, "bin", "nvcc")


def _cuobjdump():
    """cuobjdump from the toolkit, PATH, or the copy Triton bundles (same tool)."""
    cands = [os.path.join(CUDA_HOME or "", "bin", "cuobjdump"), shutil.which("cuobjdump") or ""]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def C():
    if not CAN_BUILD:
        pytest.skip(NO_BUILD)
    mod, why = _ext.cuda()
    assert mod is not None, f"nvcc and a CUDA torch are present but the extension is missing: {why}"
    return mod


# ---- build ----------------------------------------------------------------------------------
def test_extension_exposes_functions(C):
    missing = [f for f in FUNCTIONS if not hasattr(C, f)]
    assert not missing, f"noisyops._C_cuda lacks {missing}"


def test_fatbin_has_sm80_sm90_and_no_local_memory(C):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (toolkit, PATH or triton bundle)")
    so = C.__file__
    elfs = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for arch in ARCHS:
        assert f".{arch}.cubin" in elfs, f"{so}: no {arch} code in the fat binary:\n{elfs}"
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    kernels = {re.sub(r".*_GLOBAL__N__\w+?_\d+", "", f) for f, *_ in funcs}
    assert len(funcs) >= 2 * 5, f"expected every kernel for both archs, found {len(funcs)}:\n{usage}"
    for name, reg, stack, shared, local in funcs:
        assert int(local) == 0, f"{name}: {local} bytes of local memory"
        assert int(reg) <= 64, f"{name}: {reg} registers (> 64 halves occupancy of these memory-bound kernels)"
        # 32 bytes of stack = sincosf's Payne-Hanek reduction buffer (never taken: theta in [0, 2pi))
        assert int(stack) <= 32, f"{name}: {stack} bytes of stack"
    assert kernels, usage


def test_ptxas_reports_no_spills(tmp_path):
    if not CAN_BUILD:
        pytest.skip(NO_BUILD)
    flags = [f for f in _nvcc_flags() if not f.startswith("-Xptxas")]
    ptxas = [f for f in _nvcc_flags() if f.startswith("-Xptxas")]
    assert ptxas and "-warn-spills" in ptxas[0] and "--warning-as-error" in ptxas[0], \
        f"setup.py must make spills fail the build: {ptxas}"
    for src in CUDA_SOURCES:
        for arch in ARCHS:  # device code only (--cubin): the host side is not what spills
            cmd = [_nvcc(), "--cubin", "-std=c++17", *flags, "-Xptxas=-v,-warn-spills", f"-arch={arch}",
                   "-I", os.path.join(REPO, "csrc", "include"), src, "-o", str(tmp_path / f"k_{arch}.cubin")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            log = res.stderr
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            compiled = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
            assert {a for _, a in compiled} == {arch}, log
            assert len(spills) >= len(compiled) > 0, log
            bad = [s for s in spills if s != ("0", "0")]
            assert not bad, f"{os.path.basename(src)} {arch}: spills {bad}\n{log}"


def test_host_harness_builds_under_nvcc(tmp_path):
    """The shared headers compile under nvcc for the host (``-x cu``) and match Random123's KAT."""
    if not CAN_BUILD:
        pytest.skip(NO_BUILD)
    src = tmp_path / "harness.cu"
    src.write_text(r'''
#include <stdio.h>
#include "noisyops/philox.h"
#include "noisyops/quantize.h"
#include "noisy_math.h"
__global__ void touch(float* o) {  // device instantiation of the same functions
  noisyops::cudapath::PrepassParams p{1, 2, -1.f, 1.f, 0.1f, 0.1f, 1, 4, 1, 1};
  float v[4] = {o[0], o[1], o[2], o[3]};
  noisyops::cudapath::prepass_apply4(p, 3, threadIdx.x, v);
  o[threadIdx.x] = v[0] + v[1] + v[2] + v[3];
}
int main() {
  noisyops::U32x4 r = noisyops::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                              0xa4093822u, 0x299f31d0u);
  noisyops::Quantizer q(-1.f, 1.f, 2);
  printf("%08x %08x %08x %08x %a %a\n", r.x, r.y, r.z, r.w, (double)q(0.2f), (double)q(-0.4f));
  return 0;
}
''')
    exe = tmp_path / "harness"
    cmd = [_nvcc(), "-x", "cu", "-std=c++17", *[f for f in _nvcc_flags() if not f.startswith("-Xptxas")],
           "-arch=sm_80", "-I", os.path.join(REPO, "csrc", "include"), "-I", os.path.join(REPO, "csrc", "cuda"),
           str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["d16cfe09", "94fdcceb", "5001e420", "24126ea1"]
    # Q(v; -1, 1, 2): levels -1, -1/3, 1/3, 1 (float32, exactly as the reference rounds them)
    ref = R.quantize(torch.tensor([0.2, -0.4]), -1.0, 1.0, 2).tolist()
    assert [float.fromhex(v) for v in out[4:6]] == ref


# ---- host math vs the reference ---------------------------------------------------------------
def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.float().view(torch.int32).long()
    ib = b.float().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("purpose", [0, 1])
def test_prepass_normals_match_stream(C, purpose):
    """W = 0 and sigma = 1 (or W = 1, eta_mul = 1: Wn = 1 + eps') expose the raw normals."""
    n, seed, key, inst = 4 * 1000 + 3, (5 << 32) + 17, 11, [0, 7, (3 << 32) + 9]
    w = torch.zeros(n) if purpose == 0 else torch.ones(n)
    out = torch.empty(len(inst), n)
    C.weight_prepass(w, out, torch.tensor(inst), seed, key, -1.0, 1.0, 1.0, 1.0, False, 0,
                     purpose == 0, purpose == 1)
    cpu, _ = _ext.cpu()
    for k, i in enumerate(inst):
        ref = stream.normals(seed, key, purpose, i, n)
        got = out[k] if purpose == 0 else out[k] - 1
        if purpose == 0:
            assert _ulps(got, ref) <= 4, f"instance {i}: {_ulps(got, ref)} ulp"
            if cpu is not None and hasattr(cpu, "stream_normals"):  # same header, same host libm
                assert torch.equal(got, cpu.stream_normals(seed, key, purpose, i, n))
        else:
            assert torch.allclose(got, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prepass_matches_reference_weights(C, out_dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1
    for kw in (dict(w_clip=1, w_bits=3, w_std_k=0.0, w_lo=-0.12, w_hi=0.15),
               dict(w_clip=1, w_bits=0, w_std_k=2.0, eta=0.05, eta_mul=0.1),
               dict(eta=0.02), dict(eta_mul=0.3)):
        p = OpParams(seed_lo=3, seed_hi=1, layer_key=5, **kw)
        wq, sigma, _ = R.weight_quantized(w, p, torch.float32)
        lo, hi = p.weight_range(w)
        out = torch.empty((2,) + tuple(w.shape), dtype=out_dtype)
        C.weight_prepass(w, out, torch.tensor([4, 9]), p.seed, p.layer_key, lo, hi, sigma, p.eta_mul,
                         bool(p.w_clip), p.w_bits, p.eta > 0, p.eta_mul > 0)
        for k, inst in enumerate([4, 9]):
            ref = R.weight_noisy(wq, sigma, p, inst)
            if not p.has_weight_noise:
                assert torch.equal(out[k], ref.to(out_dtype)), kw  # clip + quantize: exact
            else:
                tol = 1e-6 if out_dtype == torch.float32 else (2 ** -8 if out_dtype == torch.float16 else 2 ** -6)
                torch.testing.assert_close(out[k].float(), ref.to(out_dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_quantizer_exact(C, dtype):
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 7, 6) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    for bits in (1, 4, 8):
        out = torch.empty_like(x)
        C.quantize(x, out, -1.5, 2.0, bits)
        ref = R.quantize(x.float(), -1.5, 2.0, bits).to(dtype)
        assert out.stride() == x.stride()
        assert torch.equal(out, ref), bits


def test_ste_kernels_exact(C):
    torch.manual_seed(2)
    g = torch.randn(4, 3, 5, 5)
    x = torch.randn(4, 3, 5, 5)
    out = torch.empty_like(x)
    C.ste_range(g, x, out, -0.5, 0.7)
    assert torch.equal(out, g * R.in_range_mask(x, -0.5, 0.7).float())
    m = torch.rand(2, 4, 3, 5, 5) > 0.5
    words = R.pack_mask(list(m))
    for t in range(2):
        o = torch.empty_like(g)
        C.ste_bits(g, words[t].contiguous(), o)
        assert torch.equal(o, g * m[t].float())


def test_bad_arguments_are_named(C):
    with pytest.raises(RuntimeError, match="instances"):
        C.weight_prepass(torch.zeros(8), torch.empty(2, 8), torch.tensor([1.0, 2.0]), 0, 0, -1.0, 1.0, 1.0, 0.0,
                         False, 0, True, False)
    with pytest.raises(RuntimeError, match="bits=17"):
        C.quantize(torch.zeros(4), torch.empty(4), -1.0, 1.0, 17)
    with pytest.raises(RuntimeError, match="dtype"):
        C.quantize(torch.zeros(4, dtype=torch.float64), torch.empty(4), -1.0, 1.0, 4)


# ---- the cuda backend's kernels on CPU tensors vs the reference ------------------------------------
CONFIGS = {
    "clean": dict(),
    "additive": dict(eta=0.05),
    "mixed_clip_wq": dict(eta=0.05, eta_mul=0.1, w_clip=1, w_bits=4, w_std_k=0.0, w_lo=-0.2, w_hi=0.2),
    "adc_dac_tiles_outnoise": dict(eta=0.03, in_bits=6, in_lo=-1.0, in_hi=1.0, out_bits=5, out_lo=-2.0,
                                   out_hi=2.0, out_noise=0.05, tile_rows=20),
    "per_sample_tiles": dict(eta=0.03, sampling=PER_SAMPLE, out_bits=5, out_lo=-2.0, out_hi=2.0, tile_rows=30),
    "per_instance_clean_grad": dict(eta=0.03, eta_mul=0.05, sampling=PER_INSTANCE, out_noise=0.1, tile_rows=40,
                                    clean_grad_input=1),
    "per_instance_runs": dict(eta=0.04, sampling=PER_INSTANCE, in_bits=5, in_lo=-1.0, in_hi=1.0),
    "per_instance_interleaved": dict(eta=0.04, eta_mul=0.02, sampling=PER_INSTANCE, out_bits=6, out_lo=-3.0,
                                     out_hi=3.0),
}


def _instance(p, n, name=""):
    """Chip ids: interleaved (index-list groups) or, for *_runs, contiguous runs (slice groups)."""
    if p.sampling != PER_INSTANCE:
        return torch.tensor(5)
    if name.endswith("_interleaved"):  # sample s on chip s mod 2: one grouped conv (NCHW)
        return torch.tensor([7, 4, 7, 4][:n])
    return torch.tensor([2, 2, 5, 5][:n] if name.endswith("_runs") else [3, 1, 3, 0][:n])


def _close(got, ref, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=what)


@pytest.fixture(scope="module")
def cuda_backend(C):
    from noisyops.backends import cuda
    return cuda


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_backend_conv2d_matches_reference(cuda_backend, name, channels_last, groups):
    torch.manual_seed(3)
    p = OpParams(seed_lo=123, seed_hi=7, layer_key=3, **CONFIGS[name])
    x = torch.randn(4, 8, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 8 // groups, 3, 3) * 0.1
    b = torch.randn(6)
    inst = _instance(p, 4, name)
    conv = ([1, 2], [1, 1], [1, 1], groups)
    yr, mr = R.conv2d_fwd(x, w, b, *conv, p, inst)
    yc, mc = cuda_backend.conv2d_fwd(x, w, b, *conv, p, inst)
    if name == "clean":
        assert torch.equal(yc, torch.nn.functional.conv2d(x, w, b, *conv))
    _close(yc, yr, "y")
    assert yc.stride() == yr.stride()
    assert torch.equal(mc, mr), f"{int((mc != mr).sum())} mask words differ"
    gy = torch.randn_like(yr)
    gxr, gwr = R.conv2d_bwd(gy, x, w, *conv, p, inst, mr, list(yr.stride()), True, True)
    gxc, gwc = cuda_backend.conv2d_bwd(gy, x, w, *conv, p, inst, mc, list(yc.stride()), True, True)
    _close(gxc, gxr, "grad_x")
    _close(gwc, gwr, "grad_w")
    assert gxc.stride() == gxr.stride()
    gxo, gwo = cuda_backend.conv2d_bwd(gy, x, w, *conv, p, inst, mc, list(yc.stride()), True, False)
    assert gwo is None and torch.equal(gxo, gxc)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backend_linear_matches_reference(cuda_backend, name):
    torch.manual_seed(4)
    p = OpParams(seed_lo=9, seed_hi=0, layer_key=1, **CONFIGS[name])
    for shape in ((4, 5, 40), (4, 40)):
        x = torch.randn(*shape)
        w = torch.randn(7, 40) * 0.2
        b = torch.randn(7)
        inst = _instance(p, 4, name)
        yr, mr = R.linear_fwd(x, w, b, p, inst)
        yc, mc = cuda_backend.linear_fwd(x, w, b, p, inst)
        _close(yc, yr, "y")
        assert torch.equal(mc, mr)
        gy = torch.randn_like(yr)
        gr = R.linear_bwd(gy, x, w, p, inst, mr, list(yr.stride()))
        gc = cuda_backend.linear_bwd(gy, x, w, p, inst, mc, list(yc.stride()))
        _close(gc[0], gr[0], "grad_x")
        _close(gc[1], gr[1], "grad_w")


def test_backend_linear_1d_and_bf16(cuda_backend):
    torch.manual_seed(5)
    p = OpParams(eta=0.05, out_bits=6, out_lo=-3.0, out_hi=3.0, seed_lo=1)
    w = torch.randn(5, 12) * 0.3
    x = torch.randn(12)
    yr, mr = R.linear_fwd(x, w, None, p, torch.tensor(2))
    yc, mc = cuda_backend.linear_fwd(x, w, None, p, torch.tensor(2))
    _close(yc, yr, "1-D y")
    assert torch.equal(mc, mr)
    xb, wb = torch.randn(3, 12).bfloat16(), w.bfloat16()
    yr, _ = R.linear_fwd(xb, wb, None, p, torch.tensor(2))
    yc, _ = cuda_backend.linear_fwd(xb, wb, None, p, torch.tensor(2))
    assert yc.dtype == torch.bfloat16
    torch.testing.assert_close(yc.float(), yr.float(), rtol=2 ** -7, atol=2 ** -6)


def test_backend_declines_float64_and_is_not_picked_without_gpu(cuda_backend):
    p = OpParams(eta=0.1)
    x, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert cuda_backend.linear_fwd(x, w, None, p, torch.tensor(0)) is NotImplemented
    ok, why = cuda_backend.available()
    if not torch.cuda.is_available():
        assert not ok and "no CUDA device" in why
        assert dispatch.status()["cuda"][0] is False


# ---- cost model, GPU policy, performance doc --------------------------------------------------------
def test_cost_model_bytes_and_normals():
    from noisyops.backends import gpu_cost as gc
    L = gc.Layer("l", "conv", 8, 64, 56, 56, 128, 3, 3, 56, 56)
    n = gc.Noise(weight_noise=1, in_bits=True, out_bits=True, instances=1)
    clean = gc.traffic(L, n, "clean", False)
    pre = gc.traffic(L, n, "fused_prepass", False)
    regen = gc.traffic(L, n, "fused_regen", False)
    s, W = gc.ACT_BYTES, L.w_numel
    assert clean["bytes"] == s * (L.x_numel + W + L.y_numel) + (gc.MASTER_BYTES + s) * W
    assert clean["flops"] == pre["flops"] == 2 * L.rows * 128 * 64 * 9
    # fused: the pre-pass replaces the AMP cast; only the 1-bit out mask is extra
    assert pre["bytes"] - clean["bytes"] == pytest.approx(L.y_numel / 8)
    assert pre["normals"] == W
    assert regen["normals"] == W * -(-L.rows // gc.ROW_TILE)
    assert 100e9 < gc.A100.normal_rate() < gc.H100.normal_rate() < 1e12


def test_cost_model_row_tiles_ignore_one_row_configs():
    """The regenerate strategy's row tile is the smallest BM a long segment can take: the 16-row
    configs for segments of <= 16 rows (`rows_max`) do not count."""
    from noisyops.backends import gpu_cost as gc
    from noisyops.kernels import configs
    for arch in configs.ARCHS:
        for fam, tiles in (("GEMM_REGEN", gc.REGEN_ROW_TILES), ("GEMM_RNG", gc.ROW_TILES)):
            long_seg = configs.pruned(fam, arch, dict(SEG=1 << 20, Cout_g=1 << 10, Cg=1 << 10, numel_y=1))
            assert tiles[arch] == min(c["BM"] for c in long_seg) >= 32


def test_cost_model_counts_the_tile_parallel_crossbar_forward(monkeypatch):
    """The model follows the kernels' rule: by default (one tile) no code traffic and GEMM_RNG1's
    row tile with an ADC; where the split runs with T > 1 crossbar tiles the fused forward writes
    int16 codes (2·T bytes per output) and a tile-sum pass reads them; no ADC: neither."""
    from noisyops.backends import gpu_cost as gc
    from noisyops.kernels import configs
    assert gc.SPLIT_MAX_TILES == configs.CROSSBAR_SPLIT_MAX_TILES
    layer0 = gc.Layer("l", "conv", 256, 256, 14, 14, 256, 3, 3, 14, 14)
    assert not [k for k in gc.kernels(layer0, gc.Noise(tiles=5), "fused_regen", False) if k.what == "tile sum"]
    monkeypatch.setattr(gc, "SPLIT_MAX_TILES", 8)  # as NOISYOPS_TRITON_CROSSBAR_FWD=split
    layer = gc.Layer("l", "conv", 256, 256, 14, 14, 256, 3, 3, 14, 14)
    y = 256 * 256 * 14 * 14
    for strategy in ("fused_prepass", "fused_regen"):
        ks = gc.kernels(layer, gc.Noise(tiles=5), strategy, False)
        tile_sum = [k for k in ks if k.what == "tile sum"]
        assert len(tile_sum) == 1 and tile_sum[0].bytes == 2 * 5 * y + gc.ACT_BYTES * y
        for n in (gc.Noise(tiles=1), gc.Noise(tiles=5, out_bits=False, out_noise=True)):
            assert not [k for k in gc.kernels(layer, n, strategy, False) if k.what == "tile sum"]
    for arch in configs.ARCHS:
        assert gc.row_tile_for(gc.Noise(tiles=1), arch) == min(c["BM"] for c in configs.GEMM_RNG1[arch])


def test_fused_weight_strategy_comes_from_the_one_cost_model(monkeypatch):
    """The fused kernels' pre-pass / regenerate choice is `gpu_cost.best_fused` (no second model):
    per_call over many row tiles pre-passes, per_sample at batch 256 of a 3x3 512x512 conv
    regenerates (its buffer would be 256·|W|·2 B = 1.2 GB > the budget), the override wins."""
    from noisyops.backends import gpu_cost as gc
    from noisyops.kernels.noisy_conv2d import conv_geometry
    from noisyops.kernels.weight_prepass import use_prepass
    monkeypatch.delenv("NOISYOPS_TRITON_WEIGHTS", raising=False)
    cpu = torch.device("cpu")
    x, w = torch.empty(256, 512, 7, 7, device="meta"), torch.empty(512, 512, 3, 3, device="meta")
    geo = conv_geometry(x, w, (1, 1), (1, 1), (1, 1), 1)
    per_call, per_sample = OpParams(eta=0.05), OpParams(eta=0.05, sampling=PER_SAMPLE)
    assert use_prepass(per_call, geo, 1, cpu) is True
    assert 256 * w.numel() * gc.ACT_BYTES > gc.PREPASS_BUDGET_BYTES
    assert use_prepass(per_sample, geo, 256, cpu) is False
    layer = gc.Layer("l", "conv", 256, 512, 7, 7, 512, 3, 3, 7, 7)
    assert gc.best_fused(layer, gc.Noise(instances=256, per_sample=True), False, gc.A100) == "fused_regen"
    assert gc.fused_row_tiles(layer, gc.Noise(instances=256, per_sample=True)) == 256 * -(-49 // gc.ROW_TILE)
    assert use_prepass(OpParams(in_bits=8, in_lo=-1.0, in_hi=1.0), geo, 1, cpu) is False  # nothing to perturb
    monkeypatch.setenv("NOISYOPS_TRITON_WEIGHTS", "prepass")
    assert use_prepass(per_sample, geo, 256, cpu) is True
    monkeypatch.setenv("NOISYOPS_TRITON_WEIGHTS", "regen")
    assert use_prepass(per_call, geo, 1, cpu) is False


def test_gpu_policy(monkeypatch):
    from noisyops.backends import cuda as cuda_backend, gpu_policy
    x = torch.empty(256, 64, 56, 56, device="meta")
    w = torch.empty(64, 64, 3, 3, device="meta")
    weight_only = OpParams(eta=0.05)
    quantized = OpParams(eta=0.05, in_bits=8, in_lo=-1.0, in_hi=1.0, out_bits=8, out_lo=-4.0, out_hi=4.0)
    if not torch.cuda.is_available():
        assert gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x, w) is False  # backend unavailable
    monkeypatch.setattr(cuda_backend, "available", lambda: (True, "test"))
    monkeypatch.delenv("NOISYOPS_GPU_PATH", raising=False)
    assert gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x, w) is True
    assert gpu_policy.use_cuda_path("conv2d_bwd", weight_only, x, w) is True
    # pointwise quantizers (untiled): pre-pass + cuDNN, the route safe without a GPU measurement
    assert gpu_policy.use_cuda_path("conv2d_fwd", quantized, x, w) is True
    per_instance = OpParams(eta=0.05, sampling=2)
    assert gpu_policy.use_cuda_path("conv2d_fwd", per_instance, x, w) is True
    # crossbar tiles and per_sample weight noise need the fused kernels
    tiled = OpParams(eta=0.05, out_bits=8, out_lo=-4.0, out_hi=4.0, tile_rows=128)
    assert gpu_policy.use_cuda_path("conv2d_fwd", tiled, x, w) is False
    one_tile = OpParams(eta=0.05, out_bits=8, out_lo=-4.0, out_hi=4.0, tile_rows=576)
    assert gpu_policy.use_cuda_path("conv2d_fwd", one_tile, x, w) is True  # 64·9 rows: one tile
    x4, w4 = torch.empty(256, 512, 7, 7, device="meta"), torch.empty(512, 512, 3, 3, device="meta")
    assert gpu_policy.use_cuda_path("conv2d_fwd", OpParams(eta=0.05, sampling=PER_SAMPLE), x4, w4) is False
    assert gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x4, w4) is True
    assert gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x.double(), w.double()) is False
    monkeypatch.setenv("NOISYOPS_GPU_PATH", "triton")
    assert gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x, w) is False
    monkeypatch.setenv("NOISYOPS_GPU_PATH", "bogus")
    with pytest.raises(ValueError, match="NOISYOPS_GPU_PATH"):
        gpu_policy.use_cuda_path("conv2d_fwd", weight_only, x, w)
    with pytest.raises(ValueError, match="kind"):
        gpu_policy.use_cuda_path("conv3d_fwd", weight_only, x, w)


def test_perf_model_writes_doc(tmp_path):
    pytest.importorskip("torchvision")
    from noisyops.backends import gpu_cost as gc
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import perf_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "performance.md"
    assert perf_model.main(["--out", str(out), "--no-sass"]) == 0
    text = out.read_text()
    assert "within 10% of clean" in text
    rows = [l for l in text.splitlines() if l.startswith("| layer4.2.conv3 |")]
    assert len(rows) == 2 * (1 + len(gc.GPUS))  # traffic + one table per GPU, training and evaluation
    assert "What the plan runs, priced (prediction)" in text and "H200" in text
    assert "| fc |" in text and "A100" in text and "H100" in text


def test_backend_chip_interleaved_batch_uses_one_grouped_conv(cuda_backend, monkeypatch):
    """per_instance with sample s on chip s mod K (NCHW): one pre-pass for all chips and one grouped
    convolution (forward and input gradient); channels-last falls back to per-chip convs."""
    calls = []
    real = cuda_backend._all_weights
    monkeypatch.setattr(cuda_backend, "_all_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(6)
    p = OpParams(eta=0.05, sampling=PER_INSTANCE, seed_lo=77, layer_key=2)
    inst = torch.tensor([5, 9, 2] * 2)
    w = torch.randn(4, 3, 3, 3) * 0.2
    conv = ([2, 1], [1, 1], [1, 1], 2)
    for cl, expect in ((False, 2), (True, 0)):
        calls.clear()
        x = torch.randn(6, 6, 7, 7)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        yr, mr = R.conv2d_fwd(x, w, None, *conv, p, inst)
        yc, mc = cuda_backend.conv2d_fwd(x, w, None, *conv, p, inst)
        _close(yc, yr, "y")
        gy = torch.randn_like(yr)
        gxr, _ = R.conv2d_bwd(gy, x, w, *conv, p, inst, mr, list(yr.stride()), True, False)
        gxc, _ = cuda_backend.conv2d_bwd(gy, x, w, *conv, p, inst, mc, list(yc.stride()), True, False)
        _close(gxc, gxr, "grad_x")
        assert len(calls) == expect, (cl, len(calls))
