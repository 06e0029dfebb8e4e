"""`calibrate`: fix every noisy layer's input (DAC) and output (ADC) range from data.

The paper's recipe (SPEC section 1): run a few calibration batches, take the 0.1% / 99.9%
percentiles of each layer's input and of its pre-bias output (what the ADC sees), then keep the
ranges fixed. During calibration every layer runs with noise off and its input/output quantizers
off (the weight clip and quantizer stay), so the ranges describe the network's clean activations.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from .convert import noisy_layers

_MAX_SAMPLES = 1 << 20  # values kept per layer, per side, per batch (strided subsample)


def _subsample(t: Tensor) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.numel() > _MAX_SAMPLES:
        step = -(-flat.numel() // _MAX_SAMPLES)
        flat = flat[::step]
    return flat.to(torch.float32).cpu()


def _percentiles(vals, lo_pct: float, hi_pct: float) -> Tuple[float, float]:
    v = torch.cat(vals)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        raise ValueError("calibrate: a layer saw no finite values")
    if v.numel() > (1 << 24):  # torch.quantile's size limit
        v = v[:: -(-v.numel() // (1 << 24))]
    q = torch.quantile(v.double(), torch.tensor([lo_pct / 100.0, hi_pct / 100.0], dtype=torch.float64))
    lo, hi = float(q[0]), float(q[1])
    if not hi > lo:  # a constant activation: widen to a tiny non-empty range
        eps = max(abs(lo), 1.0) * 1e-6
        lo, hi = lo - eps, hi + eps
    return lo, hi


def _batches(batches, max_batches: Optional[int]):
    if isinstance(batches, Tensor):
        batches = [batches]
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(b, (tuple, list)):
            b = b[0]
        if not isinstance(b, Tensor):
            raise TypeError(f"batches: expected tensors or (x, y) tuples, got {type(b).__name__}")
        yield b


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, *, lo_pct: float = 0.1, hi_pct: float = 99.9,
              max_batches: Optional[int] = None, device=None) -> Dict[str, Tuple[Tuple[float, float],
                                                                              Tuple[float, float]]]:
    """Set every noisy layer's ``in_range`` / ``out_range`` from percentiles and fix them.

    Args:
        model: a converted model (``noisyops.convert``).
        batches: an iterable of input tensors or ``(x, y, ...)`` tuples (a DataLoader), or one tensor.
        lo_pct, hi_pct: percentiles in [0, 100] (defaults 0.1 / 99.9, as the paper).
        max_batches: stop after this many batches (None: all).
        device: move each batch there first (None: as given).

    Formula: ``in_range = (P_lo(x), P_hi(x))`` over every input element the layer saw, and
    ``out_range`` the same over its pre-bias product ``y − b`` (the ADC input; with tiles the
    ranges are those of the full product). Values are subsampled evenly to at most 2^20 per layer
    and batch. Noise, input and output quantizers are off during the pass; the model's train/eval
    mode is respected (put it in eval mode for BatchNorm running statistics to stay unchanged).
    A NaN or Inf in a layer's input or pre-bias output is a ValueError naming the layer and the
    batch (a percentile of non-finite data is meaningless). A constant activation (lo = hi) is
    widened to ``lo − ε, hi + ε`` with ``ε = 1e-6·max(|lo|, 1)``, so the range is never empty.
    The call counters are restored afterwards, so calibration does not shift the noise sequence.

    Returns: ``{layer name: (in_range, out_range)}``.
    """
    for name, v in (("lo_pct", lo_pct), ("hi_pct", hi_pct)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100 or math.isnan(v):
            raise ValueError(f"{name}={v!r}: expected a percentile in [0, 100]")
    if not lo_pct < hi_pct:
        raise ValueError(f"lo_pct={lo_pct}, hi_pct={hi_pct}: expected lo_pct < hi_pct")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}: expected None or an int >= 1")
    layers = noisy_layers(model)
    if not layers:
        raise ValueError("model: has no noisy layers (convert it with noisyops.convert first)")
    seen: Dict[int, Tuple[list, list]] = {id(m): ([], []) for _, m in layers}

    names = {id(m): name for name, m in layers}
    batch_no = [0]

    def observer(m, x, y):
        for what, t in (("input", x), ("pre-bias output", y)):
            if not bool(torch.isfinite(t).all()):
                n_bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"calibrate: layer {names[id(m)]!r} got {n_bad} NaN/Inf values in its "
                                 f"{what} (calibration batch {batch_no[0]}, shape {tuple(t.shape)}): "
                                 f"expected finite values; check the batch and the layer's weights")
        xs, ys = seen[id(m)]
        xs.append(_subsample(x))
        ys.append(_subsample(y))

    saved = [(m, m.calls.clone()) for _, m in layers]
    try:
        for _, m in layers:
            m._observer = observer
            m._calibrating = True
            m._refresh()
        n = 0
        for x in _batches(batches, max_batches):
            batch_no[0] = n
            model(x if device is None else x.to(device))
            n += 1
        if n == 0:
            raise ValueError("batches: no calibration batch was given")
    finally:
        for m, calls in saved:
            m._observer = None
            m._calibrating = False
            m.calls.copy_(calls)
            m._refresh()
    result = {}
    for name, m in layers:
        xs, ys = seen[id(m)]
        if not xs:
            continue  # a layer the batches never reached keeps its ranges
        rin, rout = _percentiles(xs, lo_pct, hi_pct), _percentiles(ys, lo_pct, hi_pct)
        m.set_ranges(in_range=rin, out_range=rout)
        result[name] = (rin, rout)
    return result
