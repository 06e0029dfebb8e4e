"""Chip weights owned by the modules inside `noisyops.chips` (issue 12 item 4): the op keeps no
state, the store is bounded by NOISYOPS_CHIP_CACHE_MB, results are bit-identical with and
without it, and a changed weight (version counter) is never served stale."""
from __future__ import annotations

import pytest
import torch

import noisyops
from noisyops import LayerConfig
from noisyops.chip_store import STORE

CFG = LayerConfig(eta=0.05, eta_mul=0.02, in_bits=8, in_range=(-3.0, 3.0), out_bits=8,
                  out_range=(-8.0, 8.0))


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 6 * 6, 5))
    return noisyops.convert(m, CFG)


@pytest.fixture(autouse=True)
def _clean_store(backend_env):
    backend_env("cpu")
    STORE.clear()
    yield
    STORE.clear()


def _chips(model, x, k, **kw):
    with torch.no_grad():
        return noisyops.run_chips(model, x, k, **kw)


def test_store_hits_and_matches_no_store(monkeypatch):
    model, x = _model(), torch.randn(2, 3, 6, 6)
    a = _chips(model, x, 3)
    assert len(STORE) == 6 and STORE.misses == 6 and STORE.hits == 0  # 2 layers x 3 chips
    b = _chips(model, x, 3)
    assert STORE.hits == 6 and torch.equal(a, b)
    monkeypatch.setenv("NOISYOPS_CHIP_CACHE_MB", "0")
    assert torch.equal(_chips(model, x, 3), a)  # the op generating them itself: same bits
    assert torch.equal(_chips(model, x, 3, group_size=3), a)  # one forward over 3 chips


def test_weight_update_is_not_served_stale(monkeypatch):
    model, x = _model(), torch.randn(2, 3, 6, 6)
    a = _chips(model, x, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # bumps _version, as optimizer.step() does
    b = _chips(model, x, 2)
    monkeypatch.setenv("NOISYOPS_CHIP_CACHE_MB", "0")
    assert torch.equal(b, _chips(model, x, 2)) and not torch.equal(a, b)


def test_budget(monkeypatch):
    model, x = _model(), torch.randn(2, 3, 6, 6)
    monkeypatch.setenv("NOISYOPS_CHIP_CACHE_MB", "0")
    _chips(model, x, 2)
    assert len(STORE) == 0
    # one chip per forward on the CPU: a conv entry is 8·3·3·3·4 = 864 B, a linear one 5·288·4 = 5760 B
    monkeypatch.setenv("NOISYOPS_CHIP_CACHE_MB", str(2000 / 2**20))
    _chips(model, x, 2)
    assert len(STORE) == 2 and STORE.nbytes == 2 * 864  # both conv chips; the linear ones do not fit


def test_functional_per_instance_keeps_no_state():
    """A pure op: nothing is cached for functional calls, whatever the weights do."""
    x, w = torch.randn(2, 3, 6, 6), 0.3 * torch.randn(4, 3, 3, 3)
    cfg = CFG.replace(sampling="per_instance", w_range=(-1.0, 1.0))
    ids = torch.tensor([0, 1])
    noisyops.functional.noisy_conv2d(x, w, config=cfg, seed=1, instance=ids)
    assert len(STORE) == 0
