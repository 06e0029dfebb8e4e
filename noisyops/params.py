"""`OpParams`: a `LayerConfig` resolved to numbers, as the custom ops carry it.

torch custom ops take tensors, ints, floats and lists of them, so the resolved layer parameters
travel as two flat lists, ``fparams`` (floats) and ``iparams`` (ints). Every backend rebuilds an
`OpParams` from them with `OpParams.from_op_args`; nothing else may index the lists.

Conventions: a bits field of 0 means that quantizer is off; ``tile_rows = 0`` means one tile;
``w_std_k > 0`` means the weight range is ``±w_std_k·std(W)`` measured at each call (functional
ops), else ``(w_lo, w_hi)`` is fixed; ``w_clip`` says whether the weights are clipped to that range
(off for ``w_range = None``, where the range only scales the noise).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Tuple

import torch

from .config import SAMPLING_MODES, LayerConfig

PER_CALL, PER_SAMPLE, PER_INSTANCE = 0, 1, 2
SAMPLE_STRIDE = 1 << 24  # per_sample: instance id = call_counter·2^24 + s
DEFAULT_NOISE_REF_K = 2.0  # w_range=None: noise referenced to ±2·std(W)

_FLOAT_FIELDS = ("eta", "eta_mul", "w_lo", "w_hi", "w_std_k", "in_lo", "in_hi", "out_lo", "out_hi",
                 "out_noise")
_INT_FIELDS = ("w_clip", "w_bits", "in_bits", "out_bits", "tile_rows", "sampling",
               "clean_grad_input", "seed_lo", "seed_hi", "layer_key")


@dataclasses.dataclass(frozen=True)
class OpParams:
    """Numeric layer parameters shared by every backend (see module docstring)."""

    eta: float = 0.0
    eta_mul: float = 0.0
    w_lo: float = 0.0
    w_hi: float = 0.0
    w_std_k: float = DEFAULT_NOISE_REF_K
    in_lo: float = 0.0
    in_hi: float = 0.0
    out_lo: float = 0.0
    out_hi: float = 0.0
    out_noise: float = 0.0
    w_clip: int = 0
    w_bits: int = 0
    in_bits: int = 0
    out_bits: int = 0
    tile_rows: int = 0
    sampling: int = PER_CALL
    clean_grad_input: int = 0
    seed_lo: int = 0
    seed_hi: int = 0
    layer_key: int = 0

    # ---- packing -------------------------------------------------------------------------
    def to_op_args(self) -> Tuple[List[float], List[int]]:
        return ([float(getattr(self, f)) for f in _FLOAT_FIELDS],
                [int(getattr(self, f)) for f in _INT_FIELDS])

    @staticmethod
    def from_op_args(fparams, iparams) -> "OpParams":
        """The `OpParams` of the flat lists (memoised: a model has a few distinct layer params)."""
        return _from_op_args(tuple(fparams), tuple(iparams))

    @staticmethod
    def _build(fparams, iparams) -> "OpParams":
        if len(fparams) != len(_FLOAT_FIELDS) or len(iparams) != len(_INT_FIELDS):
            raise ValueError(f"fparams/iparams: expected {len(_FLOAT_FIELDS)} floats and "
                             f"{len(_INT_FIELDS)} ints, got {len(fparams)} and {len(iparams)}")
        kw = {f: float(v) for f, v in zip(_FLOAT_FIELDS, fparams)}
        kw.update({f: int(v) for f, v in zip(_INT_FIELDS, iparams)})
        return OpParams(**kw)

    # ---- derived -------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return (self.seed_hi << 32) | self.seed_lo

    @property
    def has_weight_noise(self) -> bool:
        return self.eta > 0 or self.eta_mul > 0

    def weight_range(self, weight: torch.Tensor) -> Tuple[float, float]:
        """``(w_lo, w_hi)`` for this call: fixed, or ``±w_std_k·std(W)`` (unbiased std).

        A measured range is a constant for autograd (no gradient flows through std(W)).
        Degenerate weights (docs/models.md, "Degenerate ranges"): where std(W) is 0 or undefined
        (all weights equal, a single weight) the scale is ``max|W|`` instead, so the range holds
        the weights; all-zero or empty weights give the empty range ``(0, 0)``, on which the clip
        and the quantizer leave the (zero) weights unchanged and σ = 0. Non-finite weights give
        a NaN range (NaN propagates, never a finite substitute).
        """
        if self.w_std_k > 0:
            w = weight.detach().double()
            s = float(w.std()) if w.numel() > 1 else 0.0
            if s == 0.0 and w.numel() > 0:
                s = float(w.abs().max())
            return (-self.w_std_k * s, self.w_std_k * s)
        return (self.w_lo, self.w_hi)

    def sigma(self, w_lo: float, w_hi: float) -> float:
        """Additive weight-noise std ``σ = eta·(w_hi − w_lo)``."""
        return self.eta * (w_hi - w_lo)

    @property
    def tiled(self) -> bool:
        """Tiles only change the result when each tile's partial sum gets its own noise or ADC;
        otherwise every backend runs one product (bias fused into it)."""
        return self.out_bits > 0 or self.out_noise > 0

    def num_tiles(self, in_channels_per_group: int, kernel_numel: int) -> int:
        return len(tile_bounds(in_channels_per_group, kernel_numel, self.tile_rows))


@functools.lru_cache(maxsize=4096)
def _from_op_args(fparams: tuple, iparams: tuple) -> OpParams:
    return OpParams._build(fparams, iparams)


def sample_instance_ids(p: OpParams, batch: int, instance: torch.Tensor) -> List[int]:
    """The noise instance id of every sample (SPEC section 2): the counter (per_call),
    ``counter·2^24 + s`` (per_sample), or ``instance[s]`` (per_instance)."""
    if p.sampling == PER_INSTANCE:
        return [int(v) for v in instance.reshape(-1).tolist()]
    counter = int(instance)
    if p.sampling == PER_SAMPLE:
        return [counter * SAMPLE_STRIDE + s for s in range(batch)]
    return [counter] * batch


def tile_bounds(in_channels_per_group: int, kernel_numel: int, tile_rows: int) -> List[Tuple[int, int]]:
    """Input-channel ranges ``[(c0, c1), ...]`` of the crossbar tiles (within one group).

    A tile holds whole input channels, at most ``tile_rows`` rows of ``K = C_in/groups·kh·kw``
    and at least one channel. ``tile_rows = 0`` means a single tile.
    """
    if tile_rows <= 0:
        return [(0, in_channels_per_group)]
    per_tile = max(1, tile_rows // max(1, kernel_numel))
    return [(c, min(c + per_tile, in_channels_per_group))
            for c in range(0, in_channels_per_group, per_tile)]


def split_seed(seed: int) -> Tuple[int, int]:
    """A 64-bit seed as the Philox key ``(seed mod 2^32, seed >> 32)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int in [0, 2^64)")
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed={seed!r}: expected an int in [0, 2^64)")
    return seed & 0xFFFFFFFF, seed >> 32


def resolve(config: LayerConfig, *, seed: int, layer_key: int,
            w_range: Tuple[float, float] | None = None,
            in_range: Tuple[float, float] | None = None,
            out_range: Tuple[float, float] | None = None) -> OpParams:
    """Resolve a config to `OpParams`.

    ``w_range`` overrides a data-dependent weight range with fixed numbers (modules fix it at
    conversion); ``in_range``/``out_range`` override the config's (calibrated modules).
    Functional calls leave them None: ``w_range = k`` or None is then measured per call.
    """
    if not isinstance(config, LayerConfig):
        raise TypeError(f"config={config!r}: expected a noisyops.LayerConfig")
    if isinstance(layer_key, bool) or not isinstance(layer_key, int) or not 0 <= layer_key < (1 << 30):
        raise ValueError(f"layer_key={layer_key!r}: expected an int in [0, 2^30)")
    seed_lo, seed_hi = split_seed(seed)
    kw = dict(eta=config.eta, eta_mul=config.eta_mul, out_noise=config.out_noise,
              w_bits=config.w_bits or 0, in_bits=config.in_bits or 0, out_bits=config.out_bits or 0,
              tile_rows=config.tile_rows or 0, sampling=SAMPLING_MODES.index(config.sampling),
              clean_grad_input=int(config.clean_grad_input), seed_lo=seed_lo, seed_hi=seed_hi,
              layer_key=layer_key)
    if w_range is not None:
        lo, hi = w_range
        kw.update(w_lo=float(lo), w_hi=float(hi), w_std_k=0.0, w_clip=int(config.w_range is not None))
    elif config.w_range is None:
        kw.update(w_std_k=DEFAULT_NOISE_REF_K, w_clip=0)
    elif isinstance(config.w_range, float):
        kw.update(w_std_k=config.w_range, w_clip=1)
    else:
        kw.update(w_lo=config.w_range[0], w_hi=config.w_range[1], w_std_k=0.0, w_clip=1)
    for name, bits, given, cfg in (("in_range", config.in_bits, in_range, config.in_range),
                                   ("out_range", config.out_bits, out_range, config.out_range)):
        rng = given if given is not None else cfg
        if bits is not None and rng is None:
            raise ValueError(f"{name}=None with {name[:-6]}_bits={bits}: a quantizer needs a range "
                             f"(set it in the config or calibrate the module first)")
        if rng is not None:
            p = name[:-6]
            kw.update({f"{p}_lo": float(rng[0]), f"{p}_hi": float(rng[1])})
    return OpParams(**kw)
