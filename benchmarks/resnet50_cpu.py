"""ResNet-50 on the CPU: clean torchvision vs noisyops vs a naive PyTorch noisy model.

Side by side in one process, interleaved repeats, medians, ratios to clean (throughput):

* eval (no_grad forward) and train step (forward + backward + SGD step), batch 16, 224x224;
* noisyops: ``noisyops.convert(resnet50, LayerConfig(eta=0.04, in_bits=8, out_bits=8))``
  (``per_call``; noise referenced to ±2·std(W) fixed at conversion; input/output ranges calibrated
  from one batch by ``noisyops.calibrate``, 0.1 / 99.9 percentiles);
* naive: every Conv2d/Linear forward does ``W + σ·torch.randn_like(W)`` and
  ``torch.fake_quantize_per_tensor_affine`` on its input and its (pre-bias) output, with the same
  σ and the same calibrated ranges;
* repeated evaluation on 8 chips (``per_instance``, `noisyops.run_chips`): time per image vs clean
  eval per image; naive equivalent: regenerate each chip's weights for every batch;
* peak memory of one train step (RSS high-water mark ``VmHWM`` of a fresh subprocess per variant,
  reset through ``/proc/self/clear_refs`` before the step; the step's increment over the RSS
  before it, and the process total; one model resident per child, freed heap handed back with
  ``malloc_trim`` before the reset so calibration's freed activations do not count);
* Philox normals per second (``noisyops._C.cpu_normals``) vs ``torch.randn``.

Usage: ``python benchmarks/resnet50_cpu.py [--repeats 5] [--json benchmarks/results/resnet50_cpu.json]``;
``--quick`` is a smoke run (batch 8, 3 repeats, 4 chips, no naive variant, no memory; JSON to
``benchmarks/results/resnet50_cpu_quick.json``). After the warm-up of each section the script prints
its predicted runtime (warm-up time x repeats), and it records the 1-minute load average
(``os.getloadavg``) before and after each section: on a shared machine, quote the ratios (measured
interleaved) and say how loaded it was. Inputs are random (speed does not depend on the data);
weights are torchvision's random init.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("NOISYOPS_CHIP_CACHE_MB", "1024")  # 8 ResNet-50 chips in fp32 = 818 MB
# Measure the noisyops of this source tree (a script's sys.path[0] is benchmarks/, which would
# otherwise leave the import to whatever noisyops is installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import noisyops  # noqa: E402
from noisyops import LayerConfig, dispatch  # noqa: E402

ETA = 0.04
BITS = 8


# ---- models -------------------------------------------------------------------------------------
def clean_model(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet50()


def noisy_model(clean, calib_x):
    cfg = LayerConfig(eta=ETA, in_bits=BITS, out_bits=BITS, sampling="per_call")
    m = noisyops.convert(clean, cfg, seed=1)
    m.eval()
    ranges = noisyops.calibrate(m, calib_x)
    return m, ranges


class _NaiveNoisy(nn.Module):
    """``W + σ·randn_like(W)``, fake-quantized input and pre-bias output (torch ops only)."""

    def __init__(self, layer, in_range, out_range):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach()
        self.sigma = ETA * 4.0 * float(w.std())  # eta·(w_max − w_min), range ±2·std(W)
        self.q_in = self._qparams(in_range)
        self.q_out = self._qparams(out_range)

    @staticmethod
    def _qparams(rng):
        lo, hi = rng
        scale = (hi - lo) / (2 ** BITS - 1)
        zp = int(min(max(round(-lo / scale), 0), 2 ** BITS - 1))
        return scale, zp

    def forward(self, x):
        layer = self.layer
        w = layer.weight + self.sigma * torch.randn_like(layer.weight)
        x = torch.fake_quantize_per_tensor_affine(x, self.q_in[0], self.q_in[1], 0, 2 ** BITS - 1)
        if isinstance(layer, nn.Conv2d):
            y = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            y = F.linear(x, w)
        y = torch.fake_quantize_per_tensor_affine(y, self.q_out[0], self.q_out[1], 0, 2 ** BITS - 1)
        if layer.bias is not None:
            y = y + (layer.bias.view(1, -1, 1, 1) if y.dim() == 4 else layer.bias)
        return y


def naive_model(clean, ranges):
    import copy
    m = copy.deepcopy(clean)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            in_r, out_r = ranges[name]
            setattr(parent, name.rsplit(".", 1)[-1], _NaiveNoisy(mod, in_r, out_r))
    return m


# ---- timing -------------------------------------------------------------------------------------
def eval_step(model, x):
    with torch.no_grad():
        model(x)


def make_train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def interleaved(fns: dict, repeats: int, warmup: int = 1, label: str = "") -> dict:
    """``{name: [seconds per repeat]}``, the variants run in turn in each repeat.

    Prints the section's predicted runtime after the warm-up (warm-up round time x repeats)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        for f in fns.values():
            f()
    if label:
        per_round = (time.perf_counter() - t0) / max(1, warmup)
        print(f"[{label}] warm-up {per_round:.1f} s per round; {repeats} repeats: about "
              f"{per_round * repeats:.0f} s more (load {load():.2f})", flush=True)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def med(v):
    return statistics.median(v)


def load() -> float:
    """The 1-minute load average (how shared the machine is while a section runs)."""
    return os.getloadavg()[0]


def save_partial(results: dict, rows: list, path: str):
    """Write what is measured so far (a run cut short by a time limit keeps its finished sections)."""
    results["rows"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def print_rows(rows: list):
    for r in rows:
        print(f"{r['what']:<22} {r['variant']:<10} {r['median_s']:>10.4f} {r['images_per_s']:>8.2f} "
              f"{r['throughput_vs_clean']:>9.3f}", flush=True)


# ---- memory (subprocess per variant) --------------------------------------------------------------
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim():
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the RSS a step starts from
    is what is live, not what calibration's or the warm-up step's freed activations left resident
    (the noisy child calibrates, the clean one does not: +0.6–0.85 GB of freed-but-resident heap)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure without the trim
        pass


def memory_child(variant: str, batch: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    clean = clean_model()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    if variant == "clean":
        model = clean
    else:
        noisy, ranges_by_layer = noisy_model(clean, x)
        ranges = {n: v for n, v in ranges_by_layer.items()}
        model = noisy if variant == "noisyops" else naive_model(clean, ranges)
    if variant == "noisyops":
        del clean  # convert() copied the weights: keep one model resident, as the clean child does
    step = make_train_step(model, x, y)
    step()  # optimizer state, allocator warm
    gc.collect()
    _malloc_trim()
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    peak = _rss_kb("VmHWM")
    return {"variant": variant, "rss_before_mb": before / 1024, "peak_mb": peak / 1024,
            "step_increment_mb": (peak - before) / 1024}


def measure_memory(batch: int, threads: int) -> dict:
    out = {}
    for variant in ("clean", "noisyops", "naive"):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", variant,
                            "--batch", str(batch), "--threads", str(threads)],
                           capture_output=True, text=True, check=True)
        out[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---- main ---------------------------------------------------------------------------------------
def machine() -> dict:
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats for eval / train")
    ap.add_argument("--chip-repeats", type=int, default=5, help="repeats of the 8-chip evaluation")
    ap.add_argument("--chips", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-chips", action="store_true")
    ap.add_argument("--skip-naive", action="store_true", help="clean and noisyops only")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch 8, 3 repeats, 2 chip repeats, 4 chips, no naive, no memory")
    ap.add_argument("--json", default=None, help="default benchmarks/results/resnet50_cpu[_quick].json")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.chip_repeats, args.chips = 8, 3, 2, 4
        args.skip_naive = args.skip_memory = True
    if args.json is None:
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "resnet50_cpu_quick.json" if args.quick else "resnet50_cpu.json")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch, args.threads)))
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = {"machine": machine(), "args": vars(args), "command": " ".join([sys.executable] + sys.argv),
               "noisyops": noisyops.__file__,
               "chip_cache_mb": os.environ["NOISYOPS_CHIP_CACHE_MB"],
               "backends": {k: list(v) for k, v in dispatch.status().items()}}
    variants = ("clean", "noisyops") if args.skip_naive else ("clean", "noisyops", "naive")
    results["load_avg_1min"] = {"start": load()}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.batch,))
    clean = clean_model().eval()
    noisy, ranges = noisy_model(clean, x)
    naive = naive_model(clean, ranges).eval()
    for m in (clean, noisy, naive):
        m.eval()

    # eval
    dispatch.reset_counts()
    fns = {"clean": lambda: eval_step(clean, x), "noisyops": lambda: eval_step(noisy, x),
           "naive": lambda: eval_step(naive, x)}
    t_eval = interleaved({k: fns[k] for k in variants}, args.repeats, label="eval")
    results["load_avg_1min"]["after_eval"] = load()
    results["eval_backends"] = {f"{k}/{b}": n for (k, b), n in dispatch.backend_counts().items()}
    # train (separate model copies so the optimizers do not interfere)
    import copy
    tc, tn, tv = copy.deepcopy(clean), copy.deepcopy(noisy), copy.deepcopy(naive)
    dispatch.reset_counts()
    fns = {"clean": make_train_step(tc, x, labels), "noisyops": make_train_step(tn, x, labels),
           "naive": make_train_step(tv, x, labels)}
    t_train = interleaved({k: fns[k] for k in variants}, args.repeats, label="train step")
    results["load_avg_1min"]["after_train"] = load()
    results["train_backends"] = {f"{k}/{b}": n for (k, b), n in dispatch.backend_counts().items()}
    del tc, tn, tv, fns
    gc.collect()
    rows = []
    for what, t in (("eval", t_eval), ("train step", t_train)):
        c = med(t["clean"])
        for v in variants:
            rows.append({"what": what, "variant": v, "median_s": med(t[v]), "images_per_s": args.batch / med(t[v]),
                         "throughput_vs_clean": c / med(t[v]), "all_s": t[v]})
    print_rows(rows)
    save_partial(results, rows, args.json)

    # repeated evaluation on K chips
    if not args.skip_chips:
        K = args.chips
        from noisyops.chip_store import STORE as CACHE  # the modules' chip weights
        CACHE.clear()

        def chips_noisy():
            with torch.no_grad():
                noisyops.run_chips(noisy, x, K)

        def chips_naive():
            with torch.no_grad():
                for _ in range(K):
                    naive(x)  # fresh noise per chip per batch: the naive way to evaluate K chips

        dispatch.reset_counts()
        fns = {"clean": lambda: eval_step(clean, x), "noisyops": chips_noisy, "naive": chips_naive}
        t_chips = interleaved({k: fns[k] for k in variants}, args.chip_repeats, label=f"{K} chips")
        results["load_avg_1min"]["after_chips"] = load()
        results["chips_backends"] = {f"{k}/{b}": n for (k, b), n in dispatch.backend_counts().items()}
        results["chip_cache"] = {"hits": CACHE.hits, "misses": CACHE.misses, "mb": CACHE.nbytes / 2**20}
        c = med(t_chips["clean"]) / args.batch
        for v in variants:
            n_img = args.batch * (1 if v == "clean" else K)
            per = med(t_chips[v]) / n_img
            rows.append({"what": f"{K} chips, per image", "variant": v, "median_s": per,
                         "images_per_s": 1 / per, "throughput_vs_clean": c / per, "all_s": t_chips[v]})
        print_rows(rows[-len(variants):])
        save_partial(results, rows, args.json)
    results["rows"] = rows

    # normals per second
    from noisyops import _ext
    C = _ext.cpu()[0]
    n = 1 << 24
    t_rng = interleaved({"philox": lambda: C.cpu_normals(1, 2, 0, 3, n), "torch.randn": lambda: torch.randn(n)},
                        max(3, args.repeats))
    results["normals_per_s"] = {k: n / med(v) for k, v in t_rng.items()}
    results["normals_ratio"] = results["normals_per_s"]["philox"] / results["normals_per_s"]["torch.randn"]

    if not args.skip_memory:
        print(f"[memory] 3 subprocesses, one train step each (load {load():.2f})", flush=True)
        mem = measure_memory(args.batch, args.threads)
        results["memory"] = mem
        results["memory_ratio_step_increment"] = mem["noisyops"]["step_increment_mb"] / mem["clean"]["step_increment_mb"]
        results["memory_ratio_peak"] = mem["noisyops"]["peak_mb"] / mem["clean"]["peak_mb"]
    results["runtime_s"] = time.perf_counter() - t_start

    # table
    m = results["machine"]
    print(f"# noisyops from {noisyops.__file__}")
    print(f"# ResNet-50, batch {args.batch}, 224x224, {args.threads} threads; {m['cpu']}, {m['cores']} cores, "
          f"torch {m['torch']}; medians of {args.repeats} interleaved repeats ({args.chip_repeats} for chips)")
    print(f"{'what':<22} {'variant':<10} {'median s':>10} {'img/s':>8} {'vs clean':>9}")
    print_rows(rows)
    nps = results["normals_per_s"]
    print(f"normals/s: philox {nps['philox']:.3e}, torch.randn {nps['torch.randn']:.3e}, "
          f"ratio {results['normals_ratio']:.2f}")
    if "memory" in results:
        for v, r in results["memory"].items():
            print(f"train-step memory {v:<9}: +{r['step_increment_mb']:.0f} MB over {r['rss_before_mb']:.0f} MB "
                  f"(peak RSS {r['peak_mb']:.0f} MB)")
        print(f"memory noisy/clean: step increment {results['memory_ratio_step_increment']:.3f}, "
              f"peak RSS {results['memory_ratio_peak']:.3f}")
    if "chip_cache" in results:
        print(f"chip cache: {results['chip_cache']}")
    la = results["load_avg_1min"]
    la["end"] = load()
    print("1-min load average (2 cores = 2.0 busy): " + ", ".join(f"{k} {v:.2f}" for k, v in la.items()))
    print(f"runtime {results['runtime_s']:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
