"""GPU benchmark of the Triton noisy kernels on the real ResNet-50 layer shapes.

For every conv/linear layer of torchvision's ResNet-50 (batch ``--batch``, channels-last fp16 by
default) it times, with ``triton.testing.do_bench``: the clean op (cuDNN / cuBLAS via
``F.conv2d`` / ``F.linear``) and ``noisyops.functional.noisy_conv2d`` / ``noisy_linear`` forced
onto the ``triton`` backend for each sampling mode, and reports TFLOP/s and the noisy/clean time
ratio per layer and for the whole model (sum of layer times), then which backends ran. No GPU:
prints why and exits 0.

    python benchmarks/bench_gpu.py [--batch 64] [--dtype fp16] [--modes per_call,per_instance]
"""
from __future__ import annotations

import argparse
import os
import sys


def resnet50_layers(batch: int):
    """``[(name, kind, x shape, weight shape, stride, padding, dilation, groups)]`` from a forward
    hook pass of torchvision's resnet50 on a ``[batch, 3, 224, 224]`` meta tensor."""
    import torch
    import torchvision
    model = torchvision.models.resnet50()
    layers = []

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            if isinstance(mod, torch.nn.Conv2d):
                layers.append((name, "conv", tuple(x.shape), tuple(mod.weight.shape), mod.stride,
                               mod.padding, mod.dilation, mod.groups))
            else:
                layers.append((name, "linear", tuple(x.shape), tuple(mod.weight.shape), None, None,
                               None, 1))
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(hook(name))
    model.to("meta")(torch.empty(batch, 3, 224, 224, device="meta"))
    return layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--modes", default="per_call,per_sample,per_instance")
    ap.add_argument("--chips", type=int, default=8, help="per_instance: distinct chips in a batch")
    ap.add_argument("--backend", default="triton",
                    help="NOISYOPS_BACKEND for the noisy ops ('auto': dispatch decides, e.g. the "
                         "gpu_policy may pick the cuda backend)")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU available; skipped.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_gpu.py: TRITON_INTERPRET=1 is set; benchmarks need the compiled kernels; skipped.")
        return 0
    import torch.nn.functional as TF
    import triton.testing

    import noisyops
    from noisyops import dispatch
    from noisyops import functional as F

    if args.backend == "auto":
        os.environ.pop("NOISYOPS_BACKEND", None)
    else:
        os.environ["NOISYOPS_BACKEND"] = args.backend
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dev = "cuda"
    modes = args.modes.split(",")
    totals = {"clean": 0.0, **{m: 0.0 for m in modes}}
    flops_total = 0.0
    print(f"{'layer':28s} {'GFLOP':>8s} {'clean ms':>9s} {'TFLOP/s':>8s} " +
          " ".join(f"{m + ' ms':>16s} {'ratio':>6s}" for m in modes))
    for name, kind, xs, ws, stride, padding, dilation, groups in resnet50_layers(args.batch):
        x = torch.randn(xs, device=dev, dtype=dtype)
        if kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(ws, device=dev, dtype=dtype) * 0.05
        if kind == "conv":
            y = TF.conv2d(x, w, None, stride, padding, dilation, groups)
            flops = 2.0 * y.numel() * ws[1] * ws[2] * ws[3]
            clean = lambda: TF.conv2d(x, w, None, stride, padding, dilation, groups)  # noqa: E731
        else:
            flops = 2.0 * xs[0] * ws[0] * ws[1]
            clean = lambda: TF.linear(x, w)  # noqa: E731
        t_clean = triton.testing.do_bench(clean)
        flops_total += flops
        totals["clean"] += t_clean
        cells = []
        for m in modes:
            cfg = noisyops.LayerConfig(eta=0.05, w_range=2.0, sampling=m)
            inst = (torch.arange(xs[0], device=dev) % args.chips) if m == "per_instance" else 1
            if kind == "conv":
                fn = lambda: F.noisy_conv2d(x, w, None, stride, padding, dilation, groups,  # noqa: E731
                                            config=cfg, seed=1, instance=inst)
            else:
                fn = lambda: F.noisy_linear(x, w, None, config=cfg, seed=1, instance=inst)  # noqa: E731
            t = triton.testing.do_bench(fn)
            totals[m] += t
            cells.append(f"{t:16.3f} {t / t_clean:6.2f}")
        print(f"{name:28s} {flops / 1e9:8.2f} {t_clean:9.3f} {flops / t_clean / 1e9:8.1f} " + " ".join(cells))
    print(f"{'whole model (sum)':28s} {flops_total / 1e9:8.2f} {totals['clean']:9.3f} "
          f"{flops_total / totals['clean'] / 1e9:8.1f} " +
          " ".join(f"{totals[m]:16.3f} {totals[m] / totals['clean']:6.2f}" for m in modes))
    print("backends that ran:", dispatch.backend_counts())
    return 0


if __name__ == "__main__":
    sys.exit(main())
