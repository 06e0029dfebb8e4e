"""Noisy Machines Fig. 3a trend (ResNet-32 / CIFAR-10): noise injection vs distillation, resumable.

    python -m train.reproduce_cifar --out runs/fig3a                       # run / continue the grid
    python -m train.reproduce_cifar --out runs/fig3a --table               # summary from what exists

Protocol (the paper's section 5.2, everything but the budget): the pretrained ResNet-32 of
``../shared/weights`` is clipped to ±2·std(W) and fine-tuned (noise off); that model is the starting
point of every student and, with ``--teacher finetuned`` (default), the distillation teacher. No
quantization (Fig. 3a is the unquantized network). For every η of ``--etas`` (the paper's 0.02,
0.04, 0.057, 0.073, 0.11), every method (``inject``: α = 0; ``distill``: α = 1, T = 6) and every
run ``r < --runs`` a student trains ``--epochs`` epochs (SGD, lr ``--lr`` cosine, per-call noise,
backward through the clean weights); run ``r`` seeds the student's noise and data order with
``seed + r``. Each student is evaluated over ``--chips`` chips (per_instance noise) on the first
``--eval-limit`` test images at its training η; ``none`` is the fine-tuned model without noise
retraining at every η.

Resumable: every student checkpoints into ``<out>/<method>_eta<η>_run<r>/`` and its result is
appended to ``<out>/results.json`` as soon as it exists; rerunning the same command skips finished
work, so a later session extends the grid by rerunning with more ``--runs`` / ``--etas`` (a larger
``--epochs`` needs a new ``--out``: the cosine schedule depends on it).

Parallel: processes sharing ``--out`` may split the grid (``--first-run 1 --runs 2`` next to
``--runs 1``, or one ``--methods`` each); start the second once the first has prepared (the
fine-tuned model is shared); ``results.json`` is merged under a lock.

Summary (`summarize`): per method and η the mean accuracy over runs (each run: mean over its
chips); the η a method tolerates for an accuracy drop δ below the fine-tuned model's noise-free
accuracy is where that curve crosses ``clean − δ`` (linear interpolation from (0, clean)); the
paper finds distillation tolerates about 1.4× the η of injection.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

from .config import load_config

PAPER_ETAS = [0.02, 0.04, 0.057, 0.073, 0.11]
METHODS = ("inject", "distill")


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _store(path: str, data: dict) -> dict:
    """Write ``data`` to ``path`` merged with what is there, under an exclusive lock, so several
    processes (``--first-run`` / ``--runs`` splits, ``--methods``) can fill one grid: the students
    already in the file are kept, ``data``'s students added, every other key taken from ``data``.
    Returns the merged results."""
    import fcntl
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = dict(data)
        merged["students"] = {**_load(path).get("students", {}), **data.get("students", {})}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=2)
        os.replace(tmp, path)
    return merged


def tolerated_eta(clean: float, curve: List[tuple], drop: float) -> Optional[float]:
    """The η where the accuracy curve ``[(η, acc), ...]`` (sorted by η) first falls to
    ``clean − drop``, interpolating linearly from ``(0, clean)``; None if it stays above on the grid."""
    target = clean - drop
    prev = (0.0, clean)
    for eta, acc in curve:
        if acc <= target:
            (e0, a0) = prev
            return e0 if a0 == acc else e0 + (eta - e0) * (a0 - target) / (a0 - acc)
        prev = (eta, acc)
    return None


def summarize(results: dict, drops=(0.01, 0.02, 0.05)) -> dict:
    """Per method: ``{η: {"mean", "runs": [...]}}`` and tolerated η per drop, plus distill/inject ratios."""
    clean = results.get("clean_finetuned")
    out = {"clean_finetuned": clean, "methods": {}, "tolerated": {}, "ratio": {}}
    for m in METHODS + ("none",):
        per_eta: Dict[float, List[float]] = {}
        for key, r in results.get("students", {}).items():
            meth, eta, _ = key.split("/")
            if meth == m:
                per_eta.setdefault(float(eta), []).append(r["mean"])
        out["methods"][m] = {e: {"mean": sum(v) / len(v), "runs": v} for e, v in sorted(per_eta.items())}
    if clean is not None:
        for m, rows in out["methods"].items():
            curve = [(e, r["mean"]) for e, r in rows.items()]
            out["tolerated"][m] = {d: tolerated_eta(clean, curve, d) for d in drops}
        for d in drops:
            a, b = out["tolerated"].get("distill", {}).get(d), out["tolerated"].get("inject", {}).get(d)
            out["ratio"][d] = (a / b) if (a is not None and b) else None
    return out


def table(results: dict) -> str:
    s = summarize(results)
    etas = sorted({e for rows in s["methods"].values() for e in rows})
    names = {"none": "no retraining (clip + fine-tune)", "inject": "noise injection (α = 0)",
             "distill": "distillation + injection (α = 1)"}
    L = [f"fine-tuned clipped ResNet-32, noise-free: {100 * s['clean_finetuned']:.2f}% on "
         f"{results.get('n_eval')} test images; budget: {json.dumps(results.get('budget'))}", "",
         "| method | " + " | ".join(f"η={e:g}" for e in etas) + " |", "|" + " --- |" * (len(etas) + 1)]
    for m in ("none",) + METHODS:
        rows = s["methods"].get(m, {})
        cells = [("not run" if e not in rows else
                  f"{100 * rows[e]['mean']:.2f} (" + ", ".join(f"{100 * v:.2f}" for v in rows[e]["runs"]) + ")")
                 for e in etas]
        L.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    L += ["", "Tolerated η for an accuracy drop δ (interpolated; – = not reached on the grid):", "",
          "| δ | no retraining | injection | distillation | distillation / injection |", "| --- | --- | --- | --- | --- |"]
    f = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for d, r in s["ratio"].items():
        t = s["tolerated"]
        L.append(f"| {100 * d:g} points | {f(t['none'][d])} | {f(t['inject'][d])} | {f(t['distill'][d])} | "
                 f"{'–' if r is None else f'{r:.2f}'} |")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/fig3a")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--etas", type=float, nargs="+", default=PAPER_ETAS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--runs", type=int, default=2, help="retraining runs per (method, η) (paper: 2)")
    ap.add_argument("--first-run", type=int, default=0,
                    help="train runs first-run .. runs-1 only (split the runs over processes sharing --out)")
    ap.add_argument("--epochs", type=int, default=1, help="student epochs (paper: 150)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01, help="student lr, cosine decay (paper: 0.01)")
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images (default all)")
    ap.add_argument("--eval-limit", type=int, default=1000, help="test images per chip evaluation")
    ap.add_argument("--chips", type=int, default=10, help="chips per student (paper: 50 inferences)")
    ap.add_argument("--teacher", choices=("finetuned", "clean"), default="finetuned")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--weights", default=None,
                    help="pretrained ResNet-32 state_dict (default: <$NOISYOPS_WEIGHTS or ../shared/weights>/"
                         "resnet32_cifar10.pt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res_path = os.path.join(args.out, "results.json")
    if args.table:
        print(table(_load(res_path)))
        return 0

    here = os.path.dirname(os.path.abspath(__file__))
    from noisyops.models import default_weights_dir
    weights = args.weights or os.path.join(default_weights_dir(), "resnet32_cifar10.pt")
    if not os.path.isfile(weights):
        raise SystemExit(f"--weights {weights!r}: no such file; pass the pretrained ResNet-32 state_dict "
                         f"(../shared/weights/resnet32_cifar10.pt) or set NOISYOPS_WEIGHTS")
    cfg = load_config(os.path.join(here, "configs", "cifar10_resnet32.yaml"), [
        f"out_dir={args.out}", "resume=true", f"teacher.checkpoint={weights}", f"threads={args.threads}", f"seed={args.seed}", "progress=false",
        f"finetune.epochs={args.finetune_epochs}", "quant.w_bits=null", "quant.in_bits=null",
        "quant.out_bits=null", f"data.train_limit={'null' if args.train_limit is None else args.train_limit}",
        f"data.test_limit={args.eval_limit}", f"eval.test_limit={args.eval_limit}",
        f"student.epochs={args.epochs}", f"student.lr={args.lr}", f"student.teacher={args.teacher}",
        "student.clean_grad_input=true", "student.T=6.0", "eval.batch_size=250",
    ] + ([f"data.root={args.data_root}"] if args.data_root else []))
    from .pipeline import _clean_acc, eval_batches, noisy_eval, prepare, train_student

    t0 = time.time()
    c = prepare(cfg)
    batches = eval_batches(c)
    results = _load(res_path)
    results.setdefault("students", {})
    results["n_eval"] = sum(int(y.numel()) for _, y in batches)
    results["n_train"] = len(c.train_ds)
    results["clean_finetuned"] = _clean_acc(c.ft, batches)
    results["budget"] = {"train images": len(c.train_ds), "student epochs": args.epochs,
                         "fine-tune epochs": args.finetune_epochs, "eval images": results["n_eval"],
                         "chips": args.chips, "lr": args.lr, "teacher": args.teacher}
    results = _store(res_path, results)
    print(f"prepared in {time.time() - t0:.0f} s; fine-tuned noise-free {100 * results['clean_finetuned']:.2f}%",
          flush=True)
    for eta in args.etas:  # the baseline without retraining, same chips at every η
        key = f"none/{eta:g}/0"
        if key not in results["students"]:
            t1 = time.time()
            r = noisy_eval(c.ft, batches, [eta], chips=args.chips, group_size=1)[float(eta)]
            results["students"][key] = dict(r, seconds=time.time() - t1)
            results = _store(res_path, results)
    for run in range(args.first_run, args.runs):
        for eta in args.etas:
            for m in args.methods:
                key = f"{m}/{eta:g}/{run}"
                if key in results["students"] or key in _load(res_path).get("students", {}):
                    continue
                t1 = time.time()
                s = dict(cfg["student"], eta=float(eta), alpha=1.0 if m == "distill" else 0.0)
                student = train_student(c, s, os.path.join(args.out, f"{m}_eta{eta:g}_run{run}"),
                                        seed=args.seed + run)
                r = noisy_eval(student, batches, [eta], chips=args.chips, group_size=1)[float(eta)]
                results["students"][key] = dict(r, seconds=time.time() - t1, clean=_clean_acc(student, batches))
                results = _store(res_path, results)
                print(f"{m} η={eta:g} run {run}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
                      f"({time.time() - t1:.0f} s)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
