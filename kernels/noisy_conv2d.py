"""Noisy conv2d forward as a Triton implicit GEMM, with its launcher and glue.

GEMM view (per group g): rows ``m = (n, oh, ow)`` of the output, columns ``co`` (out channels of
the group), reduction ``k = (r, s, ci)`` walked as kernel position outer, input channel inner, so
activation tiles are contiguous loads for NHWC / channels-last ``x`` (any strides work).

    prologue   a = Q_in(x[n, oh·sh − ph + r·dh, ow·sw − pw + s·dw, g·Cg + ci])   (0 in the padding)
    weights    b = Wn[co, ci, r, s]: regenerated in registers (`perturb_weight`, noise instance of
               the row tile) or read from the pre-pass buffer (slot of the row tile)
    mainloop   acc_t += a @ b  (fp32 accumulation; product in the input dtype; fp32 inputs use
               IEEE fp32 unless torch allows tf32)
    epilogue   per crossbar tile t (K split by whole input channels):
               y_t = round_to_input_dtype(acc_t) + out_noise·ε''(t·numel(y) + logical NCHW index)
               mask bit (y storage offset) |= lo <= y_t <= hi   (tl.atomic_or on int32 words)
               y  += Q_out(y_t);  finally y += bias
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
from .quantize import in_range, qparams, quantize
from .stream import normal_at, u32_as_i32
from .weight_prepass import perturb_weight, prepass, use_prepass, weight_args

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
def _fwd_mainloop(x_ptr, w_ptr, wn_base, n, oh, ow, row_ok, co, col_ok, grp, c_lo, c_hi,
                  H, W, Cg, KH, KW, sxn, sxh, sxw, sxc, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1, i0, i1, c3,
                  IN_Q: tl.constexpr, W_CLIP: tl.constexpr, W_Q: tl.constexpr,
                  NOISE_MUL: tl.constexpr, NOISE_ADD: tl.constexpr, W_PRE: tl.constexpr,
                  DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``Σ_{r,s} Σ_{ci ∈ [c_lo, c_hi)} Q_in(x)·Wn`` for one row/column tile (fp32 ``[BM, BN]``)."""
    xdt = x_ptr.dtype.element_ty
    KK = KH * KW
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(0, KH):
        ih = oh * stride_h - pad_h + r * dil_h
        for s in range(0, KW):
            iw = ow * stride_w - pad_w + s * dil_w
            pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = n * sxn + ih * sxh + iw * sxw
            for c0 in range(c_lo, c_hi, BK):
                ci = c0 + tl.arange(0, BK)
                k_ok = ci < c_hi
                a_ok = pos_ok[:, None] & k_ok[None, :]
                a = tl.load(x_ptr + x_row[:, None] + ((grp * Cg + ci) * sxc)[None, :],
                            mask=a_ok, other=0.0)
                if IN_Q:
                    a = tl.where(a_ok, quantize(a.to(tl.float32), in_lo, in_hi, in_delta),
                                 0.0).to(xdt)
                e = co[None, :] * (Cg * KK) + (ci * KK + r * KW + s)[:, None]
                b_ok = k_ok[:, None] & col_ok[None, :]
                if W_PRE:
                    b = tl.load(wn_base + e, mask=b_ok, other=0.0)
                else:
                    b = tl.load(w_ptr + e, mask=b_ok, other=0.0).to(tl.float32)
                    b = perturb_weight(b, e, w_lo, w_hi, w_delta, eta_mul, sigma, k0, k1, i0, i1,
                                       c3, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD)
                    b = tl.where(b_ok, b, 0.0).to(xdt)
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, wn_ptr, b_ptr, y_ptr, mask_ptr, inst_ptr, slot_ptr,
        H, W, OH, OW, Cg, Cout_g, KH, KW,
        sxn, sxh, sxw, sxc, syn, syh, syw, syc, lsn, lsh, lsw, lsc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        SEG, T, per_tile, mask_words, numel_y,
        in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma,
        out_noise, out_lo, out_hi, out_delta, k0_, k1_, c3_,
        HAS_BIAS: tl.constexpr, IN_Q: tl.constexpr, W_CLIP: tl.constexpr, W_Q: tl.constexpr,
        NOISE_MUL: tl.constexpr, NOISE_ADD: tl.constexpr, W_PRE: tl.constexpr,
        OUT_NOISE: tl.constexpr, OUT_Q: tl.constexpr, DOT_PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid ``(segments·cdiv(SEG, BM)·cdiv(Cout_g, BN), 1, groups)`` in grouped order
    (`grouped_tile`); see the module docstring."""
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
    wn_base = wn_ptr
    if W_PRE:
        slot = tl.load(slot_ptr + seg)
        wn_base = wn_ptr + slot.to(tl.int64) * (Cout_g * tl.num_programs(2) * Cg * KK)

    if OUT_NOISE or OUT_Q:
        total = tl.zeros((BM, BN), dtype=tl.float32)
        ok = row_ok[:, None] & col_ok[None, :]
        for t in range(0, T):
            c_lo = t * per_tile
            acc = _fwd_mainloop(x_ptr, w_ptr, wn_base, n, oh, ow, row_ok, co, col_ok, grp,
                                c_lo, tl.minimum(c_lo + per_tile, Cg), H, W, Cg, KH, KW,
                                sxn, sxh, sxw, sxc, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul, sigma,
                                k0, k1, i0, i1, c3, IN_Q, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD, W_PRE,
                                DOT_PREC, BM, BN, BK)
            v = acc.to(xdt).to(tl.float32)  # the reference's product is rounded to the input dtype
            if OUT_NOISE:
                lidx = (n * lsn + oh * lsh + ow * lsw)[:, None] + (co * lsc)[None, :]
                v = v + out_noise * normal_at(numel_y.to(tl.int64) * t + lidx, k0, k1, i0, i1, c3 + 2)
            if OUT_Q:
                off = (n * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
                word = mask_words * t + (off >> 5)
                bit = (tl.full((BM, BN), 1, tl.int32) << (off & 31).to(tl.int32))
                tl.atomic_or(mask_ptr + word, bit, mask=ok & in_range(v, out_lo, out_hi))
                v = quantize(v, out_lo, out_hi, out_delta)
            total += v
    else:  # one product, no per-tile epilogue: a single accumulator
        total = _fwd_mainloop(x_ptr, w_ptr, wn_base, n, oh, ow, row_ok, co, col_ok, grp, 0, Cg,
                              H, W, Cg, KH, KW, sxn, sxh, sxw, sxc, stride_h, stride_w, pad_h, pad_w,
                              dil_h, dil_w, in_lo, in_hi, in_delta, w_lo, w_hi, w_delta, eta_mul,
                              sigma, k0, k1, i0, i1, c3, IN_Q, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD,
                              W_PRE, DOT_PREC, BM, BN, BK)
    if HAS_BIAS:
        total += tl.load(b_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
    tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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


def out_args(p):
    olo, ohi, odelta = qparams(p.out_lo, p.out_hi, p.out_bits)
    return olo, ohi, odelta


def tiling(p, Cg: int, KK: int) -> Tuple[int, int]:
    """``(T, per_tile)``: crossbar tiles along input channels (1 tile unless out noise / ADC)."""
    if (p.out_bits > 0 or p.out_noise > 0) and p.tile_rows > 0:
        per_tile = max(1, p.tile_rows // max(1, KK))
        return triton.cdiv(Cg, per_tile), per_tile
    return 1, Cg


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
        cfg = dict(configs.INTERPRET_CONFIG)
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
    wn = prepass(w, p, wa, uniq, x4.dtype) if use_pre else w
    ilo, ihi, idelta = qparams(p.in_lo, p.in_hi, p.in_bits)
    olo, ohi, odelta = out_args(p)
    n_seg = inst.numel()
    args = (x4, w, wn, bias if bias is not None else w, y, mask if p.out_bits else y, inst, slots,
            geo.H, geo.W, geo.OH, geo.OW, Cg, geo.Cout_g, geo.KH, geo.KW,
            *xs, *ys, *ls, *geo.stride, *geo.padding, *geo.dilation,
            seg, T, per_tile, words, numel_y,
            ilo, ihi, idelta, wa.lo, wa.hi, wa.delta, wa.eta_mul, wa.sigma,
            float(p.out_noise), olo, ohi, odelta,
            u32_as_i32(p.seed_lo), u32_as_i32(p.seed_hi), u32_as_i32(4 * p.layer_key))
    consts = dict(HAS_BIAS=bias is not None, IN_Q=p.in_bits > 0, W_CLIP=wa.clip, W_Q=wa.quant,
                  NOISE_MUL=wa.noise_mul, NOISE_ADD=wa.noise_add, W_PRE=use_pre,
                  OUT_NOISE=tiled and p.out_noise > 0, OUT_Q=p.out_bits > 0,
                  DOT_PREC=dot_precision(x4.dtype), GROUP_M=GROUP_M)
    grid = lambda m: (n_seg * triton.cdiv(seg, m["BM"]) * triton.cdiv(geo.Cout_g, m["BN"]), 1,  # noqa: E731
                      geo.groups)
    launch_gemm("conv_fwd", _conv_fwd_kernel, grid, args, consts, device,  # atomic_or is idempotent
                elem_bytes=x4.element_size())
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
