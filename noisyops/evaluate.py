"""Command line: noisy evaluation and robustness analysis of a saved model, with a Markdown report.

    python -m noisyops.evaluate --model lenet5 --checkpoint lenet.pt --dataset mnist \\
        --data-root ../shared/data --what eval,walking,biasvar --out runs/lenet_eval

``--what`` picks any of ``eval`` (n chips, mean/std/95% CI, adaptive with ``--ci-half-width``),
``sweep`` (accuracy vs η; more models with ``--sweep-models``), ``grid`` (train-η × inference-η
heat map of the checkpoints given by ``--grid``), ``biasvar`` (loss decomposition vs σ_N/σ_W), ``mi`` (mutual information vs
η), ``walking`` (per-layer Walking Noise). Writes ``results.json``, one CSV per analysis, PNG figures
and ``report.md`` into ``--out``. See docs/evaluation.md for what every number means.

Model (``--model``): a built-in name (``lenet5``, ``resnet20/32/44/56``), ``torchvision:NAME``,
``timm:NAME`` or ``package.module:factory`` (`noisyops.zoo`); ``--model-kwargs`` (JSON) go to the
constructor, ``--weights`` names the library's pretrained weights (fetched by that library).

Checkpoint: a plain ``state_dict`` of the clean model, or of the converted model, or a dict holding
one under ``"model"`` / ``"state_dict"`` (the training checkpoints); ``--checkpoint pretrained``
loads ``../shared/weights/<model>_cifar10.pt`` for the CIFAR ResNets; ``--checkpoint none`` keeps
the constructor's own weights.

Dataset (``--dataset``): ``mnist``, ``cifar10`` (under ``--data-root``), or ``imagefolder:PATH``:
``PATH/val`` (or ``PATH`` itself) as the test set, ``PATH/train`` for calibration when present; the
images are resized (shorter side ``--resize``, default 256), centre-cropped to ``--image-size``
(default 224) and normalised with ``--mean``/``--std`` (default ImageNet's). Nothing is downloaded
unless ``--download``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import List, Optional

import torch

from .zoo import BUILTIN_MODELS as _MODELS
_WHAT = ("eval", "sweep", "grid", "biasvar", "mi", "walking")


def _floats(s: str) -> List[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _log_spec(s: str) -> List[float]:
    """``lo:hi:n`` (a log grid) or a comma list."""
    if ":" in s:
        lo, hi, n = s.split(":")
        from .analysis.walking_noise import log_grid
        return log_grid(float(lo), float(hi), int(n))
    return _floats(s)


def _w_range(s: Optional[str]):
    if s is None or s.lower() == "none":
        return None
    if "," in s:
        lo, hi = _floats(s)
        return (lo, hi)
    return float(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noisyops.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"{'|'.join(_MODELS)}, torchvision:NAME, timm:NAME or package.module:factory")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON keyword arguments of the constructor, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--weights", default=None,
                   help="the library's pretrained weights: torchvision enum name (DEFAULT, IMAGENET1K_V1), "
                        "timm: any value = pretrained=True (downloads unless cached)")
    p.add_argument("--checkpoint", required=True,
                   help="state_dict path (clean or converted, or a training checkpoint), 'pretrained' "
                        "(the CIFAR ResNets of ../shared/weights) or 'none' (the constructor's own weights)")
    p.add_argument("--dataset", required=True,
                   help="mnist | cifar10 | imagefolder:PATH (PATH/val or PATH; PATH/train calibrates)")
    p.add_argument("--data-root", default=None,
                   help="folder of mnist / cifar10 (default $NOISYOPS_DATA, else ../shared/data)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download mnist / cifar10 into --data-root when missing")
    p.add_argument("--resize", type=int, default=256, help="imagefolder: shorter side resized to this")
    p.add_argument("--image-size", type=int, default=224, help="imagefolder: centre crop size")
    p.add_argument("--mean", default="0.485,0.456,0.406", help="imagefolder: normalisation mean")
    p.add_argument("--std", default="0.229,0.224,0.225", help="imagefolder: normalisation std")
    p.add_argument("--grayscale", action="store_true", help="imagefolder: convert images to 1 channel")
    p.add_argument("--limit", type=int, default=None, help="use the first N test samples")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="test images per forward (before chip replication: rows = group·batch)")
    p.add_argument("--what", default="eval", help=f"comma list of {','.join(_WHAT)}")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("layer model (applied to every conv/linear layer)")
    g.add_argument("--eta", type=float, default=0.02, help="additive weight noise η for --what eval")
    g.add_argument("--eta-mul", type=float, default=0.0, help="multiplicative weight noise for eval")
    g.add_argument("--out-noise", type=float, default=0.0, help="output noise for eval")
    g.add_argument("--w-range", default=None, help="none | k (±k·std) | lo,hi")
    g.add_argument("--w-bits", type=int, default=None)
    g.add_argument("--in-bits", type=int, default=None)
    g.add_argument("--out-bits", type=int, default=None)
    g.add_argument("--tile-rows", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="noise seed of the converted model")
    g.add_argument("--calib-batches", type=int, default=4,
                   help="training batches to calibrate in/out ranges when --in-bits/--out-bits")
    c = p.add_argument_group("chips and statistics")
    c.add_argument("--chips", type=int, default=50, help="chips for eval (max in adaptive mode)")
    c.add_argument("--group", type=int, default=None,
                   help="chips run side by side per forward (default: 1 on CPU, 10 on GPU)")
    c.add_argument("--chip-offset", type=int, default=0)
    c.add_argument("--ci-half-width", type=float, default=None,
                   help="adaptive eval: stop once the 95%% CI half-width (fraction) is below this")
    c.add_argument("--confidence", type=float, default=0.95)
    a = p.add_argument_group("analyses")
    a.add_argument("--sweep-etas", default="0,0.01,0.02,0.04,0.06,0.08,0.1")
    a.add_argument("--sweep-chips", type=int, default=10)
    a.add_argument("--sweep-models", default=None,
                   help="more models on the sweep plot: comma list of name=checkpoint (same architecture)")
    a.add_argument("--grid", default=None,
                   help="for --what grid: comma list of train_eta=checkpoint (models trained at each η); "
                        "evaluated at every --sweep-etas, drawn as a heat map")
    a.add_argument("--ratios", default="0,0.2,0.4,0.5,0.6,0.7,0.8,1.0,1.2", help="σ_N/σ_W for biasvar")
    a.add_argument("--instances", type=int, default=100, help="noise instances for biasvar (paper: 100)")
    a.add_argument("--biasvar-loss", default="squared", choices=("squared", "log"),
                   help="squared: the paper's squared error of the softmax vector (eq. 1-5); "
                        "log: the log-loss (Heskes) decomposition")
    a.add_argument("--mi-levels", default="0,0.025,0.05,0.1,0.2,0.4,0.8,1.6",
                   help="η levels for mi (the default reaches the decay of a trained LeNet-5)")
    a.add_argument("--mi-repeats", type=int, default=100, help="noisy inferences per input (paper: 100)")
    a.add_argument("--mi-inputs", type=int, default=200, help="inputs for mi (paper: 200)")
    a.add_argument("--mi-split", default="train", choices=("train", "test"),
                   help="mi inputs: random training images (paper) or the first test images")
    a.add_argument("--mi-output", default="softmax", choices=("softmax", "logits"))
    a.add_argument("--bins", type=int, default=4)
    a.add_argument("--walk", default="additive:weights",
                   help="comma list of kind:target, kinds additive|multiplicative|mixed, "
                        "targets weights|outputs (outputs: additive only)")
    a.add_argument("--walk-levels", default="0.01:10:7",
                   help="lo:hi:n log grid or comma list of η / η_mul for walking noise on weights")
    a.add_argument("--walk-out-levels", default="0.1:100:7",
                   help="lo:hi:n log grid or comma list of absolute out_noise for target 'outputs'")
    a.add_argument("--walk-chips", type=int, default=5)
    a.add_argument("--walk-layers", default=None, help="comma list of layer names (default: all)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def _load_state(path: str, model_name: str):
    if path == "pretrained":
        if model_name not in ("resnet20", "resnet32"):
            raise SystemExit(f"--checkpoint pretrained: only resnet20 / resnet32 have shared weights, "
                             f"not {model_name!r}; give a state_dict path or 'none'")
        path = os.path.join(_shared_dir(), "weights", f"{model_name}_cifar10.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # training checkpoints carry plain Python metadata: the user's own file
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key], path
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), path
    return obj, path


def _shared_dir() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(repo), "shared")


def build_model(args, checkpoint: Optional[str] = None):
    """The clean architecture, converted with the CLI's `LayerConfig`, checkpoint loaded."""
    import noisyops
    from .config import LayerConfig
    from .zoo import build_network
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except ValueError as e:
        raise SystemExit(f"--model-kwargs {args.model_kwargs!r}: expected a JSON object ({e})")
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--model-kwargs {args.model_kwargs!r}: expected a JSON object")
    try:
        net = build_network(args.model, weights=args.weights, kwargs=kwargs)
    except (ValueError, ImportError) as e:
        raise SystemExit(f"--model: {e}")
    cfg = LayerConfig(eta=args.eta, eta_mul=args.eta_mul, out_noise=args.out_noise,
                      w_range=_w_range(args.w_range), w_bits=args.w_bits, in_bits=args.in_bits,
                      out_bits=args.out_bits, tile_rows=args.tile_rows)
    ck = checkpoint or args.checkpoint
    if ck.lower() == "none":
        return noisyops.convert(net, cfg, seed=args.seed).eval(), cfg, "none (the constructor's weights)"
    state, path = _load_state(ck, args.model)
    try:  # a clean state_dict: load before conversion so ranges (w_range = k) see the real weights
        net.load_state_dict(state)
        model = noisyops.convert(net, cfg, seed=args.seed)
    except RuntimeError:  # a converted model's state_dict (buffers: seeds, ranges, counters)
        model = noisyops.convert(net, cfg, seed=args.seed)
        model.load_state_dict(state)
    model.eval()
    return model, cfg, path


def _dataset(args, train: bool):
    """The dataset object of ``--dataset`` (mnist / cifar10: `build_dataset`; imagefolder:PATH:
    `image_folder_dataset`, its ``PATH/train`` falling back to the test tree for ``train=True``)."""
    from .training.data import DatasetNotFoundError, build_dataset, default_data_root, image_folder_dataset
    dataset = args.dataset
    try:
        if dataset.startswith("imagefolder:"):
            kw = dict(resize=args.resize, crop=args.image_size, mean=_floats(args.mean), std=_floats(args.std),
                      grayscale=getattr(args, "grayscale", False))
            path = dataset.partition(":")[2]
            ds = image_folder_dataset(path, train=train, **kw)
            return ds if ds is not None else image_folder_dataset(path, train=False, **kw)
        if dataset not in ("mnist", "cifar10"):
            raise SystemExit(f"--dataset {dataset!r}: expected mnist, cifar10 or imagefolder:PATH")
        root = args.data_root or default_data_root()
        pad = 2 if (dataset == "mnist" and _lenet_input_size() == 32) else 0
        return build_dataset(dataset, root, train=train, augment=False, pad=pad,
                             download=getattr(args, "download", False))
    except DatasetNotFoundError as e:
        raise SystemExit(f"--dataset {dataset}: {e}")


def load_data(args, train: bool = False, limit: Optional[int] = None):
    """Test (or training) split as a list of ``(x, y)`` batches (the first ``limit`` samples).
    ``imagefolder:PATH`` without ``PATH/train`` gives the test images for ``train=True`` (calibration)."""
    from .evaluation import as_batches
    return as_batches(_dataset(args, train), args.batch_size, limit=limit)


def load_sample(args, n: int, seed: int = 0):
    """``n`` random training images (indices ``randperm(N, generator=manual_seed(seed))[:n]``, in
    that order) as a batch list, e.g. the paper's 200 training images of the MI estimate."""
    from .evaluation import as_batches
    ds = _dataset(args, train=True)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed)))[:n].tolist()
    return as_batches(torch.utils.data.Subset(ds, idx), args.batch_size)


def as_batches_of(batches, n: int):
    """The first ``n`` samples of a batch list, as one batch."""
    x = torch.cat([b[0] for b in batches])[:n]
    y = torch.cat([b[1] for b in batches])[:n]
    return [(x, y)]


def _lenet_input_size() -> int:
    """28 or 32: which MNIST size `noisyops.models.lenet5` expects (32 = classic padded LeNet-5)."""
    from noisyops import models
    net = models.lenet5().eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, 28, 28))
        return 28
    except RuntimeError:
        return 32


def _calibrated(model, args, cfg):
    """Calibrate the in/out ranges on ``--calib-batches`` training batches when quantizers need them."""
    if cfg.in_bits is not None or cfg.out_bits is not None:
        import noisyops
        calib = load_data(args, train=True, limit=args.batch_size * args.calib_batches)
        noisyops.calibrate(model, calib)
    return model


def _write_csv(path: str, rows: List[dict]):
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in what if w not in _WHAT]
    if bad:
        raise SystemExit(f"--what: unknown {bad}; expected a comma list of {_WHAT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    import noisyops
    from . import evaluation as E
    from .analysis import plots
    from .analysis.report import write_report
    from .analysis import (bias_variance_sweep, eta_sweep, mutual_information_sweep, train_infer_grid,
                           walking_noise)

    t0 = time.perf_counter()
    model, cfg, ckpt = build_model(args)
    batches = load_data(args, train=False, limit=args.limit)
    model = _calibrated(model, args, cfg)
    n_test = sum(int(y.numel()) for _, y in batches)
    meta = {"model": args.model, "checkpoint": ckpt, "dataset": args.dataset, "test samples": n_test,
            "layer config": repr(cfg), "noise seed": args.seed,
            "chips per call": args.group or "auto (1 on CPU, 10 on GPU)",
            "backend": os.environ.get("NOISYOPS_BACKEND", "auto"),
            "command": "python -m noisyops.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)}
    results: dict = {}
    figures: dict = {}
    out = args.out

    if "eval" in what:
        clean = E.clean_accuracy(model, batches)
        r = E.evaluate_chips(model, batches, args.chips, group_size=args.group,
                             chip_offset=args.chip_offset, target_half_width=args.ci_half_width,
                             confidence=args.confidence, progress=progress, desc="eval chips")
        d = r.to_dict()
        d["clean_accuracy"] = clean
        results["eval"] = d
        _write_csv(os.path.join(out, "eval_chips.csv"),
                   [{"chip": i, "accuracy": a, "loss": l} for i, a, l in zip(r.chip_ids, r.accuracies, r.losses)])
        figures["eval"] = plots.plot_chip_accuracies(d, os.path.join(out, "eval_chips.png"))
    if "sweep" in what:
        models_ = {args.model: model}
        for item in (args.sweep_models.split(",") if args.sweep_models else []):
            name, _, ck = item.partition("=")
            models_[name] = _calibrated(build_model(args, ck)[0], args, cfg)
        sw = eta_sweep(models_, batches, _floats(args.sweep_etas), n_chips=args.sweep_chips,
                       group_size=args.group, chip_offset=args.chip_offset, progress=progress)
        results["sweep"] = sw
        _write_csv(os.path.join(out, "sweep.csv"), [{"model": n, **r} for n, rows in sw.items() for r in rows])
        figures["sweep"] = plots.plot_eta_sweep(sw, os.path.join(out, "sweep.png"))
    if "grid" in what:
        if not args.grid:
            raise SystemExit("--what grid needs --grid train_eta=checkpoint,...")
        by_eta = {}
        for item in args.grid.split(","):
            eta_s, _, ck = item.partition("=")
            by_eta[float(eta_s)] = _calibrated(build_model(args, ck)[0], args, cfg)
        gr = train_infer_grid(by_eta, batches, _floats(args.sweep_etas), n_chips=args.sweep_chips,
                              group_size=args.group, chip_offset=args.chip_offset, progress=progress)
        results["grid"] = gr
        _write_csv(os.path.join(out, "grid.csv"),
                   [{"train_eta": t, "infer_eta": e, "mean": m, "half_width": h}
                    for t, row, hw in zip(gr["train_etas"], gr["mean"], gr["half_width"])
                    for e, m, h in zip(gr["infer_etas"], row, hw)])
        figures["grid"] = plots.plot_heatmap(gr, os.path.join(out, "grid.png"))
    if "biasvar" in what:
        bv = bias_variance_sweep(model, batches, _floats(args.ratios), n_instances=args.instances,
                                 group_size=args.group, chip_offset=args.chip_offset, progress=progress,
                                 loss=args.biasvar_loss)
        results["biasvar"] = bv
        _write_csv(os.path.join(out, "biasvar.csv"), bv)
        figures["biasvar"] = plots.plot_bias_variance(bv, os.path.join(out, "biasvar.png"))
    if "mi" in what:
        mi_data = (load_sample(args, args.mi_inputs, seed=args.seed) if args.mi_split == "train"
                   else as_batches_of(batches, args.mi_inputs))
        mi = mutual_information_sweep(model, mi_data, _floats(args.mi_levels), n_repeats=args.mi_repeats,
                                      bins=args.bins, output=args.mi_output, group_size=args.group,
                                      chip_offset=args.chip_offset, progress=progress)
        mi["split"] = args.mi_split
        results["mi"] = mi
        _write_csv(os.path.join(out, "mi.csv"), mi["rows"])
        figures["mi"] = plots.plot_mutual_information(mi, os.path.join(out, "mi.png"), xlabel="η")
    if "walking" in what:
        results["walking"] = []
        for i, spec in enumerate(s for s in args.walk.split(",") if s.strip()):
            kind, _, target = spec.strip().partition(":")
            target = target or "weights"
            levels = _log_spec(args.walk_out_levels if target == "outputs" else args.walk_levels)
            wk = walking_noise(model, batches, levels, kind=kind, target=target,
                               n_chips=args.walk_chips, group_size=args.group,
                               chip_offset=args.chip_offset, progress=progress,
                               layers=args.walk_layers.split(",") if args.walk_layers else None)
            d = wk.to_dict()
            results["walking"].append(d)
            tag = f"walking_{wk.kind}_{wk.target}"
            _write_csv(os.path.join(out, f"{tag}.csv"), wk.rows())
            _write_csv(os.path.join(out, f"{tag}_midpoints.csv"),
                       [{"layer": n, **wk.midpoints[n]} for n in wk.layers])
            figures[f"walking_{i}_curves"] = plots.plot_walking_curves(d, os.path.join(out, f"{tag}.png"))
            figures[f"walking_{i}_midpoints"] = plots.plot_walking_midpoints(
                d, os.path.join(out, f"{tag}_midpoints.png"))
    meta["seconds"] = f"{time.perf_counter() - t0:.1f}"
    meta["kernel calls by backend"] = ", ".join(f"{k}/{b}: {n}" for (k, b), n in
                                                sorted(noisyops.dispatch.backend_counts().items()))
    results["meta"] = meta
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    report = write_report(out, meta, results, figures)
    print(f"wrote {report} ({meta['seconds']} s)")
    if "eval" in results:
        s = results["eval"]["summary"]
        print(f"eval: clean {100 * results['eval']['clean_accuracy']:.2f}%  noisy mean "
              f"{100 * s['mean']:.2f}% ± {100 * s['half_width']:.2f} (95% CI, n={s['n']}), "
              f"std {100 * s['std']:.2f}")
    return results


if __name__ == "__main__":
    main()
