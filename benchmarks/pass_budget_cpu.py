"""What the noisy passes of a ResNet-50 call cost at this machine's memory bandwidth, and the
throughput ceiling they leave (issue 12: "which pass is left and why it cannot go").

    python benchmarks/pass_budget_cpu.py [--batch 16] [--threads 2] [--repeats 5] [--json PATH]

Measured here, in one process:

1. the bytes of every conv / linear input and output of torchvision's ResNet-50 at ``--batch``
   (forward hooks) and its weight count;
2. the time per MB of each C++ pass (``cpu_quantize_out`` = DAC, ``cpu_out_quant_`` = ADC + out
   mask, ``cpu_quantize_mask_out`` = backward re-quantization + bits, ``cpu_mask_grad_out`` into a
   workspace = out mask of the gradient, in place over all words = input mask) and of
   ``Tensor.copy_``, on one ``[batch, 256, 56, 56]`` float32 tensor, and the rate of
   ``cpu_noisy_weights_`` (weights per second);
3. the clean eval and train step of the same model (medians of ``--repeats``).

From these: the time each pass would take over the whole network (bytes × time per MB; the noisy
weights: weight count / rate), summed per workload — eval (DAC, ADC, Wn), train step (eval's +
out mask, re-quantization, input mask, Wn again), and 8 chips per image (DAC and ADC only: the chip
weights are made once per chip) — and the ratio ``clean / (clean + passes)``: the ceiling of
noisy/clean throughput if everything but these passes ran as fast as clean. A prediction from
measured parts, not a measurement of the noisy model (`resnet50_cpu.py` is that).
"""
import argparse
import json
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from noisyops import _ext  # noqa: E402
from resnet50_cpu import interleaved, med  # noqa: E402


def _median_s(f, repeats):
    """Median seconds of ``repeats`` calls of ``f`` after one warm-up call."""
    return med(interleaved({"f": f}, repeats)["f"])


def activation_bytes(model, batch):
    tot = {"in": 0, "out": 0}

    def count(mod, inputs, output):  # returns None: the output is left alone
        tot["in"] += inputs[0].numel() * 4
        tot["out"] += output.numel() * 4

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for h in hooks:
        h.remove()
    n_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    return tot["in"] / 1e6, tot["out"] / 1e6, n_w


def pass_costs(batch, repeats):
    """ms per MB of the tensor each pass runs over (median of ``repeats * 3`` calls)."""
    C = _ext.cpu()[0]
    x = torch.rand(batch, 256, 56, 56) * 3
    mb = x.numel() * 4 / 1e6
    out, y = torch.empty_like(x), x.clone()
    nwords = (x.numel() + 31) // 32
    words = torch.full((nwords,), 0x7FFFFFFF, dtype=torch.int32)  # a cleared bit in every word:
    # the in-place pass touches all words (the dense pass; with few cleared words it skips most)
    bits = torch.empty(nwords, dtype=torch.int32)
    r = 3 * repeats
    costs = {
        "copy_": _median_s(lambda: out.copy_(x), r),
        "DAC (quantize_out)": _median_s(lambda: C.cpu_quantize_out(x, out, 0.0, 2.5, 8), r),
        "ADC + out mask (out_quant_)": _median_s(lambda: C.cpu_out_quant_(y, y, bits, 0.0, 2.5, 8, True), r),
        "re-quantize x + bits (quantize_mask_out)": _median_s(
            lambda: C.cpu_quantize_mask_out(x, out, bits, 0.0, 2.5, 8), r),
        "out mask of g into a workspace (mask_grad_out)": _median_s(lambda: C.cpu_mask_grad_out(x, words, out), r),
        "input mask in place, all words (mask_grad_out)": _median_s(lambda: C.cpu_mask_grad_out(out, words, out), r),
    }
    w = torch.randn(4 * 1024 * 1024) * 0.05
    wn = torch.empty_like(w)
    t = _median_s(lambda: C.cpu_noisy_weights_(w, wn, [0], -0.1, 0.1, True, 8, 0.008, 0.0, 1, 2), r)
    return {k: 1e3 * v / mb for k, v in costs.items()}, w.numel() / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    in_mb, out_mb, n_w = activation_bytes(model, args.batch)
    print(f"conv/linear inputs {in_mb:.0f} MB, outputs {out_mb:.0f} MB, weights {n_w / 1e6:.2f} M", flush=True)
    per_mb, w_rate = pass_costs(args.batch, args.repeats)
    for k, v in per_mb.items():
        print(f"  {k:<48} {v:.4f} ms/MB", flush=True)
    print(f"  noisy weights (noisy_weights_)                   {w_rate:.3e} weights/s", flush=True)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    model.eval()

    def ev():
        with torch.no_grad():
            model(x)
    t_eval = _median_s(ev, args.repeats)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    t_train = _median_s(step, args.repeats)
    wn = n_w / w_rate
    ms = {k: v / 1e3 for k, v in per_mb.items()}  # s per MB
    passes = {
        "DAC": in_mb * ms["DAC (quantize_out)"],
        "ADC + out mask": out_mb * ms["ADC + out mask (out_quant_)"],
        "Wn": wn,
        "out mask of g": out_mb * ms["out mask of g into a workspace (mask_grad_out)"],
        "re-quantize x": in_mb * ms["re-quantize x + bits (quantize_mask_out)"],
        "input mask": in_mb * ms["input mask in place, all words (mask_grad_out)"],
    }
    loads = {
        "eval": (t_eval, ("DAC", "ADC + out mask", "Wn")),
        "train step": (t_train, ("DAC", "ADC + out mask", "Wn", "out mask of g", "re-quantize x", "input mask", "Wn")),
        "8 chips (per batch)": (t_eval, ("DAC", "ADC + out mask")),
    }
    rows = []
    print("\n| workload | clean s | passes | passes s | ceiling clean / (clean + passes) |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, (t, which) in loads.items():
        s = sum(passes[k] for k in which)
        rows.append(dict(workload=name, clean_s=t, passes=list(which), passes_s=s, ceiling=t / (t + s)))
        print(f"| {name} | {t:.3f} | {', '.join(which)} | {s:.3f} | {t / (t + s):.3f} |")
    res = dict(batch=args.batch, threads=args.threads, in_mb=in_mb, out_mb=out_mb, weights=n_w,
               ms_per_mb=per_mb, weights_per_s=w_rate, pass_s=passes, rows=rows,
               load=os.getloadavg()[0], torch=torch.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
