"""The plan of one noisy-op call: everything about a call that is decided before any work runs.

A `CallPlan` is built once per call (`conv2d_plan` / `linear_plan`) from the op's arguments, and
the fake (meta) kernel, the forward, the backward, dispatch and every backend read it instead of
re-deriving it. Building a plan reads no tensor value (no host sync), except the measured weight
range (``w_std_k > 0``: functional ops measure ``±k·std(W)`` per call; modules fix the range at
conversion, so their calls never measure).

Small API::

    plan = conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    plan = linear_plan(x, weight, p, instance)
    plan.route            "clean" | "prepass" | "fused" (see `ROUTES` and docs/routing.md)
    plan.out_shape, plan.memory_format, plan.out_strides       the output y (dense)
    plan.compute_dtype    noise and quantizers (float64 for float64 inputs, else float32)
    plan.product_dtype    the product (the input's dtype)
    plan.batched_y_stride(y_stride)   y's strides with the sample dim explicit (1-D linear: [1, out])
    plan.tiles            ((c0, c1), ...) input-channel ranges per crossbar tile (one when untiled)
    plan.mask_shape       (T, ceil(numel(y)/32)) of the packed out mask, (0,) without ADC
    plan.w_lo, w_hi, sigma                          the weight range and σ = eta·(w_hi − w_lo)
    plan.sample_ids()     int64 [N] on x's device: the noise instance of every sample (no host read)
    plan.prepass_ids()    int64 [K] on x's device: the distinct instances whose noisy weights a
                          pre-pass writes (per_call: 1, per_sample: N); per_instance: see below
    plan.chip_weights     [K, *W] noisy weights of the distinct chip ids made by their owner, or None
    plan.host_groups()    [(instance id, samples)] on the host: CPU tensors only (a load, not a sync),
                          or per_instance chip ids on a GPU, where grouping needs the distinct ids
                          (the one read the GPU hot path keeps; run_chips / chips make ids whose
                          groups are known, see docs/routing.md)

Routes (what runs; `route_of`):

* ``clean``: every option off (no weight noise, no clip, no quantizer, no output noise): exactly
  ``F.conv2d`` / ``F.linear`` and their ATen backward, on every backend, forced or not.
* ``prepass``: weight noise per_call / per_instance, and pointwise quantizers / untiled output noise:
  one pre-pass writes the noisy weights, the vendor library (cuDNN / cuBLAS; oneDNN / BLAS on the
  CPU) does the product, pointwise passes do the quantizers.
* ``fused``: crossbar tiles (more than one tile with ADC or output noise) or ``per_sample`` weight
  noise: the fused Triton kernel on a GPU (the per-tile / per-sample products on the CPU).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .params import PER_CALL, PER_INSTANCE, PER_SAMPLE, SAMPLE_STRIDE, OpParams, tile_bounds

ROUTES = ("clean", "prepass", "fused")
Samples = Union[slice, List[int]]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The output memory format of a call: channels-last for a channels-last (and not also
    contiguous) 4-D input, else contiguous. Out masks follow the output's storage order."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Noise and quantizers run in float64 for float64 inputs, else float32 (SPEC section 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_clean(p: OpParams) -> bool:
    """True when the op is the plain product: no weight noise, clip, quantizer or output noise."""
    return not (p.has_weight_noise or p.w_clip or p.in_bits or p.out_bits or p.out_noise > 0)


def route_of(p: OpParams, n_tiles: int) -> str:
    """``clean``, ``fused`` (crossbar tiles, or per_sample weight noise), else ``prepass``.

    These are the routes that are safe without a GPU measurement: the vendor library does every
    product it can (one noisy-weight copy per call or chip), the fused kernel only runs where
    fusion is unavoidable (see docs/routing.md)."""
    if is_clean(p):
        return "clean"
    if n_tiles > 1 or (p.sampling == PER_SAMPLE and p.has_weight_noise):
        return "fused"
    return "prepass"


def _dense_strides(shape: Sequence[int], fmt: torch.memory_format) -> Tuple[int, ...]:
    if fmt == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(1, s)
    return tuple(reversed(strides))


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """The plan of one call (see the module docstring). Build with `conv2d_plan` / `linear_plan`."""

    kind: str                          # "conv2d" | "linear"
    p: OpParams
    route: str                         # one of ROUTES
    batch: int                         # N: samples (linear: rows of dim 0; 1-D input: 1)
    out_shape: Tuple[int, ...]         # y's shape (as the op returns it)
    memory_format: torch.memory_format
    compute_dtype: torch.dtype
    product_dtype: torch.dtype
    tiles: Tuple[Tuple[int, int], ...]
    mask_shape: Tuple[int, ...]
    in_per_group: int                  # C_in / groups (linear: in features)
    kernel_numel: int                  # kh·kw (linear: 1)
    instance: torch.Tensor             # the op's int64 instance tensor (0-d counter or [N] chip ids)
    w_lo: Optional[float] = None       # None: nothing transforms W, or a fake plan (no values)
    w_hi: Optional[float] = None
    sigma: float = 0.0
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    unbatched: bool = False            # linear with a 1-D input (one sample)
    chip_weights: Optional[torch.Tensor] = None  # [K, *W]: the caller's noisy weights of the K
    # distinct per_instance ids in first-seen order (`noisyops.chip_store`), or None

    # ---- derived ---------------------------------------------------------------------------
    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    @property
    def conv_args(self) -> Tuple[list, list, list, int]:
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    @property
    def out_strides(self) -> Tuple[int, ...]:
        """Strides of the dense output ``y`` (its memory format)."""
        return _dense_strides(self.out_shape, self.memory_format)

    @property
    def batched_out_shape(self) -> Tuple[int, ...]:
        """y's shape with the sample dim made explicit (a 1-D linear output gets a leading 1)."""
        return (1,) + self.out_shape if self.unbatched else self.out_shape

    @property
    def batched_out_strides(self) -> Tuple[int, ...]:
        return _dense_strides(self.batched_out_shape, self.memory_format)

    def batched_y_stride(self, y_stride: Sequence[int]) -> Tuple[int, ...]:
        """The strides of y with the sample dim explicit: ``y_stride`` as given (y's strides, which
        the backward op carries), or for a 1-D linear output those of its ``[1, out]`` view."""
        return self.batched_out_strides if self.unbatched else tuple(y_stride)

    @property
    def weight_noisy(self) -> bool:
        return self.p.has_weight_noise

    def sample_ids(self) -> torch.Tensor:
        """int64 ``[N]`` on the instance tensor's device: the noise instance of every sample
        (SPEC section 2), computed on the device (no host read)."""
        inst, n = self.instance, self.batch
        if self.p.sampling == PER_INSTANCE:
            return inst.reshape(-1)
        c = inst.reshape(1)
        if self.p.sampling == PER_SAMPLE:
            return c * SAMPLE_STRIDE + torch.arange(n, dtype=torch.int64, device=inst.device)
        return c.expand(n)

    def prepass_ids(self) -> torch.Tensor:
        """int64 ``[K]`` on the device: the instances a weight pre-pass writes, one weight copy each,
        for per_call (K = 1) and per_sample (K = N); per_instance needs the distinct chip ids and
        uses `host_groups`."""
        if self.p.sampling == PER_INSTANCE:
            raise ValueError("prepass_ids: per_instance groups come from host_groups()")
        if self.p.sampling == PER_SAMPLE:
            return self.sample_ids()
        return self.instance.reshape(1)

    def host_groups(self) -> List[Tuple[int, Samples]]:
        """``[(instance id, samples)]`` in first-seen order; ``samples`` is a ``slice`` for a
        contiguous run of the batch, else a list of indices. Reads the ids on the host: for CPU
        tensors (a memory load), and for per_instance chip ids on a GPU (documented sync)."""
        p = self.p
        if p.sampling == PER_CALL:
            return [(int(self.instance), slice(0, self.batch))]
        if p.sampling == PER_SAMPLE:
            c = int(self.instance)
            return [(c * SAMPLE_STRIDE + s, slice(s, s + 1)) for s in range(self.batch)]
        groups: dict = {}
        for s, i in enumerate(self.instance.reshape(-1).tolist()):
            groups.setdefault(int(i), []).append(s)
        out = []
        for i, samples in groups.items():
            if samples[-1] - samples[0] + 1 == len(samples):
                samples = slice(samples[0], samples[-1] + 1)
            out.append((i, samples))
        return out

    def host_ids(self) -> List[int]:
        """The instance id of every sample, on the host (see `host_groups` for when it reads)."""
        p = self.p
        if p.sampling == PER_INSTANCE:
            return [int(v) for v in self.instance.reshape(-1).tolist()]
        c = int(self.instance)
        if p.sampling == PER_SAMPLE:
            return [c * SAMPLE_STRIDE + s for s in range(self.batch)]
        return [c] * self.batch


def _weight_numbers(p: OpParams, weight: torch.Tensor, measure: bool):
    if not (p.has_weight_noise or p.w_clip) or not measure:
        return None, None, 0.0
    lo, hi = p.weight_range(weight)
    return lo, hi, p.sigma(lo, hi)


def _tiles(p: OpParams, in_per_group: int, kernel_numel: int) -> Tuple[Tuple[int, int], ...]:
    if not p.tiled:
        return ((0, in_per_group),)
    return tuple(tile_bounds(in_per_group, kernel_numel, p.tile_rows))


def _mask_shape(p: OpParams, n_tiles: int, out_numel: int) -> Tuple[int, ...]:
    return (n_tiles, (out_numel + 31) // 32) if p.out_bits else (0,)


def _chips(p: OpParams, chip_weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Chip weights only mean something for per_instance weight noise."""
    if chip_weights is None or p.sampling != PER_INSTANCE or not p.has_weight_noise:
        return None
    return chip_weights


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- the per-layout cache of the eager path ------------------------------------------------------
# Everything in a plan but the instance tensor, the chip weights and a measured weight range is a
# function of (p, shapes, strides, dtype, conv geometry): the eager path (`noisyops.eager`) builds
# that part once per layout and fills in the rest per call. Keys hold ``id(p)`` and the entry holds
# ``p`` itself, so the id cannot be reused while the entry lives.
_CACHE: dict = {}
_CACHE_MAX = 1024
_MEASURED = ("w_lo", "w_hi", "sigma")


def _measured(p: OpParams) -> bool:
    """Whether the plan's weight numbers are measured on the call's weights (``±k·std(W)``)."""
    return (p.has_weight_noise or bool(p.w_clip)) and p.w_std_k > 0


def _from_cache(key, p: OpParams, build, weight, instance, chip_weights) -> CallPlan:
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not p:
        plan = build()
        fields = dict(plan.__dict__)
        for name in ("instance", "chip_weights") + (_MEASURED if _measured(p) else ()):
            del fields[name]
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = (p, fields)
        return plan
    plan = object.__new__(CallPlan)  # the frozen dataclass's fields, set as __init__ would
    d = plan.__dict__
    d.update(hit[1])
    d["instance"] = instance
    d["chip_weights"] = _chips(p, chip_weights)
    if _measured(p):
        d["w_lo"], d["w_hi"], d["sigma"] = _weight_numbers(p, weight, True)
    return plan


def conv2d_plan_cached(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, p: OpParams,
                       instance: torch.Tensor, chip_weights: Optional[torch.Tensor] = None) -> CallPlan:
    """`conv2d_plan` (measured) for plain tensors, its layout-derived part built once per layout
    (the eager path; equal field by field to `conv2d_plan`, tests/test_eager.py)."""
    key = ("conv2d", id(p), x.shape, x.stride(), x.dtype, weight.shape, tuple(stride), tuple(padding),
           tuple(dilation), groups)
    return _from_cache(key, p, lambda: conv2d_plan(x, weight, stride, padding, dilation, groups, p,
                                                   instance, chip_weights=chip_weights),
                       weight, instance, chip_weights)


def linear_plan_cached(x: torch.Tensor, weight: torch.Tensor, p: OpParams, instance: torch.Tensor,
                       chip_weights: Optional[torch.Tensor] = None) -> CallPlan:
    """`linear_plan` (measured) for plain tensors, cached per layout as `conv2d_plan_cached`."""
    key = ("linear", id(p), x.shape, x.dtype, weight.shape)
    return _from_cache(key, p, lambda: linear_plan(x, weight, p, instance, chip_weights=chip_weights),
                       weight, instance, chip_weights)


def conv2d_plan(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, p: OpParams, instance: torch.Tensor,
                measure: bool = True, chip_weights: Optional[torch.Tensor] = None) -> CallPlan:
    """The plan of a conv call: ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``.
    ``measure=False`` (fake tensors) leaves the measured weight range out."""
    n, _, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out_shape = (n, c_out, ho, wo)
    tiles = _tiles(p, cin_g, kh * kw)
    lo, hi, sigma = _weight_numbers(p, weight, measure)
    return CallPlan(kind="conv2d", p=p, route=route_of(p, len(tiles)), batch=n, out_shape=out_shape,
                    memory_format=memory_format_of(x), compute_dtype=compute_dtype_of(x.dtype),
                    product_dtype=x.dtype, tiles=tiles,
                    mask_shape=_mask_shape(p, len(tiles), _numel(out_shape)), in_per_group=cin_g,
                    kernel_numel=kh * kw, instance=instance, w_lo=lo, w_hi=hi, sigma=sigma,
                    stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                    groups=groups, chip_weights=_chips(p, chip_weights))


def linear_plan(x: torch.Tensor, weight: torch.Tensor, p: OpParams, instance: torch.Tensor,
                measure: bool = True, chip_weights: Optional[torch.Tensor] = None) -> CallPlan:
    """The plan of a linear call: ``x [*, in]`` (a 1-D ``x`` is one sample), ``weight [out, in]``."""
    out_shape = tuple(x.shape[:-1]) + (weight.shape[0],)
    tiles = _tiles(p, weight.shape[1], 1)
    lo, hi, sigma = _weight_numbers(p, weight, measure)
    return CallPlan(kind="linear", p=p, route=route_of(p, len(tiles)),
                    batch=x.shape[0] if x.dim() > 1 else 1, out_shape=out_shape,
                    memory_format=torch.contiguous_format, compute_dtype=compute_dtype_of(x.dtype),
                    product_dtype=x.dtype, tiles=tiles,
                    mask_shape=_mask_shape(p, len(tiles), _numel(out_shape)),
                    in_per_group=weight.shape[1], kernel_numel=1, instance=instance, w_lo=lo, w_hi=hi,
                    sigma=sigma, unbatched=x.dim() == 1, chip_weights=_chips(p, chip_weights))
