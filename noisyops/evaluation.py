"""Repeated noisy evaluation: accuracy over n noise instances ("chips") with honest error bars.

A *chip* is one fixed noise instance of the whole network (SPEC section 2, ``per_instance``): chip
``k`` perturbs layer ``l`` with the noise stream at ``(seed_l, layer_key_l, purpose, instance=k,
element)``. Chip ``k`` therefore sees the *same* noisy weights on every batch, so its accuracy is
the accuracy of one physical analog device on the whole test set, as in the papers' repeated
evaluation. The test data are materialized once and reused by every chip. Chips can run side by
side (``group_size``): `noisyops.run_chips` repeats a batch over ``k`` chip ids and the ops evaluate
all of them in one call, which saves per-call overhead (Python, dispatch, kernel launches) but not
arithmetic; on CPU one chip per call is faster (measured, docs/evaluation.md), so the default
group size is 1 on CPU and 10 on GPU (`resolve_group_size`). Results never depend on it.

Statistics over the per-chip accuracies ``a_1..a_n`` (`summarize`):

* ``mean = (1/n)·Σ a_i``; ``std = sqrt(Σ (a_i − mean)² / (n − 1))`` (sample std, ddof = 1);
* ``sem = std / sqrt(n)``; 95% confidence interval of the mean from Student's t with n − 1 degrees
  of freedom: ``mean ± t_{0.975, n−1}·sem`` (``half_width = t·sem``).

The CI is for the *mean accuracy over chips* (the expected accuracy of a freshly made chip on this
test set); ``std`` is the chip-to-chip spread. Adaptive mode (``target_half_width``) adds chips in
groups until ``half_width < target_half_width`` (or ``n_chips`` is reached).

RNG contract: nothing random is drawn here. Results are a pure function of the model (weights,
seeds, configs), the data and the chip ids ``chip_offset .. chip_offset + n − 1``; a run repeated
with the same arguments gives identical numbers. Using the same chip ids for different η (sweeps)
gives common random numbers: each chip's ε is the same, only scaled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Tuple[Tensor, Tensor]

__all__ = ["Summary", "ChipEvalResult", "summarize", "t_quantile", "as_batches", "evaluate_chips",
           "clean_accuracy", "noise_disabled", "default_chip_forward", "resolve_group_size"]


# ---- statistics ------------------------------------------------------------------------------------
def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile ``t_{(1+confidence)/2, dof}`` (``scipy.special.stdtrit``)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a float in (0, 1)")
    if dof < 1:
        raise ValueError(f"dof={dof!r}: expected >= 1 (need at least 2 values for a t interval)")
    from scipy.special import stdtrit  # the inverse t CDF (scipy.stats.t.ppf, without its import cost)
    return float(stdtrit(dof, 0.5 + confidence / 2.0))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample std and Student-t confidence interval of n values (see module docstring)."""

    n: int
    mean: float
    std: float
    sem: float
    half_width: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Summarize values ``a_1..a_n``: mean, std (ddof=1), sem, ``mean ± t·sem`` (t with n−1 dof).

    With n = 1 the std, sem and half-width are NaN (no spread can be estimated); n = 0 raises.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("values: expected at least one value, got an empty sequence")
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"values: expected finite numbers, got {vals!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a float in (0, 1)")
    mean = math.fsum(vals) / n
    if n == 1:
        nan = float("nan")
        return Summary(1, mean, nan, nan, nan, nan, nan, confidence)
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    std = math.sqrt(var)
    sem = std / math.sqrt(n)
    hw = t_quantile(confidence, n - 1) * sem
    return Summary(n, mean, std, sem, hw, mean - hw, mean + hw, confidence)


# ---- data ------------------------------------------------------------------------------------------
def as_batches(data, batch_size: int = 256, device=None, limit: Optional[int] = None) -> List[Batch]:
    """Materialize evaluation data as a list of ``(x, y)`` batches (evaluated many times).

    ``data``: a ``(X, Y)`` pair of tensors (X ``[N, ...]``, Y ``[N]`` int64), a map-style dataset
    yielding ``(x, y)``, or an iterable of ``(x, y)`` batches (a DataLoader). ``limit`` keeps the
    first ``limit`` samples. Batches are re-cut to ``batch_size`` samples.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: expected None or an int >= 1")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"data: X has {X.shape[0]} samples but Y has {Y.shape[0]}")
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        n = len(data) if limit is None else min(limit, len(data))
        batch = None
        try:  # datasets that index by a list of ints in one go (TensorDataset, TensorImageDataset)
            batch = data[list(range(n))]
        except Exception:
            pass
        if (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, Tensor) and t.shape[:1] == (n,) for t in batch)):
            X, Y = batch
        else:
            items = [data[i] for i in range(n)]
            X = torch.stack([torch.as_tensor(it[0]) for it in items])
            Y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    else:
        xs, ys, got = [], [], 0
        for xb, yb in data:
            xs.append(xb)
            ys.append(torch.as_tensor(yb))
            got += xb.shape[0]
            if limit is not None and got >= limit:
                break
        if not xs:
            raise ValueError("data: got no batches")
        X, Y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        X, Y = X[:limit], Y[:limit]
    if X.shape[0] == 0:
        raise ValueError("data: no samples")
    Y = Y.to(torch.int64)
    if device is not None:
        X, Y = X.to(device), Y.to(device)
    return [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]


def _batches(data, batch_size: int) -> List[Batch]:
    if isinstance(data, list) and data and all(isinstance(b, tuple) and len(b) == 2 for b in data):
        return data
    return as_batches(data, batch_size)


# ---- model helpers ---------------------------------------------------------------------------------
def _noisy_layers(model: nn.Module):
    import noisyops
    return noisyops.noisy_layers(model)


@contextlib.contextmanager
def noise_disabled(model: nn.Module):
    """Context: every noisy layer runs with ``noise_enabled = False`` (η = η_mul = out_noise = 0;
    quantizers stay on). Restores each layer's previous flag on exit."""
    layers = _noisy_layers(model)
    saved = [m.noise_enabled for _, m in layers]
    try:
        for _, m in layers:
            m.noise_enabled = False
        yield model
    finally:
        for (_, m), flag in zip(layers, saved):
            m.noise_enabled = flag


def default_chip_forward(model: nn.Module, x: Tensor, k: int, chip_offset: int) -> Tensor:
    """``noisyops.run_chips(model, x, k, chip_offset=...)`` -> logits ``[k, B, C]``."""
    import noisyops
    return noisyops.run_chips(model, x, k, chip_offset=chip_offset)


@torch.no_grad()
def clean_accuracy(model: nn.Module, data, *, batch_size: int = 256, noise: bool = False) -> float:
    """Top-1 accuracy of one plain forward pass over ``data`` (noise switched off unless
    ``noise=True``; quantizers, if configured, stay on)."""
    batches = _batches(data, batch_size)
    was_training = model.training
    model.eval()
    ctx = contextlib.nullcontext() if noise else noise_disabled(model)
    correct = total = 0
    try:
        with ctx:
            for x, y in batches:
                correct += int((model(x).argmax(-1) == y).sum())
                total += y.numel()
    finally:
        model.train(was_training)
    return correct / total


# ---- repeated noisy evaluation ---------------------------------------------------------------------
@dataclasses.dataclass
class ChipEvalResult:
    """Per-chip results and their summary.

    ``accuracies[i]`` / ``losses[i]``: top-1 accuracy / mean cross-entropy of chip ``chip_ids[i]`` on
    all ``n_samples`` test samples. ``summary``: `summarize(accuracies)`. ``stopped_early``: the
    adaptive target was met before ``max_chips``.
    """

    chip_ids: List[int]
    accuracies: List[float]
    losses: List[float]
    n_samples: int
    summary: Summary
    target_half_width: Optional[float]
    stopped_early: bool
    seconds: float

    @property
    def mean(self) -> float:
        return self.summary.mean

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["summary"] = self.summary.to_dict()
        return d


def resolve_group_size(group_size: Optional[int], batches: List[Batch]) -> int:
    """``group_size``, or when None: 1 for CPU data, 10 otherwise.

    Why: chips side by side share one call (one Python/dispatch round trip, one kernel launch per
    layer, noise for all chips generated in that call), but not the arithmetic: k chips cost k times
    the FLOPs. On CPU the FLOPs dominate and a k-fold larger batch runs slower per chip
    (measured, docs/evaluation.md), so one chip per pass with a large batch is the default there;
    on GPUs, launches and small batches dominate and grouping pays.
    """
    if group_size is None:
        return 1 if batches[0][0].device.type == "cpu" else 10
    _check_int("group_size", group_size, 1)
    return group_size


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r}: expected an int >= {lo}")


@torch.no_grad()
def evaluate_chips(model: nn.Module, data, n_chips: int = 50, *, group_size: Optional[int] = None,
                   chip_offset: int = 0, target_half_width: Optional[float] = None,
                   min_chips: int = 5, confidence: float = 0.95, batch_size: int = 256,
                   progress: bool = False, desc: str = "chips",
                   chip_forward: Optional[Callable[[nn.Module, Tensor, int, int], Tensor]] = None
                   ) -> ChipEvalResult:
    """Accuracy of ``n_chips`` noise instances, each over the whole of ``data``.

    Args:
        model: a converted model (noisy layers); evaluated in eval mode, no grad.
        data: see `as_batches` (a list of ``(x, y)`` batches is used as is).
        n_chips: number of chips (the maximum in adaptive mode); chip ids are
            ``chip_offset .. chip_offset + n_chips − 1``.
        group_size: chips run side by side per forward call: the batch ``x [B, ...]`` becomes
            ``[group_size·B, ...]`` rows. Larger = fewer calls, more memory. None = automatic
            (`resolve_group_size`: 1 on CPU, 10 on GPU). Results do not depend on it.
        target_half_width: adaptive mode: after each group, stop once at least ``min_chips`` chips
            ran and the t-interval half-width of the mean accuracy is ``< target_half_width``
            (accuracy as a fraction, e.g. 0.005 = ±0.5 points).
        chip_forward: ``f(model, x, k, chip_offset) -> logits [k, B, C]``; default
            `noisyops.run_chips`.

    Returns:
        `ChipEvalResult` (per-chip accuracies and losses, `Summary`).
    """
    _check_int("n_chips", n_chips, 1)
    _check_int("chip_offset", chip_offset, 0)
    _check_int("min_chips", min_chips, 2)
    if target_half_width is not None:
        if not (isinstance(target_half_width, (int, float)) and math.isfinite(target_half_width)
                and target_half_width > 0):
            raise ValueError(f"target_half_width={target_half_width!r}: expected None or a float > 0")
    forward = chip_forward or default_chip_forward
    batches = _batches(data, batch_size)
    group_size = resolve_group_size(group_size, batches)
    n_samples = sum(int(y.numel()) for _, y in batches)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    ids: List[int] = []
    accs: List[float] = []
    losses: List[float] = []
    stopped = False
    bar = None
    if progress:
        from .progress import progress_bar
        bar = progress_bar(total=n_chips, desc=desc, unit="chip", leave=False)
    try:
        while len(ids) < n_chips:
            k = min(group_size, n_chips - len(ids))
            off = chip_offset + len(ids)
            correct = torch.zeros(k, dtype=torch.int64)
            loss_sum = torch.zeros(k, dtype=torch.float64)
            for x, y in batches:
                logits = forward(model, x, k, off)
                if logits.dim() != 3 or logits.shape[0] != k or logits.shape[1] != y.shape[0]:
                    raise ValueError(f"chip_forward returned shape {tuple(logits.shape)}: expected "
                                     f"[{k}, {y.shape[0]}, num_classes]")
                yk = y.unsqueeze(0).expand(k, -1)
                correct += (logits.argmax(-1) == yk).sum(1).cpu()
                ce = F.cross_entropy(logits.double().flatten(0, 1), yk.flatten(), reduction="none")
                loss_sum += ce.view(k, -1).sum(1).cpu()
            ids.extend(range(off, off + k))
            accs.extend((correct.double() / n_samples).tolist())
            losses.extend((loss_sum / n_samples).tolist())
            if bar is not None:
                bar.update(k)
                if len(accs) >= 2:
                    s = summarize(accs, confidence)
                    bar.set_postfix(acc=f"{s.mean:.4f}", hw=f"{s.half_width:.4f}")
            if target_half_width is not None and len(accs) >= min_chips:
                s = summarize(accs, confidence)
                if s.half_width < target_half_width:
                    stopped = len(ids) < n_chips
                    break
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return ChipEvalResult(chip_ids=ids, accuracies=accs, losses=losses, n_samples=n_samples,
                          summary=summarize(accs, confidence), target_half_width=target_half_width,
                          stopped_early=stopped, seconds=time.perf_counter() - t0)
