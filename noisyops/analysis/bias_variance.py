"""Bias/variance decomposition of the loss under weight noise (Noisy Machines eq. 1-5).

Default, ``loss="squared"`` (the paper's eq. 1-5): for a test sample ``(x, y)`` with one-hot label
``y ∈ {0,1}^C`` and ``n`` noise instances (chips) ``i = 1..n`` with softmax output vectors
``f_i(x) = softmax(f(x; W + N_i))``, around the *arithmetic mean* ``f̄(x) = (1/n)·Σ_i f_i(x)``::

    l_total      = (1/n)·Σ_i (1/C)·‖f_i(x) − y‖²        expected squared error under noise
    l_bias       = (1/C)·‖f̄(x) − y‖²                    error of the mean noisy output
    l_var        = (1/n)·Σ_i (1/C)·‖f_i(x) − f̄(x)‖²     spread of the instances around f̄
    l_total      = l_bias + l_var                         (exact: the cross term averages to 0)
    l_pretrained = (1/C)·‖f(E[W]; x) − y‖²               the noise-free network

averaged over the ``C`` outputs (the paper's mean over the 10 softmax coordinates) and over the test
samples. Without noise every ``f_i = f(E[W]; x)``, so ``l_var = 0`` and ``l_bias = l_pretrained``.

``loss="log"``: the log-loss (Heskes 1998) decomposition of the expected cross-entropy around the
*normalised geometric mean* ``p̄(c) ∝ exp((1/n)·Σ_i log p_i(c))``::

    l_total = (1/n)·Σ_i −log p_i(y),  l_bias = −log p̄(y),  l_var = (1/n)·Σ_i KL(p̄ ‖ p_i) = −log Z,
    l_pretrained = −log p_0(y),       l_total = l_bias + l_var (exact).

Everything is computed in float64 from the logits. The noise strength is reported as ``σ_N/σ_W``:
the noise std over the std of the layer's weights; for a layer with ``w_range = None`` (noise
referenced to ``±2·std(W)``) ``σ_N = η·4·std(W)`` so ``η = ratio / 4``; with ``w_range = k``,
``η = ratio / (2k)``; with a fixed ``(lo, hi)``, ``η = ratio·std(W) / (hi − lo)`` (`eta_for_ratio`).

RNG contract: instances are chips ``chip_offset..chip_offset+n-1`` (per_instance), so a run is
deterministic and the same chips are used at every ratio.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..evaluation import as_batches, default_chip_forward, noise_disabled, resolve_group_size
from ._common import check_levels, configs_restored, noisy_layers, quiet

__all__ = ["crossover_ratio", "decompose", "decompose_squared", "decompose_log_loss", "eta_for_ratio", "bias_variance",
           "bias_variance_sweep", "LossTerms", "LOSSES"]

LOSSES = ("squared", "log")


@dataclasses.dataclass
class LossTerms:
    """Sums of the per-sample terms (divide by ``n_samples`` for means: `means`)."""

    l_total: float = 0.0
    l_bias: float = 0.0
    l_var: float = 0.0
    l_pretrained: float = 0.0
    n_samples: int = 0

    def add(self, other: "LossTerms") -> "LossTerms":
        return LossTerms(self.l_total + other.l_total, self.l_bias + other.l_bias,
                         self.l_var + other.l_var, self.l_pretrained + other.l_pretrained,
                         self.n_samples + other.n_samples)

    def means(self) -> Dict[str, float]:
        n = max(self.n_samples, 1)
        return {"l_total": self.l_total / n, "l_bias": self.l_bias / n, "l_var": self.l_var / n,
                "l_pretrained": self.l_pretrained / n, "n_samples": self.n_samples}


def decompose(noisy_logits: Tensor, targets: Tensor, clean_logits: Tensor = None, *,
              loss: str = "squared") -> LossTerms:
    """Eq. 1-5 on one batch: `decompose_squared` (``loss="squared"``, the paper's) or
    `decompose_log_loss` (``loss="log"``).

    Args:
        noisy_logits: ``[n, B, C]`` logits of n noise instances.
        targets: ``[B]`` int64 labels.
        clean_logits: ``[B, C]`` logits of the noise-free network (for ``l_pretrained``) or None.
        loss: ``"squared"`` or ``"log"``.
    Returns:
        `LossTerms` holding per-sample *sums* over the batch (``n_samples = B``).
    """
    if loss == "squared":
        return decompose_squared(noisy_logits, targets, clean_logits)
    if loss == "log":
        return decompose_log_loss(noisy_logits, targets, clean_logits)
    raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")


def _check_shapes(noisy_logits: Tensor, targets: Tensor):
    if noisy_logits.dim() != 3:
        raise ValueError(f"noisy_logits: expected [n, B, C], got shape {tuple(noisy_logits.shape)}")
    n, B, C = noisy_logits.shape
    if targets.shape != (B,):
        raise ValueError(f"targets: expected shape [{B}], got {tuple(targets.shape)}")
    return n, B, C


def decompose_squared(noisy_logits: Tensor, targets: Tensor, clean_logits: Tensor = None) -> LossTerms:
    """The paper's squared-error decomposition (module docstring) on one batch: softmax vectors
    ``f_i [n, B, C]`` against the one-hot labels, around the arithmetic mean ``f̄ = mean_i f_i``;
    every term is averaged over the ``C`` outputs. Returns per-sample sums (`LossTerms`)."""
    n, B, C = _check_shapes(noisy_logits, targets)
    f = torch.softmax(noisy_logits.double(), dim=-1)                      # [n, B, C]
    onehot = torch.nn.functional.one_hot(targets.long(), C).double()      # [B, C]
    fbar = f.mean(0)                                                      # [B, C]
    l_total = (f - onehot).square().mean(-1).mean(0)                      # [B]
    l_bias = (fbar - onehot).square().mean(-1)                            # [B]
    l_var = (f - fbar).square().mean(-1).mean(0)                          # [B]
    l_pre = 0.0
    if clean_logits is not None:
        f0 = torch.softmax(clean_logits.double(), dim=-1)
        l_pre = float((f0 - onehot).square().mean(-1).sum())
    return LossTerms(float(l_total.sum()), float(l_bias.sum()), float(l_var.sum()), l_pre, B)


def decompose_log_loss(noisy_logits: Tensor, targets: Tensor, clean_logits: Tensor = None) -> LossTerms:
    """The log-loss (Heskes) decomposition (module docstring) on one batch, around the normalised
    geometric mean of the instances' softmax outputs. Returns per-sample sums (`LossTerms`)."""
    n, B, C = _check_shapes(noisy_logits, targets)
    logp = torch.log_softmax(noisy_logits.double(), dim=-1)             # [n, B, C]
    m = logp.mean(0)                                                   # [B, C] mean log p_i
    log_z = torch.logsumexp(m, dim=-1)                                 # [B]
    log_pbar = m - log_z.unsqueeze(-1)                                 # [B, C]
    idx = targets.view(1, B, 1).expand(n, B, 1)
    l_total = -logp.gather(-1, idx).squeeze(-1).mean(0)                # [B]
    l_bias = -log_pbar.gather(-1, targets.view(B, 1)).squeeze(-1)      # [B]
    pbar = log_pbar.exp()
    kl = (pbar.unsqueeze(0) * (log_pbar.unsqueeze(0) - logp)).sum(-1)  # [n, B]
    l_var = kl.mean(0)                                                 # [B]  (= -log Z)
    l_pre = 0.0
    if clean_logits is not None:
        lp0 = torch.log_softmax(clean_logits.double(), dim=-1)
        l_pre = float(-lp0.gather(-1, targets.view(B, 1)).sum())
    return LossTerms(float(l_total.sum()), float(l_bias.sum()), float(l_var.sum()), l_pre, B)


def eta_for_ratio(module: nn.Module, ratio: float) -> float:
    """η that gives noise std ``σ_N = ratio·std(W)`` on this layer (module docstring)."""
    w_range = module.config.w_range
    if w_range is None:
        return ratio / 4.0
    if isinstance(w_range, float):
        return ratio / (2.0 * w_range)
    lo, hi = w_range
    return ratio * float(module.weight.detach().double().std()) / (hi - lo)


@torch.no_grad()
def bias_variance(model: nn.Module, data, ratio: float, *, n_instances: int = 100,
                  group_size=None, chip_offset: int = 0, batch_size: int = 256,
                  chip_forward=None, loss: str = "squared") -> Dict[str, float]:
    """Mean ``l_total, l_bias, l_var, l_pretrained`` at noise ``σ_N/σ_W = ratio`` on every layer
    (additive weight noise only; other noise sources off) over ``n_instances`` chips and all of
    ``data``; ``loss`` = ``"squared"`` (the paper's eq. 1-5, default) or ``"log"`` (log-loss,
    Heskes). Configs are restored on return."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    forward = chip_forward or default_chip_forward
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    group_size = resolve_group_size(group_size, batches)
    was_training = model.training
    model.eval()
    total = LossTerms()
    try:
        with configs_restored(model) as layers:
            for _, m in layers:
                m.config = quiet(m.config).replace(eta=eta_for_ratio(m, ratio))
                m.noise_enabled = True
            for x, y in batches:
                with noise_disabled(model):
                    clean = model(x)
                outs = []
                for off in range(0, n_instances, group_size):
                    k = min(group_size, n_instances - off)
                    outs.append(forward(model, x, k, chip_offset + off))
                total = total.add(decompose(torch.cat(outs, 0), y, clean, loss=loss))
    finally:
        model.train(was_training)
    out = total.means()
    out.update(ratio=float(ratio), n_instances=n_instances, loss=loss)
    return out


def bias_variance_sweep(model: nn.Module, data, ratios: Sequence[float], *, n_instances: int = 100,
                        group_size=None, chip_offset: int = 0, batch_size: int = 256,
                        progress: bool = False, loss: str = "squared") -> List[Dict[str, float]]:
    """`bias_variance` at every ``σ_N/σ_W`` in ``ratios``; one dict per ratio."""
    rs = check_levels(ratios, name="ratios")
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    noisy_layers(model)
    it = rs
    if progress:
        from ..progress import progress_iter
        it = progress_iter(rs, desc="bias/variance", unit="ratio")
    return [bias_variance(model, batches, r, n_instances=n_instances, group_size=group_size,
                          chip_offset=chip_offset, loss=loss) for r in it]


def crossover_ratio(rows: Sequence[Dict[str, float]]) -> Optional[float]:
    """The ``σ_N/σ_W`` where ``l_var`` first overtakes ``l_bias`` in a sweep (rows sorted by
    ``ratio``): linear interpolation of ``d = l_var − l_bias`` between the last grid point with
    ``d <= 0`` and the first with ``d > 0``; None if ``l_var`` never overtakes on the grid."""
    prev = None
    for r in rows:
        d = r["l_var"] - r["l_bias"]
        if d > 0:
            if prev is None:
                return float(r["ratio"])
            (r0, d0) = prev
            return float(r0 + (r["ratio"] - r0) * (-d0) / (d - d0))
        prev = (r["ratio"], d)
    return None
