"""torch.compile on the CPU: a compiled noisy ResNet against the compiled clean one.

Side by side in one process, interleaved repeats, medians, ratios to clean (throughput = clean time
/ noisy time):

* torchvision ResNet-18 at 160x160 and ResNet-50 at 224x224, batch 16 (``--quick``: a tiny residual
  CNN at 16x16, batch 4, for the test suite);
* noisy = ``noisyops.convert(model, LayerConfig(eta=0.04, in_bits=8, out_bits=8))`` (``per_call``;
  noise referenced to ±2·std(W) fixed at conversion; input/output ranges calibrated on one batch
  by ``noisyops.calibrate``, 0.1 / 99.9 percentiles), then ``torch.compile`` (inductor). Under
  compile the noisy layers trace `noisyops.decomposition` (noise pre-pass op → aten conv → pointwise
  quantizers); ``--opaque`` adds the variant with ``decomposition.ENABLED = False`` (the opaque
  custom op, as before the decomposition existed); ``--cl-weights`` the variant whose pre-pass
  writes channels-last weights (``decomposition.CHANNELS_LAST_WEIGHTS = True``; by default it writes
  them row-major and inductor copies each to channels-last per call); ``--saved-masks`` the variant
  traced with ``decomposition.RECOMPUTE_STE = False`` (the partitioner saves bool masks). Each
  variant's step sets its own flags before every call: dynamo guards on them, and a step called
  under another variant's flags would be re-traced (``retraced_graphs`` in the JSON counts graphs
  traced while timing; it must be 0);
* eval = ``no_grad`` forward; train step = forward + cross-entropy + backward + SGD step (the
  optimizer runs eagerly, the model is compiled);
* fusion evidence: the inductor output code of each compiled graph (``run_and_get_code``), counting
  the generated C++ kernels (``cpp_fused_*`` launched from ``call``), how many of them round (the
  quantizers: ``nearbyint`` / ``round``), the extern calls (convolutions, GEMMs) and the noisyops
  custom ops;
* cost split of one compiled eval forward and train step (``torch.profiler``, self CPU time, and
  the ten costliest events): the noise pre-pass
  op (``noisyops::noisy_weights``), the convolutions, the generated kernels (each on its own with
  ``--kernel-profile``), everything else.

Usage: ``python benchmarks/compile_cpu.py [--repeats 5] [--models resnet18,resnet50] [--opaque] [--cl-weights]
[--saved-masks] [--kernel-profile] [--json benchmarks/results/compile_cpu.json]``. Inputs are random (speed does not depend on the
data); weights are torchvision's random init.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import noisyops  # noqa: E402
from noisyops import LayerConfig, decomposition, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resnet50_cpu as _eager_bench  # noqa: E402  (benchmarks/ sibling: its interleaved loop)

ETA = 0.04
BITS = 8
MODELS = {"resnet18": 160, "resnet50": 224}


class TinyResNet(nn.Module):
    """A residual CNN small enough to compile in seconds (the --quick mode)."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name: str):
    torch.manual_seed(0)
    if name == "tiny":
        return TinyResNet()
    import torchvision
    return getattr(torchvision.models, name)()


def noisy_copy(clean: nn.Module, calib_x: torch.Tensor) -> nn.Module:
    cfg = LayerConfig(eta=ETA, in_bits=BITS, out_bits=BITS, sampling="per_call")
    m = noisyops.convert(copy.deepcopy(clean), cfg, seed=1)
    m.eval()
    noisyops.calibrate(m, calib_x)
    return m


# ---- steps ----------------------------------------------------------------------------------------
def make_eval(model, x):
    def step():
        model.eval()
        with torch.no_grad():
            model(x)
    return step


def make_train(model, x, y, params):
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def interleaved(fns: dict, repeats: int) -> dict:
    """``{name: [seconds per repeat]}``, the variants run in turn in each repeat (the eager CPU
    benchmark's loop; warm-up is done here by the caller)."""
    return _eager_bench.interleaved(fns, repeats, warmup=0)


# ---- inductor output code --------------------------------------------------------------------------
_KERNEL_DEF = re.compile(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?'''(.*?)'''", re.M | re.S)


_NEIGHBOURS = ("batch_norm", "relu", "threshold_backward", "mean", "convolution", "pool", "mm", "sum")


def kernel_census(codes) -> dict:
    """Counts over inductor's output code of one compiled step (every graph it generated).

    ``cpp_kernels``: generated C++ kernels launched per call; ``counter_kernels``: the scalar
    kernels that advance the noisy layers' call counters (``calls.copy_(calls + 1)``);
    ``rounding_kernels``: kernels holding a quantizer (they round); ``standalone_quantizers``:
    rounding kernels with no neighbouring op in them (kernel names list the fused aten ops; none of
    batch_norm / relu / threshold_backward / mean / convolution (layout copy) / pool / mm / sum);
    ``layout_copies``: launched kernels that change a tensor's layout (``transpose_mxn`` in the body:
    NCHW -> channels-last copies of inputs or weights); ``bool_outputs``: bool buffers the graphs
    allocate (in a train step's forward: masks saved for the backward, which inductor's C++ backend
    stores slowly, docs/compile_cpu.md).
    """
    out = {"cpp_kernels": 0, "counter_kernels": 0, "rounding_kernels": 0, "standalone_quantizers": 0,
           "layout_copies": 0, "bool_outputs": 0, "extern_calls": 0, "noisyops_ops": 0, "graphs": len(codes)}
    for code in codes:
        bodies = dict(_KERNEL_DEF.findall(code))
        call = code[code.find("def call("):]
        launched = re.findall(r"^\s+(cpp_fused_\w+)\(", call, re.M)
        out["cpp_kernels"] += len(launched)
        out.setdefault("launched", []).extend(launched)
        for k in launched:
            rounds = bool(re.search(r"nearbyint|round", bodies.get(k, "")))
            out["rounding_kernels"] += rounds
            out["counter_kernels"] += bool(re.fullmatch(r"cpp_fused_add_copy__sub_\d+", k))
            out["layout_copies"] += "transpose_mxn" in bodies.get(k, "")
            out["standalone_quantizers"] += rounds and not any(n in k for n in _NEIGHBOURS)
        out["extern_calls"] += len(re.findall(r"extern_kernels\.\w+\(", call))
        out["bool_outputs"] += len(re.findall(r"empty_strided_cpu\([^\n]*torch\.bool\)", call))
        out["noisyops_ops"] += len(re.findall(r"= torch\.ops\.noisyops\.\w+", call))
    return out


def first_call(step):
    """Run ``step`` once (it compiles) and return ``(seconds, inductor output code)``."""
    from torch._inductor.utils import run_and_get_code
    t0 = time.perf_counter()
    _, codes = run_and_get_code(step)
    return time.perf_counter() - t0, codes


# ---- cost split ------------------------------------------------------------------------------------
_GENERATED_KERNEL = re.compile(r"^(graph_\d+_)?cpp_fused_")


def cost_split(step, top: int = 10) -> dict:
    """Self CPU seconds of one call by category (torch.profiler), and the ``top`` events by self
    CPU time (``top``: ``[[name, seconds, calls], ...]``).

    Categories: ``noise_prepass`` (``noisyops::noisy_weights``), ``convolution`` (aten / mkldnn
    convolutions), ``generated_kernels`` (inductor's C++ kernels: only seen as events of their own
    when the graphs were compiled with ``torch._inductor.config.cpp.enable_kernel_profile``, see
    ``--kernel-profile``; then ``kernels`` lists every one, ``[[name, seconds, calls], ...]``, costliest
    first), ``other`` (the rest: without the kernel profile, the generated kernels sit in here)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split = {"noise_prepass": 0.0, "convolution": 0.0, "generated_kernels": 0.0, "other": 0.0}
    events = prof.key_averages()
    kernels = []
    for e in events:
        t = e.self_cpu_time_total / 1e6
        if "noisy_weights" in e.key:
            split["noise_prepass"] += t
        elif _GENERATED_KERNEL.match(e.key):
            split["generated_kernels"] += t
            kernels.append([e.key, round(t, 6), int(e.count)])
        elif "conv" in e.key or "mkldnn" in e.key:
            split["convolution"] += t
        else:
            split["other"] += t
    out = {k: round(v, 6) for k, v in split.items()}
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out["top"] = [[e.key, round(e.self_cpu_time_total / 1e6, 4), int(e.count)] for e in ranked]
    if kernels:
        out["kernels"] = sorted(kernels, key=lambda k: -k[1])
    return out


def prepass_seconds(model, repeats=3) -> float:
    """Median seconds of the noise pre-pass of every noisy layer (what one noisy forward adds)."""
    layers = [m for _, m in noisyops.noisy_layers(model)]
    inst = torch.tensor(0)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in layers:
            decomposition.noisy_weights(m._noisy_weight().detach(), m._op_params(), inst)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---- output noise: traced Philox vs the custom op ------------------------------------------------------
def output_noise_micro(shape=(16, 64, 56, 56), repeats=7) -> dict:
    """Median seconds of ``relu(y + out_noise·ε'')`` compiled two ways: the pure-torch Philox stream
    traced into the graph (`decomposition.output_noise_traced`, inductor fuses it) and the custom op
    on the C++ kernel (`decomposition.add_output_noise_op`, what the decomposition uses); and of
    compiled ``relu(y)`` alone. ``y`` is a ResNet-50 layer-1 sized output."""
    from noisyops.params import resolve
    p = resolve(LayerConfig(out_noise=0.1), seed=5, layer_key=3)
    fparams, iparams = p.to_op_args()
    y = torch.randn(*shape)
    inst = torch.tensor(7)
    fns = {
        "traced_philox": torch.compile(lambda y, i: torch.relu(y + decomposition.output_noise_traced(y, p, i))),
        "custom_op": torch.compile(lambda y, i: torch.relu(decomposition.add_output_noise_op(y, fparams, iparams, i))),
        "relu_only": torch.compile(lambda y, i: torch.relu(y)),
    }
    for f in fns.values():
        for _ in range(3):
            f(y, inst)
    times = interleaved({k: (lambda f=f: f(y, inst)) for k, f in fns.items()}, repeats)
    return {"shape": list(shape), "median_s": {k: round(statistics.median(v), 5) for k, v in times.items()}}


def quantizer_micro(shape=(16, 64, 56, 56), repeats=15) -> dict:
    """Median seconds of compiled ``Q(relu(x·a + b))`` (8-bit, fixed range) with the quantizer's
    ±Inf pass-through written as noisyops writes it (`reference.is_inf`: ``|v| == inf``) and as
    ``torch.isinf`` (what it was before, a scalar loop in inductor's C++ kernels), against compiled
    ``relu(x·a + b)`` alone; and whether the two quantizers give the same bits. ``x`` is a
    ResNet-50 layer-1 sized activation, ``a``/``b`` per-channel (a batch-norm in eval)."""
    x = torch.randn(*shape)
    x.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    a, b = torch.randn(shape[1], 1, 1), torch.randn(shape[1], 1, 1)

    def q_relu(x, a, b):
        return reference.quantize(torch.relu(x * a + b), -1.6, 1.7, BITS)

    compiled = torch.compile(q_relu)

    def with_isinf(x, a, b):  # dynamo guards on reference.is_inf: this call runs the isinf graph
        is_inf, reference.is_inf = reference.is_inf, torch.isinf
        try:
            return compiled(x, a, b)
        finally:
            reference.is_inf = is_inf

    fns = {"relu_only": torch.compile(lambda x, a, b: torch.relu(x * a + b)),
           "abs_eq_inf": compiled, "torch_isinf": with_isinf}
    outs = {k: f(x, a, b) for k, f in fns.items()}
    for f in fns.values():
        for _ in range(2):
            f(x, a, b)
    times = interleaved({k: (lambda f=f: f(x, a, b)) for k, f in fns.items()}, repeats)
    same = torch.equal(outs["abs_eq_inf"].view(torch.int32), outs["torch_isinf"].view(torch.int32))
    return {"shape": list(shape), "median_s": {k: round(statistics.median(v), 5) for k, v in times.items()},
            "bit_identical": bool(same)}


# ---- one model ---------------------------------------------------------------------------------------
# variants beyond clean / noisy: the decomposition flags they are traced with
EXTRA_VARIANTS = {
    "noisy_opaque": {"ENABLED": False},                     # the opaque custom op under compile
    "noisy_cl_weights": {"CHANNELS_LAST_WEIGHTS": True},  # pre-pass writes channels-last weights
    "noisy_saved_masks": {"RECOMPUTE_STE": False},        # the partitioner may save bool STE masks
}
DEFAULT_FLAGS = {"ENABLED": True, "CHANNELS_LAST_WEIGHTS": False, "RECOMPUTE_STE": True}


def _trace_flags(vname: str) -> dict:
    flags = dict(DEFAULT_FLAGS)
    flags.update(EXTRA_VARIANTS.get(vname, {}))
    return flags


def with_flags(step, flags: dict):
    """``step`` run with the `decomposition` flags it was compiled under. Dynamo guards on those
    module globals: a step called under other flags would be re-traced with them, and two variants
    would time the same graphs."""
    def run():
        for flag, value in flags.items():
            setattr(decomposition, flag, value)
        step()
    return run


def run_model(name: str, size: int, batch: int, repeats: int, opaque: bool, train: bool = True,
              cl_weights: bool = False, saved_masks: bool = False) -> dict:
    torch._dynamo.reset()
    clean = build(name)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    noisy = noisy_copy(clean, x)
    variants = {"clean": clean, "noisy": noisy}
    if opaque:
        variants["noisy_opaque"] = noisy_copy(clean, x)
    if cl_weights:
        variants["noisy_cl_weights"] = noisy_copy(clean, x)
    if saved_masks:
        variants["noisy_saved_masks"] = noisy_copy(clean, x)
    result = {"model": name, "size": size, "batch": batch, "compile_s": {}, "kernels": {}, "times_s": {}}
    modes = ("eval", "train") if train else ("eval",)
    for mode in modes:
        steps = {}
        for vname, model in variants.items():
            comp = torch.compile(model)
            step = make_eval(comp, x) if mode == "eval" else make_train(comp, x, y, model.parameters())
            steps[vname] = with_flags(step, _trace_flags(vname))
            secs, codes = first_call(steps[vname])
            result["compile_s"][f"{mode}/{vname}"] = round(secs, 1)
            result["kernels"][f"{mode}/{vname}"] = kernel_census(codes)
            counts = {k: v for k, v in result["kernels"][f"{mode}/{vname}"].items() if k != "launched"}
            print(f"  {name} {mode} {vname}: compiled in {secs:.1f} s, {counts}", flush=True)
        # warm-up after every variant compiled (the first calls after a compile are slow). It also
        # re-traces each variant (under its own flags): run_and_get_code resets dynamo's caches
        for _ in range(3):
            for s in steps.values():
                s()
        from torch._dynamo.utils import counters
        graphs_compiled = counters["stats"]["unique_graphs"]
        times = interleaved(steps, repeats)
        # graphs dynamo traced while timing (a variant re-traced under other flags: must be 0)
        result.setdefault("retraced_graphs", {})[mode] = counters["stats"]["unique_graphs"] - graphs_compiled
        result["times_s"][mode] = {k: [round(t, 4) for t in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        result.setdefault("median_s", {})[mode] = {k: round(v, 4) for k, v in med.items()}
        result.setdefault("ratio", {})[mode] = {k: round(med["clean"] / v, 3) for k, v in med.items() if k != "clean"}
        print(f"  {name} {mode}: medians {result['median_s'][mode]} ratios {result['ratio'][mode]}", flush=True)
        result[f"{mode}_cost_split_s"] = {k: cost_split(s) for k, s in steps.items()}
    for flag, value in DEFAULT_FLAGS.items():
        setattr(decomposition, flag, value)
    result["prepass_eager_s"] = round(prepass_seconds(noisy), 4)
    return result


def table(results) -> str:
    extra = [v for v in EXTRA_VARIANTS if any(v in r["median_s"]["eval"] for r in results)]
    lines = ["| model | input | step | clean (s) | noisy (s) | noisy / clean throughput |"
             + "".join(f" {v} (s) | {v} / clean |" for v in extra),
             "| --- | --- | --- | --- | --- | --- |" + " --- | --- |" * len(extra)]
    for r in results:
        for mode, med in r["median_s"].items():
            row = (f"| {r['model']} | {r['batch']}×3×{r['size']}² | {mode} | {med['clean']:.3f} | "
                   f"{med['noisy']:.3f} | **{r['ratio'][mode]['noisy']:.3f}** |")
            for v in extra:
                row += f" {med[v]:.3f} | {r['ratio'][mode][v]:.3f} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny residual CNN, 16x16, batch 4 (tests)")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--opaque", action="store_true", help="also time the opaque custom op under compile")
    ap.add_argument("--cl-weights", action="store_true",
                    help="also time the noisy model traced with channels-last pre-pass weights "
                         "(decomposition.CHANNELS_LAST_WEIGHTS = True: no layout copies of them)")
    ap.add_argument("--saved-masks", action="store_true",
                    help="also time the noisy model traced with decomposition.RECOMPUTE_STE = False (AOT's "
                         "partitioner may save bool STE / ReLU masks for the backward)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--output-noise", action="store_true",
                    help="only the output-noise micro-benchmark (traced Philox vs custom op)")
    ap.add_argument("--quantizer", action="store_true",
                    help="only the quantizer micro-benchmark (|v| == inf vs torch.isinf)")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="compile with torch._inductor.config.cpp.enable_kernel_profile: every generated "
                         "C++ kernel is a profiler event, so the cost split lists each kernel's self time "
                         "(adds a record-function per kernel call to the timed steps too)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    load = os.getloadavg()
    if args.output_noise or args.quantizer:
        res = output_noise_micro() if args.output_noise else quantizer_micro()
        print(json.dumps(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return res
    runs = [("tiny", 16, 4)] if args.quick else [(m, MODELS[m], args.batch) for m in args.models.split(",")]
    results = []
    import torch._inductor.config as inductor_config
    with inductor_config.patch({"cpp.enable_kernel_profile": args.kernel_profile}):
        for name, size, batch in runs:
            results.append(run_model(name, size, batch, 2 if args.quick else args.repeats, args.opaque,
                                     train=not args.eval_only, cl_weights=args.cl_weights,
                                     saved_masks=args.saved_masks))
    out = {"command": "python benchmarks/compile_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "loadavg_before": [round(v, 2) for v in load], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}
    print(table(results))
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
