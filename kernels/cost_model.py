"""Which weight strategy a GEMM call uses: regenerate on-chip, or a pre-pass.

*Regenerate*: every row-tile program perturbs the weight tiles it loads (Philox + Box-Muller in
registers). No extra memory traffic, no extra launch, and the only option whose memory does not
grow with the number of instances; but the RNG work is repeated once per row tile:

    t_regen   = R · |W| · c_rng / ALU            R = row tiles sharing one instance

*Pre-pass*: one elementwise kernel perturbs ``|W|`` weights per distinct instance ``I`` and writes
them in the product dtype; the GEMM then only loads them:

    t_prepass = I · |W| · c_rng / ALU + I · |W| · (4 + b) / BW + t_launch

with ``c_rng`` ≈ 130 ALU ops per noisy weight element (Philox4x32-10: 10 rounds of 2 mul-hi,
2 mul, 6 xor/add; plus the uniform map, log, sqrt, sin/cos, clip and quantize; both noise kinds
double it), ``ALU`` the CUDA-core rate (A100: 19.5 Tops/s), ``BW`` the DRAM bandwidth
(A100: 1.5 TB/s), ``b`` the bytes of the product dtype and ``t_launch`` ≈ 4 µs. The pre-pass is
used when it is cheaper and its buffer ``I·|W|·b`` fits `PREPASS_BUDGET_BYTES`. Consequences:
per_call with more than one row tile → pre-pass; per_sample (R = 1 row tile per sample for small
feature maps, I = batch) → mostly regenerate; per_instance with a few chips → pre-pass.

Setting ``NOISYOPS_TRITON_WEIGHTS=regen|prepass`` overrides the model (tests, benchmarks).
"""
from __future__ import annotations

import os

import torch

ALU_OPS_PER_S = 19.5e12
DRAM_BYTES_PER_S = 1.5e12
LAUNCH_S = 4e-6
RNG_OPS_PER_ELEMENT = 130.0
PREPASS_BUDGET_BYTES = 256 << 20
ROW_TILE = 128  # typical BM of the autotune configs (configs.GEMM)


def rng_ops(p) -> float:
    kinds = int(p.eta > 0) + int(p.eta_mul > 0)
    return RNG_OPS_PER_ELEMENT * max(kinds, 0)


def estimate(p, weight_numel: int, row_tiles_per_instance: int, instances: int,
             dtype: torch.dtype):
    """``(t_regen, t_prepass, prepass_bytes)`` in seconds/bytes, as the module docstring."""
    ops = rng_ops(p)
    b = torch.tensor([], dtype=dtype).element_size()
    t_regen = instances * row_tiles_per_instance * weight_numel * ops / ALU_OPS_PER_S
    t_pre = (instances * weight_numel * ops / ALU_OPS_PER_S
             + instances * weight_numel * (4 + b) / DRAM_BYTES_PER_S + LAUNCH_S)
    return t_regen, t_pre, instances * weight_numel * b


def use_prepass(p, geo, instances: int, seg_rows: int, dtype: torch.dtype) -> bool:
    """True when the pre-pass strategy is cheaper for this call (see module docstring)."""
    forced = os.environ.get("NOISYOPS_TRITON_WEIGHTS", "").strip().lower()
    if forced == "regen":
        return False
    if forced == "prepass":
        return p.has_weight_noise or p.w_clip
    if not (p.has_weight_noise or p.w_clip):
        return False
    numel = geo.C_out * geo.Cg * geo.KH * geo.KW
    row_tiles = max(1, -(-seg_rows // ROW_TILE))
    t_regen, t_pre, nbytes = estimate(p, numel, row_tiles, instances, dtype)
    return nbytes <= PREPASS_BUDGET_BYTES and t_pre < t_regen
