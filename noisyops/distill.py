"""Noise injection with distillation: the loss of Noisy Machines (Zhou et al. 2020), eq. 10.

    L = CE(z_s, y) + α·T²·CE(softmax(z_t/T), softmax(z_s/T))  [+ weight decay]

``z_s`` are the logits of the noisy student, ``z_t`` those of the clean teacher, ``T`` the
temperature and ``α`` the weight of the distillation term. The second term is the cross-entropy
of the student's softened distribution against the teacher's softened distribution,
``−Σ_c softmax(z_t/T)_c · log softmax(z_s/T)_c``; it equals ``KL(p_t ‖ p_s) + H(p_t)``, i.e. the
KL divergence plus a constant that does not depend on the student, so both give the same
gradients. We return the cross-entropy form (the paper's formula, as written) so the reported loss
value matches a hand computation of eq. 10. ``T²`` keeps the gradient scale of the soft term
independent of ``T`` (Hinton et al. 2015).

Weight decay is NOT part of this function: the training code applies it through the optimizer
(``torch.optim.SGD(..., weight_decay=wd)``, which adds ``wd·W`` to every gradient, the gradient of
``wd/2·‖W‖²``). `l2_penalty` gives the explicit term for users who prefer to add it to the loss.

``α = 0`` (or ``teacher_logits=None``) gives plain noise-injection training: ``CE(z_s, y)``.
No randomness is involved here (the noise lives in the student's layers).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["distillation_loss", "DistillationLoss", "soft_cross_entropy", "l2_penalty"]


def _check_float(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: expected a finite float")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name}={value!r}: expected a finite float {'> 0' if positive else '>= 0'}")
    return v


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0,
                       reduction: str = "mean") -> Tensor:
    """``CE(softmax(z_t/T), softmax(z_s/T)) = −Σ_c p_t,c · log p_s,c`` per sample.

    Args:
        student_logits: ``[N, C]`` (gradients flow into it).
        teacher_logits: ``[N, C]`` (detached: the teacher is not trained).
        T: temperature > 0.
        reduction: ``"mean"`` over the N samples, ``"sum"`` or ``"none"`` (``[N]``).
    """
    T = _check_float("T", T, positive=True)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)}: expected the same [N, C] shape")
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)
    pt = F.softmax(teacher_logits.detach().float() / T, dim=1)
    per_sample = -(pt * log_ps).sum(dim=1)
    return _reduce(per_sample, reduction)


def _reduce(v: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")


def distillation_loss(student_logits: Tensor, targets: Tensor, teacher_logits: Optional[Tensor] = None,
                      *, T: float = 6.0, alpha: float = 1.0, reduction: str = "mean") -> Tensor:
    """Noisy Machines eq. 10 without the weight-decay term (applied by the optimizer).

    ``L = CE(z_s, y) + α·T²·CE(softmax(z_t/T), softmax(z_s/T))``, averaged over the batch.

    Args:
        student_logits: ``[N, C]`` logits of the (noisy) student.
        targets: ``[N]`` int64 class labels.
        teacher_logits: ``[N, C]`` logits of the clean teacher, or None (then only the CE term; so
            is ``alpha == 0``: plain noise injection).
        T: temperature > 0 (paper default 6).
        alpha: weight >= 0 of the distillation term (paper default 1).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample ``[N]``).
    """
    T = _check_float("T", T, positive=True)
    alpha = _check_float("alpha", alpha, positive=False)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits: expected [N, C], got shape {tuple(student_logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != student_logits.shape[0]:
        raise ValueError(f"targets: expected shape [{student_logits.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected int64 class labels, got {targets.dtype}")
    ce = F.cross_entropy(student_logits.float(), targets.long(), reduction="none")
    if teacher_logits is None or alpha == 0.0:
        return _reduce(ce, reduction)
    soft = soft_cross_entropy(student_logits, teacher_logits, T, reduction="none")
    return _reduce(ce + alpha * T * T * soft, reduction)


class DistillationLoss(nn.Module):
    """Module form of `distillation_loss`: ``DistillationLoss(T=6, alpha=1)(z_s, y, z_t)``."""

    def __init__(self, T: float = 6.0, alpha: float = 1.0):
        super().__init__()
        self.T = _check_float("T", T, positive=True)
        self.alpha = _check_float("alpha", alpha, positive=False)

    def forward(self, student_logits: Tensor, targets: Tensor, teacher_logits: Optional[Tensor] = None):
        return distillation_loss(student_logits, targets, teacher_logits, T=self.T, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"T={self.T}, alpha={self.alpha}"


def l2_penalty(params: Iterable[Tensor], weight_decay: float) -> Tensor:
    """Explicit weight-decay term ``wd/2 · Σ‖W‖²`` (its gradient ``wd·W`` equals SGD's weight_decay).

    Use either this or the optimizer's ``weight_decay``, never both.
    """
    wd = _check_float("weight_decay", weight_decay, positive=False)
    params = [p for p in params]
    if not params:
        return torch.zeros(())
    return 0.5 * wd * sum((p.float() ** 2).sum() for p in params)
