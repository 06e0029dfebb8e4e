"""The backward's straight-through mask passes on one activation, by the fraction of mask words with
a cleared bit, and how many words are cleared in a real train step (issue 12, "fewer passes").

    python benchmarks/mask_pass_cpu.py [--shape 16 256 56 56] [--threads 2] [--repeats 21]
                                       [--json PATH] [--steps]

Part 1 (always): one float32 gradient ``g`` and random packed masks whose words are cleared with a
given probability; medians of ``--repeats`` interleaved calls, ms, of

* ``masked copy``   ``cpu_mask_grad_out(g, words, ws)``: g into a workspace (the dense pass),
* ``in place``      ``cpu_mask_grad_out(w, words, w)``: the dense pass in place,
* ``in place, sparse`` ``cpu_mask_grad_out(w, words, w, True)``: skips the all-ones words,
* ``borrow+restore`` ``cpu_mask_grad_borrow(g, words)`` then ``restore()`` (the caller's gradient
  masked in place, then given back), with ``torch.Tensor.copy_`` of g as the bandwidth reference.

Part 2 (``--steps``): the cleared fraction of the out masks and the input masks in one train step
of the noisy ResNet-50 of `resnet50_cpu.py` (random init, calibrated in eval mode, step in train
mode) at batch 8, and of the pretrained CIFAR-10 ResNet-32 of ``../shared/weights`` (calibrated on
128 CIFAR-10 test images in eval mode, a train-mode step on the next 128; ``NOISYOPS_DATA`` names
the data folder). `noisyops.backends.cpu.SPARSE_MAX_CLEARED` is chosen from part 1; docs/benchmarks_cpu.md
quotes both parts.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from noisyops import _ext, reference  # noqa: E402
from resnet50_cpu import interleaved, med  # noqa: E402

FRACTIONS = (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.35, 1.0)


def _median_ms(fns, repeats):
    """Interleaved medians (ms) of the callables in ``fns`` (a dict), one warm-up call each."""
    return {k: 1e3 * med(v) for k, v in interleaved(fns, repeats).items()}


def kernels(shape, repeats):
    C = _ext.cpu()[0]
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    ws, w = torch.empty_like(g), torch.empty_like(g)
    rows = []
    for frac in FRACTIONS:
        # a word is cleared with probability frac: each of its 32 bits with 1 - (1 - frac)^(1/32)
        p_bit = 1 - (1 - frac) ** (1 / 32) if frac < 1 else 0.5
        words = reference.pack_mask([torch.rand(shape, generator=gen) >= p_bit])[0]

        def borrow():
            C.cpu_mask_grad_borrow(g, words).restore()

        def in_place():
            C.cpu_mask_grad_out(w, words, w)

        def in_place_sparse():
            C.cpu_mask_grad_out(w, words, w, True)

        ms = _median_ms({"copy_": lambda: ws.copy_(g), "masked copy": lambda: C.cpu_mask_grad_out(g, words, ws),
                         "in place": in_place, "in place, sparse": in_place_sparse,
                         "borrow+restore": borrow}, repeats)
        rows.append(dict(cleared=C.cpu_cleared_words(words) / words.numel(), **ms))
        print(f"cleared {rows[-1]['cleared']:.3f}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
              flush=True)
    return rows


def step_fractions(batch):
    import resnet50_cpu as B
    torch.manual_seed(0)
    model, _ = B.noisy_model(B.clean_model(), torch.randn(batch, 3, 224, 224))
    model.train()
    return _fractions(model, torch.randn(batch, 3, 224, 224), f"ResNet-50 (random init) train step, batch {batch}")


def _fractions(model, x, what):
    from noisyops.backends import cpu
    C = _ext.cpu()[0]
    seen = {"out": [0, 0], "in": [0, 0]}
    real_out, real_in = cpu._out_masked_grads, cpu._input_ste_

    def out_spy(g, out_mask, *a, **k):
        if out_mask.numel():
            seen["out"][0] += C.cpu_cleared_words(out_mask[0].contiguous())
            seen["out"][1] += out_mask[0].numel()
        return real_out(g, out_mask, *a, **k)

    def in_spy(grad_x, xc, bits, p):
        if bits is not None:
            seen["in"][0] += C.cpu_cleared_words(bits)
            seen["in"][1] += bits.numel()
        return real_in(grad_x, xc, bits, p)

    cpu._out_masked_grads, cpu._input_ste_ = out_spy, in_spy
    try:
        model(x).sum().backward()
    finally:
        cpu._out_masked_grads, cpu._input_ste_ = real_out, real_in
    out = {k: v[0] / max(v[1], 1) for k, v in seen.items()}
    print(f"{what}: cleared words, out masks {out['out']:.3f}, input masks {out['in']:.3f}", flush=True)
    return out


def trained_fractions(batch):
    """The same for the pretrained CIFAR-10 ResNet-32 of ``../shared/weights`` on CIFAR-10 test
    images (calibrated on one batch in eval mode, one train-mode step on the next batch)."""
    import noisyops
    from noisyops import LayerConfig, models
    from noisyops.backends import cpu
    from noisyops.training.data import build_dataset
    ds = build_dataset("cifar10", os.environ.get("NOISYOPS_DATA"), train=False)
    xs, _ = ds[list(range(2 * batch))]
    model = noisyops.convert(models.load_cifar_resnet("resnet32"),
                             LayerConfig(eta=0.04, in_bits=8, out_bits=8, sampling="per_call"), seed=1)
    model.eval()
    noisyops.calibrate(model, xs[:batch])
    model.train()
    return _fractions(model, xs[batch:], "CIFAR-10 ResNet-32 (pretrained) train step")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 256, 56, 56])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--steps", action="store_true", help="also the cleared fractions of a ResNet-50 step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, shape {args.shape}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    res = {"shape": args.shape, "threads": args.threads, "kernels": kernels(args.shape, args.repeats)}
    if args.steps:
        res["resnet50_step"] = step_fractions(8)
        res["resnet32_cifar_step"] = trained_fractions(128)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
