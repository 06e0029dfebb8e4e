"""Resident memory after each phase of the noisy ResNet-50 setup of `resnet50_cpu.py` (build the
clean model, convert + calibrate, two train steps), to see where the memory children's starting
RSS comes from.

    python benchmarks/rss_phases_cpu.py [--batch 16] [--threads 2]

Prints ``VmRSS`` and ``VmHWM`` (MB) after a ``gc.collect()`` at each phase. docs/benchmarks_cpu.md
("Commands", memory) quotes it.
"""
import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet50_cpu import _rss_kb, clean_model, make_train_step, noisy_model  # noqa: E402


def report(tag: str) -> None:
    gc.collect()
    print(f"{tag:<28} RSS {_rss_kb('VmRSS') / 1024:8.0f} MB  HWM {_rss_kb('VmHWM') / 1024:8.0f} MB",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report("start")
    clean = clean_model()
    report("clean built")
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    noisy, _ = noisy_model(clean, x)
    report("noisy built + calibrated")
    step = make_train_step(noisy, x, y)
    step()
    report("after train step 1")
    step()
    report("after train step 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
