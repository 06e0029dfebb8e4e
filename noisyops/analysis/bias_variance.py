"""Bias/variance decomposition of the expected loss under weight noise (Noisy Machines eq. 1-5).

For a test sample ``(x, y)`` and ``n`` noise instances (chips) ``i = 1..n`` with softmax outputs
``p_i = softmax(f(x; W + N_i))`` the expected cross-entropy splits exactly into a bias and a variance
term (Heskes 1998, the decomposition for log-loss that the paper uses), around the *normalised
geometric mean* of the noisy outputs::

    p̄(c)     = exp( (1/n)·Σ_i log p_i(c) ) / Z,     Z = Σ_c exp( (1/n)·Σ_i log p_i(c) )
    l_total   = (1/n)·Σ_i −log p_i(y)                 expected loss under noise
    l_bias    = −log p̄(y)                            loss of the "average" noisy network
    l_var     = (1/n)·Σ_i KL(p̄ ‖ p_i) = −log Z       spread of the noisy networks around p̄
    l_total   = l_bias + l_var                        (exact, for every sample)
    l_pretrained = −log p_0(y)                        the noise-free network

All four are averaged over the test samples. They are computed in float64 from ``log_softmax`` of
the logits. The noise strength is reported as ``σ_N/σ_W``: the noise std over the std of the layer's
weights; for a layer with ``w_range = None`` (noise referenced to ``±2·std(W)``) ``σ_N = η·4·std(W)``
so ``η = ratio / 4``; with ``w_range = k``, ``η = ratio / (2k)``; with a fixed ``(lo, hi)``,
``η = ratio·std(W) / (hi − lo)`` (`eta_for_ratio`).

RNG contract: instances are chips ``chip_offset..chip_offset+n-1`` (per_instance), so a run is
deterministic and the same chips are used at every ratio.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..evaluation import as_batches, default_chip_forward, noise_disabled, resolve_group_size
from ._common import check_levels, configs_restored, noisy_layers, quiet

__all__ = ["decompose", "eta_for_ratio", "bias_variance", "bias_variance_sweep", "LossTerms"]


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


def decompose(noisy_logits: Tensor, targets: Tensor, clean_logits: Tensor = None) -> LossTerms:
    """Eq. 1-5 on one batch.

    Args:
        noisy_logits: ``[n, B, C]`` logits of n noise instances.
        targets: ``[B]`` int64 labels.
        clean_logits: ``[B, C]`` logits of the noise-free network (for ``l_pretrained``) or None.
    Returns:
        `LossTerms` holding per-sample *sums* over the batch (``n_samples = B``).
    """
    if noisy_logits.dim() != 3:
        raise ValueError(f"noisy_logits: expected [n, B, C], got shape {tuple(noisy_logits.shape)}")
    n, B, C = noisy_logits.shape
    if targets.shape != (B,):
        raise ValueError(f"targets: expected shape [{B}], got {tuple(targets.shape)}")
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
def bias_variance(model: nn.Module, data, ratio: float, *, n_instances: int = 20,
                  group_size=None, chip_offset: int = 0, batch_size: int = 256,
                  chip_forward=None) -> Dict[str, float]:
    """Mean ``l_total, l_bias, l_var, l_pretrained`` at noise ``σ_N/σ_W = ratio`` on every layer
    (additive weight noise only; other noise sources off). Configs are restored on return."""
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
                total = total.add(decompose(torch.cat(outs, 0), y, clean))
    finally:
        model.train(was_training)
    out = total.means()
    out.update(ratio=float(ratio), n_instances=n_instances)
    return out


def bias_variance_sweep(model: nn.Module, data, ratios: Sequence[float], *, n_instances: int = 20,
                        group_size=None, chip_offset: int = 0, batch_size: int = 256,
                        progress: bool = False) -> List[Dict[str, float]]:
    """`bias_variance` at every ``σ_N/σ_W`` in ``ratios``; one dict per ratio."""
    rs = check_levels(ratios, name="ratios")
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    noisy_layers(model)
    it = rs
    if progress:
        from ..progress import progress_iter
        it = progress_iter(rs, desc="bias/variance", unit="ratio")
    return [bias_variance(model, batches, r, n_instances=n_instances, group_size=group_size,
                          chip_offset=chip_offset) for r in it]
