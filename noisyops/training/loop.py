"""One training stage (clean teacher, clipped fine-tune, or noisy student), resumable at any step.

`train_stage` runs SGD (momentum, weight decay in the optimizer) with a per-step cosine decay
over ``epochs × len(loader)`` steps and the loss of `noisyops.distill.distillation_loss`
(teacher None or ``alpha = 0``: plain cross-entropy / noise injection). After every optimizer
step it can project the weights into their clip ranges (`noisyops.project_weights`).

Exact resume contract (CPU, same thread count): everything the next step depends on is either
in the checkpoint or a pure function of ``(seed, epoch, step)``:
- model ``state_dict`` (weights, BN statistics, and the noisy layers' seeds and call counters),
  optimizer (momentum), LR scheduler, AMP scaler, ``epoch``, ``batch`` (within the epoch),
  ``step`` (global) — all in the checkpoint;
- data order and augmentation: a function of (seed, epoch) (`noisyops.training.data`);
- the per-step training η (``eta_std > 0``): drawn from ``Generator.manual_seed(seed·1_000_003 +
  step)``, ``η = max(0, η₀ + σ_η·N(0, 1))``.
Checkpoints: every ``ckpt_every`` steps, at every epoch end (after evaluation) and at the end.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..distill import distillation_loss
from . import distributed as D
from .checkpoint import latest, load_checkpoint, save_checkpoint
from .metrics import MetricsLogger

__all__ = ["StageConfig", "train_stage", "evaluate", "unwrap", "step_eta", "set_train_eta"]


@dataclasses.dataclass
class StageConfig:
    """Hyper-parameters of one stage. ``epochs`` may be 0 (stage skipped, model unchanged)."""
    name: str = "stage"
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    T: float = 6.0
    alpha: float = 1.0
    eta0: Optional[float] = None      # training η; None = leave the layers' config alone
    eta_std: float = 0.0              # σ_η: per-step η ~ N(η0, σ_η), clipped at 0
    project: bool = False             # clip weights into their ranges after every step
    ckpt_every: int = 0               # steps between checkpoints (0 = epoch ends only)
    amp: bool = True                  # autocast on CUDA: bfloat16 where supported, else float16
                                      # (+ GradScaler); ignored on CPU
    channels_last: bool = True        # channels-last model and batches on CUDA
    max_steps: Optional[int] = None   # stop after this many global steps (tests, smoke runs)
    progress: bool = True             # tqdm bar on rank 0
    eval_every_epoch: bool = True

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs}: expected >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: expected a finite float > 0")
        if self.eta_std < 0:
            raise ValueError(f"eta_std={self.eta_std}: expected >= 0")
        if self.eta0 is not None and self.eta0 < 0:
            raise ValueError(f"eta0={self.eta0}: expected None or >= 0")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every={self.ckpt_every}: expected >= 0")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def step_eta(eta0: float, eta_std: float, seed: int, step: int) -> float:
    """The training η of global step ``step``: ``max(0, η₀ + σ_η·z)``, ``z`` from a generator seeded
    with ``seed·1_000_003 + step`` (same on every rank; a pure function, so resume replays it)."""
    if eta_std == 0:
        return float(eta0)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
    z = torch.randn((), generator=g, dtype=torch.float64).item()
    return max(0.0, float(eta0) + float(eta_std) * z)


def set_train_eta(model: nn.Module, eta: float) -> None:
    """Set η on every noisy layer (``m.config = m.config.replace(eta=eta)``)."""
    import noisyops
    for _, m in noisyops.noisy_layers(unwrap(model)):
        if m.config.eta != eta:
            m.config = m.config.replace(eta=eta)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, *, max_batches: Optional[int] = None) -> Dict[str, float]:
    """Accuracy and mean CE loss over ``loader`` (summed over ranks). Noisy layers keep their config
    (per_call noise: one draw per batch; their call counters advance)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    loader.set_epoch(0, 0)
    for b, (x, y) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += (logits.argmax(1) == y).sum().double().cpu()
        total += y.numel()
    stats = torch.stack([correct, total, loss_sum])
    if D.is_distributed():
        stats = stats.to(device)
        D.all_reduce_sum(stats)
        stats = stats.cpu()
    c, t, l = stats.tolist()
    return {"acc": c / max(t, 1.0), "loss": l / max(t, 1.0), "n": t}


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` on ``device``: bfloat16 on CUDA devices that support it
    (sm_80+; no loss scaling needed), else float16; None on the CPU (amp stays off there, as
    before: no CPU bf16 training speed was measured)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _cosine(total_steps: int):
    def f(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return f


def train_stage(model: nn.Module, train_loader, *, cfg: StageConfig, ckpt_dir: Optional[str],
                device: torch.device, seed: int = 0, teacher: Optional[nn.Module] = None,
                eval_loader=None, resume: bool = True, rank: int = 0,
                after_load: Optional[Callable[[nn.Module], None]] = None,
                log: Callable[[str], None] = print) -> Dict[str, float]:
    """Train ``model`` (possibly DDP-wrapped) for ``cfg.epochs`` epochs; returns the last metrics.

    Args:
        model: the network (its noisy layers carry their own noise seeds and counters).
        train_loader: a `noisyops.training.data.ResumableLoader` (this rank's share).
        cfg: `StageConfig`.
        ckpt_dir: where ``last.pt`` / ``epoch<k>.pt`` / ``final.pt`` go (None: no checkpoints).
        device: where batches go.
        seed: run seed (per-step η generator).
        teacher: clean teacher for distillation (eval mode, no grad), or None.
        eval_loader: evaluated at every epoch end if given.
        resume: continue from ``ckpt_dir/last.pt`` if it exists (a finished stage returns at once).
        after_load: called with the unwrapped model after a checkpoint is loaded (e.g. to re-apply
            the per-rank noise seed under DDP).
    """
    net = unwrap(model)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov and cfg.momentum > 0)
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total))
    dtype = amp_dtype(device) if cfg.amp else None
    use_amp = dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)  # bf16 needs no scaling
    fmt = torch.channels_last if (cfg.channels_last and device.type == "cuda") else None
    if fmt is not None:
        net.to(memory_format=fmt)
    epoch = batch = step = 0
    last: Dict[str, float] = {}
    is_main = rank == 0

    path = latest(ckpt_dir) if (ckpt_dir and resume) else None
    if path:
        ck = load_checkpoint(path)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        epoch, batch, step = ck["epoch"], ck["batch"], ck["step"]
        last = dict(ck.get("metrics", {}))
        if after_load is not None:
            after_load(net)
        if ck.get("done"):
            log(f"[{cfg.name}] already finished ({path}); skipping")
            return last
        log(f"[{cfg.name}] resumed from {path}: epoch {epoch}, batch {batch}, step {step}")
    metrics = MetricsLogger(ckpt_dir, enabled=is_main, resume_step=step if path else None)

    def save(tag=None, done=False):
        if not (ckpt_dir and is_main):
            D.barrier()
            return
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "step": step,
                 "done": done, "metrics": last, "stage": cfg.name, "config": dataclasses.asdict(cfg)}
        save_checkpoint(state, ckpt_dir, tag=tag)
        D.barrier()

    if teacher is not None:
        teacher.eval()
    stop = False
    while epoch < cfg.epochs and not stop:
        train_loader.set_epoch(epoch, batch)
        model.train()
        bar = None
        if cfg.progress and is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps_per_epoch, initial=batch, desc=f"{cfg.name} {epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)
        t0, seen, run_loss, run_correct, run_n = time.perf_counter(), 0, 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if fmt is not None and x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            if cfg.eta0 is not None:
                set_train_eta(net, step_eta(cfg.eta0, cfg.eta_std, seed, step))
            with torch.autocast(device.type, dtype=dtype or torch.float16, enabled=use_amp):
                logits = model(x)
                t_logits = None
                if teacher is not None and cfg.alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(x)
            loss = distillation_loss(logits.float(), y, None if t_logits is None else t_logits.float(),
                                     T=cfg.T, alpha=cfg.alpha)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if cfg.project:
                import noisyops
                noisyops.project_weights(net)
            step += 1
            batch += 1
            n = y.numel()
            acc = (logits.detach().argmax(1) == y).float().mean().item()
            lv = loss.item()
            seen += n
            run_loss += lv * n
            run_correct += acc * n
            run_n += n
            if is_main and (step % 10 == 0 or batch == steps_per_epoch):
                metrics.log(step, epoch, {"train/loss": lv, "train/acc": acc, "lr": sched.get_last_lr()[0]})
            if bar is not None:
                ips = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{run_loss / run_n:.4f}", acc=f"{run_correct / run_n:.4f}",
                                img_s=f"{ips:.0f}")
                bar.update(1)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and batch < steps_per_epoch:
                save()
            if stop:
                break
        if bar is not None:
            bar.close()
        last = {"train_loss": run_loss / max(run_n, 1), "train_acc": run_correct / max(run_n, 1)}
        if stop and batch < steps_per_epoch:
            break
        if eval_loader is not None and cfg.eval_every_epoch:
            ev = evaluate(model, eval_loader, device)
            last.update({"val_acc": ev["acc"], "val_loss": ev["loss"]})
            if is_main:
                metrics.log(step, epoch, {"val/acc": ev["acc"], "val/loss": ev["loss"]})
        D.average_buffers(net)
        if is_main:
            log(f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs}: " +
                ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        epoch += 1
        batch = 0
        save(tag=f"epoch{epoch}")
    done = epoch >= cfg.epochs
    save(tag="final" if done else None, done=done)
    metrics.close()
    return last
