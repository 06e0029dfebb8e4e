"""Train a noise-robust network: ``python -m train.main [--config FILE] [--preset demo] [key=value ...]``.

Single process: ``python -m train.main --config train/configs/mnist_lenet5.json``.
Several processes (DDP, gloo on CPU / NCCL on GPU): ``torchrun --nproc_per_node=2 -m train.main ...``.
Resume a killed run: the same command plus ``--resume`` (or ``resume=true``).
The README's main job: ``python -m train.main --preset demo``.
"""
from __future__ import annotations

import argparse
import sys

from .config import PRESETS, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON or YAML config file (keys: see train/config.py DEFAULTS)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a built-in config (demo = README main job)")
    ap.add_argument("--resume", action="store_true", help="continue from out_dir's last checkpoints")
    ap.add_argument("--out-dir", help="shorthand for out_dir=...")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. student.eta=0.1")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    cfg = load_config(args.config, overrides, preset=args.preset)
    from .pipeline import run
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
