"""The Noisy Machines eq. 10 loss against a hand computation in plain Python floats."""
import math

import pytest
import torch

from noisyops.distill import DistillationLoss, distillation_loss, l2_penalty, soft_cross_entropy


def _softmax(v, T=1.0):
    m = max(x / T for x in v)
    e = [math.exp(x / T - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _hand(zs, y, zt, T, alpha):
    """(1/N)·Σ_n [ −log softmax(zs_n)_{y_n} − α·T²·Σ_c softmax(zt_n/T)_c·log softmax(zs_n/T)_c ]."""
    total = 0.0
    for s, lab, t in zip(zs, y, zt):
        ce = -math.log(_softmax(s)[lab])
        pt, ps = _softmax(t, T), _softmax(s, T)
        soft = -sum(a * math.log(b) for a, b in zip(pt, ps))
        total += ce + alpha * T * T * soft
    return total / len(zs)


ZS = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, -1.5, 0.0, 4.0]]
ZT = [[3.0, -2.0, 1.0, 0.5], [0.0, 0.0, 5.0, -1.0], [1.0, -3.0, 0.5, 2.0]]
Y = [0, 2, 1]


@pytest.mark.parametrize("T,alpha", [(6.0, 1.0), (1.0, 1.0), (2.5, 0.3), (6.0, 0.0)])
def test_matches_hand_computation(T, alpha):
    got = distillation_loss(torch.tensor(ZS, dtype=torch.float64), torch.tensor(Y),
                            torch.tensor(ZT, dtype=torch.float64), T=T, alpha=alpha)
    # the loss computes in float32: tolerance tied to float32 eps times the magnitude
    want = _hand(ZS, Y, ZT, T, alpha)
    assert got.item() == pytest.approx(want, rel=8 * torch.finfo(torch.float32).eps)


def test_alpha_zero_and_no_teacher_are_plain_cross_entropy():
    zs, y = torch.tensor(ZS), torch.tensor(Y)
    ce = torch.nn.functional.cross_entropy(zs, y)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(distillation_loss(zs, y, None), ce, rtol=4 * eps, atol=0)
    torch.testing.assert_close(distillation_loss(zs, y, torch.tensor(ZT), alpha=0.0), ce, rtol=4 * eps, atol=0)


def test_soft_term_is_kl_plus_teacher_entropy_and_gradient_matches_kl():
    torch.manual_seed(0)
    zs = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 7, dtype=torch.float64)
    T = 3.0
    soft = soft_cross_entropy(zs, zt, T)
    pt = torch.softmax(zt / T, 1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs / T, 1), pt, reduction="batchmean")
    ent = -(pt * torch.log(pt)).sum(1).mean()
    assert soft.item() == pytest.approx((kl + ent).item(), rel=1e-5)
    g1, = torch.autograd.grad(soft, zs)
    g2, = torch.autograd.grad(kl, zs)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-7)


def test_teacher_gets_no_gradient_and_module_form():
    zs = torch.tensor(ZS, requires_grad=True)
    zt = torch.tensor(ZT, requires_grad=True)
    loss = DistillationLoss(T=6.0, alpha=1.0)(zs, torch.tensor(Y), zt)
    loss.backward()
    assert zt.grad is None and zs.grad is not None
    assert loss.item() == pytest.approx(_hand(ZS, Y, ZT, 6.0, 1.0), rel=1e-5)


def test_l2_penalty_gradient_equals_sgd_weight_decay():
    w = torch.randn(3, 4, requires_grad=True)
    l2_penalty([w], 5e-4).backward()
    torch.testing.assert_close(w.grad, 5e-4 * w.detach())


@pytest.mark.parametrize("kw,exc", [({"T": 0.0}, ValueError), ({"T": float("nan")}, ValueError),
                                    ({"alpha": -1.0}, ValueError), ({"T": "6"}, TypeError),
                                    ({"reduction": "avg"}, ValueError)])
def test_bad_arguments(kw, exc):
    with pytest.raises(exc):
        distillation_loss(torch.tensor(ZS), torch.tensor(Y), torch.tensor(ZT), **kw)


def test_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        distillation_loss(torch.tensor(ZS), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(torch.tensor(ZS), torch.tensor(Y), torch.zeros(3, 5))
    with pytest.raises(TypeError, match="targets"):
        distillation_loss(torch.tensor(ZS), torch.tensor([0.0, 1.0, 2.0]))
