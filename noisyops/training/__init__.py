"""Training pieces for noise injection + distillation (Noisy Machines): resumable data loaders,
atomic checkpoints, metrics, the per-stage loop, and single-process / torchrun setup.

The end-to-end recipe (teacher → clip + fine-tune → calibrate → noisy student → noisy evaluation)
lives in the ``train`` package of the repository (``python -m train.main``).
"""
from .checkpoint import CheckpointError, atomic_save, latest, load_checkpoint, save_checkpoint
from .data import ResumableLoader, ResumableSampler, TensorImageDataset, build_dataset, make_loader
from .loop import StageConfig, evaluate, set_train_eta, step_eta, train_stage, unwrap
from .metrics import MetricsLogger
from . import distributed

__all__ = ["CheckpointError", "atomic_save", "latest", "load_checkpoint", "save_checkpoint", "ResumableLoader",
           "ResumableSampler", "TensorImageDataset", "build_dataset", "make_loader", "StageConfig",
           "evaluate", "set_train_eta", "step_eta", "train_stage", "unwrap", "MetricsLogger",
           "distributed"]
