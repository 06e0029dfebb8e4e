"""Metrics to CSV and TensorBoard (rank 0 only), resumable.

One CSV per stage (``metrics.csv``: columns ``step, epoch, name, value``, long format so new metric
names never change the header). On resume, rows with ``step`` beyond the checkpoint's step are
dropped (they were written by the killed run after its last checkpoint and will be replayed).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, Optional

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """``log(step, epoch, {name: value})`` → CSV row(s) + TensorBoard scalars (if available)."""

    def __init__(self, out_dir: Optional[str], *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = bool(enabled and out_dir)
        self.path = os.path.join(out_dir, "metrics.csv") if out_dir else None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._rewrite(rows)
        elif resume_step is None or not os.path.exists(self.path):
            self._rewrite([])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step)
            except Exception:  # tensorboard missing: CSV only
                self.tb = None

    def _rewrite(self, rows) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "epoch", "name", "value"])
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def log(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, epoch, k, f"{float(v):.6g}"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
