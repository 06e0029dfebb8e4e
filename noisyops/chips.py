"""Evaluate K noisy "chips" at once (``per_instance`` sampling, SPEC section 2).

Chip ``c`` is one fixed draw of every layer's noisy weights: instance id ``c`` in every layer, the
same on every batch. `run_chips` repeats a batch K times along dim 0, runs it once with sample
``k·B + b`` on chip ``chip_offset + k``, and returns the outputs as ``[K, B, ...]``; the
`chips` context does the same for code that drives the model itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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


def run_chips(model: nn.Module, x: Tensor, k: int, *, chip_offset: int = 0) -> Tensor:
    """Outputs of ``k`` chips on batch ``x [B, ...]``: a tensor ``[k, B, ...]``, where ``[c]`` is
    the model on chip ``chip_offset + c`` (same result as running each chip alone). The model must
    return one tensor whose dim 0 is the batch. Memory grows k-fold over one forward."""
    _check_k(k, chip_offset)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a batched tensor [B, ...], got {type(x).__name__}")
    b = x.shape[0]
    with chips(model, k, chip_offset=chip_offset):
        y = model(x.repeat((k,) + (1,) * (x.dim() - 1)))
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != k * b:
        raise ValueError(f"model output: expected a tensor with dim 0 = k·B = {k * b}, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    return y.reshape((k, b) + tuple(y.shape[1:]))
