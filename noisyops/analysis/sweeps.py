"""Accuracy vs η for several models (Noisy Machines Fig. 3a) and the train-η × inference-η grid
(Fig. 3b).

`eta_sweep`: for every model and every inference η, additive weight noise ``eta = η`` on every noisy
layer (other noise sources off, quantizers kept), accuracy over ``n_chips`` chips
(`noisyops.evaluation.evaluate_chips`: mean, std, 95% t-interval).

`train_infer_grid`: models trained at different η (one model per training η), each evaluated at
every inference η: the mean accuracy matrix ``acc[i_train, j_infer]`` (and its CI half-widths).

RNG contract: chips ``chip_offset..chip_offset+n_chips-1`` at every η and for every model (common
random numbers: the same ε, scaled by η, for a model with the same seeds), deterministic.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

from torch import nn

from ..evaluation import as_batches, evaluate_chips
from ._common import check_kind_target, check_levels, configs_restored, set_noise

__all__ = ["eta_sweep", "train_infer_grid"]


def _sweep_one(model, batches, etas, kind, target, n_chips, group_size, chip_offset, bar=None):
    rows = []
    with configs_restored(model):
        for eta in etas:
            set_noise(model, eta, kind, target)
            r = evaluate_chips(model, batches, n_chips, group_size=group_size, chip_offset=chip_offset)
            s = r.summary
            rows.append({"eta": eta, "mean": s.mean, "std": s.std, "ci_low": s.ci_low,
                         "ci_high": s.ci_high, "half_width": s.half_width, "n": s.n})
            if bar is not None:
                bar.update(1)
    return rows


def eta_sweep(models: Mapping[str, nn.Module], data, etas: Sequence[float], *, n_chips: int = 10,
              group_size=None, chip_offset: int = 0, kind: str = "additive",
              target: str = "weights", batch_size: int = 256,
              progress: bool = False) -> Dict[str, List[dict]]:
    """``{model_name: [{"eta", "mean", "std", "ci_low", "ci_high", "half_width", "n"}, ...]}``.

    ``etas``: increasing noise levels >= 0 (η = 0 gives the noise-free accuracy, std 0).
    ``kind``/``target`` as in walking noise (default additive weight noise = the paper's η).
    """
    check_kind_target(kind, target)
    lv = check_levels(etas, name="etas")
    if not models:
        raise ValueError("models: expected at least one {name: model}")
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(total=len(models) * len(lv), desc="eta sweep", unit="point")
    try:
        return {name: _sweep_one(m, batches, lv, kind, target, n_chips, group_size, chip_offset, bar)
                for name, m in models.items()}
    finally:
        if bar is not None:
            bar.close()


def train_infer_grid(models_by_train_eta: Mapping[float, nn.Module], data,
                     infer_etas: Sequence[float], *, n_chips: int = 10, group_size=None,
                     chip_offset: int = 0, batch_size: int = 256,
                     progress: bool = False) -> Dict[str, object]:
    """Mean accuracy of each model (trained at η_train) at each inference η.

    Returns ``{"train_etas": [...], "infer_etas": [...], "mean": [[...]], "half_width": [[...]],
    "std": [[...]]}`` with rows = training η (sorted), columns = inference η.
    """
    if not models_by_train_eta:
        raise ValueError("models_by_train_eta: expected at least one {train_eta: model}")
    train = sorted(float(k) for k in models_by_train_eta)
    by = {float(k): m for k, m in models_by_train_eta.items()}
    sweep = eta_sweep({t: by[t] for t in train}, data, infer_etas, n_chips=n_chips,
                      group_size=group_size, chip_offset=chip_offset, batch_size=batch_size,
                      progress=progress)
    return {"train_etas": train, "infer_etas": [float(e) for e in infer_etas],
            "mean": [[r["mean"] for r in sweep[t]] for t in train],
            "std": [[r["std"] for r in sweep[t]] for t in train],
            "half_width": [[r["half_width"] for r in sweep[t]] for t in train],
            "n_chips": n_chips}
