"""Evaluate K noisy "chips" at once (``per_instance`` sampling, SPEC section 2).

Chip ``c`` is one fixed draw of every layer's noisy weights: instance id ``c`` in every layer, the
same on every batch. `run_chips` repeats a batch K times along dim 0, runs it once with sample
``k·B + b`` on chip ``chip_offset + k``, and returns the outputs as ``[K, B, ...]``; the
`chips` context does the same for code that drives the model itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .convert import noisy_layers


def _check_k(k, chip_offset):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: expected an int >= 1 (number of chips)")
    if isinstance(chip_offset, bool) or not isinstance(chip_offset, int) or chip_offset < 0:
        raise ValueError(f"chip_offset={chip_offset!r}: expected an int >= 0")


@contextlib.contextmanager
def chips(model: nn.Module, k: int, *, chip_offset: int = 0) -> Iterator[nn.Module]:
    """Inside the context every noisy layer runs ``per_instance`` with chip ids derived from the
    batch: a batch of ``k·B`` samples (the inputs repeated k times along dim 0, chip-major) puts
    sample ``j`` on chip ``chip_offset + j // B``. Configs, explicit ``chip_ids`` and call counters
    are restored on exit. Yields ``model``.

    Example: ``with noisyops.chips(model, 8): y = model(x.repeat(8, 1, 1, 1)).view(8, B, -1)``.
    """
    _check_k(k, chip_offset)
    layers = noisy_layers(model)
    if not layers:
        raise ValueError("model: has no noisy layers (convert it with noisyops.convert first)")
    saved = [(m, m.config, m.chip_ids, m._chips) for _, m in layers]
    try:
        for _, m in layers:
            if m.config.sampling != "per_instance":
                m.config = m.config.replace(sampling="per_instance")
            m.chip_ids = None
            m._chips = (k, chip_offset)
        yield model
    finally:
        for m, cfg, ids, ch in saved:
            m.config = cfg
            m.chip_ids = ids
            m._chips = ch


def run_chips(model: nn.Module, x: Tensor, k: int, *, chip_offset: int = 0,
              group_size: Optional[int] = None) -> Tensor:
    """Outputs of ``k`` chips on batch ``x [B, ...]``: a tensor ``[k, B, ...]``, where ``[c]`` is
    the model on chip ``chip_offset + c`` (same result as running each chip alone). The model must
    return one tensor whose dim 0 is the batch.

    Chips run side by side in groups of ``group_size`` (one forward over ``group_size·B`` samples,
    memory grows with it). Default: all ``k`` at once on CUDA; one chip per forward on the CPU, where
    a ``k``-fold batch only loses cache locality and each chip's noisy weights are cached by the
    ``cpu`` backend anyway (measured: ResNet-50, 8 chips × 16 images, ``benchmarks/resnet50_cpu.py``).
    Results do not depend on ``group_size``."""
    _check_k(k, chip_offset)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a batched tensor [B, ...], got {type(x).__name__}")
    if group_size is None:
        group_size = k if x.device.type == "cuda" else 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: expected None or an int >= 1")
    b = x.shape[0]
    outs = []
    for c0 in range(0, k, group_size):
        g = min(group_size, k - c0)
        with chips(model, g, chip_offset=chip_offset + c0):
            y = model(x.repeat((g,) + (1,) * (x.dim() - 1)) if g > 1 else x)
        if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != g * b:
            raise ValueError(f"model output: expected a tensor with dim 0 = chips·B = {g * b}, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        outs.append(y.reshape((g, b) + tuple(y.shape[1:])))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
