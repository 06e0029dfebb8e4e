"""Where does a noisy ResNet-50 train step spend its time on the CPU? (torch.profiler)

`python benchmarks/profile_train_step_cpu.py [--batch 16] [--rows 15]` builds the clean and the
noisyops model of `resnet50_cpu.py` (η = 0.04, 8-bit input/output quantizers, per_call), runs one
warm-up and one profiled train step of each, and prints the top operators by self CPU time.
"""
import argparse
import os
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet50_cpu import clean_model, make_train_step, noisy_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    clean = clean_model()
    noisy, _ = noisy_model(clean, x)
    for name, model in (("clean", clean), ("noisyops", noisy)):
        step = make_train_step(model, x, y)
        step()
        with profile() as prof:
            step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        print(f"\n== {name}: one train step, {total:.2f} s self CPU time ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
