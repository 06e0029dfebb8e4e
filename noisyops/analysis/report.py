"""A Markdown report (tables + PNGs) from the results the CLI collects, readable at a glance.

`write_report(out_dir, meta, results, figures)` writes ``out_dir/report.md``. ``results`` may hold any
of the keys ``eval`` (`ChipEvalResult.to_dict()`, plus ``clean_accuracy``), ``sweep``
(`eta_sweep`), ``grid`` (`train_infer_grid`), ``biasvar`` (`bias_variance_sweep` rows), ``mi``
(`mutual_information_sweep`), ``walking`` (a list of `WalkingNoiseResult.to_dict()`); ``figures``
maps names to PNG paths (linked relative to ``out_dir``).
"""
from __future__ import annotations

import math
import os
from typing import List, Mapping

__all__ = ["write_report", "markdown_table"]


def _fmt(v, pct=False, digits=4):
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if abs(v) < 1e-15:  # rounding residue of an exact zero (e.g. l_var at zero noise)
            v = 0.0
        return f"{100 * v:.2f}" if pct else f"{v:.{digits}g}"
    return str(v)


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _img(figures, key, out_dir):
    p = figures.get(key)
    if not p:
        return ""
    return f"\n![{key}]({os.path.relpath(p, out_dir)})\n"


def write_report(out_dir: str, meta: Mapping[str, object], results: Mapping[str, object],
                 figures: Mapping[str, str]) -> str:
    """Write ``out_dir/report.md`` and return its path (see module docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    L = ["# noisyops robustness report", ""]
    L.append(markdown_table(["setting", "value"], [[k, f"`{v}`"] for k, v in meta.items()]))
    L.append("")
    ev = results.get("eval")
    if ev:
        s = ev["summary"]
        L += ["## Repeated noisy evaluation", "",
              f"Each chip is one fixed noise instance of the network, evaluated on all "
              f"{ev['n_samples']} test samples. Accuracy in %; CI = {int(100 * s['confidence'])}% "
              f"Student-t interval of the mean over chips.", ""]
        rows = [["clean (noise off)", _fmt(ev.get("clean_accuracy"), pct=True)],
                ["chips n", s["n"]], ["mean", _fmt(s["mean"], pct=True)],
                ["std over chips", _fmt(s["std"], pct=True)],
                ["95% CI", f"[{_fmt(s['ci_low'], pct=True)}, {_fmt(s['ci_high'], pct=True)}]"],
                ["CI half-width", _fmt(s["half_width"], pct=True)],
                ["min / max chip", f"{_fmt(min(ev['accuracies']), pct=True)} / "
                                   f"{_fmt(max(ev['accuracies']), pct=True)}"],
                ["mean loss", _fmt(sum(ev["losses"]) / len(ev["losses"]))],
                ["stopped early (adaptive)", ev["stopped_early"]],
                ["seconds", f"{ev['seconds']:.1f}"]]
        L += [markdown_table(["quantity", "value"], rows), _img(figures, "eval", out_dir), ""]
    sw = results.get("sweep")
    if sw:
        L += ["## Accuracy vs η", "", "Mean accuracy (%) ± 95% CI half-width over chips.", ""]
        names = list(sw)
        etas = [r["eta"] for r in sw[names[0]]]
        rows = [[f"{e:g}"] + [f"{_fmt(sw[n][i]['mean'], pct=True)} ± "
                              f"{_fmt(sw[n][i]['half_width'], pct=True)}" for n in names]
                for i, e in enumerate(etas)]
        L += [markdown_table(["η"] + [str(n) for n in names], rows), _img(figures, "sweep", out_dir), ""]
    gr = results.get("grid")
    if gr:
        L += ["## Training η × inference η", "", "Mean accuracy (%).", ""]
        rows = [[f"{t:g}"] + [_fmt(v, pct=True) for v in row] for t, row in zip(gr["train_etas"], gr["mean"])]
        L += [markdown_table(["train η \\ infer η"] + [f"{e:g}" for e in gr["infer_etas"]], rows),
              _img(figures, "grid", out_dir), ""]
    bv = results.get("biasvar")
    if bv:
        from .bias_variance import crossover_ratio
        unit = ("Cross-entropy in nats (log-loss decomposition around the normalised geometric mean)"
                if bv[0].get("loss") == "log" else
                "Squared error of the softmax vector against the one-hot label, mean over the outputs "
                "(the paper's eq. 1-5, around the arithmetic mean of the instances)")
        L += ["## Bias/variance decomposition of the loss (Noisy Machines eq. 1-5)", "",
              f"{unit}, averaged over {bv[0]['n_samples']} test samples; l_total = l_bias + l_var; "
              f"{bv[0]['n_instances']} noise instances per ratio.", ""]
        rows = [[f"{r['ratio']:g}", _fmt(r["l_total"]), _fmt(r["l_bias"]), _fmt(r["l_var"]),
                 _fmt(r["l_pretrained"])] for r in bv]
        cross = next((r["ratio"] for r in bv if r["l_var"] > r["l_bias"]), None)
        L += [markdown_table(["σ_N/σ_W", "l_total", "l_bias", "l_var", "l_pretrained"], rows), "",
              f"First ratio of the grid with l_var > l_bias: {_fmt(cross)}; crossover "
              f"(linear interpolation of l_var − l_bias): {_fmt(crossover_ratio(bv))}.",
              _img(figures, "biasvar", out_dir), ""]
    mi = results.get("mi")
    if mi:
        L += ["## Mutual information (binning, Noisy Machines eq. 6-7)", "",
              f"{mi['bins']} bins per output coordinate ({mi['output']}), {mi['n_inputs']} inputs × "
              f"{mi['n_repeats']} noisy repeats; clean I = {mi['clean']['mi']:.3f} bits. "
              f"Noise: {mi['kind']} on {mi['target']}, all layers.", ""]
        f3 = lambda v: f"{v + 0.0:.3f}" if abs(v) >= 5e-4 else "0.000"  # noqa: E731 (no "-0.000")
        rows = [[f"{r['level']:g}", f3(r["mi"]), f3(r["h_t"]), f3(r["h_t_given_x"]),
                 f3(r["normalized"])] for r in mi["rows"]]
        from .mutual_info import level_at_fraction
        L += [markdown_table(["level", "I (bits)", "H(T)", "H(T\\|X)", "I / I_clean"], rows), "",
              f"Normalised MI falls to 0.5 at level {_fmt(level_at_fraction(mi['rows'], 0.5))} and to 0.1 "
              f"at {_fmt(level_at_fraction(mi['rows'], 0.1))} (linear interpolation; – = not on the grid).",
              _img(figures, "mi", out_dir), ""]
    for i, wk in enumerate(results.get("walking") or []):
        L += [f"## Walking Noise: {wk['kind']} noise on {wk['target']}", "",
              f"Noise in one layer at a time, {wk['n_chips']} chips per point. Clean accuracy "
              f"{_fmt(wk['clean_accuracy'], pct=True)}%, chance {_fmt(wk['chance'], pct=True)}%. "
              f"Midpoint = noise level where accuracy falls halfway between them (log "
              f"interpolation); larger = more robust layer.", ""]
        rows = []
        for n in wk["layers"]:
            mp = wk["midpoints"][n]
            accs = [r["mean"] for r in wk["curves"][n]]
            rows.append([n, _fmt(mp["midpoint"]), mp["status"], _fmt(accs[0], pct=True),
                         _fmt(accs[-1], pct=True)])
        L += [markdown_table(["layer", "midpoint level", "status",
                              f"acc @ {wk['levels'][0]:g} (%)", f"acc @ {wk['levels'][-1]:g} (%)"], rows),
              _img(figures, f"walking_{i}_curves", out_dir), _img(figures, f"walking_{i}_midpoints", out_dir), ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path
