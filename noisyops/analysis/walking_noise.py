"""Walking Noise: per-layer noise sensitivity (noise in one layer at a time).

For each noisy layer ``l`` and each noise level ``s`` of a grid, every other layer runs without noise
and layer ``l`` gets noise of one kind (`with_noise`): additive weight noise ``eta = s``,
multiplicative ``eta_mul = s``, mixed (both ``= s``), or additive output noise ``out_noise = s``
(absolute, in the layer's output units, per tile). Accuracy is measured over ``n_chips`` chips
(`noisyops.evaluation.evaluate_chips`: mean, std, 95% t-interval).

Midpoint noise level of a layer (`midpoint_level`): the level at which the mean accuracy first falls
to ``a_half = (a_clean + a_chance) / 2`` (``a_chance = 1/num_classes``). Between the two grid levels
``s_i < s_{i+1}`` that bracket ``a_half`` (``a_i >= a_half > a_{i+1}``) it is interpolated linearly
in ``log s``::

    log s* = log s_i + (a_i − a_half) / (a_i − a_{i+1}) · (log s_{i+1} − log s_i)

If the accuracy never falls below ``a_half`` on the grid the midpoint is reported as ``inf``
(status ``"above_grid"``: more robust than the grid shows); if it is already below at the smallest
level, the midpoint is ``s_0`` with status ``"below_grid"`` (an upper bound). A larger midpoint =
a more robust layer.

RNG contract: chips ``chip_offset..chip_offset+n_chips-1`` at every level and layer (common random
numbers), so the curves are smooth in ``s`` and the run is deterministic.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

from torch import nn

from ..evaluation import as_batches, clean_accuracy, evaluate_chips
from ._common import check_kind_target, check_levels, configs_restored, num_outputs, set_noise

__all__ = ["midpoint_level", "walking_noise", "WalkingNoiseResult", "log_grid"]


def log_grid(lo: float, hi: float, n: int) -> List[float]:
    """``n`` levels spaced evenly in ``log`` from ``lo`` to ``hi`` (both > 0)."""
    if not (lo > 0 and hi > lo and n >= 2):
        raise ValueError(f"log_grid(lo={lo!r}, hi={hi!r}, n={n!r}): expected 0 < lo < hi and n >= 2")
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]


def midpoint_level(levels: Sequence[float], accuracies: Sequence[float], clean: float,
                   chance: float) -> Dict[str, object]:
    """Noise level where accuracy falls halfway between ``clean`` and ``chance`` (module docstring).

    Returns ``{"midpoint": float, "status": "ok"|"above_grid"|"below_grid", "threshold": a_half}``.
    """
    lv = check_levels(levels, positive=True)
    acc = [float(a) for a in accuracies]
    if len(acc) != len(lv):
        raise ValueError(f"accuracies: expected {len(lv)} values (one per level), got {len(acc)}")
    if not clean > chance:
        raise ValueError(f"clean={clean!r} <= chance={chance!r}: the midpoint needs clean > chance")
    half = 0.5 * (clean + chance)
    if acc[0] < half:
        return {"midpoint": lv[0], "status": "below_grid", "threshold": half}
    for i in range(len(lv) - 1):
        a0, a1 = acc[i], acc[i + 1]
        if a0 >= half > a1:
            frac = (a0 - half) / (a0 - a1)
            ls = math.log(lv[i]) + frac * (math.log(lv[i + 1]) - math.log(lv[i]))
            return {"midpoint": math.exp(ls), "status": "ok", "threshold": half}
    return {"midpoint": math.inf, "status": "above_grid", "threshold": half}


@dataclasses.dataclass
class WalkingNoiseResult:
    """``curves[layer]`` = list of ``{"level", "mean", "std", "ci_low", "ci_high", "n"}``;
    ``midpoints[layer]`` = `midpoint_level` output."""

    kind: str
    target: str
    levels: List[float]
    clean_accuracy: float
    chance: float
    layers: List[str]
    curves: Dict[str, List[dict]]
    midpoints: Dict[str, dict]
    n_chips: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rows(self) -> List[dict]:
        """Flat table rows (layer, level, mean, std, ci_low, ci_high, n) for CSV."""
        return [{"layer": name, **r} for name in self.layers for r in self.curves[name]]


def walking_noise(model: nn.Module, data, levels: Sequence[float], *, kind: str = "additive",
                  target: str = "weights", n_chips: int = 10, group_size=None,
                  chip_offset: int = 0, layers: Optional[Sequence[str]] = None,
                  num_classes: Optional[int] = None, batch_size: int = 256,
                  progress: bool = False) -> WalkingNoiseResult:
    """Accuracy vs noise level with noise in one layer at a time, and each layer's midpoint.

    Args:
        model: converted model; its configs are restored on return.
        data: test data (see `noisyops.evaluation.as_batches`).
        levels: strictly increasing noise levels > 0 (a log grid: `log_grid`).
        kind, target: ``additive|multiplicative|mixed`` on ``weights``, or ``additive`` on ``outputs``.
        layers: layer names to walk (default: every noisy layer, in layer_key order).
        num_classes: for chance = 1/num_classes (default: the model's output width).
    """
    check_kind_target(kind, target)
    lv = check_levels(levels, positive=True)
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    chance = 1.0 / (num_classes or num_outputs(model, batches[0][0]))
    with configs_restored(model) as all_layers:
        names = [n for n, _ in all_layers] if layers is None else list(layers)
        clean = clean_accuracy(model, batches)
        curves: Dict[str, List[dict]] = {}
        mids: Dict[str, dict] = {}
        bar = None
        if progress:
            from ..progress import progress_bar
            bar = progress_bar(total=len(names) * len(lv), desc=f"walking {kind}/{target}", unit="level")
        try:
            for name in names:
                rows = []
                for s in lv:
                    set_noise(model, s, kind, target, names=[name])
                    r = evaluate_chips(model, batches, n_chips, group_size=group_size,
                                       chip_offset=chip_offset)
                    sm = r.summary
                    rows.append({"level": s, "mean": sm.mean, "std": sm.std, "ci_low": sm.ci_low,
                                 "ci_high": sm.ci_high, "n": sm.n})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(layer=name, acc=f"{sm.mean:.3f}")
                curves[name] = rows
                mids[name] = midpoint_level(lv, [r["mean"] for r in rows], clean, chance)
        finally:
            if bar is not None:
                bar.close()
    return WalkingNoiseResult(kind, target, lv, clean, chance, names, curves, mids, n_chips)
