"""The MNIST / LeNet-5 reproduction of docs/results.md (Noisy Machines, Zhou et al. 2020).

    python -m train.reproduce_mnist --out runs/repro_mnist --prepare-only        # teacher + fine-tune
    python -m train.reproduce_mnist --out runs/repro_mnist --method none          # no retraining
    python -m train.reproduce_mnist --out runs/repro_mnist --method inject        # noise injection
    python -m train.reproduce_mnist --out runs/repro_mnist --method distill       # + distillation
    python -m train.reproduce_mnist --out runs/repro_mnist --table                # the markdown table

The methods after ``--prepare-only`` can run in parallel processes (they only read the teacher
and fine-tune checkpoints). Every training stage is resumable (``--resume`` is implied) and each
(method, η) result is appended to ``<out>/results_<method>.json`` as soon as it exists, so a
killed run continues where it stopped.

Methods, all with the same hardware model (weights clipped to ±2·std(W) fixed at conversion,
8-bit weights / inputs / outputs with calibrated ranges, additive weight noise σ = η·(w_max − w_min)):
- ``none``: the clean teacher converted as is (clip + quantize + calibrate, no training at all);
- ``finetuned``: the clipped, fine-tuned, quantized model (no noise during training);
- ``inject``: a student per η trained with noise η (per-call noise), plain cross-entropy;
- ``distill``: the same plus distillation from the clean teacher (eq. 10, T = 6, α = 1).
Each model is evaluated at the η it was trained for (``none``/``finetuned``: at every η) over
``--chips`` chips (per_instance noise, chip ids 0..n−1, the same for every model) on the first
``--eval-limit`` test images; the noise-free (quantized) accuracy is measured on the full test set.

``--paper`` runs the paper's protocol (section 5 of Noisy Machines) in one command, at the budget
of `PAPER` (about 30 minutes on a 2-core CPU): teacher trained, clipped to ±2σ and fine-tuned; that
clipped fine-tuned clean model is both the distillation teacher and every student's starting
point; students train with the backward pass through the clean weights (``clean_grad_input``),
T = 6, α = 1, 8-bit weights / inputs / outputs; η ∈ {0.05, .., 0.3}; ``chips`` chips on all 10,000
test images. ``no retraining`` is that clipped fine-tuned 8-bit model without noise training
(``results_finetuned.json``); ``results_none.json`` is the teacher converted without fine-tuning.
Every budget flag given on the command line overrides the preset (ablations: ``--no-adc``,
``--student-teacher clean``, ``--no-clean-grad``, ``--T``, ``--alpha``, ``--student-epochs``,
``--clip-k`` for the noise reference, ``--model lenet_caffe`` for a wider network).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

from .config import load_config

METHODS = ("none", "finetuned", "inject", "distill")

# The --paper preset: the paper's recipe at a budget chosen to fit 30 minutes on 2 CPU cores.
# Measured on a quiet 2-core machine (one process, 1 thread, 2026-12-04): 467 s with these
# 2-epoch students, 994 s with `--student-epochs 8`, which does not help (docs/results.md).
PAPER = dict(etas=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3], chips=20, eval_limit=10000, teacher_epochs=6,
             finetune_epochs=1, student_epochs=2, student_teacher="finetuned", clean_grad=True,
             T=6.0, alpha=1.0, adc=True)
_LEGACY = dict(etas=[0.0, 0.05, 0.1, 0.2, 0.3], chips=10, eval_limit=2000, teacher_epochs=2,
               finetune_epochs=1, student_epochs=1, student_teacher="clean", clean_grad=False,
               T=6.0, alpha=1.0, adc=True)


def _results_path(out, method):
    return os.path.join(out, f"results_{method}.json")


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _store(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def table(out: str, etas) -> str:
    res = {m: _load(_results_path(out, m)) for m in METHODS}
    base = _load(os.path.join(out, "prepare.json"))
    names = {"none": "no retraining (clip + 8-bit)", "finetuned": "clip + fine-tune (no noise)",
             "inject": "noise injection", "distill": "noise injection + distillation"}
    lines = []
    if base:
        lines.append(f"clean float LeNet-5 (teacher): {100 * base['teacher']:.2f}% on {base['n_test']} test images; "
                     f"clipped ±{_load(os.path.join(out, 'settings.json')).get('clip_k', 2.0):g}σ + fine-tuned: "
                     f"{100 * base['finetuned']:.2f}%; + 8-bit quantized: "
                     f"{100 * base['quantized']:.2f}%\n")
    lines.append("| method | " + " | ".join(f"η={e:g}" for e in etas) + " |")
    lines.append("|" + " --- |" * (len(etas) + 1))
    for m in METHODS:
        if not res[m]:
            continue
        cells = []
        for e in etas:
            r = res[m].get(f"{float(e):g}")
            cells.append("not run" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}")
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Noise-free accuracy of the same models (quantizers on, η = 0) on the chip-evaluation images / "
                 "on the full test set:\n")
    lines.append("| method | " + " | ".join(f"trained at η={e:g}" for e in etas) + " |")
    lines.append("|" + " --- |" * (len(etas) + 1))
    for m in METHODS:
        if not res[m]:
            continue
        cells = []
        for e in etas:
            r = res[m].get(f"{float(e):g}")
            if r is None:
                cells.append("not run")
            else:
                ce = "?" if r.get("clean_eval") is None else f"{100 * r['clean_eval']:.2f}"
                cl = "?" if r.get("clean") is None else f"{100 * r['clean']:.2f}"
                cells.append(f"{ce} / {cl}")
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/repro_mnist")
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--paper", action="store_true",
                    help="the paper's protocol at the PAPER budget; without --method: every method in turn")
    ap.add_argument("--etas", type=float, nargs="+", default=None, help="(default: 0 0.05 0.1 0.2 0.3; "
                    "--paper: 0.05 0.1 0.15 0.2 0.25 0.3)")
    ap.add_argument("--chips", type=int, default=None, help="chips per η (default 10; --paper 20)")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="test images per chip evaluation (default 2000; --paper 10000)")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--student-teacher", choices=("clean", "finetuned"), default=None,
                    help="distillation teacher: the clean float model or the clipped fine-tuned one "
                         "(default clean; --paper finetuned)")
    ap.add_argument("--clean-grad", dest="clean_grad", action="store_true", default=None,
                    help="backward through the clean weights (clean_grad_input; --paper default)")
    ap.add_argument("--no-clean-grad", dest="clean_grad", action="store_false")
    ap.add_argument("--T", type=float, default=None, help="distillation temperature (default 6)")
    ap.add_argument("--alpha", type=float, default=None, help="distillation weight of 'distill' (default 1)")
    ap.add_argument("--clip-k", type=float, default=2.0,
                    help="clip to ±k·std(W); the noise reference is w_max − w_min = 2k·std(W) (default 2)")
    ap.add_argument("--no-adc", dest="adc", action="store_false", default=None,
                    help="ablation: no output (ADC) quantizer (weights and inputs stay 8-bit)")
    ap.add_argument("--model", choices=("lenet5", "lenet_caffe"), default="lenet5",
                    help="ablation: the network (default lenet5, 6-16-120-84; lenet_caffe: Caffe's "
                         "MNIST LeNet, 20-50-500)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    for k, v in (PAPER if args.paper else _LEGACY).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.paper and not args.table and args.method is None and not args.prepare_only:
        rc = 0
        for m in ("distill", "inject", "finetuned", "none"):
            rc = rc or main(list(argv if argv is not None else sys.argv[1:]) + ["--method", m])
        print(table(args.out, args.etas))
        return rc
    if args.table:
        print(table(args.out, args.etas))
        return 0
    if not args.prepare_only and args.method is None:
        ap.error("give --method, --prepare-only or --table")

    cfg = load_config(None, [
        f"out_dir={args.out}", "resume=true", f"model.name={args.model}", f"threads={args.threads}", f"seed={args.seed}",
        f"progress={str(args.progress).lower()}", "ckpt_every=200",
        f"teacher.epochs={args.teacher_epochs}", "teacher.lr=0.05",
        f"finetune.epochs={args.finetune_epochs}", "finetune.lr=0.01", f"finetune.clip_k={args.clip_k}",
        f"student.epochs={args.student_epochs}", "student.lr=0.01",
        f"student.teacher={args.student_teacher}", f"student.clean_grad_input={str(args.clean_grad).lower()}",
        f"student.T={args.T}",
        "quant.w_bits=8", "quant.in_bits=8", f"quant.out_bits={8 if args.adc else 'null'}",
        f"eval.chips={args.chips}", f"eval.test_limit={args.eval_limit}", "eval.batch_size=500",
        "data.eval_batch_size=1000",
    ])
    import torch
    import noisyops
    from noisyops import LayerConfig
    from .pipeline import _clean_acc, eval_batches, noisy_eval, prepare, quantize, train_student

    t0 = time.time()
    c = prepare(cfg)
    prep_path = os.path.join(args.out, "prepare.json")
    if not os.path.exists(prep_path):
        _store(prep_path, {"teacher": c.results["clean"]["teacher (float)"],
                           "finetuned": c.results["clean"][f"clipped ±{args.clip_k:g}σ + fine-tuned"],
                           "quantized": c.results["clean"]["+ quantized"], "n_test": len(c.test_ds)})
    _store(os.path.join(args.out, "settings.json"), {k: v for k, v in vars(args).items()
                                                      if k not in ("table", "prepare_only", "method")})
    print(f"prepared in {time.time() - t0:.0f} s", flush=True)
    if args.prepare_only:
        return 0

    batches = eval_batches(c)
    from noisyops.training import evaluate
    path = _results_path(args.out, args.method)
    done = _load(path)

    from noisyops.evaluation import clean_accuracy

    def record(eta, r, clean=None, seconds=None, clean_eval=None):
        done[f"{eta:g}"] = dict(r, clean=clean, seconds=seconds, n_eval=sum(int(y.numel()) for _, y in batches),
                                clean_eval=clean_eval)
        _store(path, done)
        print(f"{args.method} η={eta:g}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
              f"(noise-free {'-' if clean is None else f'{100 * clean:.2f}'})", flush=True)

    if args.method in ("none", "finetuned"):
        if args.method == "none":
            model = noisyops.convert(copy.deepcopy(c.teacher), LayerConfig(w_range=float(args.clip_k)), seed=c.seed)
            quantize(model, cfg["quant"], c.calib)
        else:
            model = c.ft
        clean = evaluate(model, c.eval_loader, c.device)["acc"]
        clean_eval = clean_accuracy(model, batches)
        for eta in args.etas:
            key = f"{eta:g}"
            if key in done:
                if done[key].get("clean_eval") is None:  # filled in for runs of an older version
                    done[key]["clean_eval"] = clean_eval
                    _store(path, done)
                continue
            t1 = time.time()
            r = noisy_eval(model, batches, [eta], chips=args.chips, group_size=args.chips,
                           progress=args.progress, label=args.method)[eta]
            record(eta, r, clean, time.time() - t1, clean_eval)
        return 0

    alpha = float(args.alpha) if args.method == "distill" else 0.0
    for eta in args.etas:
        key = f"{eta:g}"
        if key in done and done[key].get("clean_eval") is not None:
            continue
        s = dict(cfg["student"], eta=float(eta), alpha=alpha)
        t1 = time.time()
        torch.manual_seed(c.seed)
        # a finished student is loaded from its final checkpoint (train_stage skips it)
        student = train_student(c, s, os.path.join(args.out, f"{args.method}_eta{eta:g}"))
        if key in done:  # filled in for runs of an older version
            done[key]["clean_eval"] = clean_accuracy(student, batches)
            _store(path, done)
            continue
        clean = clean_accuracy(student, [(x, y) for x, y in _iter(c.eval_loader)])
        r = noisy_eval(student, batches, [eta], chips=args.chips, group_size=args.chips,
                       progress=args.progress, label=args.method)[eta]
        record(eta, r, clean, time.time() - t1, clean_accuracy(student, batches))
    return 0


def _iter(loader):
    loader.set_epoch(0, 0)
    return iter(loader)


if __name__ == "__main__":
    raise SystemExit(main())
