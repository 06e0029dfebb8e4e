"""Matplotlib figures (Agg backend, PNG) for the evaluation and analysis results.

Every function takes the result structure of the matching analysis function, writes one PNG to
``path`` (parent folders created) and returns ``path``. Nothing is shown on screen.
"""
from __future__ import annotations

import math
import os
from typing import List, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_chip_accuracies", "plot_eta_sweep", "plot_heatmap", "plot_bias_variance",
           "plot_mutual_information", "plot_walking_curves", "plot_walking_midpoints"]


def _save(fig, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _err(rows: List[dict], lo="ci_low", hi="ci_high", mid="mean"):
    m = [r[mid] for r in rows]
    lo_ = [max(r[mid] - r[lo], 0.0) if _finite(r[lo]) else 0.0 for r in rows]
    hi_ = [max(r[hi] - r[mid], 0.0) if _finite(r[hi]) else 0.0 for r in rows]
    return m, [lo_, hi_]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def plot_chip_accuracies(result: dict, path: str, title: str = "Accuracy per chip") -> str:
    """Histogram of per-chip accuracies with the mean and its 95% CI (`ChipEvalResult.to_dict()`)."""
    accs = [100 * a for a in result["accuracies"]]
    s = result["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(accs, bins=min(30, max(5, len(accs) // 2)), color="#4c72b0", alpha=0.8)
    ax.axvline(100 * s["mean"], color="k", lw=1.5, label=f"mean {100 * s['mean']:.2f}%")
    if _finite(s["ci_low"]):
        ax.axvspan(100 * s["ci_low"], 100 * s["ci_high"], color="orange", alpha=0.3,
                   label=f"{int(100 * s['confidence'])}% CI ±{100 * s['half_width']:.2f}")
    ax.set_xlabel("test accuracy of one chip (%)")
    ax.set_ylabel("chips")
    ax.set_title(f"{title} (n={s['n']})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_eta_sweep(sweep: Mapping[str, List[dict]], path: str, *, xlabel: str = "η (inference)",
                   title: str = "Accuracy vs noise") -> str:
    """Mean accuracy ± 95% CI vs η, one line per model (Noisy Machines Fig. 3a)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, rows in sweep.items():
        x = [r["eta"] for r in rows]
        m, e = _err(rows)
        ax.errorbar(x, [100 * v for v in m], yerr=[[100 * v for v in e[0]], [100 * v for v in e[1]]],
                    marker="o", ms=3, capsize=3, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_heatmap(grid: dict, path: str, title: str = "Accuracy: train η × inference η") -> str:
    """Heat map of ``grid["mean"]`` (rows train η, columns inference η), values annotated (Fig. 3b)."""
    import numpy as np
    M = 100 * np.asarray(grid["mean"], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * M.shape[1], 1.8 + 0.6 * M.shape[0]))
    im = ax.imshow(M, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(M.shape[1]), [f"{v:g}" for v in grid["infer_etas"]])
    ax.set_yticks(range(M.shape[0]), [f"{v:g}" for v in grid["train_etas"]])
    ax.set_xlabel("inference η")
    ax.set_ylabel("training η")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="w" if M[i, j] < M.max() - 0.5 * (M.max() - M.min()) else "k")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title)
    return _save(fig, path)


def plot_bias_variance(rows: List[dict], path: str,
                       title: str = "Loss decomposition under weight noise") -> str:
    """l_total, l_bias, l_var and l_pretrained vs σ_N/σ_W (`bias_variance_sweep` output)."""
    x = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, style in (("l_total", "k-o"), ("l_bias", "b-s"), ("l_var", "r-^")):
        ax.plot(x, [r[key] for r in rows], style, ms=3, label=key)
    ax.plot(x, [r["l_pretrained"] for r in rows], "g--", label="l_pretrained")
    ax.set_xlabel("σ_N / σ_W")
    ax.set_ylabel("cross-entropy (nats)" if rows and rows[0].get("loss") == "log"
                  else "squared error of the softmax vector (mean over outputs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mutual_information(result: dict, path: str, xlabel: str = "noise level",
                            title: str = "Normalised mutual information I(X;T)/I_clean") -> str:
    """Normalised MI vs noise level (`mutual_information_sweep` output)."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["level"] for r in rows], [r["normalized"] for r in rows], "o-", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("I(X;T) / I_clean")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_walking_curves(result: dict, path: str, title: str = "Walking Noise: one noisy layer") -> str:
    """Accuracy (± 95% CI) vs noise level per layer on a log x axis, with clean and chance lines."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name in result["layers"]:
        rows = result["curves"][name]
        m, e = _err(rows)
        ax.errorbar([r["level"] for r in rows], [100 * v for v in m],
                    yerr=[[100 * v for v in e[0]], [100 * v for v in e[1]]],
                    marker="o", ms=3, capsize=2, label=name)
    ax.axhline(100 * result["clean_accuracy"], color="k", ls="--", lw=1, label="clean")
    ax.axhline(100 * result["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel(f"noise level ({result['kind']} on {result['target']})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_walking_midpoints(result: dict, path: str,
                           title: str = "Walking Noise: midpoint noise level per layer") -> str:
    """Bar chart of each layer's midpoint noise level (log y; layers above the grid drawn hatched
    at the largest level)."""
    names = result["layers"]
    top = max(result["levels"])
    vals, hatch = [], []
    for n in names:
        mp = result["midpoints"][n]
        v = mp["midpoint"]
        vals.append(top if not _finite(v) else v)
        hatch.append(mp["status"] != "ok")
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(names) + 1.5), 3.8))
    bottom = min(min(vals), min(result["levels"])) / 2   # bars start well below the smallest value
    bars = ax.bar(range(len(names)), [v - bottom for v in vals], bottom=bottom, color="#55a868")
    for b, h, v, n in zip(bars, hatch, vals, names):
        if h:
            b.set_hatch("//")
            b.set_alpha(0.5)
        st = result["midpoints"][n]["status"]
        label = f"{v:.3g}" if st == "ok" else (f">{v:.3g}" if st == "above_grid" else f"≤{v:.3g}")
        ax.text(b.get_x() + b.get_width() / 2, v, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom, max(vals) * 2)
    ax.set_ylabel(f"midpoint level ({result['kind']} on {result['target']})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    return _save(fig, path)
