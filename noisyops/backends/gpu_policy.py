"""Which GPU path runs a noisy op: the fused Triton kernels, or the ``cuda`` backend (CUDA weight
pre-pass and quantizers around cuDNN / cuBLAS).

`use_cuda_path` returns True unless the call's route (`noisyops.plan.route_of`) is ``fused``:
crossbar tiles and per_sample weight noise run the fused Triton kernels, everything else runs the
pre-pass + cuDNN / cuBLAS path with pointwise quantizers (docs/routing.md). These are the routes
that are safe without a GPU measurement. `predicted_times` evaluates the roofline model of
`noisyops.backends.gpu_cost` (docs/performance.md) for a call — a prediction, not used to route.
The Triton backend declines the call when `use_cuda_path` says True, so dispatch runs the ``cuda``
backend and records it.

``NOISYOPS_GPU_PATH=cuda|triton`` forces the answer (benchmarks, tests); ``auto`` or unset uses the
model. Importing this module never touches CUDA.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import gpu_cost
from ..params import PER_CALL, PER_SAMPLE, OpParams, tile_bounds
from ..plan import route_of

KINDS = ("conv2d_fwd", "conv2d_bwd", "linear_fwd", "linear_bwd")


def layer_of(kind: str, x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> gpu_cost.Layer:
    """The model's `Layer` for a call. Without the conv arguments the output size is taken as
    ``ceil(H/stride) × ceil(W/stride)`` (``stride`` defaults to 1: 'same' padding)."""
    if kind.startswith("conv2d"):
        n, cin, h, w = x.shape
        cout, cin_g, kh, kw = weight.shape
        ho, wo = -(-h // stride), -(-w // stride)
        return gpu_cost.Layer(kind, "conv", n, cin, h, w, cout, kh, kw, ho, wo, groups=max(1, cin // cin_g))
    rows = x.numel() // max(1, x.shape[-1])
    return gpu_cost.Layer(kind, "linear", rows, weight.shape[1], 1, 1, weight.shape[0], 1, 1, 1, 1)


def noise_of(p: OpParams, layer: gpu_cost.Layer, batch: int, instances: Optional[int]) -> gpu_cost.Noise:
    if p.sampling == PER_CALL:
        k = 1
    elif p.sampling == PER_SAMPLE:
        k = batch
    else:
        k = instances if instances is not None else batch
    tiled = p.out_bits > 0 or p.out_noise > 0
    kernel = layer.kh * layer.kw
    tiles = len(tile_bounds(layer.Cin // layer.groups, kernel, p.tile_rows)) if tiled else 1
    return gpu_cost.Noise(weight_noise=int(p.eta > 0) + int(p.eta_mul > 0), in_bits=p.in_bits > 0,
                          out_bits=p.out_bits > 0, out_noise=p.out_noise > 0, tiles=tiles, instances=k,
                          per_sample=p.sampling == PER_SAMPLE)


def predicted_times(kind: str, p: OpParams, x: torch.Tensor, weight: torch.Tensor, gpu: gpu_cost.GPU,
                    instances: Optional[int] = None, stride: int = 1):
    """``{strategy: seconds}`` for this call (forward kinds: forward; backward kinds: backward only)."""
    layer = layer_of(kind, x, weight, stride)
    noise = noise_of(p, layer, x.shape[0], instances)
    out = {}
    for s in ("cuda", "fused_prepass", "fused_regen"):
        fwd = gpu_cost.layer_time(layer, noise, s, False, gpu)
        out[s] = fwd if kind.endswith("_fwd") else gpu_cost.layer_time(layer, noise, s, True, gpu) - fwd
    return out


def _gpu_of(x: torch.Tensor) -> gpu_cost.GPU:
    major = None
    if x.device.type == "cuda":
        try:
            major = torch.cuda.get_device_capability(x.device)[0]
        except Exception:  # no driver: model the default GPU
            major = None
    return gpu_cost.gpu_for_arch(major)


def n_tiles(kind: str, p: OpParams, weight: torch.Tensor) -> int:
    """Crossbar tiles of a call (1 unless ADC / output noise with ``tile_rows``)."""
    if not p.tiled:
        return 1
    kernel = weight.shape[2] * weight.shape[3] if kind.startswith("conv2d") else 1
    return len(tile_bounds(weight.shape[1], kernel, p.tile_rows))


def use_cuda_path(kind: str, p: OpParams, x: torch.Tensor, weight: torch.Tensor, *,
                  instances: Optional[int] = None, stride: int = 1) -> bool:
    """True when the ``cuda`` backend (pre-pass + cuDNN / cuBLAS) should run this call instead of
    the fused Triton kernels: the call's route (`noisyops.plan.route_of`) is not ``fused``.

    The route is the one that is safe without a GPU measurement (docs/routing.md): the vendor
    library runs every product it can; the fused kernel only runs crossbar tiles and per_sample
    weight noise. The cost model (`gpu_cost`, docs/performance.md) is a prediction and is not
    consulted. ``kind``: one of `KINDS`; ``x``/``weight``: the call's tensors (shapes and dtype
    only); ``instances``/``stride`` are accepted for the model's callers and unused here. False
    whenever the cuda backend cannot run the call (float64, extension or device missing).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    forced = os.environ.get("NOISYOPS_GPU_PATH", "auto").strip().lower()
    if forced not in ("auto", "cuda", "triton", ""):
        raise ValueError(f"NOISYOPS_GPU_PATH={forced!r}: expected auto, cuda or triton")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from . import cuda as cuda_backend
    ok, _ = cuda_backend.available()
    if not ok:
        return False
    if forced in ("cuda", "triton"):
        return forced == "cuda"
    return route_of(p, n_tiles(kind, p, weight)) != "fused"
