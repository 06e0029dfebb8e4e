"""State and forward plumbing shared by every noisy module (`NoisyConv2d`, `NoisyLinear`,
`NoisyMultiheadAttention`).

A noisy module holds its clean weights (ordinary parameters) plus:

* buffers (in ``state_dict``, so a checkpoint resumes the same noise):
  ``calls`` (0-d int64, the call counter, advanced by every forward in ``per_call`` /
  ``per_sample`` mode, in train and eval mode alike), ``seed`` (0-d int64 holding the 64-bit seed in
  two's complement), ``w_range`` / ``in_range`` / ``out_range`` (float64 ``[2]``; NaN = not set);
* Python attributes: ``config`` (a `LayerConfig`), ``layer_key``, ``noise_enabled``,
  ``chip_ids``, ``per_rank_noise``.

The forward pass never reads a buffer's value on the host (no ``.item()``): the numbers the op
needs are mirrored in Python attributes and resolved once into an `OpParams` whenever the state
changes (``config``, seed, ranges, ``noise_enabled``, a ``load_state_dict``). That keeps the
forward free of device syncs and of graph breaks under ``torch.compile``; the counter reaches the
op as a tensor, so advancing it does not recompile.

RNG contract (SPEC sections 2-3): the noise of a call is a pure function of ``(seed_eff, layer_key,
purpose, instance, element)`` with ``instance`` = the value of ``calls`` before the call
(per_call; per_sample adds ``s`` as ``calls·2^24 + s``) or ``chip_ids[s]`` (per_instance), and
``seed_eff = (seed + rank·0x9E3779B97F4A7C15) mod 2^64`` where ``rank`` is the
``torch.distributed`` rank (0 outside distributed runs, so then ``seed_eff = seed``) — each DDP rank
draws its own noise by default; ``per_rank_noise = False`` makes all ranks share ``seed``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config import LayerConfig
from ..params import PER_INSTANCE, OpParams, resolve, split_seed
from .. import functional as _functional

U64 = 1 << 64
RANK_SEED_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio increment: seed + rank·stride, mod 2^64
NOISE_REF_K = 2.0  # w_range=None: noise referenced to ±2·std(W), fixed at conversion
_RANGE_BUFFERS = ("w_range", "in_range", "out_range")
NOISY_BUFFERS = ("calls", "seed") + _RANGE_BUFFERS


def seed_to_int64(seed: int) -> int:
    """A seed in [0, 2^64) as the signed int64 with the same bits (two's complement)."""
    split_seed(seed)  # validates type and range
    return seed - U64 if seed >= (1 << 63) else seed


def int64_to_seed(value: int) -> int:
    """Inverse of `seed_to_int64`."""
    return int(value) % U64


def dist_rank() -> int:
    """The ``torch.distributed`` rank, or 0 when no process group is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _range_tensor(rng: Optional[Tuple[float, float]], device) -> Tensor:
    vals = (math.nan, math.nan) if rng is None else (float(rng[0]), float(rng[1]))
    return torch.tensor(vals, dtype=torch.float64, device=device)


def _range_from_tensor(name: str, t: Tensor) -> Optional[Tuple[float, float]]:
    if t.shape != (2,):
        raise ValueError(f"{name}: expected a [2] tensor (lo, hi), got shape {tuple(t.shape)}")
    lo, hi = (float(v) for v in t.detach().double().cpu())
    if math.isnan(lo) and math.isnan(hi):
        return None
    return _check_range(name, (lo, hi))


def _check_range(name: str, rng) -> Optional[Tuple[float, float]]:
    if rng is None:
        return None
    if isinstance(rng, Tensor):
        rng = tuple(float(v) for v in rng.detach().double().cpu().reshape(-1))
    if not isinstance(rng, (tuple, list)) or len(rng) != 2:
        raise TypeError(f"{name}={rng!r}: expected None or a (lo, hi) pair of finite floats")
    lo, hi = float(rng[0]), float(rng[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}={rng!r}: bounds must be finite (no NaN or Inf)")
    if not lo < hi:
        raise ValueError(f"{name}={rng!r}: expected lo < hi")
    return (lo, hi)


class NoisyModuleMixin:
    """Mixin for an ``nn.Module`` whose crossbar weight is ``_noisy_weight()``.

    Subclasses call `_init_noisy` in ``__init__`` and use `_op_params` / `_next_instance` /
    `_observe` in ``forward``.
    """

    # ---- construction ----------------------------------------------------------------------
    def _init_noisy(self, config: LayerConfig, seed: int, layer_key: int) -> None:
        if not isinstance(config, LayerConfig):
            raise TypeError(f"config={config!r}: expected a noisyops.LayerConfig")
        if isinstance(layer_key, bool) or not isinstance(layer_key, int) or not 0 <= layer_key < (1 << 30):
            raise ValueError(f"layer_key={layer_key!r}: expected an int in [0, 2^30)")
        stored = seed_to_int64(seed)
        w = self._noisy_weight()
        device = w.device if w.device.type != "meta" else torch.device("cpu")
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("seed", torch.tensor(stored, dtype=torch.int64, device=device))
        for name in _RANGE_BUFFERS:
            self.register_buffer(name, _range_tensor(None, device))
        self._config = config
        self._seed = int(seed)
        self.layer_key = int(layer_key)
        self._noise_enabled = True
        self._calibrating = False
        self.per_rank_noise = True
        self._rank = dist_rank()  # re-checked at every eager forward
        self.chip_ids: Optional[Tensor] = None
        self._chips: Optional[Tuple[int, int]] = None  # (k, chip_offset) set by noisyops.chips
        self._observer = None  # calibration callback(module, x, y_without_bias)
        self._w_range: Optional[Tuple[float, float]] = None
        self._in_range: Optional[Tuple[float, float]] = None
        self._out_range: Optional[Tuple[float, float]] = None
        self._params: Optional[OpParams] = None
        self._params_error: Optional[Exception] = None
        self.set_weight_range()

    def _noisy_weight(self) -> Tensor:
        """The clean weight tensor the crossbar holds (each layer type says which)."""
        raise NotImplementedError(f"{type(self).__name__} must define _noisy_weight()")

    # ---- public state ------------------------------------------------------------------------
    @property
    def config(self) -> LayerConfig:
        """The layer's `LayerConfig` (assignable; a changed ``w_range`` re-fixes the range)."""
        return self._config

    @config.setter
    def config(self, config: LayerConfig) -> None:
        if not isinstance(config, LayerConfig):
            raise TypeError(f"config={config!r}: expected a noisyops.LayerConfig")
        old = self._config
        self._config = config
        if config.w_range != old.w_range:
            self.set_weight_range()
        else:
            self._refresh()

    @property
    def noise_enabled(self) -> bool:
        """False: the layer runs its config with eta = eta_mul = out_noise = 0 (quantizers stay)."""
        return self._noise_enabled

    @noise_enabled.setter
    def noise_enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"noise_enabled={value!r}: expected a bool")
        self._noise_enabled = value
        self._refresh()

    def get_seed(self) -> int:
        """The layer's 64-bit seed (before the per-rank offset)."""
        return self._seed

    def set_seed(self, seed: int) -> None:
        """Set the seed (an int in [0, 2^64)); stored in the ``seed`` buffer."""
        self.seed.fill_(seed_to_int64(seed))
        self._seed = int(seed)
        self._refresh()

    @property
    def weight_range(self) -> Optional[Tuple[float, float]]:
        """The fixed ``(w_lo, w_hi)`` (None: measured per call, as the functional ops do)."""
        return self._w_range

    @property
    def input_range(self) -> Optional[Tuple[float, float]]:
        """The calibrated/set input range (None: the config's ``in_range``)."""
        return self._in_range

    @property
    def output_range(self) -> Optional[Tuple[float, float]]:
        """The calibrated/set output range (None: the config's ``out_range``)."""
        return self._out_range

    def set_weight_range(self, w_range=None) -> Optional[Tuple[float, float]]:
        """Fix the weight range: the given ``(lo, hi)``, else from the config on the current
        weights — a pair as given, ``k`` → ``±k·std(W)``, None → ``±2·std(W)`` (noise reference
        only, no clip). std is the unbiased std of the whole weight tensor. A degenerate range
        (all-equal weights, e.g. a zero-initialised head) is left unset: the op then measures
        ``±k·std(W)`` on every call until `set_weight_range` is called again (a warning says so).
        """
        rng = _check_range("w_range", w_range)
        if rng is None:
            cw = self._config.w_range
            w = self._noisy_weight()
            if isinstance(cw, tuple):
                rng = cw
            elif w.device.type != "meta" and w.numel() > 1:
                k = NOISE_REF_K if cw is None else cw
                s = float(w.detach().double().std())
                if math.isfinite(s) and s > 0:
                    rng = (-k * s, k * s)
            if rng is None and w.device.type != "meta":
                warnings.warn(f"{type(self).__name__}(layer_key={self.layer_key}): weight std is 0 or "
                              f"undefined, so the weight range is not fixed; it is measured on every "
                              f"call until set_weight_range() is called", stacklevel=2)
        self._w_range = rng
        self.w_range.copy_(_range_tensor(rng, "cpu"))
        self._refresh()
        return rng

    def set_ranges(self, in_range=None, out_range=None) -> None:
        """Set (fix) the input / output ranges (pairs; None leaves one unchanged)."""
        if in_range is not None:
            self._in_range = _check_range("in_range", in_range)
            self.in_range.copy_(_range_tensor(self._in_range, "cpu"))
        if out_range is not None:
            self._out_range = _check_range("out_range", out_range)
            self.out_range.copy_(_range_tensor(self._out_range, "cpu"))
        self._refresh()

    def clear_ranges(self) -> None:
        """Forget calibrated input/output ranges (the config's apply again)."""
        self._in_range = self._out_range = None
        self.in_range.copy_(_range_tensor(None, "cpu"))
        self.out_range.copy_(_range_tensor(None, "cpu"))
        self._refresh()

    def reset_calls(self, value: int = 0) -> None:
        """Set the call counter (default 0: the noise sequence starts over); ``value`` in [0, 2^63),
        checked here so the forward never reads the counter back."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << 63):
            raise ValueError(f"reset_calls(value={value!r}): expected an int in [0, 2^63)")
        self.calls.fill_(value)

    def effective_config(self) -> LayerConfig:
        """The config the op runs: noise zeroed when ``noise_enabled`` is False or during
        calibration (which also turns the input/output quantizers off)."""
        cfg = self._config
        if not self._noise_enabled or self._calibrating:
            cfg = cfg.replace(eta=0.0, eta_mul=0.0, out_noise=0.0)
        if self._calibrating:
            cfg = cfg.replace(in_bits=None, out_bits=None)
        return cfg

    def effective_seed(self) -> int:
        """``(seed + rank·0x9E3779B97F4A7C15) mod 2^64`` with ``per_rank_noise``, else ``seed``."""
        if not self.per_rank_noise:
            return self._seed
        return (self._seed + self._rank * RANK_SEED_STRIDE) % U64

    # ---- resolution --------------------------------------------------------------------------
    def _refresh(self) -> None:
        try:
            self._params = resolve(self.effective_config(), seed=self.effective_seed(),
                                   layer_key=self.layer_key, w_range=self._w_range,
                                   in_range=self._in_range, out_range=self._out_range)
            self._params_error = None
        except (TypeError, ValueError) as exc:
            self._params, self._params_error = None, exc

    def _op_params(self) -> OpParams:
        """The resolved params for this call (eager calls re-check the distributed rank)."""
        if not torch.compiler.is_compiling():
            r = dist_rank()
            if r != self._rank:
                self._rank = r
                self._refresh()
        if self._params is None:
            raise ValueError(f"{type(self).__name__}(layer_key={self.layer_key}): "
                             f"{self._params_error}")
        return self._params

    def _next_instance(self, p: OpParams, batch: int, device: torch.device) -> Tensor:
        """The op's int64 instance tensor: chip ids (per_instance) or the counter's value before
        this call as a fresh tensor (the counter then advances; autograd saves the op's inputs, so
        the instance must never alias the mutated buffer)."""
        if p.sampling == PER_INSTANCE:
            ids = self.chip_ids
            if ids is None and self._chips is not None:
                k, offset = self._chips
                if batch % k:
                    raise ValueError(f"input: batch {batch} is not a multiple of the chip count k={k} "
                                     f"(noisyops.chips expects the batch repeated k times)")
                ids = torch.arange(offset, offset + k, dtype=torch.int64,
                                   device=device).repeat_interleave(batch // k)
            if ids is None:
                raise ValueError(f"{type(self).__name__}(layer_key={self.layer_key}): per_instance "
                                 f"sampling needs chip ids: set module.chip_ids (int64 [batch]) or "
                                 f"use noisyops.chips / noisyops.run_chips")
            # ids made by noisyops.chips (offset >= 0 checked there) need no value check
            return _functional.instance_tensor(p, ids, batch, device, checked=self.chip_ids is None)
        # Compiled, NOT `inst = calls.clone(); calls += 1`: inductor elides that clone and saves an
        # alias of the buffer for backward, which then regenerates the noise of the NEXT call (wrong
        # input gradients; tests/test_compile.py::test_inductor_saved_counter_is_not_the_buffer).
        # Eager, the clone is a real copy (two ops instead of three: per-call overhead).
        calls = self.calls
        if not torch.compiler.is_compiling():
            inst = calls.clone()
            calls.add_(1)
            return inst
        advanced = calls + 1
        calls.copy_(advanced)
        return advanced - 1

    def _chip_weights(self, p: OpParams, weight: Tensor, x: Tensor) -> Optional[Tensor]:
        """Inside `noisyops.chips` on the CPU: the ``[k, *W]`` noisy weights of this layer's chips
        ``offset .. offset + k − 1`` (the ids `chips` makes, first-seen order), kept in
        `noisyops.chip_store.STORE` under this module while its weights stay in one state
        (``_version``, storage; no value is read), for the op's ``chip_weights`` input. None when
        the ``cpu`` backend will not run the call, under torch.compile, or when the store is off."""
        if (self._chips is None or self.chip_ids is not None or p.sampling != PER_INSTANCE
                or not p.has_weight_noise or x.device.type != "cpu" or torch.compiler.is_compiling()):
            return None
        from .. import chip_store, dispatch
        if dispatch.forced_backend() not in (None, "cpu") or not dispatch.backend("cpu").status()[0]:
            return None
        if chip_store.budget_bytes() == 0:
            return None
        dtype = torch.get_autocast_dtype("cpu") if _functional._autocasting(x) else x.dtype
        k, offset = self._chips
        key = (p, k, offset, dtype)
        state = chip_store.weight_state(weight)
        wn = chip_store.STORE.get(self, key, state)
        if wn is None:
            from ..backends import cpu
            wn = cpu.noisy_weights(weight.detach().to(dtype), p, range(offset, offset + k), dtype)
            chip_store.STORE.put(self, key, state, wn,
                                 current=lambda m: chip_store.weight_state(m._noisy_weight()))
        return wn

    # ---- state_dict ----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in NOISY_BUFFERS:  # a clean state_dict need not carry the noise state
            key = prefix + name
            if key not in state_dict and key in missing_keys:
                missing_keys.remove(key)
        self._seed = int64_to_seed(self.seed)
        self._in_range = _range_from_tensor("in_range", self.in_range)
        self._out_range = _range_from_tensor("out_range", self.out_range)
        if prefix + "w_range" in state_dict:
            self._w_range = _range_from_tensor("w_range", self.w_range)
            self._refresh()
        else:  # clean weights loaded: fix the range on them, as at conversion
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.set_weight_range()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # keep the range buffers float64 through .half()/.to(dtype) (the mirrors are exact)
        for name, rng in zip(_RANGE_BUFFERS, (self._w_range, self._in_range, self._out_range)):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float64:
                self._buffers[name] = _range_tensor(rng, buf.device)
        return self

    def _noisy_repr(self) -> str:
        parts = [f"config={self._config!r}", f"layer_key={self.layer_key}", f"seed={self._seed}"]
        if self._w_range is not None:
            parts.append("w_range=(%.4g, %.4g)" % self._w_range)
        if self._in_range is not None:
            parts.append("in_range=(%.4g, %.4g)" % self._in_range)
        if self._out_range is not None:
            parts.append("out_range=(%.4g, %.4g)" % self._out_range)
        if not self._noise_enabled:
            parts.append("noise_enabled=False")
        return ", ".join(parts)
