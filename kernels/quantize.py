"""The uniform quantizer as a Triton device function, and an activation-quantizer kernel.

``Q(v; lo, hi, bits) = lo + rint((clamp(v, lo, hi) − lo) / Δ)·Δ``, ``Δ = (hi − lo)/(2^bits − 1)``,
in float32, rounding half to even (as ``torch.round``), the division correctly rounded
(``tl.div_rn``, not the approximate ``div.full``). ``lo, hi, Δ`` are passed already rounded to
float32 by `qparams`, exactly as `noisyops.reference.quantize` forms them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import configs


def qparams(lo: float, hi: float, bits: int) -> Tuple[float, float, float]:
    """``(lo, hi, Δ)`` as float32 values (Python floats), Δ computed in float32 like the reference."""
    lo_t = torch.tensor(lo, dtype=torch.float32)
    hi_t = torch.tensor(hi, dtype=torch.float32)
    if bits <= 0:
        return float(lo_t), float(hi_t), 1.0
    delta = (hi_t - lo_t) / torch.tensor(float((1 << bits) - 1), dtype=torch.float32)
    return float(lo_t), float(hi_t), float(delta)


@triton.jit
def rint_half_even(q):
    """Round to nearest, ties to even (``torch.round``), for float32 blocks."""
    f = tl.floor(q)
    d = q - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def level_index(v, lo, hi, delta):
    """``rint((clamp(v, lo, hi) − lo)/Δ)`` as float32: the index ``k`` of the level ``Q(v)``
    (NaN for a NaN ``v``)."""
    # NaN-propagating clamp: a NaN input stays NaN (never quantized to a finite level)
    c = tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                   propagate_nan=tl.PropagateNan.ALL)
    return rint_half_even(tl.div_rn(c - lo, delta))


@triton.jit
def level(k, lo, delta):
    """The level ``lo + k·Δ`` of index ``k`` (float32); the one expression `quantize` and
    `code_level` share, so a value rebuilt from its code has the same bits."""
    return lo + k * delta


@triton.jit
def quantize(v, lo, hi, delta):
    """``Q(v; lo, hi, ·)`` for a float32 block ``v``; ``lo, hi, delta`` float32 scalars. NaN and ±Inf
    propagate."""
    q = level(level_index(v, lo, hi, delta), lo, delta)
    return tl.where(tl.abs(v) == float("inf"), v, q)  # ±Inf propagates too


@triton.jit
def quantize_code(v, lo, hi, delta):
    """``Q(v)`` as an int32 code: its level index ``k`` in ``[0, 2^bits − 1]``, or ``-1`` (NaN),
    ``-2`` (+Inf), ``-3`` (−Inf). `code_level` turns it back into exactly `quantize`'s value."""
    k = level_index(v, lo, hi, delta)
    k = tl.where(v == float("inf"), -2.0, tl.where(v == -float("inf"), -3.0, tl.where(v != v, -1.0, k)))
    return k.to(tl.int32)


@triton.jit
def code_level(code, lo, delta):
    """The float32 value of a `quantize_code` code (int block)."""
    q = level(code.to(tl.float32), lo, delta)
    special = tl.where(code == -2, float("inf"), tl.where(code == -3, -float("inf"), float("nan")))
    return tl.where(code >= 0, q, special)


@triton.jit
def in_range(v, lo, hi):
    """Straight-through mask: ``lo <= v <= hi``."""
    return (v >= lo) & (v <= hi)


@triton.jit
def _quantize_kernel(x_ptr, y_ptr, n, lo, hi, delta, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, quantize(v, lo, hi, delta).to(y_ptr.dtype.element_ty), mask=ok)


def quantize_tensor(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Launcher: ``Q(x)`` computed in float32, returned in ``x``'s dtype and memory layout
    (``x`` must be dense; any float dtype but float64)."""
    if bits <= 0:
        return x
    lo, hi, delta = qparams(lo, hi, bits)
    xc = x if x.is_contiguous() else x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    block = configs.ELEMENTWISE_BLOCK
    if n:
        _quantize_kernel[(triton.cdiv(n, block),)](xc, y, n, lo, hi, delta, BLOCK=block)
    return y
