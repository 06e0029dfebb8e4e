"""Helpers shared by the analysis modules: set noise on some layers, restore configs afterwards."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional, Sequence

from torch import nn

from ..config import LayerConfig

KINDS = ("additive", "multiplicative", "mixed")
TARGETS = ("weights", "outputs")


def noisy_layers(model: nn.Module):
    """``noisyops.noisy_layers(model)``: ``[(name, module)]`` in layer_key order."""
    import noisyops
    layers = noisyops.noisy_layers(model)
    if not layers:
        raise ValueError("model: has no noisy layers (convert it with noisyops.convert first)")
    return layers


def quiet(config: LayerConfig) -> LayerConfig:
    """The config with every noise source off (η = η_mul = out_noise = 0); quantizers kept."""
    return config.replace(eta=0.0, eta_mul=0.0, out_noise=0.0)


def check_kind_target(kind: str, target: str):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    if target == "outputs" and kind != "additive":
        raise ValueError(f"kind={kind!r} with target='outputs': output noise (out_noise) is additive "
                         f"only in the layer model (SPEC section 1); use kind='additive'")


def with_noise(config: LayerConfig, level: float, kind: str = "additive",
               target: str = "weights") -> LayerConfig:
    """``quiet(config)`` plus noise of one kind at ``level``.

    weights/additive: ``eta = level``; weights/multiplicative: ``eta_mul = level``; weights/mixed:
    ``eta = eta_mul = level``; outputs/additive: ``out_noise = level`` (absolute, output units).
    """
    check_kind_target(kind, target)
    if not (isinstance(level, (int, float)) and math.isfinite(level) and level >= 0):
        raise ValueError(f"level={level!r}: expected a finite float >= 0")
    c = quiet(config)
    if target == "outputs":
        return c.replace(out_noise=float(level))
    if kind == "additive":
        return c.replace(eta=float(level))
    if kind == "multiplicative":
        return c.replace(eta_mul=float(level))
    return c.replace(eta=float(level), eta_mul=float(level))


@contextlib.contextmanager
def configs_restored(model: nn.Module):
    """Context: saves every noisy layer's ``config`` and ``noise_enabled`` and restores them on exit."""
    layers = noisy_layers(model)
    saved = [(m.config, m.noise_enabled) for _, m in layers]
    try:
        yield layers
    finally:
        for (_, m), (c, e) in zip(layers, saved):
            m.config = c
            m.noise_enabled = e


def set_noise(model: nn.Module, level: float, kind: str = "additive", target: str = "weights",
              names: Optional[Iterable[str]] = None):
    """Put noise ``level`` on the layers ``names`` (all if None) and switch every other layer's noise
    off (`quiet`). Enables noise on the chosen layers. Use inside `configs_restored`."""
    layers = noisy_layers(model)
    chosen = None if names is None else set(names)
    if chosen is not None:
        unknown = chosen - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"names={sorted(unknown)!r}: not noisy layers of the model "
                             f"(have {[n for n, _ in layers]})")
    for n, m in layers:
        if chosen is None or n in chosen:
            m.config = with_noise(m.config, level, kind, target)
            m.noise_enabled = True
        else:
            m.config = quiet(m.config)


def check_levels(levels: Sequence[float], *, positive: bool = False, name: str = "levels"):
    vals = [float(v) for v in levels]
    if not vals:
        raise ValueError(f"{name}: expected at least one value")
    for v in vals:
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ValueError(f"{name}={list(levels)!r}: expected finite values "
                             f"{'> 0' if positive else '>= 0'}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name}={list(levels)!r}: expected strictly increasing values")
    return vals


def num_outputs(model: nn.Module, x) -> int:
    import torch
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])
