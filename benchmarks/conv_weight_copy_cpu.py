"""Is ATen's conv slower on the noisy weight copy than on the clean Parameter? (issue 12, item 1)

`python benchmarks/conv_weight_copy_cpu.py [--repeats 7]` times `F.conv2d` and
`aten::convolution_backward` (grad input + grad weight in one call, as both the clean autograd and
the noisy backward call it) on four ResNet-50 layer shapes at batch 16 with three weights of equal
values: the clean ``nn.Parameter`` (the same tensor every call), a fresh tensor per call (what the
noisy path hands to ATen: `cpu_noisy_weights_` writes a new ``Wn`` each call) and one reused tensor
rewritten before each call. Only the conv is timed (the copy is made before the timer starts);
variants are interleaved, medians printed in ms, and the sums over the layers with ratios to clean.
If oneDNN cached a reorder of the clean weight, or the copy's memory format differed, "clean" would
be faster.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (N, C_in, H, W, C_out, k, padding): layer1 3x3, layer1 1x1 reduce, layer3 3x3, layer3 1x1
    (16, 64, 56, 56, 64, 3, 1),
    (16, 256, 56, 56, 64, 1, 0),
    (16, 256, 14, 14, 256, 3, 1),
    (16, 1024, 14, 14, 256, 1, 0),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sums = {}
    print(f"# {args.threads} threads, medians of {args.repeats} interleaved repeats, ms; "
          f"1-min load {os.getloadavg()[0]:.2f}")
    for n, ci, h, w_, co, k, p in SHAPES:
        x = torch.randn(n, ci, h, w_).relu()
        weight = torch.nn.Parameter(0.05 * torch.randn(co, ci, k, k))
        wd = weight.detach()
        g = torch.randn_like(F.conv2d(x, wd, None, 1, p))
        reused = torch.empty_like(wd)

        def fresh():
            return torch.empty_like(wd).copy_(wd)

        def rewritten():
            return reused.copy_(wd)

        weights = {"clean": lambda: wd, "fresh": fresh, "rewritten": rewritten}
        ops = {"fwd": lambda w: F.conv2d(x, w, None, 1, p),
               "bwd": lambda w: torch.ops.aten.convolution_backward(
                   g, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, [True, True, False])}
        variants = {(o, wn): (ops[o], weights[wn]) for o in ops for wn in weights}
        for op, make in variants.values():
            op(make())
        times = {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, (op, make) in variants.items():
                w = make()
                t0 = time.perf_counter()
                op(w)
                times[key].append(time.perf_counter() - t0)
        meds = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        for key, v in meds.items():
            sums[key] = sums.get(key, 0.0) + v
        print((n, ci, h, w_, co, k), "  ".join(f"{o} {wn} {v:.1f}" for (o, wn), v in meds.items()), flush=True)
    print("sum over the layers: " + "  ".join(
        f"{o} {wn} {v:.1f} ({v / sums[(o, 'clean')]:.3f} of clean)" for (o, wn), v in sums.items()))
    print(f"1-min load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
