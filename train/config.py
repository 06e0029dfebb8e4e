"""Run configuration: defaults ← config file (JSON or YAML) ← ``key.sub=value`` overrides.

Every key must exist in `DEFAULTS` (a typo is an error naming the key, not a silently ignored
setting). Override values are parsed as YAML/JSON scalars or lists (``student.eta=0.1``,
``eval.etas=[0,0.1]``, ``teacher.checkpoint=null``), falling back to the raw string.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List

__all__ = ["DEFAULTS", "load_config", "apply_overrides", "parse_value", "PRESETS"]

_STAGE = {"epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "out_dir": "runs/run",
    "device": "auto",            # auto | cpu | cuda
    "resume": False,             # continue from out_dir's checkpoints
    "ckpt_every": 100,           # steps between checkpoints (plus every epoch end)
    "progress": True,
    "amp": True,                 # autocast on CUDA: bfloat16 where supported, else float16
    "threads": 0,                # torch.set_num_threads (0 = leave torch's default)
    "data": {"name": "mnist", "root": None, "batch_size": 128, "eval_batch_size": 1000,
             "num_workers": 0, "train_limit": None, "test_limit": None, "pad": 0, "augment": None,
             "download": False},   # download: let torchvision fetch a dataset missing under root
    "model": {"name": "lenet5", "num_classes": 10},
    # teacher: a checkpoint (a plain state_dict, or a checkpoint of this tool) or trained here
    "teacher": dict(_STAGE, checkpoint=None, epochs=2, lr=0.05),
    # clip every conv/linear weight to ±clip_k·std(W), then fine-tune with projection after each step
    "finetune": dict(_STAGE, clip_k=2.0, epochs=1, lr=0.01),
    # quantizers of the student (None = off) and calibration of the input/output ranges
    "quant": {"w_bits": 8, "in_bits": 8, "out_bits": 8, "calib_batches": 10, "lo_pct": 0.1,
              "hi_pct": 99.9},
    # noisy student: η (additive, σ = η·(w_max − w_min)), optional per-step η ~ N(eta, eta_std)
    # clean_grad_input: backward through the noise-free weights (the paper's "gradients are
    # calculated with clean weights"); False = through the noisy weights
    "student": dict(_STAGE, eta=0.1, eta_std=0.0, eta_mul=0.0, alpha=1.0, T=6.0, epochs=2, lr=0.01,
                    teacher="clean", clean_grad_input=False),   # teacher for distillation: clean | finetuned
    # noisy evaluation over chips (per_instance noise): the student and the baselines
    "eval": {"etas": [0.0, 0.05, 0.1, 0.2, 0.3], "chips": 10, "group_size": 10, "batch_size": 1000,
             "test_limit": None, "baseline": True},
}

PRESETS: Dict[str, Dict[str, Any]] = {
    # The README's main job: LeNet-5 on MNIST, a few minutes on 2 CPU cores.
    "demo": {
        "out_dir": "runs/demo", "ckpt_every": 100, "threads": 2,
        "data": {"name": "mnist", "pad": 0, "train_limit": 12000, "test_limit": 2000,
                 "batch_size": 64},
        "model": {"name": "lenet5"},
        "teacher": {"epochs": 2, "lr": 0.05},
        "finetune": {"epochs": 1, "lr": 0.01},
        "student": {"eta": 0.1, "alpha": 1.0, "T": 6.0, "epochs": 1, "lr": 0.01},
        "eval": {"etas": [0.0, 0.1, 0.2], "chips": 10, "batch_size": 500, "test_limit": 1000},
    },
}


def parse_value(text: str) -> Any:
    """``"0.1"`` → 0.1, ``"[0,0.1]"`` → [0, 0.1], ``"null"`` → None, ``"true"`` → True, else the string."""
    try:
        import yaml
        return yaml.safe_load(text)
    except ImportError:
        pass
    except Exception:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _merge(base: Dict[str, Any], upd: Dict[str, Any], where: str = "") -> None:
    for k, v in upd.items():
        key = f"{where}{k}"
        if k not in base:
            raise KeyError(f"config key {key!r} is not known; known keys here: {sorted(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise TypeError(f"config key {key!r}: expected a mapping, got {v!r}")
            _merge(base[k], v, key + ".")
        else:
            base[k] = v


def apply_overrides(cfg: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``["a.b=1", "c=x"]`` in place; returns ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. student.eta=0.1)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        nested: Dict[str, Any] = {}
        cur = nested
        for p in parts[:-1]:
            cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = parse_value(text)
        _merge(cfg, nested)
    return cfg


def load_config(path: str = None, overrides: List[str] = (), preset: str = None) -> Dict[str, Any]:
    """Defaults, then ``preset`` (name in `PRESETS`), then the file (``.json``, ``.yaml``/``.yml``),
    then the overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
        _merge(cfg, copy.deepcopy(PRESETS[preset]))
    if path:
        with open(path) as f:
            text = f.read()
        if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ImportError(f"config {path!r} is YAML but PyYAML is not installed; "
                                  f"use a .json config") from e
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"config {path!r}: expected a mapping at the top level")
        _merge(cfg, data)
    apply_overrides(cfg, list(overrides))
    return cfg
