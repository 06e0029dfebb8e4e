"""Straight-through backward of the noisy conv2d (and linear) as Triton implicit GEMMs.

Input gradient (transposed implicit GEMM; rows = input positions ``(n, ih, iw)``, columns = input
channels ``ci`` of group g, reduction over ``(r, s, co)``):

    gx[n, ih, iw, ci] = Σ_t Σ_{r,s,co} (g ⊙ M_t)[n, oh, ow, co] · Wn[co, ci, r, s] · [ci ∈ tile t]
        with oh = (ih + ph − r·dh)/sh (only when divisible and in range), likewise ow
    gx ⊙= [in_lo <= x <= in_hi]   (input quantizer STE)

``M_t`` is the out-mask bit of tile t (output quantizer STE, read from the int32 words at y's
storage offset). ``Wn`` is *regenerated* with the forward's noise stream and the row tile's
instance (or read from a pre-pass buffer, or ``Wq`` with clean_grad_input): never stored.

Weight gradient (rows of the GEMM = output channels, columns = ``(r, s, ci)``, reduction over all
output positions, split over row chunks accumulated with fp32 ``tl.atomic_add``):

    gw[co, ci, r, s] = Σ_t Σ_{n,oh,ow} (g ⊙ M_t)[n, oh, ow, co] · Q_in(x)[n, ih, iw, ci] · [ci ∈ t]
    gw ⊙= [w_lo <= W <= w_hi]     (weight clip STE, only with a clip range: on the host, in the
                                   fp32 result, not in the kernel's epilogue — a BM x BN tile of W
                                   next to the accumulator is what spilled at 128x128)

Noise is straight-through for the weight gradient, so gw does not depend on the instance.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from noisyops.reference import in_range_mask, memory_format_of

from . import configs
from .noisy_conv2d import (GROUP_M, Geometry, dot_precision, grouped_tile, launch_gemm, mask_aligned,
                           nhwc_strides, segments, tiling)
from .quantize import in_range, qparams, quantize
from .stream import u32_as_i32
from .weight_prepass import k_major, perturb_weight, prepass, use_prepass, weight_args


@triton.jit
def _conv_bwd_x_kernel(
        g_ptr, w_ptr, wn_ptr, x_ptr, gx_ptr, mask_ptr, inst_ptr, slot_ptr,
        H, W, OH, OW, Cg, Cout_g, KH, KW,
        sgn, sgh, sgw, sgc, syn, syh, syw, syc, sxn, sxh, sxw, sxc, sgxn, sgxh, sgxw, sgxc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        SEG, per_tile, mask_words,
        in_lo, in_hi, w_lo, w_hi, w_delta, eta_mul, sigma, k0_, k1_, c3_,
        IN_Q: tl.constexpr, W_CLIP: tl.constexpr, W_Q: tl.constexpr, NOISE_MUL: tl.constexpr,
        NOISE_ADD: tl.constexpr, W_PRE: tl.constexpr, HAS_OMASK: tl.constexpr,
        MASK_ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid ``(segments·cdiv(SEG, BM)·cdiv(Cg, BN), 1, groups)`` in grouped order
    (`grouped_tile`); see the module docstring."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(Cg, BN), GROUP_M)
    grp = tl.program_id(2)
    tiles_per_seg = tl.cdiv(SEG, BM)
    seg = pid_m // tiles_per_seg
    r_in_seg = (pid_m % tiles_per_seg) * BM + tl.arange(0, BM)
    row_ok = r_in_seg < SEG
    rows = seg * SEG + r_in_seg
    hw = H * W
    n = rows // hw
    rem = rows % hw
    ih = rem // W
    iw = rem % W
    ci = pid_n * BN + tl.arange(0, BN)
    col_ok = ci < Cg

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
    if HAS_OMASK:
        t_lo = (pid_n * BN) // per_tile
        t_hi = (tl.minimum(pid_n * BN + BN, Cg) - 1) // per_tile
    else:
        t_lo = 0
        t_hi = 0
    ih_p = ih + pad_h
    iw_p = iw + pad_w
    n_cb = tl.cdiv(Cout_g, BK)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(t_lo, t_hi + 1):
        if HAS_OMASK:
            ci_ok = col_ok & (ci >= t * per_tile) & (ci < t * per_tile + per_tile)
        else:
            ci_ok = col_ok
        # one flattened K loop over (r, s, out-channel block); the weight tile is a 2-D block of
        # the K-major weights (`weight_prepass.k_major`), contiguous along the reduction (co)
        for it in range(0, KK * n_cb):
            rs = it // n_cb
            c0 = (it - rs * n_cb) * BK
            r = rs // KW
            oh_num = ih_p - r * dil_h
            ow_num = iw_p - (rs - r * KW) * dil_w
            oh = oh_num // stride_h
            ow = ow_num // stride_w
            pos_ok = row_ok & (oh_num >= 0) & (oh_num % stride_h == 0) & (oh < OH) \
                & (ow_num >= 0) & (ow_num % stride_w == 0) & (ow < OW)
            co_l = c0 + tl.arange(0, BK)
            kk_ok = co_l < Cout_g
            co = grp * Cout_g + co_l
            a_ok = pos_ok[:, None] & kk_ok[None, :]
            a = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + (co * sgc)[None, :],
                        mask=a_ok, other=0.0)
            if HAS_OMASK:
                if MASK_ALIGNED and BK <= 32:
                    # y channels-last, C_out and Cout_g multiples of 32: the BK channels of a row
                    # lie in one mask word, loaded once per row (not once per element)
                    wrd = (n * syn + oh * syh + ow * syw + grp * Cout_g + c0) >> 5
                    word = tl.load(mask_ptr + mask_words * t + wrd, mask=pos_ok, other=0)
                    bit = (word[:, None] >> (co_l % 32).to(tl.int32)[None, :]) & 1
                else:
                    off = (n * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
                    word = tl.load(mask_ptr + mask_words * t + (off >> 5), mask=a_ok, other=0)
                    bit = (word >> (off & 31).to(tl.int32)) & 1
                a = tl.where(bit != 0, a, 0.0)
            a = a.to(xdt)
            b_ok = kk_ok[:, None] & ci_ok[None, :]
            b = tl.load(b_base + co_l[:, None] + ((rs * Cg + ci) * Cout_g)[None, :], mask=b_ok, other=0.0)
            if not W_PRE:
                if W_CLIP or NOISE_MUL or NOISE_ADD:
                    e = (co * (Cg * KK))[:, None] + (ci * KK + rs)[None, :]
                    b = perturb_weight(b.to(tl.float32), e, w_lo, w_hi, w_delta, eta_mul, sigma,
                                       k0, k1, i0, i1, c3, W_CLIP, W_Q, NOISE_MUL, NOISE_ADD)
                    b = tl.where(b_ok, b, 0.0).to(xdt)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    out_ok = row_ok[:, None] & col_ok[None, :]
    cin = grp * Cg + ci
    if IN_Q:
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (cin * sxc)[None, :],
                     mask=out_ok, other=0.0).to(tl.float32)
        acc = tl.where(in_range(xv, in_lo, in_hi), acc, 0.0)
    tl.store(gx_ptr + (n * sgxn + ih * sgxh + iw * sgxw)[:, None] + (cin * sgxc)[None, :],
             acc.to(gx_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _conv_bwd_w_kernel(
        g_ptr, x_ptr, gw_ptr, mask_ptr,
        H, W, OH, OW, Cg, Cout_g, KH, KW,
        sgn, sgh, sgw, sgc, syn, syh, syw, syc, sxn, sxh, sxw, sxc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        per_tile, mask_words, rows_total, rows_per_split, n_split,
        in_lo, in_hi, in_delta,
        IN_Q: tl.constexpr, HAS_OMASK: tl.constexpr, MASK_ALIGNED: tl.constexpr,
        DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Grid ``(cdiv(Cout_g, BM), KH·KW·cdiv(Cg, BN), groups·n_split)``; accumulates into an
    fp32 ``gw`` (zeroed) with atomics; see the module docstring."""
    pid_co = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_gs = tl.program_id(2)
    grp = pid_gs // n_split
    split = pid_gs % n_split
    n_cb = tl.cdiv(Cg, BN)
    rs = pid_k // n_cb
    cb = pid_k % n_cb
    r = rs // KW
    s = rs % KW
    co_l = pid_co * BM + tl.arange(0, BM)
    co_ok = co_l < Cout_g
    co = grp * Cout_g + co_l
    ci = cb * BN + tl.arange(0, BN)
    col_ok = ci < Cg
    cin = grp * Cg + ci
    xdt = x_ptr.dtype.element_ty
    ohw = OH * OW
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, rows_total)
    if HAS_OMASK:
        t_lo = (cb * BN) // per_tile
        t_hi = (tl.minimum(cb * BN + BN, Cg) - 1) // per_tile
    else:
        t_lo = 0
        t_hi = 0
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(t_lo, t_hi + 1):
        if HAS_OMASK:
            ci_ok = col_ok & (ci >= t * per_tile) & (ci < t * per_tile + per_tile)
        else:
            ci_ok = col_ok
        for m0 in range(m_start, m_end, BK):
            rows = m0 + tl.arange(0, BK)
            r_ok = rows < m_end
            rows64 = rows
            n = rows64 // ohw
            rem = rows64 % ohw
            oh = rem // OW
            ow = rem % OW
            g_ok = co_ok[:, None] & r_ok[None, :]
            gt = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[None, :] + (co * sgc)[:, None],
                         mask=g_ok, other=0.0)
            if HAS_OMASK:
                if MASK_ALIGNED and BM >= 32:
                    # word-aligned mask (y channels-last, C_out and Cout_g multiples of 32): the
                    # BM channels of a row are BM/32 whole words, loaded once and expanded
                    wcol = (grp * Cout_g + pid_co * BM) // 32 + tl.arange(0, BM // 32)
                    wrd = ((n * syn + oh * syh + ow * syw) >> 5)[None, :] + wcol[:, None]
                    word = tl.load(mask_ptr + mask_words * t + wrd,
                                   mask=r_ok[None, :] & (wcol * 32 < grp * Cout_g + Cout_g)[:, None], other=0)
                    bit = (word[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
                    bit = tl.reshape(bit, (BM, BK))
                else:
                    off = (n * syn + oh * syh + ow * syw)[None, :] + (co * syc)[:, None]
                    word = tl.load(mask_ptr + mask_words * t + (off >> 5), mask=g_ok, other=0)
                    bit = (word >> (off & 31).to(tl.int32)) & 1
                gt = tl.where(bit != 0, gt, 0.0)
            ih = oh * stride_h - pad_h + r * dil_h
            iw = ow * stride_w - pad_w + s * dil_w
            pos_ok = r_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ok = pos_ok[:, None] & ci_ok[None, :]
            xa = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (cin * sxc)[None, :],
                         mask=a_ok, other=0.0)
            if IN_Q:
                xa = quantize(xa.to(tl.float32), in_lo, in_hi, in_delta)
            xa = tl.where(a_ok, xa, 0.0)
            acc = tl.dot(gt.to(xdt), xa.to(xdt), acc, input_precision=DOT_PREC)
    KK = KH * KW
    e = co[:, None] * (Cg * KK) + (ci * KK + r * KW + s)[None, :]
    ok = co_ok[:, None] & col_ok[None, :]
    tl.atomic_add(gw_ptr + e, acc, mask=ok)


# ---- host glue ----------------------------------------------------------------------------
def gemm_grad_input(g4, gs, x4, xs, weight, geo: Geometry, ys, p, instance, rows_per_sample_in,
                    out_mask, gx, gxs):
    """Launch the input-gradient kernel; writes ``gx`` (strides ``gxs``)."""
    device = x4.device
    Cg, KK = geo.Cg, geo.KH * geo.KW
    T, per_tile = tiling(p, Cg, KK)
    words = out_mask.shape[1] if p.out_bits else 0
    seg, inst, slots, uniq = segments(p, rows_per_sample_in, geo.N, instance, device)
    w = weight.detach().contiguous()
    wa = weight_args(p, w, noise=not p.clean_grad_input)
    noisy = wa.noise_add or wa.noise_mul
    use_pre = use_prepass(p, geo, len(uniq) if noisy else 1, device, train=True) and (noisy or wa.clip)
    if use_pre and not noisy:
        uniq, slots = [0], torch.zeros_like(slots)
    wn = prepass(w, p, wa, uniq, x4.dtype, groups=geo.groups) if use_pre else w
    wk = w if use_pre else k_major(w, geo.groups)
    ilo, ihi, _ = qparams(p.in_lo, p.in_hi, p.in_bits)
    n_seg = inst.numel()
    args = (g4, wk, wn, x4, gx, out_mask if p.out_bits else g4, inst, slots,
            geo.H, geo.W, geo.OH, geo.OW, Cg, geo.Cout_g, geo.KH, geo.KW,
            *gs, *ys, *xs, *gxs, *geo.stride, *geo.padding, *geo.dilation,
            seg, per_tile, words, ilo, ihi, wa.lo, wa.hi, wa.delta, wa.eta_mul, wa.sigma,
            u32_as_i32(p.seed_lo), u32_as_i32(p.seed_hi), u32_as_i32(4 * p.layer_key))
    consts = dict(IN_Q=p.in_bits > 0, W_CLIP=wa.clip, W_Q=wa.quant, NOISE_MUL=wa.noise_mul,
                  NOISE_ADD=wa.noise_add, W_PRE=use_pre, HAS_OMASK=p.out_bits > 0,
                  MASK_ALIGNED=p.out_bits > 0 and mask_aligned(ys, geo),
                  DOT_PREC=dot_precision(x4.dtype), GROUP_M=GROUP_M)
    grid = lambda m: (n_seg * triton.cdiv(seg, m["BM"]) * triton.cdiv(Cg, m["BN"]), 1, geo.groups)  # noqa: E731
    launch_gemm("conv_bwd_x", _conv_bwd_x_kernel, grid, args, consts, device,
                elem_bytes=x4.element_size())


def split_rows(rows: int, groups: int, device) -> int:
    """Row chunks of the weight-gradient reduction (1 under the interpreter / on CPU); grid axis 2
    is ``groups·chunks`` and must stay <= 65535."""
    if configs.interpret() or device.type != "cuda":
        return 1
    return max(1, min(256, rows // 8192, 65535 // max(1, groups)))


def gemm_grad_weight(g4, gs, x4, xs, weight, geo: Geometry, ys, p, out_mask) -> torch.Tensor:
    """Launch the weight-gradient kernel; returns ``gw`` in the weight's dtype."""
    device = x4.device
    Cg, KK = geo.Cg, geo.KH * geo.KW
    T, per_tile = tiling(p, Cg, KK)
    words = out_mask.shape[1] if p.out_bits else 0
    w = weight.detach().contiguous()
    wa = weight_args(p, w, noise=False)
    ilo, ihi, idelta = qparams(p.in_lo, p.in_hi, p.in_bits)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=device)
    rows = geo.rows
    n_split = split_rows(rows, geo.groups, device)
    per_split = triton.cdiv(rows, n_split)
    args = (g4, x4, gw, out_mask if p.out_bits else g4,
            geo.H, geo.W, geo.OH, geo.OW, Cg, geo.Cout_g, geo.KH, geo.KW,
            *gs, *ys, *xs, *geo.stride, *geo.padding, *geo.dilation,
            per_tile, words, rows, per_split, n_split, ilo, ihi, idelta)
    consts = dict(IN_Q=p.in_bits > 0, HAS_OMASK=p.out_bits > 0,
                  MASK_ALIGNED=p.out_bits > 0 and mask_aligned(ys, geo), DOT_PREC=dot_precision(x4.dtype))
    grid = lambda m: (triton.cdiv(geo.Cout_g, m["BM"]), KK * triton.cdiv(Cg, m["BN"]),  # noqa: E731
                      geo.groups * n_split)
    launch_gemm("conv_bwd_w", _conv_bwd_w_kernel, grid, args, consts, device, kind="WGRAD",
                reset_to_zero=["gw_ptr"], elem_bytes=x4.element_size())
    if wa.clip:  # the weight clip's STE: fp32 W against the fp32 range, as the kernel compared them
        gw = torch.where(in_range_mask(w.float(), wa.lo, wa.hi), gw, 0.0)
    return gw.to(weight.dtype)


def conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p, instance, out_mask,
               y_stride, needs_input_grad=True, needs_weight_grad=True):
    """Glue with the signature of `noisyops.reference.conv2d_bwd`: ``(grad_x|None, grad_w|None)``;
    grad_x in x's memory format. NotImplemented for float64."""
    from .noisy_conv2d import conv_geometry, supported
    if not supported(x, weight, grad_y.numel()) or grad_y.dtype != x.dtype:
        return NotImplemented
    geo = conv_geometry(x, weight, stride, padding, dilation, groups)
    ys = (y_stride[0], y_stride[2], y_stride[3], y_stride[1])
    gs = nhwc_strides(grad_y)
    xs = nhwc_strides(x)
    gx = gw = None
    if needs_input_grad:
        gx = torch.empty_like(x, memory_format=memory_format_of(x))
        gemm_grad_input(grad_y, gs, x, xs, weight, geo, ys, p, instance, geo.H * geo.W, out_mask,
                        gx, nhwc_strides(gx))
    if needs_weight_grad:
        gw = gemm_grad_weight(grad_y, gs, x, xs, weight, geo, ys, p, out_mask)
    return gx, gw
