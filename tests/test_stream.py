"""The noise stream (SPEC section 3): known answers, cross-backend agreement, statistics."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from noisyops import stream
from noisyops._ext import cpu as cpu_ext

KAT = [  # Random123 kat_vectors for philox4x32_10: counter ; key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
STREAMS = [  # (seed, layer_key, purpose, instance)
    (0, 0, 0, 0), (12345, 3, 1, 7), (2**64 - 1, 2**29, 2, 2**40 + 3), (2**33 + 5, 1, 0, 2**63 - 1)]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 ulps (monotone integer mapping of the bit patterns)."""
    ia = a.contiguous().view(torch.int32).to(torch.int64)
    ib = b.contiguous().view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = stream.philox4x32_10(*counter, *key)
    assert tuple(int(w) for w in out) == expected


def test_uniform_mapping_matches_spec_formula():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 123456789], dtype=torch.int64)
    u = stream.uint_to_uniform(words)
    for w, got in zip(words.tolist(), u.tolist()):
        x = w - 2**32 if w >= 2**31 else w
        x = -x - 1 if x < 0 else x
        want = np.float32(np.float32(x) * np.float32(4.6566127342e-10))
        assert np.float32(got) == want
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_element_takes_lane_of_its_group():
    seed, key, purpose, inst = 99, 5, 2, 11
    e = torch.arange(64)
    words = stream.counter_words(seed, key, purpose, inst, e >> 2)
    n01 = stream.box_muller(stream.uint_to_uniform(words[0]), stream.uint_to_uniform(words[1]))
    n23 = stream.box_muller(stream.uint_to_uniform(words[2]), stream.uint_to_uniform(words[3]))
    lanes = torch.stack([n01[0], n01[1], n23[0], n23[1]], -1)
    want = lanes[e, e % 4]
    assert torch.equal(stream.normals_at(seed, key, purpose, inst, e), want)


needs_cpu_ext = pytest.mark.skipif(cpu_ext()[0] is None, reason=cpu_ext()[1])


@needs_cpu_ext
@pytest.mark.parametrize("seed,key,purpose,inst", STREAMS)
def test_cpp_stream_bit_identical_words_and_uniforms(seed, key, purpose, inst):
    C = cpu_ext()[0]
    n = 4099
    e = torch.arange(n)
    ref_words = torch.stack(stream.counter_words(seed, key, purpose, inst, e >> 2), -1)[e, e % 4]
    assert torch.equal(C.stream_words(seed, key, purpose, inst, n), ref_words)
    assert torch.equal(C.stream_uniforms(seed, key, purpose, inst, n),
                       stream.uniforms_at(seed, key, purpose, inst, e))


@needs_cpu_ext
@pytest.mark.parametrize("seed,key,purpose,inst", STREAMS)
def test_cpp_stream_normals_within_ulps(seed, key, purpose, inst):
    C = cpu_ext()[0]
    n = 100_003
    got = C.stream_normals(seed, key, purpose, inst, n)
    want = stream.normals(seed, key, purpose, inst, n)
    # log/sqrt/cos are not correctly rounded alike everywhere: a few ulp, or 1e-5 relative near 0
    ok = (ulp_distance(got, want) <= 8) | ((got - want).abs() <= 1e-5 * want.abs().clamp_min(1e-3))
    assert bool(ok.all()), f"max ulp distance {int(ulp_distance(got, want).max())}"


def test_triton_randn4x_equals_stream_with_zero_instance():
    """SPEC: with instance = layer_key = purpose = 0 the stream is tl.randn4x(seed, e >> 2).
    Runs under the Triton interpreter in a subprocess (TRITON_INTERPRET is read at import)."""
    pytest.importorskip("triton")
    code = r"""
import torch, triton, triton.language as tl
from noisyops import stream
@triton.jit
def k(out, seed, N: tl.constexpr):
    off = tl.arange(0, N)
    a, b, c, d = tl.randn4x(seed, off)
    tl.store(out + off * 4, a); tl.store(out + off * 4 + 1, b)
    tl.store(out + off * 4 + 2, c); tl.store(out + off * 4 + 3, d)
o = torch.empty(256)
k[(1,)](o, 987654321, 64)
r = stream.normals(987654321, 0, 0, 0, 256)
assert ((o - r).abs() <= 1e-5 * r.abs().clamp_min(1e-2)).all(), (o - r).abs().max()
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- statistics --------------------------------------------------------------------------------
N_STAT = 400_000


def test_normals_mean_variance_and_shape():
    n = stream.normals(2024, 1, 0, 0, N_STAT).double()
    se = 1 / np.sqrt(N_STAT)
    assert abs(float(n.mean())) < 5 * se
    assert abs(float(n.var()) - 1) < 5 * np.sqrt(2) * se
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.kstest(n.numpy(), "norm").pvalue > 1e-4


def test_uniforms_are_uniform():
    u = stream.uniforms_at(7, 0, 0, 0, torch.arange(N_STAT)).double()
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = N_STAT / 16
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 60  # chi2(15) exceeds 60 with p ~ 1e-7


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_neighbouring_elements_uncorrelated():
    n = stream.normals(5, 2, 0, 3, N_STAT)
    bound = 5 / np.sqrt(N_STAT)
    for lag in (1, 2, 3, 4, 5):
        assert abs(_corr(n[:-lag], n[lag:])) < bound, lag


@pytest.mark.parametrize("other", [(5, 3, 0, 3), (5, 2, 1, 3), (5, 2, 0, 4), (6, 2, 0, 3),
                                   (5, 2, 0, 3 + 2**32), (5 + 2**32, 2, 0, 3)])
def test_streams_independent_across_layers_purposes_instances_seeds(other):
    base = stream.normals(5, 2, 0, 3, N_STAT // 4)
    alt = stream.normals(*other, N_STAT // 4)
    assert not torch.equal(base, alt)
    assert abs(_corr(base, alt)) < 5 / np.sqrt(N_STAT // 4)
