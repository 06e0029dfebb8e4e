"""Noisy drop-in modules: `NoisyConv2d`, `NoisyLinear`, `NoisyMultiheadAttention`.

Their state, buffers and RNG contract are described in `noisyops.nn.base`.
"""
from .base import NoisyModuleMixin
from .noisy_conv import NoisyConv2d
from .noisy_linear import NoisyLinear
from .noisy_attention import NoisyMultiheadAttention

__all__ = ["NoisyModuleMixin", "NoisyConv2d", "NoisyLinear", "NoisyMultiheadAttention"]
