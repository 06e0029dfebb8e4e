"""Noisy conv2d forward as a Triton implicit GEMM, with its launcher and glue.

GEMM view (per group g): rows ``m = (n, oh, ow)`` of the output, columns ``co`` (out channels of
the group), reduction ``k = (r, s, ci)`` walked as ONE flattened loop (kernel position outer,
input-channel block inner), so activation tiles are contiguous loads for NHWC / channels-last ``x``
(any strides work) and the pipeliner sees a single K loop (``cp.async`` on sm_80/sm_90). Per-row
bases (``x_base``, ``ih0 = oh·sh − ph``, ``iw0``) are computed once and moved by scalar deltas.

    prologue   a = Q_in(x[n, ih0 + r·dh, iw0 + s·dw, g·Cg + ci])   (0 in the padding)
    weights    b = Wn[k, co] of the K-major weights ``[groups, KH·KW·Cg, Cout_g]``
               (`weight_prepass.k_major`): a plain 2-D block contiguous along co; regenerated in
               registers (`perturb_weight` at the flat OIHW index, noise instance of the row tile)
               or read from the K-major pre-pass buffer (slot of the row tile)
    mainloop   acc_t += a @ b  (fp32 accumulation; product in the input dtype; fp32 inputs use
               IEEE fp32 unless torch allows tf32)
    epilogue   per crossbar tile t (K split by whole input channels, `_tile_epilogue`):
               y_t = round_to_input_dtype(acc_t) + out_noise·ε''(t·numel(y) + logical NCHW index)
                     (one Philox call per four outputs where four rows / columns of the tile are
                     four aligned stream elements: `noise_grouping`)
               mask bit (y storage offset) = lo <= y_t <= hi: whole int32 words built in
                     registers and stored once when y is channels-last with C_out, Cout_g
                     multiples of 32 (`mask_aligned`), else tl.atomic_or
               y  += Q_out(y_t);  finally y += bias
    tile-parallel  with the ADC on (`crossbar_split`: one tile by default, any T on request): one program per crossbar tile and
               row/column tile, one accumulator; it stores the int16 level index of Q_out(y_t)
               and `_tile_sum_kernel` adds the levels in the same order (the same bits as the loop)
A row tile never mixes noise instances: rows are split into segments (the whole batch for
per_call, one sample for per_sample / per_instance) and a program's rows lie in one segment.

The linear op reuses this kernel as a 1x1 convolution over rows (`noisy_linear`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from noisyops.reference import memory_format_of

from . import configs
from .quantize import code_level, in_range, qparams, quantize, quantize_code
from .stream import normal_at, normals_cols4, normals_rows4, u32_as_i32
from .weight_prepass import k_major, perturb_weight, prepass, use_prepass, weight_args

PER_CALL, PER_SAMPLE, PER_INSTANCE = 0, 1, 2
SAMPLE_STRIDE = 1 << 24
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


GROUP_M = 8  # row tiles per rasterization group (consecutive programs share column tiles)


@triton.jit
def grouped_tile(pid, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` of a 1-D grid of ``num_pid_m · num_pid_n`` programs in
    grouped order: ``GROUP_M`` consecutive row tiles sweep all column tiles together, so the
    activation rows (and the weight column tiles) they share are re-read from L2, not DRAM."""
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _fwd_mainloop(x_ptr, b_base, x_base, ih0, iw0, row_ok, co_l, col_ok, grp, c_lo, c_hi,
                  H, W, Cg, Cout_g, KW, KK, sxh, sxw, sxc, dil_h, dil_w,
                  in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1, i0, i1, c3,
                  IN_Q: tl.constexpr, W_CLIP: tl.constexpr, W_Q: tl.constexpr,
                  NOISE_MUL: tl.constexpr, NOISE_ADD: tl.constexpr, W_PRE: tl.constexpr,
                  DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``Σ_{r,s} Σ_{ci ∈ [c_lo, c_hi)} Q_in(x)·Wn`` for one row/column tile (fp32 ``[BM, BN]``).

    One flattened K loop over ``(r, s, channel block)``: the per-row bases ``x_base``, ``ih0 =
    oh·sh − ph``, ``iw0`` are computed once by the caller and moved by the scalar deltas of the
    kernel position; the weight tile is a plain 2-D block of the K-major weights ``b_base``
    (`weight_prepass.k_major`: row ``rs·Cg + ci``, contiguous along the out channels)."""
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    n_cb = tl.cdiv(c_hi - c_lo, BK)
    for it in range(0, KK * n_cb):
        rs = it // n_cb
        c0 = c_lo + (it - rs * n_cb) * BK
        r = rs // KW
        dr = r * dil_h
        ds = (rs - r * KW) * dil_w
        pos_ok = row_ok & (ih0 >= -dr) & (ih0 < H - dr) & (iw0 >= -ds) & (iw0 < W - ds)
        ci = c0 + tl.arange(0, BK)
        k_ok = ci < c_hi
        a_ok = pos_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + (x_base + (dr * sxh + ds * sxw))[:, None] + ((grp * Cg + ci) * sxc)[None, :],
                    mask=a_ok, other=0.0)
        if IN_Q:
            a = tl.where(a_ok, quantize(a.to(tl.float32), in_lo, in_hi, in_delta), 0.0).to(xdt)
        b_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_base + ((rs * Cg + ci) * Cout_g)[:, None] + co_l[None, :], mask=b_ok, other=0.0)
        if not W_PRE:
            if W_CLIP or NOISE_MUL or NOISE_ADD:
                e = ((grp * Cout_g + co_l) * (Cg * KK))[None, :] + (ci * KK + rs)[:, None]
                b = perturb_weight(b.to(tl.float32), e, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1,
                                   i0, i1, c3, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD)
                b = tl.where(b_ok, b, 0.0).to(xdt)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _tile_epilogue(acc, t, col0, row_ok, n, oh, ow, y_row, r4_first, grp, Cout_g, OW, ohw,
                   lsn, lsh, lsw, lsc, syc, mask_words, numel_y, out_noise, out_lo, out_hi, out_delta,
                   k0, k1, i0, i1, c3, mask_ptr, OUT_NOISE: tl.constexpr, OUT_Q: tl.constexpr,
                   MASK_ALIGNED: tl.constexpr, NOISE4: tl.constexpr, xdt: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, AS_CODE: tl.constexpr = False):
    """Crossbar tile t's epilogue on a ``[BM, BN]`` (sub-)tile of columns ``col0 + [0, BN)``:
    ``Q_out(round_to_input_dtype(acc) + out_noise·ε''(t·numel(y) + logical index))`` in fp32 (or,
    ``AS_CODE``, its int32 `quantize_code`), and the tile's out-mask bits stored (whole int32 words
    from registers when ``MASK_ALIGNED``, else ``atomic_or``)."""
    co_l = col0 + tl.arange(0, BN)
    col_ok = co_l < Cout_g
    co = grp * Cout_g + co_l
    ok = row_ok[:, None] & col_ok[None, :]
    v = acc.to(xdt).to(tl.float32)  # the reference's product is rounded to the input dtype
    if OUT_NOISE:
        t_base = numel_y.to(tl.int64) * t
        if NOISE4 == 1:  # four consecutive rows share one Philox call
            r4 = r4_first + 4 * tl.arange(0, BM // 4)
            n4 = r4 // ohw
            rem4 = r4 % ohw
            first = t_base + (n4 * lsn + (rem4 // OW) * lsh + (rem4 % OW) * lsw)[:, None] \
                + (co * lsc)[None, :]
            eps = normals_rows4(first, k0, k1, i0, i1, c3 + 2, BM, BN)
        elif NOISE4 == 2:  # four consecutive columns share one Philox call
            co4 = grp * Cout_g + col0 + 4 * tl.arange(0, BN // 4)
            first = t_base + (n * lsn + oh * lsh + ow * lsw)[:, None] + (co4 * lsc)[None, :]
            eps = normals_cols4(first, k0, k1, i0, i1, c3 + 2, BM, BN)
        else:
            lidx = (n * lsn + oh * lsh + ow * lsw)[:, None] + (co * lsc)[None, :]
            eps = normal_at(t_base + lidx, k0, k1, i0, i1, c3 + 2)
        v = v + out_noise * eps
    if OUT_Q:
        inside = ok & in_range(v, out_lo, out_hi)
        if MASK_ALIGNED and BN >= 32:
            # y channels-last with C_out, Cout_g multiples of 32: the 32 bits of a word are
            # 32 consecutive channels of one row of this tile, so the tile builds whole
            # words in registers and stores each once (no atomics)
            bits = inside.to(tl.int32) << (co_l % 32).to(tl.int32)[None, :]
            words = tl.sum(tl.reshape(bits, (BM, BN // 32, 32)), axis=2)
            wcol = col0 // 32 + tl.arange(0, BN // 32)
            w_off = mask_words * t + ((y_row + grp * Cout_g) >> 5)[:, None] + wcol[None, :]
            tl.store(mask_ptr + w_off, words,
                     mask=row_ok[:, None] & (wcol * 32 < Cout_g)[None, :])
        else:
            off = y_row[:, None] + (co * syc)[None, :]
            bit = (tl.full((BM, BN), 1, tl.int32) << (off & 31).to(tl.int32))
            tl.atomic_or(mask_ptr + mask_words * t + (off >> 5), bit, mask=inside)
        if AS_CODE:
            v = quantize_code(v, out_lo, out_hi, out_delta)
        else:
            v = quantize(v, out_lo, out_hi, out_delta)
    return v


@triton.jit
def _tile_sum_kernel(code_ptr, b_ptr, y_ptr, numel_y, T, syc, C_out, out_lo, out_delta,
                     HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Digital sum of the crossbar tiles of a tile-parallel forward (``SPLIT_T``):
    ``y[e] = Σ_{t < T} level(code[t, e]) (+ bias[channel of e])``, summed in the order of the
    looped kernel, so y has its bits. ``e``: storage offset of dense y; channel ``(e // syc) % C_out``."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel_y
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        code = tl.load(code_ptr + numel_y.to(tl.int64) * t + e, mask=ok, other=0).to(tl.int32)
        total += code_level(code, out_lo, out_delta)
    if HAS_BIAS:
        total += tl.load(b_ptr + (e // syc) % C_out, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + e, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, wn_ptr, b_ptr, y_ptr, mask_ptr, code_ptr, inst_ptr, slot_ptr,
        H, W, OH, OW, Cg, Cout_g, KH, KW,
        sxn, sxh, sxw, sxc, syn, syh, syw, syc, lsn, lsh, lsw, lsc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        SEG, T, per_tile, mask_words, numel_y,
        in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma,
        out_noise, out_lo, out_hi, out_delta, k0_, k1_, c3_,
        HAS_BIAS: tl.constexpr, IN_Q: tl.constexpr, W_CLIP: tl.constexpr, W_Q: tl.constexpr,
        NOISE_MUL: tl.constexpr, NOISE_ADD: tl.constexpr, W_PRE: tl.constexpr,
        OUT_NOISE: tl.constexpr, OUT_Q: tl.constexpr, MASK_ALIGNED: tl.constexpr, NOISE4: tl.constexpr,
        DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_T: tl.constexpr = False, CODES: tl.constexpr = False):
    """Grid ``(segments·cdiv(SEG, BM)·cdiv(Cout_g, BN), 1, groups)`` in grouped order
    (`grouped_tile`); ``w_ptr`` the K-major weights, ``wn_ptr`` the K-major pre-pass buffer
    ``[slots, groups, KH·KW·Cg, Cout_g]``; see the module docstring.

    ``SPLIT_T`` (ADC on; `crossbar_split`): the grid's axis 1 is the crossbar tile ``t``, each
    program runs ONE tile's K range with a single accumulator; ``CODES`` (T > 1): its ADC codes go
    to ``code_ptr[t, y offset]`` (int16 / int32) and `_tile_sum_kernel` adds the tiles; else (T = 1)
    it writes y itself."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(Cout_g, BN), GROUP_M)
    grp = tl.program_id(2)
    tiles_per_seg = tl.cdiv(SEG, BM)
    seg = pid_m // tiles_per_seg
    r_in_seg = (pid_m % tiles_per_seg) * BM + tl.arange(0, BM)
    row_ok = r_in_seg < SEG
    rows = seg * SEG + r_in_seg
    ohw = OH * OW
    n = rows // ohw
    rem = rows % ohw
    oh = rem // OW
    ow = rem % OW
    co_l = pid_n * BN + tl.arange(0, BN)
    col_ok = co_l < Cout_g
    co = grp * Cout_g + co_l

    inst = tl.load(inst_ptr + seg)
    i0 = inst.to(tl.uint32)
    i1 = (inst >> 32).to(tl.uint32)
    k0 = k0_.to(tl.uint32, bitcast=True)
    k1 = k1_.to(tl.uint32, bitcast=True)
    c3 = c3_.to(tl.uint32, bitcast=True)
    xdt = x_ptr.dtype.element_ty
    KK = KH * KW
    w_group = grp.to(tl.int64) * (KK * Cg * Cout_g)
    if W_PRE:
        slot = tl.load(slot_ptr + seg)
        b_base = wn_ptr + slot.to(tl.int64) * (tl.num_programs(2) * KK * Cg * Cout_g) + w_group
    else:
        b_base = w_ptr + w_group
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_base = n * sxn + ih0 * sxh + iw0 * sxw
    y_row = n * syn + oh * syh + ow * syw
    ok = row_ok[:, None] & col_ok[None, :]

    if SPLIT_T:
        t = tl.program_id(1)
        c_lo = t * per_tile
        acc = _fwd_mainloop(x_ptr, b_base, x_base, ih0, iw0, row_ok, co_l, col_ok, grp,
                            c_lo, tl.minimum(c_lo + per_tile, Cg), H, W, Cg, Cout_g, KW, KK,
                            sxh, sxw, sxc, dil_h, dil_w,
                            in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma,
                            k0, k1, i0, i1, c3, IN_Q, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD, W_PRE,
                            DOT_PREC, BM, BN, BK)
        r4_first = seg * SEG + (pid_m % tiles_per_seg) * BM
        total = _tile_epilogue(acc, t, pid_n * BN, row_ok, n, oh, ow, y_row, r4_first, grp,
                               Cout_g, OW, ohw, lsn, lsh, lsw, lsc, syc, mask_words, numel_y,
                               out_noise, out_lo, out_hi, out_delta, k0, k1, i0, i1, c3,
                               mask_ptr, OUT_NOISE, OUT_Q, MASK_ALIGNED, NOISE4, xdt, BM, BN,
                               AS_CODE=CODES)
    elif OUT_NOISE or OUT_Q:
        total = tl.zeros((BM, BN), dtype=tl.float32)
        r4_first = seg * SEG + (pid_m % tiles_per_seg) * BM  # first row of the tile
        for t in range(0, T):
            c_lo = t * per_tile
            acc = _fwd_mainloop(x_ptr, b_base, x_base, ih0, iw0, row_ok, co_l, col_ok, grp,
                                c_lo, tl.minimum(c_lo + per_tile, Cg), H, W, Cg, Cout_g, KW, KK,
                                sxh, sxw, sxc, dil_h, dil_w,
                                in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma,
                                k0, k1, i0, i1, c3, IN_Q, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD, W_PRE,
                                DOT_PREC, BM, BN, BK)
            total += _tile_epilogue(acc, t, pid_n * BN, row_ok, n, oh, ow, y_row, r4_first, grp,
                                    Cout_g, OW, ohw, lsn, lsh, lsw, lsc, syc, mask_words, numel_y,
                                    out_noise, out_lo, out_hi, out_delta, k0, k1, i0, i1, c3,
                                    mask_ptr, OUT_NOISE, OUT_Q, MASK_ALIGNED, NOISE4, xdt, BM, BN)
    else:  # one product, no per-tile epilogue: a single accumulator
        total = _fwd_mainloop(x_ptr, b_base, x_base, ih0, iw0, row_ok, co_l, col_ok, grp, 0, Cg,
                              H, W, Cg, Cout_g, KW, KK, sxh, sxw, sxc, dil_h, dil_w,
                              in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul,
                              sigma, k0, k1, i0, i1, c3, IN_Q, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD,
                              W_PRE, DOT_PREC, BM, BN, BK)
    y_off = y_row[:, None] + (co * syc)[None, :]
    if CODES:  # one crossbar tile's ADC codes; `_tile_sum_kernel` adds the tiles and the bias
        c_off = tl.program_id(1).to(tl.int64) * numel_y + y_off
        tl.store(code_ptr + c_off, total.to(code_ptr.dtype.element_ty), mask=ok)
    else:
        if HAS_BIAS:
            total += tl.load(b_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=ok)


# ---- host glue ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
    """A conv (or linear as 1x1 conv) in NHWC terms; strides are element strides of the
    logical ``[n, h, w, c]`` views."""

    N: int
    H: int
    W: int
    C_in: int
    OH: int
    OW: int
    C_out: int
    KH: int
    KW: int
    groups: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    @property
    def Cg(self):
        return self.C_in // self.groups

    @property
    def Cout_g(self):
        return self.C_out // self.groups

    @property
    def rows(self):
        return self.N * self.OH * self.OW


def conv_geometry(x, weight, stride, padding, dilation, groups) -> Geometry:
    N, C, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return Geometry(N, H, W, C, OH, OW, C_out, KH, KW, groups, tuple(stride), tuple(padding),
                    tuple(dilation))


def nhwc_strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """``(n, h, w, c)`` element strides of a 4-D NCHW-shaped tensor."""
    s = t.stride()
    return s[0], s[2], s[3], s[1]


def sample_ids(p, batch: int, instance: torch.Tensor) -> List[int]:
    """Noise instance id of each sample (SPEC section 2)."""
    if p.sampling == PER_INSTANCE:
        return [int(v) for v in instance.reshape(-1).tolist()]
    counter = int(instance)
    if p.sampling == PER_SAMPLE:
        return [counter * SAMPLE_STRIDE + s for s in range(batch)]
    return [counter]


def segments(p, geo_rows_per_sample: int, batch: int, instance: torch.Tensor, device):
    """Row segments that share one noise instance: ``(SEG, inst int64 [S], slot int32 [S],
    slot_instances)``. per_call: one segment of all rows; otherwise one segment per sample.
    ``slot_instances`` lists the distinct instances in slot order (pre-pass buffer rows)."""
    ids = sample_ids(p, batch, instance)
    if p.sampling == PER_CALL:
        seg = geo_rows_per_sample * batch
    else:
        seg = geo_rows_per_sample
    uniq = list(dict.fromkeys(ids))
    slot_of = {v: i for i, v in enumerate(uniq)}
    inst = torch.tensor(ids, dtype=torch.int64, device=device)
    slots = torch.tensor([slot_of[v] for v in ids], dtype=torch.int32, device=device)
    return seg, inst, slots, uniq


def dot_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for float32 unless torch allows tf32 matmuls; 16-bit inputs use tensor cores."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"


def mask_aligned(ys, geo: Geometry) -> bool:
    """True when every int32 word of the out mask holds 32 consecutive channels of one output
    position: y channels-last (unit channel stride) and ``C_out``, ``Cout_g`` multiples of 32, so a
    row/column tile with ``BN >= 32`` builds whole words in registers (no atomics)."""
    return ys[3] == 1 and ys[2] % 32 == 0 and ys[1] % 32 == 0 and ys[0] % 32 == 0 \
        and geo.Cout_g % 32 == 0


def noise_grouping(ls, geo: Geometry, seg: int) -> int:
    """How the forward epilogue draws the output noise (`stream.normals_rows4` / `normals_cols4`):
    1 when four consecutive rows of a tile are four consecutive stream elements, aligned to 4
    (logical NCHW: unit stride along the row index within a sample, ``OH·OW``, the sample and
    channel strides and the segment length multiples of 4); 2 when four consecutive columns are
    (unit channel stride, every other stride and ``Cout_g`` multiples of 4: the linear op); else 0
    (one Philox call per element, `stream.normal_at`). ``ls``: logical ``(n, h, w, c)`` strides."""
    lsn, lsh, lsw, lsc = ls
    numel_y = geo.rows * geo.C_out
    if lsw == 1 and lsh == geo.OW and (geo.OH * geo.OW) % 4 == 0 and lsn % 4 == 0 and lsc % 4 == 0 \
            and seg % 4 == 0 and numel_y % 4 == 0:
        return 1
    if lsc == 1 and lsn % 4 == 0 and lsh % 4 == 0 and lsw % 4 == 0 and geo.Cout_g % 4 == 0 \
            and numel_y % 4 == 0:
        return 2
    return 0


def out_args(p):
    olo, ohi, odelta = qparams(p.out_lo, p.out_hi, p.out_bits)
    return olo, ohi, odelta


def tiling(p, Cg: int, KK: int) -> Tuple[int, int]:
    """``(T, per_tile)``: crossbar tiles along input channels (1 tile unless out noise / ADC)."""
    if (p.out_bits > 0 or p.out_noise > 0) and p.tile_rows > 0:
        per_tile = max(1, p.tile_rows // max(1, KK))
        return triton.cdiv(Cg, per_tile), per_tile
    return 1, Cg


CROSSBAR_FWD_ENV = "NOISYOPS_TRITON_CROSSBAR_FWD"


def crossbar_split(p, T: int) -> bool:
    """True when the forward runs its ``T`` crossbar tiles in parallel (``SPLIT_T``). Needs the ADC
    (the tile outputs are levels, summed exactly from their int codes). ``NOISYOPS_TRITON_CROSSBAR_FWD``:
    ``auto`` (default) splits when ``T <= configs.CROSSBAR_SPLIT_MAX_TILES`` (1: a single tile, where
    it only drops the loop's second accumulator), ``split`` always, ``loop`` never. Why: the looped
    kernel carries two ``BM×BN`` fp32 tensors (the tile's product and the running sum) and stops at
    64×128 on sm_90; one tile per program has one accumulator and compiles at 128×128 without
    spills (docs/compile_report.md, case ``tiles_split``), at the price of ``2·T`` bytes of codes
    written and read per output element when ``T > 1`` (which is faster: the GPU check times both)."""
    mode = os.environ.get(CROSSBAR_FWD_ENV, "auto").strip().lower()
    if mode not in ("auto", "split", "loop"):
        raise ValueError(f"{CROSSBAR_FWD_ENV}={mode!r}: expected 'auto', 'split' or 'loop'")
    if p.out_bits <= 0 or mode == "loop":
        return False
    return mode == "split" or T <= configs.CROSSBAR_SPLIT_MAX_TILES


def code_dtype(out_bits: int) -> torch.dtype:
    """Storage of the per-tile ADC codes (levels ``0 .. 2^bits − 1`` and three negative specials)."""
    return torch.int16 if out_bits <= 14 else torch.int32


_AUTOTUNED = {}
# scalar arguments that change neither the best tile nor the code: noise key words and the float
# layer parameters (the autotuner's cache key is built from every other argument)
_NOT_IN_KEY = ("k0_", "k1_", "c3_")


def autotune_key(jit_fn, consts: dict) -> List[str]:
    """Names the autotuner keys on: every int argument (shapes, strides, padding, dilation,
    segment/tile sizes) and every constexpr switch; Triton adds the tensors' dtypes itself."""
    floats = ("lo", "hi", "delta", "eta_mul", "sigma", "out_noise")
    names = [n for n in jit_fn.arg_names if not n.endswith("_ptr") and n not in _NOT_IN_KEY
             and not n.endswith(floats) and n not in ("BM", "BN", "BK")]
    return names + [n for n in sorted(consts) if n not in names]


def _prune(fam: str, arch: int):
    """``early_config_prune`` for `triton.autotune`: `configs.pruned` on the launch's arguments."""
    def prune(cfgs, named_args, **kwargs):
        keep = configs.pruned(fam, arch, {**named_args, **kwargs})
        tiles = {(c["BM"], c["BN"], c["BK"], c["num_warps"], c["num_stages"]) for c in keep}
        return [c for c in cfgs if (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps,
                                    c.num_stages) in tiles]
    return prune


def launch_gemm(name: str, jit_fn, grid_fn, args: Sequence, consts: dict, device,
                kind: str = "GEMM", reset_to_zero=None, elem_bytes: int = 2):
    """Launch ``jit_fn`` with the interpreter's single config, or autotuned over the configs of
    the device's arch in the family `configs.family` picks from the switches (``kind``: ``"GEMM"``
    or ``"WGRAD"``; ``elem_bytes``: the operands' element size), pruned for the shape
    (`configs.pruned`), keyed on `autotune_key`. ``NOISYOPS_TRITON_AUTOTUNE=0`` skips the
    autotuner and runs the first pruned config (the GPU check's correctness part: one compile
    per specialization instead of one per config, no timing runs)."""
    if configs.interpret() or device.type != "cuda":
        cfg = configs.interpret_config()
        meta = {**consts, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"]}
        jit_fn[grid_fn(meta)](*args, **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return
    arch = configs.arch_of(device)
    fam = configs.family(kind, consts, elem_bytes)
    if os.environ.get("NOISYOPS_TRITON_AUTOTUNE", "1").strip() == "0":
        # no autotuning (correctness runs): the first config the pruning keeps, compiled once
        c = configs.pruned(fam, arch, {**dict(zip(jit_fn.arg_names, args)), **consts})[0]
        meta = {**consts, "BM": c["BM"], "BN": c["BN"], "BK": c["BK"]}
        opts = {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}
        jit_fn[grid_fn(meta)](*args, **meta, num_warps=c["num_warps"], num_stages=c["num_stages"], **opts)
        return
    k = (name, arch, fam)
    if k not in _AUTOTUNED:
        cfgs = [triton.Config({"BM": c["BM"], "BN": c["BN"], "BK": c["BK"]}, num_warps=c["num_warps"],
                              num_stages=c["num_stages"], maxnreg=c.get("maxnreg"))
                for c in getattr(configs, fam)[arch]]
        _AUTOTUNED[k] = triton.autotune(cfgs, key=autotune_key(jit_fn, consts), reset_to_zero=reset_to_zero,
                                        prune_configs_by={"early_config_prune": _prune(fam, arch)})(jit_fn)
    _AUTOTUNED[k][grid_fn](*args, **consts)


def gemm_forward(x4: torch.Tensor, xs, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 geo: Geometry, y: torch.Tensor, ys, ls, p, instance: torch.Tensor,
                 rows_per_sample: int) -> torch.Tensor:
    """Run the forward kernel. ``xs/ys``: ``(n, h, w, c)`` element strides of x and y (storage),
    ``ls``: logical strides for the output-noise element index. Writes ``y``; returns the mask."""
    device = x4.device
    Cg, KK = geo.Cg, geo.KH * geo.KW
    T, per_tile = tiling(p, Cg, KK)
    tiled = p.out_bits > 0 or p.out_noise > 0
    numel_y = y.numel()
    words = triton.cdiv(numel_y, 32)
    mask = torch.zeros((T, words) if p.out_bits else (0,), dtype=torch.int32, device=device)
    seg, inst, slots, uniq = segments(p, rows_per_sample, geo.N, instance, device)
    w = weight.detach().contiguous()
    wa = weight_args(p, w)
    use_pre = use_prepass(p, geo, len(uniq), device)
    wn = prepass(w, p, wa, uniq, x4.dtype, groups=geo.groups) if use_pre else w
    wk = w if use_pre else k_major(w, geo.groups)
    ilo, ihi, idelta = qparams(p.in_lo, p.in_hi, p.in_bits)
    olo, ohi, odelta = out_args(p)
    n_seg = inst.numel()
    split = crossbar_split(p, T)
    codes = torch.empty((T, numel_y), dtype=code_dtype(p.out_bits), device=device) \
        if split and T > 1 else y  # y: a placeholder the kernel never touches without CODES
    args = (x4, wk, wn, bias if bias is not None else w, y, mask if p.out_bits else y, codes, inst, slots,
            geo.H, geo.W, geo.OH, geo.OW, Cg, geo.Cout_g, geo.KH, geo.KW,
            *xs, *ys, *ls, *geo.stride, *geo.padding, *geo.dilation,
            seg, T, per_tile, words, numel_y,
            ilo, ihi, idelta, wa.lo, wa.hi, wa.delta, wa.eta_mul, wa.sigma,
            float(p.out_noise), olo, ohi, odelta,
            u32_as_i32(p.seed_lo), u32_as_i32(p.seed_hi), u32_as_i32(4 * p.layer_key))
    consts = dict(HAS_BIAS=bias is not None, IN_Q=p.in_bits > 0, W_CLIP=wa.clip, W_Q=wa.quant,
                  NOISE_MUL=wa.noise_mul, NOISE_ADD=wa.noise_add, W_PRE=use_pre,
                  OUT_NOISE=tiled and p.out_noise > 0, OUT_Q=p.out_bits > 0,
                  MASK_ALIGNED=mask_aligned(ys, geo), NOISE4=noise_grouping(ls, geo, seg),
                  DOT_PREC=dot_precision(x4.dtype), GROUP_M=GROUP_M,
                  SPLIT_T=split, CODES=split and T > 1)
    grid = lambda m: (n_seg * triton.cdiv(seg, m["BM"]) * triton.cdiv(geo.Cout_g, m["BN"]),  # noqa: E731
                      T if split else 1, geo.groups)
    launch_gemm("conv_fwd", _conv_fwd_kernel, grid, args, consts, device,  # atomic_or is idempotent
                elem_bytes=x4.element_size())
    if split and T > 1:
        block = configs.ELEMENTWISE_BLOCK
        _tile_sum_kernel[(triton.cdiv(numel_y, block),)](
            codes, bias if bias is not None else y, y, numel_y, T, ys[3], geo.C_out, olo, odelta,
            HAS_BIAS=bias is not None, BLOCK=block)
    return mask


INDEX_LIMIT = 1 << 31  # the kernels' element offsets are int32 (noise indices and slots: int64)


def supported(x: torch.Tensor, weight: torch.Tensor, *others: int) -> bool:
    """True when the kernels can run this call: a supported dtype, non-empty tensors, and every
    tensor (``x``, ``weight``, and the element counts ``others``: outputs, incoming gradients)
    below 2^31 elements, so no int32 offset can overflow (larger calls are declined)."""
    sizes = (x.numel(), weight.numel()) + tuple(int(n) for n in others)
    return (x.dtype in SUPPORTED_DTYPES and weight.dtype == x.dtype and x.numel() > 0
            and weight.numel() > 0 and max(sizes) < INDEX_LIMIT)


def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p, instance):
    """Glue with the signature of `noisyops.reference.conv2d_fwd`: ``(y, out_mask)``; y in x's
    memory format (channels-last in, channels-last out). Returns NotImplemented for float64."""
    geo = conv_geometry(x, weight, stride, padding, dilation, groups)
    if not supported(x, weight, geo.rows * geo.C_out):
        return NotImplemented
    fmt = memory_format_of(x)
    xk = x if (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) else \
        x.contiguous(memory_format=torch.channels_last)
    y = torch.empty((geo.N, geo.C_out, geo.OH, geo.OW), dtype=x.dtype, device=x.device,
                    memory_format=fmt)
    ls = (geo.C_out * geo.OH * geo.OW, geo.OH * geo.OW, geo.OW, 1)  # (n, h, w, c) of NCHW
    ys = nhwc_strides(y)
    logical = (ls[0], ls[2], ls[3], ls[1])
    b = bias.detach().contiguous() if bias is not None else None
    mask = gemm_forward(xk, nhwc_strides(xk), weight, b, geo, y, ys, logical, p, instance,
                        geo.OH * geo.OW)
    return y, mask
