"""Roofline cost model of the noisy ops on A100 / H100 / H200: the one GPU cost model, behind
``benchmarks/perf_model.py`` (which writes docs/performance.md from it) and
`gpu_policy.predicted_times`. Its numbers are **predictions**: no GPU has run these kernels yet,
and routing does not depend on them (`noisyops.plan.route_of`; `route_time` prices the route the
plan picks). The one decision it makes: inside the fused route, whether the Triton GEMM reads
pre-passed weights or regenerates them (`best_fused`, called by `kernels.weight_prepass.use_prepass`).

Every kernel is charged ``max(flops / peak, bytes / bandwidth) + philox_normals / normal_rate``
plus a fixed launch overhead; a layer's time is the sum over its kernels. Numbers:

* Peak rates: vendor datasheets (A100 SXM4 80GB: 312 TFLOP/s bf16 dense tensor, 19.5 TFLOP/s
  fp32, 2.039 TB/s HBM2e, 108 SMs at 1.41 GHz; H100 SXM5: 989 TFLOP/s bf16 dense tensor, 67 TFLOP/s
  fp32, 3.35 TB/s HBM3, 132 SMs at 1.98 GHz — 67e12 = 132·128·2·1.98e9; H200 SXM: the H100's
  compute, 4.8 TB/s HBM3e).
* Per-SM instruction throughput per clock (CUDA C++ Programming Guide, "Arithmetic Instructions"
  throughput table, compute capability 8.0 / 9.0): fp32 add/mul/fma 64 / 128; 32-bit integer
  add, logic, multiply(-add) 64 / 64; int<->fp32 conversion 16 / 16; special functions (MUFU:
  lg2, rsqrt, ...) 16 / 16.
* Instructions per four normals (one Philox4x32-10 call + two Box-Muller transforms, as
  csrc/include/noisyops/philox.h): 10 rounds × (2 mul.hi + 2 mul.lo) = 40 IMAD, 10 × (2
  three-input XOR + 2 key adds) = 40 integer ALU, 4 × 3 ALU for the uniform map + 4 I2F
  conversions + 4 FMUL, and per Box-Muller pair ~40 fp32 (accurate logf, IEEE sqrtf, sincosf
  with its range reduction) and 3 MUFU. Charged serially (no dual issue): a conservative bound.
* Kernel launch overhead: ``LAUNCH_S`` = 4 µs per extra kernel (an assumption; CUDA graphs
  reduce it).

Byte counts assume every kernel reads and writes each operand once (ideal caching), activations
in the product dtype (bf16 for mixed-precision training, 2 bytes), master weights in fp32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

LAUNCH_S = 4e-6


def _kernel_configs():
    """`noisyops/kernels/configs.py` loaded from its file (it imports only ``os``, the kernels
    package imports triton)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "configs.py")
    spec = importlib.util.spec_from_file_location("_noisyops_kernel_configs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# BM of the fused GEMM's row tiles when it regenerates the weights, read from the kernels' autotune
# configs: the smallest BM of the family such launches take (`configs.family`): GEMM_RNG with an
# output epilogue, GEMM_REGEN without. The regenerate strategy pays one regeneration per row tile.
# Configs with ``rows_max`` (16-row tiles of one-row segments) are left out: a segment that short
# has one row tile whatever BM is.
_CFG = _kernel_configs()


def _min_bm(cfgs) -> int:
    return min(c["BM"] for c in cfgs if c.get("rows_max") is None)


ROW_TILES = {arch: _min_bm(cfgs) for arch, cfgs in _CFG.GEMM_RNG.items()}
ROW_TILE = min(ROW_TILES.values())
REGEN_ROW_TILES = {arch: _min_bm(cfgs) for arch, cfgs in _CFG.GEMM_REGEN.items()}
# with the ADC on, the crossbar forward runs one crossbar tile per program (`SPLIT_T`): GEMM_RNG1
SPLIT_ROW_TILES = {arch: _min_bm(cfgs) for arch, cfgs in _CFG.GEMM_RNG1.items()}
CODE_BYTES = 2  # int16 ADC code per output and crossbar tile (kernels/noisy_conv2d.py `code_dtype`)


# the kernels' default rule (`noisy_conv2d.crossbar_split`): tile-parallel up to this many tiles
SPLIT_MAX_TILES = _CFG.CROSSBAR_SPLIT_MAX_TILES


def splits(noise: "Noise") -> bool:
    """True when the fused forward runs tile-parallel by default (ADC on, few enough tiles)."""
    return bool(noise.out_bits) and noise.tiles <= SPLIT_MAX_TILES


def row_tile_for(noise: "Noise", arch: int) -> int:
    """BM of the regenerating fused GEMM for this noise on sm_``arch``."""
    if splits(noise):
        return SPLIT_ROW_TILES.get(arch, ROW_TILE)
    epilogue = noise.out_noise
    return (ROW_TILES if epilogue else REGEN_ROW_TILES).get(arch, ROW_TILE)


def split_code_bytes(noise: "Noise", y: float) -> float:
    """Bytes of ADC codes the tile-parallel crossbar forward writes (and its tile sum reads):
    ``CODE_BYTES·T·y`` when it runs (`splits`) with ``T > 1`` crossbar tiles, else 0."""
    return CODE_BYTES * noise.tiles * y if splits(noise) and noise.tiles > 1 else 0.0


def _split_sum(noise: "Noise", y: float) -> list:
    """The tile sum pass of the tile-parallel crossbar forward (none for a single tile)."""
    codes = split_code_bytes(noise, y)
    return [_ew("tile sum", codes, ACT_BYTES * y)] if codes else []


ACT_BYTES = 2             # bf16 activations / product dtype
MASTER_BYTES = 4          # fp32 master weights
# The Triton implicit-GEMM conv reaches this fraction of cuDNN's conv throughput (an assumption
# until benchmarks/bench_gpu.py measures it on a GPU); GEMMs (linear) are taken as equal.
TRITON_CONV_EFFICIENCY = 0.7
# The CUDA path materialises at most this many pre-passed weights (instances × |W|) at once; above
# it a per_instance / per_sample batch runs one conv per instance (noisyops.backends.cuda).
MAX_PREPASS_ELEMENTS = 1 << 26
# The fused Triton path's pre-pass buffer (instances × |W| in the product dtype) may take at most
# this many bytes; above it the fused GEMM regenerates the weights on-chip (`best_fused`).
PREPASS_BUDGET_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    sms: int
    clock_hz: float
    bf16_flops: float      # dense tensor-core peak
    fp32_flops: float      # CUDA-core peak
    hbm_bytes_s: float
    fp32_per_clk: int      # per SM per clock
    int_per_clk: int
    cvt_per_clk: int
    sfu_per_clk: int

    def normal_rate(self) -> float:
        """Normals per second when the whole GPU only runs Philox + Box-Muller."""
        c = PHILOX_INSTR
        cycles_per_4 = (c["imad"] + c["alu"]) / self.int_per_clk + c["fp32"] / self.fp32_per_clk \
            + c["cvt"] / self.cvt_per_clk + c["sfu"] / self.sfu_per_clk
        return 4.0 * self.sms * self.clock_hz / cycles_per_4

    def int_ops_s(self) -> float:
        return self.sms * self.clock_hz * self.int_per_clk


A100 = GPU("A100 SXM4 80GB", "sm_80", 108, 1.41e9, 312e12, 19.5e12, 2.039e12, 64, 64, 16, 16)
H100 = GPU("H100 SXM5", "sm_90", 132, 1.98e9, 989e12, 67e12, 3.35e12, 128, 64, 16, 16)
H200 = GPU("H200 SXM", "sm_90", 132, 1.98e9, 989e12, 67e12, 4.8e12, 128, 64, 16, 16)
GPUS = (A100, H100, H200)

# Instructions per Philox4x32-10 call = four normals (see the module docstring).
PHILOX_INSTR: Dict[str, int] = {"imad": 40, "alu": 40 + 12, "cvt": 4, "fp32": 4 + 2 * 40, "sfu": 2 * 3}


def instr_per_normal() -> float:
    return sum(PHILOX_INSTR.values()) / 4.0


# ---- layers ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv/linear layer at batch N: x [N, Cin, H, W] -> y [N, Cout, Ho, Wo]."""

    name: str
    kind: str   # "conv" | "linear"
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    kh: int
    kw: int
    Ho: int
    Wo: int
    groups: int = 1
    first: bool = False  # no input gradient (the network input)

    @property
    def x_numel(self) -> int:
        return self.N * self.Cin * self.H * self.W

    @property
    def y_numel(self) -> int:
        return self.N * self.Cout * self.Ho * self.Wo

    @property
    def w_numel(self) -> int:
        return self.Cout * (self.Cin // self.groups) * self.kh * self.kw

    @property
    def rows(self) -> int:
        return self.N * self.Ho * self.Wo

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.Cout * (self.Cin // self.groups) * self.kh * self.kw

    def with_batch(self, n: int) -> "Layer":
        return dataclasses.replace(self, N=n)


@dataclasses.dataclass(frozen=True)
class Noise:
    """What the noisy layer does (a `LayerConfig` reduced to what costs time)."""

    weight_noise: int = 1     # noise kinds: 1 additive (or multiplicative), 2 both
    in_bits: bool = True
    out_bits: bool = True
    out_noise: bool = False
    tiles: int = 1
    instances: int = 1        # distinct noise instances in the batch (per_call 1, per_instance K)
    interleaved: bool = True  # per_instance batch laid out sample s on chip s mod K (else chip-major)
    per_sample: bool = False  # per_sample sampling (instances = N)

    @property
    def route(self) -> str:
        """The route `noisyops.plan.route_of` gives such a call: clean / prepass / fused."""
        if not (self.weight_noise or self.in_bits or self.out_bits or self.out_noise):
            return "clean"
        if (self.tiles > 1 and (self.out_bits or self.out_noise)) or (self.per_sample and self.weight_noise):
            return "fused"
        return "prepass"


@dataclasses.dataclass
class Kernel:
    what: str
    flops: float = 0.0
    bytes: float = 0.0
    normals: float = 0.0
    tensor: bool = True    # flops on tensor cores (else CUDA cores)
    efficiency: float = 1.0

    def time(self, g: GPU) -> float:
        peak = (g.bf16_flops if self.tensor else g.fp32_flops) * self.efficiency
        t = max(self.flops / peak if self.flops else 0.0, self.bytes / g.hbm_bytes_s)
        return t + self.normals / g.normal_rate() + LAUNCH_S


def _gemm(what, flops, *numels, eff=1.0, extra_bytes=0.0, normals=0.0) -> Kernel:
    return Kernel(what, flops=flops, bytes=ACT_BYTES * sum(numels) + extra_bytes, normals=normals,
                  efficiency=eff)


def _ew(what, read_b, write_b, normals=0.0) -> Kernel:
    return Kernel(what, bytes=read_b + write_b, normals=normals, tensor=False)


# ---- strategies: the kernels of one layer -----------------------------------------------------------
STRATEGIES = ("clean", "naive", "cuda", "fused_prepass", "fused_regen")


def kernels(layer: Layer, noise: Noise, strategy: str, train: bool,
            triton_eff: Optional[float] = None, row_tile: int = ROW_TILE) -> List[Kernel]:
    """The kernels one layer runs for one forward (``train``: + backward) pass.

    * clean: AMP weight cast + cuDNN conv (+ dgrad, wgrad);
    * naive: PyTorch noise injection: randn, W + σ·ε, cast; fake-quant of x and y (one fused op
      each) and their straight-through backward; one conv per instance;
    * cuda: this package's CUDA path: quantizer kernel on x, weight pre-pass (all instances),
      cuDNN conv (K > 1 instances: the batch chip-interleaved, sample s on chip s mod K, NCHW,
      which the backend runs as ONE grouped conv on views), output-tile kernel per tile; backward:
      mask kernels, pre-pass again, cuDNN dgrad/wgrad, quantizer on x again;
    * fused_prepass: pre-pass kernel + fused Triton GEMM (quantizers, noise, masks in the
      prologue/epilogue: only the 1-bit masks add traffic);
    * fused_regen: fused Triton GEMM regenerating the noisy weights in every row tile.
    """
    L, n = layer, noise
    K = max(1, n.instances)
    W = L.w_numel
    x, y = L.x_numel, L.y_numel
    F = L.flops
    wn_kinds = n.weight_noise
    ks: List[Kernel] = []
    if strategy == "clean":
        ks.append(_ew("cast W", MASTER_BYTES * W, ACT_BYTES * W))
        ks.append(_gemm("conv", F, x, W, y))
        if train:
            if not L.first:
                ks.append(_gemm("dgrad", F, y, W, x))
            ks.append(_gemm("wgrad", F, x, y, W))
        return ks
    mask_b = n.tiles * y / 8 if n.out_bits else 0.0
    if strategy == "naive":
        for _ in range(wn_kinds):
            ks.append(_ew("randn W", 0, 4 * K * W, normals=K * W))
            ks.append(_ew("W + s*eps", 4 * K * W + 4 * W, 4 * K * W))
        ks.append(_ew("cast Wn", 4 * K * W, ACT_BYTES * K * W))
        if n.in_bits:
            ks.append(_ew("fake-quant x", ACT_BYTES * x, ACT_BYTES * x))
        per = 1.0 / K
        assemble = 2 * ACT_BYTES * y if K > 1 else 0.0  # per-instance outputs copied into y
        for k in range(K):
            ks.append(_gemm("conv", F * per, x * per, W, y * per, extra_bytes=assemble * per))
        if n.out_noise:
            ks.append(_ew("randn y", 0, 4 * y * n.tiles, normals=y * n.tiles))
            ks.append(_ew("y + s*eps", (ACT_BYTES + 4) * y * n.tiles, ACT_BYTES * y * n.tiles))
        if n.out_bits:
            ks.append(_ew("fake-quant y", ACT_BYTES * y * n.tiles, ACT_BYTES * y * n.tiles))
        if train:
            if n.out_bits:
                ks.append(_ew("STE y", 2 * ACT_BYTES * y * n.tiles, ACT_BYTES * y * n.tiles))
            for k in range(K):
                if not L.first:
                    ks.append(_gemm("dgrad", F * per, y * per, W, x * per))
                ks.append(_gemm("wgrad", F * per, x * per, y * per, W))
            if n.in_bits and not L.first:
                ks.append(_ew("STE x", 2 * ACT_BYTES * x, ACT_BYTES * x))
        return ks
    if strategy == "cuda":
        if n.in_bits:
            ks.append(_ew("quantize x", ACT_BYTES * x, ACT_BYTES * x))
        ks.append(_ew("pre-pass W", MASTER_BYTES * W, ACT_BYTES * K * W, normals=wn_kinds * K * W))
        # K > 1: a chip-interleaved NCHW batch is one grouped cuDNN conv over all chips' weights;
        # chip-major: one conv per chip on a view of its samples, outputs copied into y
        grouped = K == 1 or (n.interleaved and K * W <= MAX_PREPASS_ELEMENTS)
        if grouped:
            ks.append(_gemm("cuDNN conv", F, x, K * W, y * n.tiles))
        else:
            for k in range(K):
                ks.append(_gemm("cuDNN conv", F / K, x / K, W, y * n.tiles / K,
                                extra_bytes=2 * ACT_BYTES * y * n.tiles / K))
        if n.out_bits or n.out_noise:
            out_normals = 4 * y * n.tiles if n.out_noise else 0.0  # one Philox call per element
            ks.append(_ew("output tiles", ACT_BYTES * y * n.tiles, ACT_BYTES * y + mask_b, normals=out_normals))
        if train:
            if n.out_bits:
                ks.append(_ew("STE bits", (ACT_BYTES * y + y / 8) * n.tiles, ACT_BYTES * y * n.tiles))
            if not L.first:
                ks.append(_ew("pre-pass W", MASTER_BYTES * W, ACT_BYTES * K * W, normals=wn_kinds * K * W))
            if not L.first and grouped:
                ks.append(_gemm("cuDNN dgrad", F, y * n.tiles, K * W, x))
            elif not L.first:
                for k in range(K):
                    ks.append(_gemm("cuDNN dgrad", F / K, y * n.tiles / K, W, x / K, extra_bytes=2 * ACT_BYTES * x / K))
            if n.in_bits and not L.first:
                ks.append(_ew("STE x", 2 * ACT_BYTES * x, ACT_BYTES * x))
            if n.in_bits:
                ks.append(_ew("quantize x", ACT_BYTES * x, ACT_BYTES * x))
            ks.append(_gemm("cuDNN wgrad", F, x, y * n.tiles, W))
        return ks
    conv_eff = TRITON_CONV_EFFICIENCY if triton_eff is None else triton_eff
    eff = conv_eff if L.kind == "conv" else 1.0
    out_normals = (y * n.tiles) if n.out_noise else 0.0  # epilogue: four normals per Philox call
    if strategy == "fused_prepass":
        ks.append(_ew("pre-pass W", MASTER_BYTES * W, ACT_BYTES * K * W, normals=wn_kinds * K * W))
        ks.append(_gemm("fused GEMM", F, x, K * W, y, eff=eff, extra_bytes=mask_b + split_code_bytes(n, y),
                        normals=out_normals))
        ks.extend(_split_sum(n, y))
        if train:
            if not L.first:
                ks.append(_ew("pre-pass W", MASTER_BYTES * W, ACT_BYTES * K * W, normals=wn_kinds * K * W))
                ks.append(_gemm("fused dgrad", F, y, K * W, x, eff=eff, extra_bytes=mask_b))
            ks.append(_gemm("fused wgrad", F, x, y, W, eff=eff, extra_bytes=mask_b))
        return ks
    if strategy == "fused_regen":
        ks.append(_ew("cast W", MASTER_BYTES * W, ACT_BYTES * W))
        row_tiles = fused_row_tiles(L, n, row_tile)
        regen = wn_kinds * W * row_tiles
        ks.append(_gemm("fused GEMM", F, x, W, y, eff=eff, extra_bytes=mask_b + split_code_bytes(n, y),
                        normals=regen + out_normals))
        ks.extend(_split_sum(n, y))
        if train:
            if not L.first:
                ks.append(_gemm("fused dgrad", F, y, W, x, eff=eff, extra_bytes=mask_b, normals=regen))
            ks.append(_gemm("fused wgrad", F, x, y, W, eff=eff, extra_bytes=mask_b))
        return ks
    raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")


def layer_time(layer: Layer, noise: Noise, strategy: str, train: bool, gpu: GPU,
               triton_eff: Optional[float] = None) -> float:
    """Predicted seconds for one layer (forward, or forward + backward with ``train``);
    ``triton_eff`` overrides `TRITON_CONV_EFFICIENCY` (sensitivity studies)."""
    row_tile = row_tile_for(noise, int(gpu.arch[3:]))
    return sum(k.time(gpu) for k in kernels(layer, noise, strategy, train, triton_eff, row_tile))


def traffic(layer: Layer, noise: Noise, strategy: str, train: bool) -> Dict[str, float]:
    ks = kernels(layer, noise, strategy, train)
    return {"flops": sum(k.flops for k in ks), "bytes": sum(k.bytes for k in ks),
            "normals": sum(k.normals for k in ks), "kernels": len(ks)}


def fused_row_tiles(layer: Layer, noise: Noise, row_tile: int = ROW_TILE) -> int:
    """Row tiles of the fused GEMM: a row tile never mixes noise instances, so per_call has one
    segment of all ``N·Ho·Wo`` rows, and per_sample / per_instance one segment per sample (the
    kernels' `segments`)."""
    if noise.per_sample or noise.instances > 1:
        return layer.N * math.ceil(layer.Ho * layer.Wo / row_tile)
    return math.ceil(layer.rows / row_tile)


def best_fused(layer: Layer, noise: Noise, train: bool, gpu: GPU) -> str:
    """The cheaper fused weight strategy by the model, ``fused_prepass`` or ``fused_regen``
    (pre-pass only while its buffer fits `PREPASS_BUDGET_BYTES`). A prediction."""
    if max(1, noise.instances) * layer.w_numel * ACT_BYTES > PREPASS_BUDGET_BYTES:
        return "fused_regen"
    return min(("fused_prepass", "fused_regen"), key=lambda s: layer_time(layer, noise, s, train, gpu))


def gpu_for_arch(major: Optional[int]) -> GPU:
    """The modelled GPU closest to a compute capability major version (9 -> H100, else A100)."""
    return H100 if (major or 0) >= 9 else A100


# ---- what the plan runs ------------------------------------------------------------------------
ROUTE_STRATEGY = {"clean": "clean", "prepass": "cuda"}  # fused: the better fused weight strategy


def route_strategy(layer: Layer, noise: Noise, train: bool, gpu: GPU) -> str:
    """The strategy of the model that prices what the plan's route runs for this layer."""
    route = noise.route
    if route == "fused":
        return best_fused(layer, noise, train, gpu)
    return ROUTE_STRATEGY[route]


def route_time(layer: Layer, noise: Noise, train: bool, gpu: GPU, triton_eff: Optional[float] = None) -> float:
    """Predicted seconds of what the plan's route runs for one layer (a prediction)."""
    s = route_strategy(layer, noise, train, gpu)
    row_tile = row_tile_for(noise, int(gpu.arch[3:]))
    return sum(k.time(gpu) for k in kernels(layer, noise, s, train, triton_eff, row_tile))
