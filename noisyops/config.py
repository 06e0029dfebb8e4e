"""`LayerConfig`: the analog layer model of SPEC section 1 as a validated dataclass.

A config describes *what* a layer does on the crossbar (ranges, bits, noise); it holds no tensors
and no RNG state. Ranges that come from data (``w_range = k``, calibrated ``in_range`` /
``out_range``) are resolved to numbers by the modules (`noisyops.nn`) or per call by the
functional ops.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

SAMPLING_MODES = ("per_call", "per_sample", "per_instance")

Range = Tuple[float, float]


def _check_range(name: str, value, *, allow_none: bool = True) -> Optional[Range]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name}=None: expected a (lo, hi) pair of finite floats")
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}={value!r}: expected a (lo, hi) pair of finite floats")
    lo, hi = value
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}={value!r}: expected a (lo, hi) pair of finite floats")
        if not math.isfinite(v):
            raise ValueError(f"{name}={value!r}: bounds must be finite (no NaN or Inf)")
    if not lo < hi:
        raise ValueError(f"{name}={value!r}: expected lo < hi")
    return (float(lo), float(hi))


def check_bits(name: str, value) -> Optional[int]:
    """Validate a quantizer bit width: None (quantizer off) or an int in 1..16."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected None or an int in 1..16")
    if not 1 <= value <= 16:
        raise ValueError(f"{name}={value!r}: expected None or an int in 1..16")
    return value


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: expected a finite float >= 0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a finite float >= 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """How one conv/linear layer behaves on an analog crossbar (SPEC section 1).

    Attributes:
        eta: additive weight noise, ``σ = eta·(w_max − w_min)``; 0 = off.
        eta_mul: multiplicative weight noise, ``Wn = Wq·(1 + eta_mul·ε')``; 0 = off.
        w_range: ``None`` (no clipping; noise referenced to ``±2·std(W)``), a ``(w_min, w_max)``
            pair (clip to it), or a float ``k`` (clip to ``±k·std(W)``, the paper's k = 2; where
            std(W) is 0 or undefined, ``±k·max|W|``: docs/models.md, "Degenerate ranges").
        w_bits: weight quantizer bits (1..16) over ``w_range``; None = off. Needs a ``w_range``.
        in_bits, in_range: DAC input quantizer; ``in_range`` None = calibrate later (modules).
        out_bits, out_range: ADC output quantizer, before bias; ``out_range`` as ``in_range``.
        out_noise: absolute std of additive output noise per tile, in output units; 0 = off.
        tile_rows: crossbar rows per tile (None = one tile); tiles hold whole input channels.
        sampling: ``"per_call"``, ``"per_sample"`` or ``"per_instance"`` (SPEC section 2).
        clean_grad_input: input gradient through the noise-free weights instead of ``Wn``.
    """

    eta: float = 0.0
    eta_mul: float = 0.0
    w_range: Union[None, float, Range] = None
    w_bits: Optional[int] = None
    in_bits: Optional[int] = None
    in_range: Optional[Range] = None
    out_bits: Optional[int] = None
    out_range: Optional[Range] = None
    out_noise: float = 0.0
    tile_rows: Optional[int] = None
    sampling: str = "per_call"
    clean_grad_input: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("eta", _check_nonneg("eta", self.eta))
        set_("eta_mul", _check_nonneg("eta_mul", self.eta_mul))
        set_("out_noise", _check_nonneg("out_noise", self.out_noise))
        w = self.w_range
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            if not math.isfinite(w) or w <= 0:
                raise ValueError(f"w_range={w!r}: a float k (clip to ±k·std(W)) must be finite and > 0")
            set_("w_range", float(w))
        elif w is not None:
            set_("w_range", _check_range("w_range", w))
        set_("w_bits", check_bits("w_bits", self.w_bits))
        set_("in_bits", check_bits("in_bits", self.in_bits))
        set_("out_bits", check_bits("out_bits", self.out_bits))
        set_("in_range", _check_range("in_range", self.in_range))
        set_("out_range", _check_range("out_range", self.out_range))
        if self.w_bits is not None and self.w_range is None:
            raise ValueError("w_bits=%r with w_range=None: weight quantization needs a range "
                             "(a (w_min, w_max) pair or k for ±k·std(W))" % (self.w_bits,))
        if self.tile_rows is not None:
            if isinstance(self.tile_rows, bool) or not isinstance(self.tile_rows, int):
                raise TypeError(f"tile_rows={self.tile_rows!r}: expected None or an int >= 1")
            if self.tile_rows < 1:
                raise ValueError(f"tile_rows={self.tile_rows!r}: expected None or an int >= 1")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling={self.sampling!r}: expected one of {SAMPLING_MODES}")
        if not isinstance(self.clean_grad_input, bool):
            raise TypeError(f"clean_grad_input={self.clean_grad_input!r}: expected a bool")

    def replace(self, **changes) -> "LayerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_clean(self) -> bool:
        """True when the layer is an exact `F.conv2d`/`F.linear` (no noise, clip or quantizer)."""
        return (self.eta == 0 and self.eta_mul == 0 and self.out_noise == 0 and self.w_range is None
                and self.w_bits is None and self.in_bits is None and self.out_bits is None)
