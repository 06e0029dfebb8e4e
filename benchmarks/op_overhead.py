"""Per-call overhead of a noisy op: a tiny conv / linear (the work is negligible) against
F.conv2d / F.linear in the same process (issue 12 item 3).

    python benchmarks/op_overhead.py [--threads 1] [--json out.json]

Prints, for each case, the median CPU time per call (torch.utils.benchmark, process time) of
the noisy module and of the plain torch layer on the same tensors, and their difference — the
overhead the noisy op adds beyond the work. Which noisyops is measured is printed first (run it
from another directory against an installed tree to get a "before").
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.utils.benchmark as tb

import noisyops
from noisyops import LayerConfig

NOISY = LayerConfig(eta=0.04, w_range=(-1.0, 1.0), in_bits=8, in_range=(-3.0, 3.0), out_bits=8,
                    out_range=(-8.0, 8.0))
CASES = {
    "conv clean config": ("conv", LayerConfig()),
    "conv eta=0.04 8-bit DAC+ADC": ("conv", NOISY),
    "linear eta=0.04 8-bit DAC+ADC": ("linear", NOISY),
}


def _median(stmt: str, env: dict) -> float:
    # process CPU time, not wall time: on a shared, loaded machine wall time mostly measures the
    # other processes (one thread: the process time is this call's time)
    t = tb.Timer(stmt, globals=env, timer=time.process_time)
    return t.blocked_autorange(min_run_time=1.0).median


def run(threads: int) -> list:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for name, (kind, cfg) in CASES.items():
        if kind == "conv":
            clean = torch.nn.Conv2d(4, 4, 3, padding=1)
            x = torch.randn(1, 4, 8, 8)
        else:
            clean = torch.nn.Linear(16, 16)
            x = torch.randn(2, 16)
        noisy = noisyops.convert(torch.nn.Sequential(clean), cfg)[0]
        xg = x.clone().requires_grad_()
        env = dict(noisy=noisy, clean=clean, x=x, xg=xg, torch=torch)
        with torch.no_grad():
            t_noisy = _median("noisy(x)", env)
            t_clean = _median("clean(x)", env)
        t_noisy_bw = _median("noisy(xg).sum().backward()", env)
        t_clean_bw = _median("clean(xg).sum().backward()", env)
        rows.append(dict(case=name, fwd_noisy_us=t_noisy * 1e6, fwd_clean_us=t_clean * 1e6,
                         fwd_overhead_us=(t_noisy - t_clean) * 1e6, fwdbwd_noisy_us=t_noisy_bw * 1e6,
                         fwdbwd_clean_us=t_clean_bw * 1e6,
                         fwdbwd_overhead_us=(t_noisy_bw - t_clean_bw) * 1e6))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"noisyops from {noisyops.__file__}, torch {torch.__version__}, {args.threads} thread(s)")
    rows = run(args.threads)
    print(f"{'case':32s} {'fwd noisy':>10s} {'fwd clean':>10s} {'overhead':>9s} | "
          f"{'f+b noisy':>10s} {'f+b clean':>10s} {'overhead':>9s}  (µs per call, medians)")
    for r in rows:
        print(f"{r['case']:32s} {r['fwd_noisy_us']:10.1f} {r['fwd_clean_us']:10.1f} "
              f"{r['fwd_overhead_us']:9.1f} | {r['fwdbwd_noisy_us']:10.1f} {r['fwdbwd_clean_us']:10.1f} "
              f"{r['fwdbwd_overhead_us']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(noisyops=noisyops.__file__, threads=args.threads, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
