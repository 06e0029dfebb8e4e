"""Launch configurations of the GEMM kernels: autotune families for sm_80 (A100) and sm_90 (H100),
and the single config used under ``TRITON_INTERPRET=1`` (the interpreter rejects multi-config
autotune and ``do_bench``; big tiles make it fast on small test shapes).

A config is ``dict(BM=, BN=, BK=, num_warps=, num_stages=, maxnreg=)`` (``maxnreg``: ptx
``.maxnreg``, so ptxas does not squeeze an 8-warp kernel to 64-96 registers and spill).
`benchmarks/compile_report.py` compiles every config of every kernel as the JIT specializes it
for ResNet-50 shapes, for both archs, and fails on spills or shared memory over the device limit,
so these lists are checked without a GPU (docs/compile_report.md).

Register budget (compile report, K-major weights and one flattened K loop): without in-kernel RNG
or a per-tile epilogue the 128x128 tiles compile to wgmma / mma.sync without spills; regenerating
the weights in registers (per_sample) still fits 128x128x32 on both archs; the crossbar-tile
forward (two BM x BN fp32 tensors through the tile loop, output noise, mask words) fits 64x128x32
on 8 warps and spills at 128x128, the tile-parallel form (one crossbar tile per program, one
accumulator) fits 128x128; the crossbar-tile input and weight grads fit 128x128x32 when the
out mask is word-aligned (one word per row, not per element) and 64x128 otherwise; the linear's
column-grouped output noise and fp32 operands keep the small tiles.
"""
from __future__ import annotations

import os
from typing import Dict, List

ELEMENTWISE_BLOCK = 1024


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _c(BM, BN, BK, w, s, maxnreg=None, rows_max=None):
    """A config; ``rows_max``: only for launches whose segments have at most that many rows."""
    return dict(BM=BM, BN=BN, BK=BK, num_warps=w, num_stages=s, maxnreg=maxnreg, rows_max=rows_max)


# 16-row tiles (mma.sync; wgmma needs 64 rows) for segments of at most 16 rows: the per_sample
# linear, one row per sample, would otherwise run a 64- or 128-row tile with all rows but one
# masked off (8x the MMA work of a 16-row tile). Compiles (fc, per_sample, forward and input
# grad, both archs): pre-pass 16x128x64 / 4 warps 128-168 registers, regenerated 16x128x32 / 8
# warps 168-186, no spill.
_TINY_PRE = _c(16, 128, 64, 4, 3, rows_max=16)
_TINY_REGEN = _c(16, 128, 32, 8, 3, rows_max=16)


# Families, chosen per launch by `family` from the kernel's constexpr switches:
#   GEMM       forward / input-grad GEMM without in-kernel RNG or crossbar-tile epilogue (weights
#              from the pre-pass or noise-free): >= 128-wide tiles
#   GEMM_REGEN the same with the weights regenerated in registers (no per-tile epilogue or gate)
#   GEMM_OMASK input grad gated by the out mask (crossbar tiles), weights from the pre-pass
#   GEMM_OMASK_WORDS  the same with a word-aligned out mask, pre-pass or regenerated weights
#   GEMM_EPI   forward with the crossbar-tile loop (ADC / output noise), weights from the pre-pass
#   GEMM_EPI1 / GEMM_RNG1 / GEMM_EPI1_COLS  the tile-parallel crossbar forward (SPLIT_T), pre-pass /
#              regenerated weights / the linear's column-grouped output noise
#   GEMM_RNG   regenerated weights together with an epilogue / out-mask gate
#   GEMM_SMALL fp32 operands, the linear's column-grouped output-noise epilogue: the small tiles
#   WGRAD / WGRAD_Q  weight-grad GEMM (out-channels x in-channels, reduction over rows, split-K with
#              fp32 atomics) without / with the input quantizer or out-mask gate; WGRAD_SMALL: fp32
# Largest tiles first; `pruned` drops the ones wider than the problem.
GEMM: Dict[int, List[dict]] = {
    80: [_c(128, 128, 32, 8, 3), _c(128, 64, 32, 4, 3), _c(64, 128, 32, 4, 3), _TINY_PRE],
    90: [_c(128, 128, 64, 8, 3), _c(128, 64, 64, 4, 4), _c(64, 128, 64, 4, 4), _TINY_PRE],
}
GEMM_REGEN: Dict[int, List[dict]] = {
    80: [_c(128, 128, 32, 8, 3), _c(64, 64, 32, 4, 3), _TINY_REGEN],
    90: [_c(128, 128, 32, 8, 3), _c(128, 64, 32, 4, 3), _c(64, 64, 32, 4, 3), _TINY_REGEN],
}
# The crossbar-tile forward carries two BM x BN fp32 accumulators through the tile loop: 8 warps on
# a 64x128 tile (32 accumulator registers per thread each) compile spill-free where 4 warps at
# 64x64 or 8 warps at 128x128 do not (compile runs, docs/triton.md)
_SMALL = {
    80: [_c(32, 32, 16, 8, 2, 128), _c(32, 16, 16, 4, 2, 255)],
    # 64x32 / 4 warps is one warpgroup: the smallest wgmma tile
    90: [_c(64, 32, 16, 4, 3), _c(32, 32, 16, 8, 3, 168), _c(32, 16, 16, 4, 3, 255)],
}
GEMM_OMASK: Dict[int, List[dict]] = {
    80: [_c(64, 128, 32, 8, 3)] + _SMALL[80],
    90: [_c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
# the gated input grad when the out mask is word-aligned (y channels-last, C_out and Cout_g multiples
# of 32): one mask word per row and K step instead of one per element; 128x128x32 / 8 warps compiles
# spill-free with pre-pass (180-222 registers) and regenerated weights (210-246) on both archs
GEMM_OMASK_WORDS: Dict[int, List[dict]] = {
    # sm_80: without maxnreg ptxas caps the smaller tiles at 128 / 168 registers and spills 20-324 B
    80: [_c(128, 128, 32, 8, 3), _c(64, 128, 32, 8, 3, 255), _c(64, 64, 32, 4, 3, 255)],
    90: [_c(128, 128, 32, 8, 3), _c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
GEMM_EPI: Dict[int, List[dict]] = {
    80: [_c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
    90: [_c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
# The tile-parallel crossbar forward runs by default for calls with at most this many crossbar tiles
# (`noisy_conv2d.crossbar_split`): with one tile it only drops the second accumulator; with T > 1 it
# adds 2·T bytes of codes per output, which the roofline model (noisyops/backends/gpu_cost.py, equal
# efficiency for both tiles) prices above the 64x128 loop's cost, so until a GPU times both
# (benchmarks/gpu_check.py, route triton-prepass-loop) T > 1 keeps the loop.
CROSSBAR_SPLIT_MAX_TILES = 1
# the tile-parallel crossbar forward (`SPLIT_T`: one crossbar tile per program, ADC codes summed by
# a second pass): one accumulator, so the single-tile epilogue's registers; lists from compile runs
GEMM_EPI1: Dict[int, List[dict]] = {
    80: [_c(128, 128, 32, 8, 3), _c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
    90: [_c(128, 128, 32, 8, 3), _c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
# with regenerated weights 128x128x32 spills (layer3 3x3: 156 B sm_90, 12 B sm_80), BK = 16 fits
GEMM_RNG1: Dict[int, List[dict]] = {
    80: [_c(128, 128, 16, 8, 3), _c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
    90: [_c(128, 128, 16, 8, 3), _c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
# the linear's column-grouped output noise with a mask that is not word-aligned (fc: 1000 outputs)
# spills 2852-3492 B at 128x128 (sm_90, either weight strategy) and fits 64x128x32 / 8 warps
GEMM_EPI1_COLS: Dict[int, List[dict]] = {
    80: [_c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
    90: [_c(64, 128, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
GEMM_RNG: Dict[int, List[dict]] = {
    # sm_80: 64x128x32 / 8 warps spills 128 B in the linear's gated input grad with regenerated weights
    80: list(_SMALL[80]),
    90: [_c(64, 128, 32, 8, 3)] + _SMALL[90],
}
GEMM_SMALL: Dict[int, List[dict]] = {80: list(_SMALL[80]), 90: list(_SMALL[90])}
# Weight grads: the weight clip's STE is applied on the host (kernels/noisy_conv2d_backward.py);
# with it in the epilogue (a BM x BN tile of W next to the accumulator) 128x128x32 / 8 warps spilled
# 280 B (conv, sm_90) and the crossbar-tile launches had to stay at 32x32 (compile runs, docs/triton.md)
WGRAD: Dict[int, List[dict]] = {
    80: [_c(128, 128, 32, 8, 3), _c(128, 64, 32, 8, 3, 255), _c(64, 64, 32, 4, 3)],
    90: [_c(128, 128, 32, 8, 3), _c(128, 64, 32, 8, 3), _c(64, 64, 32, 4, 3)],
}
# with a gathered out-mask gate (mask not word-aligned: fc's 1000 outputs): 128x128x32 / 8 warps
# spills (fc: 136 B sm_90, 408 B sm_80), 64x128x32 / 8 warps fits on both archs
WGRAD_Q: Dict[int, List[dict]] = {
    80: [_c(64, 128, 32, 8, 3), _c(32, 32, 32, 4, 2)],
    90: [_c(64, 128, 32, 8, 3), _c(32, 32, 16, 4, 3, 255)],
}
# fp32 operands (tf32 products): the small tiles
WGRAD_SMALL: Dict[int, List[dict]] = {
    80: [_c(32, 32, 32, 4, 2)],
    90: [_c(32, 32, 16, 4, 3, 255)],
}
FAMILIES = ("GEMM", "GEMM_REGEN", "GEMM_OMASK", "GEMM_OMASK_WORDS", "GEMM_EPI", "GEMM_EPI1", "GEMM_EPI1_COLS",
            "GEMM_RNG", "GEMM_RNG1", "GEMM_SMALL",
            "WGRAD", "WGRAD_Q", "WGRAD_SMALL")


def family(kind: str, consts: dict, elem_bytes: int = 2) -> str:
    """The config family of a launch: ``kind`` is ``"GEMM"`` (forward, input grad) or ``"WGRAD"``;
    ``consts`` the launch's constexpr switches (see the module's family table); ``elem_bytes`` the
    operand size: fp32 operands (4 bytes) double the tiles' registers, and the 128-wide configs
    spill with them (compile runs: 552 B at 128x128x64 on sm_90, 380 B at 64x128x32 on sm_80), so
    fp32 launches take the small families."""
    if kind == "WGRAD":
        if elem_bytes > 2:
            return "WGRAD_SMALL"
        # the gathered out-mask gate (one word per element) needs the smaller tiles; the input
        # quantizer alone or a word-aligned gate fit the WGRAD tiles (compile report)
        gathered = consts.get("HAS_OMASK") and not consts.get("MASK_ALIGNED")
        return "WGRAD_Q" if gathered else "WGRAD"
    # fp32 operands, and the linear's column-grouped output noise (spills 48-892 B at 64x128 and
    # 108-620 B at 64x64): the small tiles
    cols_noise = consts.get("NOISE4") == 2 and consts.get("OUT_NOISE")
    rng = not consts.get("W_PRE") and bool(consts.get("NOISE_ADD") or consts.get("NOISE_MUL")
                                           or consts.get("W_CLIP"))
    if elem_bytes > 2:
        return "GEMM_SMALL"
    if consts.get("SPLIT_T"):  # one crossbar tile per program: one accumulator
        if cols_noise:
            return "GEMM_EPI1_COLS"
        return "GEMM_RNG1" if rng else "GEMM_EPI1"
    if cols_noise:
        return "GEMM_SMALL"
    epilogue = bool(consts.get("OUT_NOISE") or consts.get("OUT_Q"))
    gate = bool(consts.get("HAS_OMASK"))
    if gate and not epilogue and consts.get("MASK_ALIGNED"):
        return "GEMM_OMASK_WORDS"
    if rng and (epilogue or gate):
        return "GEMM_RNG"
    if rng:
        return "GEMM_REGEN"
    if epilogue:
        return "GEMM_EPI"
    return "GEMM_OMASK" if gate else "GEMM"


INTERPRET_CONFIG = _c(64, 32, 32, 1, 1)


def interpret_config() -> dict:
    """The interpreter's config: `INTERPRET_CONFIG`, or ``NOISYOPS_INTERPRET_TILE="BM,BN,BK"``
    (tests: code paths that depend on the tile, e.g. several mask words per tile row at BN >= 64)."""
    tile = os.environ.get("NOISYOPS_INTERPRET_TILE", "").strip()
    if not tile:
        return dict(INTERPRET_CONFIG)
    try:
        bm, bn, bk = (int(v) for v in tile.split(","))
    except ValueError:
        raise ValueError(f"NOISYOPS_INTERPRET_TILE={tile!r}: expected 'BM,BN,BK' (powers of two >= 16)")
    return _c(bm, bn, bk, 1, 1)
ARCHS = (80, 90)


def arch_of(device) -> int:
    """80 or 90: the config family for a CUDA device (sm_8x -> 80, sm_9x and newer -> 90)."""
    import torch
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _pow2_at_least(n: int, floor: int = 16) -> int:
    v = floor
    while v < n:
        v *= 2
    return v


def pruned(fam: str, arch: int, args: dict) -> List[dict]:
    """The configs of family ``fam`` worth timing for a launch with named arguments ``args``:
    tiles no wider than the padded problem (``BM <= pow2(rows)``, ``BN <= pow2(columns)``,
    ``BK <= pow2(reduction chunk)``; configs with ``rows_max`` only for segments of at most that
    many rows), keeping at least the smallest config. Forward: rows = ``SEG``
    (one segment's rows), columns = ``Cout_g``, chunk = ``Cg``; input grad: columns = ``Cg``, chunk =
    ``Cout_g``; weight grad: rows = ``Cout_g``, columns = ``Cg``, chunk = ``rows_per_split``."""
    cfgs = globals()[fam][arch]
    big = 1 << 30
    if fam.startswith("WGRAD"):
        m, n, k = args.get("Cout_g", big), args.get("Cg", big), args.get("rows_per_split", big)
    else:
        fwd = "numel_y" in args
        m = args.get("SEG", big)
        n = args.get("Cout_g" if fwd else "Cg", big)
        k = args.get("Cg" if fwd else "Cout_g", big)
    cfgs = [c for c in cfgs if c.get("rows_max") is None or m <= c["rows_max"]]
    keep = [c for c in cfgs if c["BM"] <= _pow2_at_least(m) and c["BN"] <= _pow2_at_least(n)
            and c["BK"] <= _pow2_at_least(k)]
    return keep or [min(cfgs, key=lambda c: c["BM"] * c["BN"] * c["BK"])]
