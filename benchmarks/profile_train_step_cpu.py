"""Where does a noisy ResNet-50 train step spend its time on the CPU? (torch.profiler)

`python benchmarks/profile_train_step_cpu.py [--batch 16] [--steps 2] [--rows 15]` builds the clean
and the noisyops model of `resnet50_cpu.py` (η = 0.04, 8-bit input/output quantizers, per_call),
runs one warm-up step of each, then ``--steps`` profiled train steps of each, interleaved
(clean, noisy, clean, noisy, ...) so that a change in machine load hits both alike. It prints the
top operators of the last step of each by self CPU time, and a side-by-side table of the operators
whose self time differs most between noisy and clean: per operator the **median over the steps**
of its self time in one step (a shared machine makes single steps unreliable), with the 1-minute
load average before and after. ``--json PATH`` writes those medians.
"""
import argparse
import json
import os
import statistics
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet50_cpu import clean_model, make_train_step, noisy_model  # noqa: E402  (puts this tree first)
import noisyops  # noqa: E402


def self_times(prof) -> dict:
    """``{operator name: (self CPU seconds, calls)}`` of one profile."""
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}


def medians(per_step: list) -> dict:
    """``{operator: [median self seconds over the steps, calls per step]}`` (0 s in a step without it)."""
    keys = set().union(*per_step)
    return {k: [statistics.median(t.get(k, (0.0, 0))[0] for t in per_step),
                max(t.get(k, (0.0, 0))[1] for t in per_step)] for k in keys}


def diff_table(clean: dict, noisy: dict, rows: int) -> str:
    keys = set(clean) | set(noisy)
    d = sorted(keys, key=lambda k: -abs(noisy.get(k, [0, 0])[0] - clean.get(k, [0, 0])[0]))
    lines = [f"{'operator (median self CPU s per step)':<58} {'clean':>8} {'noisy':>8} {'noisy-clean':>12} {'calls n':>8}"]
    for k in d[:rows]:
        c = clean.get(k, [0.0, 0])[0]
        n = noisy.get(k, [0.0, 0])[0]
        calls = noisy.get(k, [0, 0])[1]
        lines.append(f"{k[:58]:<58} {c:>8.3f} {n:>8.3f} {n - c:>+12.3f} {calls:>8d}")
    tc = sum(v[0] for v in clean.values())
    tn = sum(v[0] for v in noisy.values())
    lines.append(f"{'sum of the medians':<58} {tc:>8.3f} {tn:>8.3f} {tn - tc:>+12.3f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per variant, interleaved")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# noisyops from {noisyops.__file__}, {args.threads} threads, batch {args.batch}")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    clean = clean_model()
    noisy, _ = noisy_model(clean, x)
    steps = {"clean": make_train_step(clean, x, y), "noisyops": make_train_step(noisy, x, y)}
    for step in steps.values():
        step()
    per_step = {name: [] for name in steps}
    totals = {name: [] for name in steps}
    last = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.steps):
        for name, step in steps.items():
            with profile() as prof:
                step()
            t = self_times(prof)
            per_step[name].append(t)
            totals[name].append(sum(v[0] for v in t.values()))
            last[name] = prof
    load1 = os.getloadavg()[0]
    for name, prof in last.items():
        print(f"\n== {name}: self CPU time per train step {', '.join(f'{v:.2f}' for v in totals[name])} s "
              f"(median {statistics.median(totals[name]):.2f}); last step: ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    med = {name: medians(v) for name, v in per_step.items()}
    print(f"\n== noisy vs clean, operators with the largest difference (medians of {args.steps} "
          f"interleaved steps; 1-min load {load0:.2f} -> {load1:.2f}) ==")
    print(diff_table(med["clean"], med["noisyops"], args.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_avg_1min": [load0, load1], "steps": args.steps,
                       "step_self_s": totals, "median_self_s": med}, f, indent=1)


if __name__ == "__main__":
    main()
