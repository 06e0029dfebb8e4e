"""The Noisy Machines recipe, stage by stage (each stage resumable from ``out_dir/<stage>/last.pt``).

1. teacher: load ``teacher.checkpoint`` or train a clean model (stage ``teacher``);
2. clip every conv/linear weight to ``±clip_k·std(W)`` (measured once, at conversion) and fine-tune
   with projection after every step (stage ``finetune``, noise off);
3. switch on the quantizers (``quant.*_bits``) and calibrate the input/output ranges on training
   batches (0.1 / 99.9 percentiles, then fixed);
4. the noisy student: per-call additive weight noise η (optionally η ~ N(η₀, σ_η) per step),
   distilled from the clean teacher (``student.alpha`` > 0) or plain noise injection (``alpha = 0``),
   weights projected after every step (stage ``student``);
5. noisy evaluation over chips (per_instance noise, `noisyops.evaluation.evaluate_chips`) of the
   student and of the baseline without retraining, at every η of ``eval.etas``.

Under torchrun every rank builds the same model from the same seed, wraps it in DDP (buffers are
not broadcast) and reads its share of the data through the distributed sampler. Every rank holds
the same ``seed`` buffer; the noisy layers draw per-rank noise themselves (their effective seed is
``seed + rank·0x9E3779B97F4A7C15``, `noisyops.nn` ``per_rank_noise = True``), so rank r's noise
differs from rank 0's and a checkpoint written by rank 0 resumes every rank. BatchNorm statistics
are averaged over ranks at every epoch end. Rank 0 writes the checkpoints and runs the final
evaluation (outside DDP it is rank 0 again, so its chips equal a single-process evaluation's).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from noisyops.training import StageConfig, build_dataset, evaluate, make_loader, train_stage
from noisyops.training import distributed as D

from .models import build_model, load_weights

__all__ = ["run", "prepare", "train_student", "quantize", "eval_batches", "stage_config", "noisy_eval",
           "format_table", "Context"]


def stage_config(cfg: Dict[str, Any], name: str, **extra) -> StageConfig:
    s = cfg[name]
    return StageConfig(name=name, epochs=int(s["epochs"]), lr=float(s["lr"]), momentum=float(s["momentum"]),
                       weight_decay=float(s["weight_decay"]), nesterov=bool(s["nesterov"]),
                       ckpt_every=int(cfg["ckpt_every"]), amp=bool(cfg["amp"]), progress=bool(cfg["progress"]),
                       **extra)


def _wrap(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _set_layers(model: nn.Module, **changes) -> None:
    import noisyops
    for _, m in noisyops.noisy_layers(model):
        m.config = m.config.replace(**changes)


def noisy_eval(model: nn.Module, batches, etas: List[float], *, chips: int, group_size: int,
               progress: bool = False, label: str = "") -> Dict[float, Dict[str, float]]:
    """Per η: set every noisy layer's η, evaluate ``chips`` chips (ids 0..chips−1, the same for every
    η and model: common random numbers) on ``batches``; returns ``{η: {mean, std, n}}``."""
    from noisyops.evaluation import evaluate_chips
    import noisyops
    saved = [(m, m.config) for _, m in noisyops.noisy_layers(model)]
    out = {}
    try:
        for eta in etas:
            _set_layers(model, eta=float(eta))
            r = evaluate_chips(model, batches, n_chips=chips, group_size=min(group_size, chips),
                               progress=progress, desc=f"{label} η={eta}")
            out[float(eta)] = {"mean": r.summary.mean, "std": r.summary.std, "n": r.summary.n}
    finally:
        for m, c in saved:
            m.config = c
    return out


def format_table(results: Dict[str, Any]) -> str:
    """Markdown table: one row per model, one column per η (accuracy %, mean ± std over chips);
    "noise-free" = the same model (quantizers on) without noise, on the same test images."""
    etas = sorted({e for row in results["noisy"].values() for e in row})
    head = "| model | noise-free | " + " | ".join(f"η={e:g}" for e in etas) + " |"
    lines = [head, "|" + " --- |" * (len(etas) + 2)]
    for name, row in results["noisy"].items():
        clean = results["clean"].get(name)
        cells = [f"{100 * row[e]['mean']:.2f} ± {100 * row[e]['std']:.2f}" if e in row else "" for e in etas]
        lines.append(f"| {name} | {'' if clean is None else f'{100 * clean:.2f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Context:
    """What the stages share: rank/world/device, data, loaders, the clean teacher, the clipped +
    fine-tuned + quantized model ``ft`` and the results collected so far."""


def prepare(cfg: Dict[str, Any], log=print) -> Context:
    """Stages 1-3: data, teacher (loaded or trained), clip + fine-tune, quantizers + calibration."""
    import noisyops
    from noisyops import LayerConfig

    c = Context()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    rank, world, device = D.init(cfg["device"])
    seed, out = int(cfg["seed"]), cfg["out_dir"]
    resume = bool(cfg["resume"])
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    c.cfg, c.rank, c.world, c.device, c.seed, c.out, c.resume, c.log = cfg, rank, world, device, seed, out, resume, log
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    d, m = cfg["data"], cfg["model"]
    c.train_ds = build_dataset(d["name"], d["root"], train=True, augment=d["augment"], seed=seed, pad=d["pad"],
                               limit=d["train_limit"], download=bool(d["download"]))
    c.test_ds = build_dataset(d["name"], d["root"], train=False, augment=False, seed=seed, pad=d["pad"],
                              limit=d["test_limit"])
    mk = dict(seed=seed, rank=rank, world_size=world, num_workers=int(d["num_workers"]))
    c.train_loader = make_loader(c.train_ds, int(d["batch_size"]), train=True, **mk)
    c.eval_loader = make_loader(c.test_ds, int(d["eval_batch_size"]), train=False, **mk)
    log(f"data: {d['name']} train {len(c.train_ds)} test {len(c.test_ds)}; world size {world}; device {device}")

    # 1. teacher ------------------------------------------------------------------------------------
    torch.manual_seed(seed)
    teacher = build_model(m["name"], int(m["num_classes"])).to(device)
    if cfg["teacher"]["checkpoint"]:
        load_weights(teacher, cfg["teacher"]["checkpoint"])
        log(f"teacher: loaded {cfg['teacher']['checkpoint']}")
    else:
        train_stage(_wrap(teacher, world, device), c.train_loader, cfg=stage_config(cfg, "teacher", alpha=0.0),
                    ckpt_dir=os.path.join(out, "teacher"), device=device, seed=seed,
                    eval_loader=c.eval_loader, resume=resume, rank=rank, log=log)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    c.teacher = teacher
    c.results = {"clean": {}, "noisy": {}, "config": cfg}
    c.results["clean"]["teacher (float)"] = evaluate(teacher, c.eval_loader, device)["acc"]
    log(f"teacher clean accuracy {100 * c.results['clean']['teacher (float)']:.2f}%")

    # 2. clip to ±k·std(W) and fine-tune --------------------------------------------------------------
    k = float(cfg["finetune"]["clip_k"])
    ft = noisyops.convert(copy.deepcopy(teacher), LayerConfig(w_range=k), seed=seed).to(device)
    for p in ft.parameters():
        p.requires_grad_(True)
    noisyops.project_weights(ft)
    train_stage(_wrap(ft, world, device), c.train_loader, cfg=stage_config(cfg, "finetune", alpha=0.0, project=True),
                ckpt_dir=os.path.join(out, "finetune"), device=device, seed=seed, eval_loader=c.eval_loader,
                resume=resume, rank=rank, log=log)
    c.results["clean"][f"clipped ±{k:g}σ + fine-tuned"] = evaluate(ft, c.eval_loader, device)["acc"]

    # 3. quantizers + calibration ---------------------------------------------------------------------
    q = cfg["quant"]
    # the same calibration batches on every rank (a single-rank view of epoch 0)
    calib_loader = make_loader(c.train_ds, int(d["batch_size"]), train=True, seed=seed)
    c.calib = [(x.to(device), y) for _, (x, y) in zip(range(int(q["calib_batches"])), _first_epoch(calib_loader))]
    quantize(ft, q, c.calib)
    c.ft = ft
    c.results["clean"]["+ quantized"] = evaluate(ft, c.eval_loader, device)["acc"]
    log(f"clipped+fine-tuned+quantized clean accuracy {100 * c.results['clean']['+ quantized']:.2f}%")
    return c


def quantize(model: nn.Module, q: Dict[str, Any], calib) -> None:
    """Switch on the quantizers of ``q`` (``w_bits``, ``in_bits``, ``out_bits``) and calibrate the
    input/output ranges on ``calib`` batches (percentiles ``lo_pct``/``hi_pct``, then fixed)."""
    import noisyops
    _set_layers(model, w_bits=q["w_bits"], in_bits=q["in_bits"], out_bits=q["out_bits"])
    if q["in_bits"] or q["out_bits"]:
        noisyops.calibrate(model, calib, lo_pct=float(q["lo_pct"]), hi_pct=float(q["hi_pct"]))


def fresh_student(start: nn.Module, seed: int) -> nn.Module:
    """A copy of ``start`` whose noise is a function of ``seed`` and its own calls only: seed set,
    call counters at 0. (A plain copy would inherit ``start``'s counters, i.e. how many calls the
    fine-tuned model made in this process — more when it was just trained here than when it was
    loaded from its checkpoint — and the same command would draw other noise.)"""
    import noisyops
    student = copy.deepcopy(start)
    noisyops.set_seed(student, int(seed))
    noisyops.reset_calls(student)
    return student


def train_student(c: Context, s: Dict[str, Any], ckpt_dir: str, seed: Optional[int] = None) -> nn.Module:
    """Stage 4: a noisy student from ``c.ft`` with the student settings ``s`` (see DEFAULTS["student"]).

    ``seed`` (default: the run seed ``c.seed``) seeds the student's noise (`noisyops.set_seed`) and
    its data order, so repeated retraining runs of one setting differ only by it."""
    import noisyops
    student = fresh_student(c.ft, c.seed if seed is None else int(seed))
    loader = c.train_loader
    if seed is not None and int(seed) != c.seed:
        loader = make_loader(c.train_ds, int(c.cfg["data"]["batch_size"]), train=True, seed=int(seed),
                             rank=c.rank, world_size=c.world, num_workers=int(c.cfg["data"]["num_workers"]))
    _set_layers(student, eta=float(s["eta"]), eta_mul=float(s["eta_mul"]), sampling="per_call",
                clean_grad_input=bool(s.get("clean_grad_input", False)))
    t_model = c.teacher if s["teacher"] == "clean" else noisyops.export_clean(c.ft).eval()
    sc = StageConfig(name="student", epochs=int(s["epochs"]), lr=float(s["lr"]), momentum=float(s["momentum"]),
                     weight_decay=float(s["weight_decay"]), nesterov=bool(s["nesterov"]),
                     ckpt_every=int(c.cfg["ckpt_every"]), amp=bool(c.cfg["amp"]), progress=bool(c.cfg["progress"]),
                     alpha=float(s["alpha"]), T=float(s["T"]), eta0=float(s["eta"]), eta_std=float(s["eta_std"]),
                     project=True)
    train_stage(_wrap(student, c.world, c.device), loader, cfg=sc, ckpt_dir=ckpt_dir, device=c.device,
                seed=c.seed if seed is None else int(seed), teacher=t_model if sc.alpha > 0 else None, eval_loader=c.eval_loader,
                resume=c.resume, rank=c.rank, log=c.log)
    _set_layers(student, eta=float(s["eta"]))
    return student


def eval_batches(c: Context):
    """The test batches of the final noisy evaluation (``eval.test_limit`` samples, or all)."""
    d, e = c.cfg["data"], c.cfg["eval"]
    ds = c.test_ds if e["test_limit"] is None else build_dataset(
        d["name"], d["root"], train=False, augment=False, pad=d["pad"], limit=int(e["test_limit"]))
    return _all_batches(ds, int(e["batch_size"]), c.device)


def run(cfg: Dict[str, Any], log=print) -> Optional[Dict[str, Any]]:
    """Run the whole recipe of ``cfg`` (see `train.config.DEFAULTS`). Returns the results dict on
    rank 0 (also written to ``out_dir/results.json``), None on other ranks."""
    c = prepare(cfg, log)
    s = cfg["student"]
    student = train_student(c, s, os.path.join(c.out, "student"))
    results = c.results

    # 5. noisy evaluation (rank 0) --------------------------------------------------------------------
    e = cfg["eval"]
    if c.rank == 0 and e["chips"] > 0 and e["etas"]:
        batches = eval_batches(c)
        kind = "distilled" if float(s["alpha"]) > 0 else "noise injection"
        rows = {}
        if e["baseline"]:
            rows["no noise training (clipped+fine-tuned+quantized)"] = c.ft
            results["clean"]["no noise training (clipped+fine-tuned+quantized)"] = _clean_acc(c.ft, batches)
        rows[f"student ({kind}, η_train={s['eta']:g})"] = student
        for name, model in rows.items():
            results["noisy"][name] = noisy_eval(model, batches, list(e["etas"]), chips=int(e["chips"]),
                                                group_size=int(e["group_size"]), progress=bool(cfg["progress"]),
                                                label=name.split(" ")[0])
        results["clean"][f"student ({kind}, η_train={s['eta']:g})"] = _clean_acc(student, batches)
        results["table"] = format_table(results)
        with open(os.path.join(c.out, "results.json"), "w") as f:
            json.dump({k2: v for k2, v in results.items() if k2 != "table"}, f, indent=2, default=str)
        c.log(f"\nclean float teacher: {100 * results['clean']['teacher (float)']:.2f}% on {len(c.test_ds)} test "
              f"images. Table: {sum(int(y.numel()) for _, y in batches)} test images, {e['chips']} chips per η, "
              f"accuracy % (mean ± std over chips)\n" + results["table"])
    D.cleanup()  # barriers first
    return results if c.rank == 0 else None


def _first_epoch(loader):
    loader.set_epoch(0, 0)
    return iter(loader)


def _all_batches(ds, batch_size: int, device):
    loader = make_loader(ds, batch_size, train=False)
    loader.set_epoch(0, 0)
    return [(x.to(device), y.to(device)) for x, y in loader]


@torch.no_grad()
def _clean_acc(model, batches) -> float:
    from noisyops.evaluation import clean_accuracy
    return clean_accuracy(model, batches)
