"""The noise stream, format v1 (SPEC section 3), in pure torch: the reference every backend matches.

Noise is a pure function of ``(seed, layer_key, purpose, instance, element)``:

    key     = (seed mod 2^32, seed >> 32)
    counter = (element >> 2, instance mod 2^32, instance >> 32, (4·layer_key + purpose) mod 2^32)
    words   = Philox4x32-10(counter, key)                     # four uint32
    u_i     = float32(x_i) · 4.6566127342e-10,  x_i = int32(word_i), x_i = −x_i − 1 if x_i < 0
    (n0, n1) = BoxMuller(u0, u1), (n2, n3) = BoxMuller(u2, u3)
    noise[element] = n[element mod 4]

32-bit words are held in int64 tensors (torch has no full uint32 arithmetic). Everything here is
elementwise with broadcasting, so the same function serves a weight tensor, a batch of instances or
scattered output elements.
"""
from __future__ import annotations

import torch

PURPOSE_ADD, PURPOSE_MUL, PURPOSE_OUT = 0, 1, 2

_M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
BOX_MULLER_MIN_U = 1.0e-7


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of ``a·b`` for a 32-bit constant a and int64 tensor b < 2^32."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p0 = b * a_lo                      # < 2^48
    p1 = b * a_hi                      # < 2^48
    t = p0 + ((p1 & 0xFFFF) << 16)     # < 2^49
    return ((t >> 32) + (p1 >> 16)) & _M32, t & _M32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors/ints holding uint32 values; returns four int64 tensors."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) & _M32 for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _M32
        k1 = (k1 + PHILOX_W1) & _M32
    return c0, c1, c2, c3


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 word (in int64) to a float32 uniform in [0, 1), exactly as Triton's
    ``uint_to_uniform_float``: ``x = int32(word); x = −x − 1 if x < 0; u = float32(x)·4.6566127342e-10``."""
    x = torch.where(word >= (1 << 31), word - (1 << 32), word)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u_a: torch.Tensor, u_b: torch.Tensor):
    """Triton's ``pair_uniform_to_normal`` in float32: ``r = sqrt(−2 ln max(a, 1e-7))``,
    ``θ = 2π·b``, returns ``(r cos θ, r sin θ)``."""
    a = torch.clamp_min(u_a, BOX_MULLER_MIN_U)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u_b
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(a))
    return r * torch.cos(theta), r * torch.sin(theta)


def counter_words(seed: int, layer_key: int, purpose: int, instance, group):
    """The four Philox output words for counter group ``group = element >> 2`` (broadcasting)."""
    instance = torch.as_tensor(instance, dtype=torch.int64)
    group = torch.as_tensor(group, dtype=torch.int64)
    c3 = (4 * layer_key + purpose) & _M32
    return philox4x32_10(group, instance & _M32, (instance >> 32) & _M32, c3,
                         seed & _M32, (seed >> 32) & _M32)


def uniforms_at(seed: int, layer_key: int, purpose: int, instance, element) -> torch.Tensor:
    """Float32 uniform ``u[element mod 4]`` of the stream at each (instance, element)."""
    element = torch.as_tensor(element, dtype=torch.int64)
    words = counter_words(seed, layer_key, purpose, instance, element >> 2)
    lane = element & 3
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1],
                       torch.where(lane == 2, words[2], words[3])))
    return uint_to_uniform(word)


def normals_at(seed: int, layer_key: int, purpose: int, instance, element) -> torch.Tensor:
    """Float32 N(0, 1) noise ``n[element mod 4]`` at each (instance, element), broadcasting.

    Shapes: ``instance`` and ``element`` are int64 tensors (or ints) that broadcast together;
    the result has their broadcast shape.
    """
    element = torch.as_tensor(element, dtype=torch.int64)
    w0, w1, w2, w3 = counter_words(seed, layer_key, purpose, instance, element >> 2)
    n0, n1 = box_muller(uint_to_uniform(w0), uint_to_uniform(w1))
    n2, n3 = box_muller(uint_to_uniform(w2), uint_to_uniform(w3))
    lane = element & 3
    return torch.where(lane == 0, n0, torch.where(lane == 1, n1, torch.where(lane == 2, n2, n3)))


def normals(seed: int, layer_key: int, purpose: int, instance: int, numel: int) -> torch.Tensor:
    """The first ``numel`` normals of one stream (one instance): float32 ``[numel]``."""
    return normals_at(seed, layer_key, purpose, instance, torch.arange(numel, dtype=torch.int64))
