"""The SPEC noise stream (format v1) as Triton device functions, plus a test launcher.

For a 64-bit ``seed``, ``layer_key``, ``purpose``, 64-bit ``instance`` and an ``element`` index:

    key     = (seed mod 2^32, seed >> 32)                      -> (k0, k1)
    counter = (element >> 2, instance mod 2^32, instance >> 32, 4·layer_key + purpose)
    words   = Philox4x32-10(counter, key)                      (triton.language.philox_impl)
    u_i     = tl.uint_to_uniform_float(word_i)                 (Triton's own map, bit-exact)
    (n0,n1) = tl.pair_uniform_to_normal(u0, u1); (n2,n3) = ...(u2, u3)
    noise[element] = n[element mod 4]

Host scalars that are uint32 words travel as *signed int32* (``u32_as_i32``) so the JIT always
specializes them as ``i32``; the kernels bitcast them back to uint32. With
``instance = layer_key = purpose = 0`` the words equal ``tl.randint4x(seed, element >> 2)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox_impl, uint_to_uniform_float

from . import configs


def u32_as_i32(v: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel scalar arguments)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@triton.jit
def philox_words(element, k0, k1, i0, i1, c3):
    """Four uint32 Philox words for counter ``(element >> 2, i0, i1, c3)``, key ``(k0, k1)``.

    ``element``: int32/int64 block; ``k0 k1 i0 i1 c3``: uint32 scalars (or blocks)."""
    g = (element >> 2).to(tl.uint32)
    zero = g * 0
    return philox_impl(g, zero + i0, zero + i1, zero + c3, k0, k1)


@triton.jit
def normal_at(element, k0, k1, i0, i1, c3):
    """Float32 N(0,1) ``n[element mod 4]`` of the stream (one Box-Muller pair per element)."""
    w0, w1, w2, w3 = philox_words(element, k0, k1, i0, i1, c3)
    lane = (element & 3).to(tl.int32)
    lo_pair = lane < 2
    a = tl.where(lo_pair, w0, w2)
    b = tl.where(lo_pair, w1, w3)
    n_cos, n_sin = pair_uniform_to_normal(uint_to_uniform_float(a), uint_to_uniform_float(b))
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def _four_normals(first, k0, k1, i0, i1, c3):
    """The four normals ``n[first + l]``, ``l = 0..3``, of one Philox call (``first ≡ 0 mod 4``)
    joined on two new trailing axes: ``[..., 2, 2]`` with ``l = 2·a + b``."""
    w0, w1, w2, w3 = philox_words(first, k0, k1, i0, i1, c3)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
    # tl.join adds a trailing axis: join(join(n0, n2), join(n1, n3))[..., a, b] = n[2a + b]
    return tl.join(tl.join(n0, n2), tl.join(n1, n3))


@triton.jit
def normals_rows4(first, k0, k1, i0, i1, c3, BM: tl.constexpr, BN: tl.constexpr):
    """``[BM, BN]`` normals with ``out[4i + l, j] = n[first[i, j] + l]``: ``first`` is an int
    ``[BM // 4, BN]`` block of element indices ≡ 0 mod 4 (four consecutive rows of a tile are four
    consecutive stream elements). One Philox call per four outputs, every normal of it used; equal
    bit for bit to `normal_at` of each element."""
    x = tl.permute(_four_normals(first, k0, k1, i0, i1, c3), (0, 2, 3, 1))  # [BM/4, 2, 2, BN]
    return tl.reshape(x, (BM, BN))


@triton.jit
def normals_cols4(first, k0, k1, i0, i1, c3, BM: tl.constexpr, BN: tl.constexpr):
    """``[BM, BN]`` normals with ``out[i, 4j + l] = n[first[i, j] + l]`` (``first``: ``[BM, BN // 4]``,
    ≡ 0 mod 4): four consecutive columns are four consecutive stream elements."""
    return tl.reshape(_four_normals(first, k0, k1, i0, i1, c3), (BM, BN))


@triton.jit
def _stream_kernel(words_ptr, unif_ptr, norm_ptr, start, n, k0_, k1_, i0_, i1_, c3_,
                   BLOCK: tl.constexpr):
    """Test kernel: words (as int32 bits), uniforms and normals of elements ``start + [0, n)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    e = start + offs.to(tl.int64)
    k0 = k0_.to(tl.uint32, bitcast=True)
    k1 = k1_.to(tl.uint32, bitcast=True)
    i0 = i0_.to(tl.uint32, bitcast=True)
    i1 = i1_.to(tl.uint32, bitcast=True)
    c3 = c3_.to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = philox_words(e, k0, k1, i0, i1, c3)
    lane = (e & 3).to(tl.int32)
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    tl.store(words_ptr + offs, w.to(tl.int32, bitcast=True), mask=ok)
    tl.store(unif_ptr + offs, uint_to_uniform_float(w), mask=ok)
    tl.store(norm_ptr + offs, normal_at(e, k0, k1, i0, i1, c3), mask=ok)


def stream_values(seed: int, layer_key: int, purpose: int, instance: int, start: int, n: int,
                  device="cpu"):
    """Launcher: ``(words int64 [n] in [0, 2^32), uniforms f32 [n], normals f32 [n])`` of the
    stream at elements ``start .. start+n-1`` (the same contract as `noisyops.stream`)."""
    words = torch.empty(n, dtype=torch.int32, device=device)
    unif = torch.empty(n, dtype=torch.float32, device=device)
    norm = torch.empty(n, dtype=torch.float32, device=device)
    block = configs.ELEMENTWISE_BLOCK
    _stream_kernel[(triton.cdiv(n, block),)](
        words, unif, norm, start, n, u32_as_i32(seed), u32_as_i32(seed >> 32),
        u32_as_i32(instance), u32_as_i32(instance >> 32), u32_as_i32(4 * layer_key + purpose),
        BLOCK=block)
    return words.to(torch.int64) & 0xFFFFFFFF, unif, norm
