"""Mutual information between input and output under noise by binning (Noisy Machines eq. 6-7).

Estimator (`binned_mutual_information`): each output coordinate ``d`` is discretized into ``bins``
equal-width bins (default four) whose edges span ``[min_d, max_d]`` of the *noise-free* outputs over
the test inputs (`bin_edges`; values outside fall into the end bins). An output vector becomes the
code ``T = (bin_1, .., bin_D)``. With ``N`` inputs and ``R`` noisy repeats per input (chips), every
pair ``(x_j, r)`` gives one code ``T_jr`` and, in bits::

    H(T)     = −Σ_t p(t)·log2 p(t),        p(t) = #{(j, r): T_jr = t} / (N·R)
    H(T|X)   = (1/N)·Σ_j H(T | X = x_j),   from the R codes of input j
    I(X; T)  = H(T) − H(T|X)

A noise-free network is deterministic (``H(T|X) = 0``), so its MI is ``H(T)`` of the clean codes;
`mutual_information_sweep` reports ``I_noisy / I_clean`` (normalised MI, 1 = no information lost).
Outputs are the softmax probabilities by default (``output="logits"`` uses the logits). Note the
plug-in estimate is biased by finite N and R (``H(T) ≤ log2(N·R)``); quote N and R with a result.

RNG contract: repeats are chips ``chip_offset..chip_offset+R-1`` (per_instance), deterministic.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..evaluation import as_batches, default_chip_forward, noise_disabled, resolve_group_size
from ._common import check_kind_target, check_levels, configs_restored, noisy_layers, set_noise

__all__ = ["level_at_fraction", "bin_edges", "discretize", "entropy_bits", "binned_mutual_information",
           "collect_outputs", "mutual_information_sweep"]


def bin_edges(clean_outputs: Tensor, bins: int = 4) -> Tensor:
    """Interior edges ``[D, bins-1]``: ``min_d + (max_d − min_d)·b/bins``, b = 1..bins-1, per coordinate
    of ``clean_outputs [N, D]``."""
    if clean_outputs.dim() != 2:
        raise ValueError(f"clean_outputs: expected [N, D], got shape {tuple(clean_outputs.shape)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins={bins!r}: expected an int >= 2")
    x = clean_outputs.double()
    lo, hi = x.min(0).values, x.max(0).values
    frac = torch.arange(1, bins, dtype=torch.float64) / bins
    return lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * frac.unsqueeze(0)


def discretize(outputs: Tensor, edges: Tensor) -> Tensor:
    """Bin index per coordinate: ``outputs [..., D]`` -> int64 ``[..., D]`` in ``0..bins-1``
    (``#{edges_d < v}``; a value equal to an edge goes to the lower bin)."""
    D = edges.shape[0]
    if outputs.shape[-1] != D:
        raise ValueError(f"outputs: last dim {outputs.shape[-1]} != {D} coordinates of edges")
    v = outputs.double().unsqueeze(-1)                                  # [..., D, 1]
    return (v > edges.to(v.device)).sum(-1).to(torch.int64)


def entropy_bits(codes: Tensor) -> float:
    """Plug-in entropy in bits of the rows of ``codes [M, D]`` (each row one symbol)."""
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def binned_mutual_information(codes: Tensor) -> Dict[str, float]:
    """``I(X;T) = H(T) − H(T|X)`` in bits from bin codes ``[N, R, D]`` (N inputs, R repeats).

    Returns ``{"mi", "h_t", "h_t_given_x"}``.
    """
    if codes.dim() != 3:
        raise ValueError(f"codes: expected [N, R, D] bin indices, got shape {tuple(codes.shape)}")
    N, R, D = codes.shape
    # one integer symbol per code row, shared across inputs
    _, sym = torch.unique(codes.reshape(N * R, D), dim=0, return_inverse=True)
    sym = sym.view(N, R)
    counts = torch.bincount(sym.flatten()).double()
    p = counts[counts > 0] / (N * R)
    h_t = float(-(p * p.log2()).sum())
    # H(T | X = x_j) from the counts of each (input j, symbol) pair, summed over j
    S = int(sym.max()) + 1
    pair = torch.arange(N, dtype=torch.int64).unsqueeze(1) * S + sym
    _, c = torch.unique(pair, return_counts=True)
    q = c.double() / R
    h_tx = float(-(q * q.log2()).sum()) / N
    return {"mi": h_t - h_tx, "h_t": h_t, "h_t_given_x": h_tx}


def _transform(logits: Tensor, output: str) -> Tensor:
    if output == "softmax":
        return torch.softmax(logits.double(), dim=-1)
    if output == "logits":
        return logits.double()
    raise ValueError(f"output={output!r}: expected 'softmax' or 'logits'")


@torch.no_grad()
def collect_outputs(model: nn.Module, batches, n_repeats: int, *, output: str = "softmax",
                    group_size=None, chip_offset: int = 0, chip_forward=None) -> Tensor:
    """Noisy outputs ``[N, R, D]``: every input through chips ``chip_offset..chip_offset+R-1``."""
    forward = chip_forward or default_chip_forward
    group_size = resolve_group_size(group_size, batches)
    res = []
    for x, _ in batches:
        outs = []
        for off in range(0, n_repeats, group_size):
            k = min(group_size, n_repeats - off)
            outs.append(_transform(forward(model, x, k, chip_offset + off), output))
        res.append(torch.cat(outs, 0).transpose(0, 1).cpu())                  # [B, R, D]
    return torch.cat(res, 0)


@torch.no_grad()
def mutual_information_sweep(model: nn.Module, data, levels: Sequence[float], *,
                             n_repeats: int = 20, bins: int = 4, kind: str = "additive",
                             target: str = "weights", output: str = "softmax", group_size=None,
                             chip_offset: int = 0, batch_size: int = 256,
                             progress: bool = False) -> Dict[str, object]:
    """Normalised MI ``I_noisy / I_clean`` vs noise level (noise of `kind` on every layer).

    Returns ``{"clean": {...}, "rows": [{"level", "mi", "h_t", "h_t_given_x", "normalized"}], ...}``.
    """
    check_kind_target(kind, target)
    lv = check_levels(levels)
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, int) or n_repeats < 2:
        raise ValueError(f"n_repeats={n_repeats!r}: expected an int >= 2")
    batches = data if isinstance(data, list) else as_batches(data, batch_size)
    noisy_layers(model)
    was_training = model.training
    model.eval()
    try:
        with noise_disabled(model):
            clean = torch.cat([_transform(model(x), output).cpu() for x, _ in batches], 0)
        edges = bin_edges(clean, bins)
        clean_mi = binned_mutual_information(discretize(clean, edges).unsqueeze(1))
        if clean_mi["mi"] <= 0:
            raise ValueError("the noise-free outputs fall into a single bin code: MI is 0, "
                             "nothing to normalise by (use more inputs or output='logits')")
        rows: List[dict] = []
        it = lv
        if progress:
            from ..progress import progress_iter
            it = progress_iter(lv, desc="mutual information", unit="level")
        with configs_restored(model):
            for s in it:
                set_noise(model, s, kind, target)
                out = collect_outputs(model, batches, n_repeats, output=output,
                                      group_size=group_size, chip_offset=chip_offset)
                r = binned_mutual_information(discretize(out, edges))
                r.update(level=s, normalized=r["mi"] / clean_mi["mi"])
                rows.append(r)
    finally:
        model.train(was_training)
    n = sum(int(y.numel()) for _, y in batches)
    return {"clean": clean_mi, "rows": rows, "kind": kind, "target": target, "output": output,
            "bins": bins, "n_inputs": n, "n_repeats": n_repeats}


def level_at_fraction(rows: Sequence[dict], fraction: float = 0.5) -> Optional[float]:
    """The noise level where the normalised MI first falls to ``fraction`` (rows sorted by
    ``level``), linearly interpolated between the two grid levels around it; None if it never
    falls that far on the grid."""
    prev = None
    for r in rows:
        v = r["normalized"]
        if v <= fraction:
            if prev is None:
                return float(r["level"])
            l0, v0 = prev
            return float(l0 + (r["level"] - l0) * (v0 - fraction) / (v0 - v))
        prev = (r["level"], v)
    return None
