"""The project's one GPU check: correctness of every GPU path, layer timings, whole-model timings.

One command on one H100/H200 (see docs/gpu_check.md for the device-tool call)::

    pip install --no-build-isolation --no-deps -e . && python benchmarks/gpu_check.py --out $OUT

Parts, each timed against a budget (printed as it goes; a part that runs out of time stops and
says what it skipped; a part that fails records its error and the next part runs):

* ``check``  every route (``cuda``, ``triton`` with regenerated and with pre-pass weights, dispatch's
  own choice ``auto``) × dtype (fp32, tf32, bf16) × config (every sampling mode and option) × shape
  (conv 3x3, strided 1x1, grouped, linear) on fresh random inputs, outputs poisoned (NaN-filled
  allocations, `torch.utils.deterministic.fill_uninitialized_memory`), against the pure-torch
  reference in float64 on the same (dtype-rounded) values: forward and both gradients within
  dtype-tied tolerances; clean calls equal ``F.conv2d`` / ``F.linear`` bit for bit; noise words and
  uniforms of the Triton stream bit-exact, normals of the Triton and CUDA streams within 4 ulp.
* ``layers`` each ResNet-50 conv/linear shape at batch 256, channels-last, bf16 and tf32: the clean
  op (cuDNN / cuBLAS) vs every noisyops route for weight noise (per_call), crossbar tiles with
  DAC/ADC and output noise (per_call), per_sample and per_instance (8 chips), with
  `triton.testing.do_bench`; TFLOP/s, GB/s (operand bytes / time) and noisy/clean ratios.
* ``model``  the ResNet-50 train step (forward, loss, backward, SGD step) and the 8-chip evaluation
  (`noisyops.run_chips`), noisy vs clean, eager and ``torch.compile``d: time, peak memory,
  TFLOP/s and GB/s (the layers' operand bytes / time: a lower bound on the traffic).

``--out`` (default ``$OUT`` when set, else ``benchmarks/results/gpu_check``) receives
``gpu_check.json`` and ``gpu_check.md``. ``--quick`` is the short version (< 3 min on an H100
including the build). ``--cpu-smoke`` runs the same code on tiny CPU shapes (reference and cpu
backends in this process; the Triton kernels under ``TRITON_INTERPRET=1`` in a subprocess) so CI
keeps every code path of this script working; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

DTYPES = ("fp32", "tf32", "bf16")
# triton-prepass-loop: the crossbar-tile forward with the tile loop inside one program (64x128)
# instead of one program per crossbar tile (128x128 + a code-sum pass); timed for ADC configs only
GPU_ROUTES = ("cuda", "triton-regen", "triton-prepass", "triton-prepass-loop", "auto")
CPU_ROUTES = ("cpu", "reference")
INTERPRET_ROUTES = ("triton-regen", "triton-prepass")
# max |a - r| / max|r| allowed, by product dtype (fp32: IEEE; tf32: 10-bit mantissa; bf16: 8-bit)
TOL = {"fp32": 2e-5, "tf32": 4e-3, "bf16": 3e-2}
# ADC configs: fraction of outputs allowed one level apart (summation order; tf32 vs the fp32
# reference also rounds the product) and of gradient elements moved by the out-mask bits they gate
FLIPS = {"fp32": 0.01, "tf32": 0.03, "bf16": 0.02}


# ---- budget -----------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole run: each part gets a share of what is left."""

    def __init__(self, seconds: float):
        self.total = float(seconds)
        self.t0 = time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def say(self, msg: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s / {self.total:.0f}s] {msg}", flush=True)


class Part:
    """One part's deadline; `expired` is checked before each item, skipped items are counted."""

    def __init__(self, budget: Budget, name: str, seconds: float):
        self.budget, self.name = budget, name
        self.deadline = time.time() + max(0.0, min(seconds, budget.left()))
        self.skipped = 0

    def expired(self, need_s: float = 0.0) -> bool:
        """True (and the item counted as skipped) when less than ``need_s`` seconds are left."""
        if time.time() + need_s >= self.deadline:
            self.skipped += 1
            return True
        return False


# ---- routes and dtypes --------------------------------------------------------------------------
@contextlib.contextmanager
def route_env(route: str):
    """Force a noisyops route: ``NOISYOPS_BACKEND`` (+ ``NOISYOPS_TRITON_WEIGHTS``); ``auto`` clears
    both so dispatch (and the GPU policy) decide."""
    keys = ("NOISYOPS_BACKEND", "NOISYOPS_TRITON_WEIGHTS", "NOISYOPS_TRITON_CROSSBAR_FWD")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    if route.startswith("triton"):
        os.environ["NOISYOPS_BACKEND"] = "triton"
        os.environ["NOISYOPS_TRITON_WEIGHTS"] = route.split("-")[1]
        if route.endswith("-loop"):  # the looped crossbar-tile forward (kernels/noisy_conv2d.py)
            os.environ["NOISYOPS_TRITON_CROSSBAR_FWD"] = "loop"
    elif route != "auto":
        os.environ["NOISYOPS_BACKEND"] = route
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def dtype_mode(name: str):
    """``(torch dtype)`` for fp32/tf32/bf16, with torch's tf32 switches set for the product."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield torch.bfloat16 if name == "bf16" else torch.float32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def poisoned_allocations():
    """Every uninitialised torch allocation is filled (NaN for floats, the max for ints), so an
    output element a kernel forgets to write shows up (torch's own switch for this)."""
    import torch.utils.deterministic as det
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        det.fill_uninitialized_memory = saved[2]


def bench(fn, device: str, quick: bool = False) -> float:
    """Milliseconds per call: `triton.testing.do_bench` on CUDA, a median of wall times on CPU."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100))
    fn()
    times = []
    for _ in range(1 if quick else 3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- part 1: correctness ------------------------------------------------------------------------
def check_configs():
    """``{name: LayerConfig}``: every sampling mode and every option at least once."""
    from noisyops import LayerConfig
    return {
        "clean": LayerConfig(),
        "wnoise_call": LayerConfig(eta=0.05, eta_mul=0.05, w_range=2.0, w_bits=6),
        "tiles_adc_call": LayerConfig(eta=0.05, w_range=2.0, in_bits=6, in_range=(-2.5, 2.5),
                                      out_bits=6, out_range=(-6.0, 6.0), out_noise=0.1, tile_rows=72),
        "sample_tiles": LayerConfig(eta=0.05, w_range=(-0.2, 0.2), out_noise=0.05, tile_rows=72,
                                    sampling="per_sample"),
        "sample_plain": LayerConfig(eta=0.1, sampling="per_sample", clean_grad_input=True),
        "instance_adc": LayerConfig(eta=0.05, eta_mul=0.02, in_bits=8, in_range=(-3.0, 3.0),
                                    out_bits=8, out_range=(-8.0, 8.0), sampling="per_instance"),
    }


def check_shapes(smoke: bool):
    """``[(name, kind, x shape, w shape, stride, padding, groups)]``."""
    if smoke:
        return [("conv3x3", "conv", (2, 8, 5, 5), (6, 8, 3, 3), 1, 1, 1),
                ("conv1x1_s2", "conv", (2, 6, 5, 5), (4, 6, 1, 1), 2, 0, 1),
                ("linear", "linear", (3, 20), (5, 20), None, None, 1)]
    return [("conv3x3", "conv", (6, 64, 14, 14), (96, 64, 3, 3), 1, 1, 1),
            ("conv1x1_s2", "conv", (6, 128, 15, 15), (160, 128, 1, 1), 2, 0, 1),
            ("conv3x3_g2", "conv", (4, 32, 9, 9), (48, 16, 3, 3), 2, 1, 2),
            ("linear", "linear", (24, 320), (200, 320), None, None, 1)]


def _op(kind, stride, padding, groups, cfg, inst, layer_key=3):
    from noisyops import functional as F

    def run(x, w, b):
        if kind == "conv":
            return F.noisy_conv2d(x, w, b, stride, padding, 1, groups, config=cfg, seed=0x5EED1234ABC,
                                  layer_key=layer_key, instance=inst)
        return F.noisy_linear(x, w, b, config=cfg, seed=0x5EED1234ABC, layer_key=layer_key,
                              instance=inst)
    return run


def _fwd_bwd(run, x, w, b, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = run(*leaves)
    y.backward(gy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def _compare(name, a, r, tol, step=0.0, flips=0.01):
    """``(ok, stats)``: NaN-free, shapes equal, ``|a-r| <= tol·max|r|`` everywhere except, with a
    quantizer of step ``step``, at most a fraction ``flips`` of the elements one step apart."""
    a, r = a.double().cpu(), r.double().cpu()
    st = {"tensor": name}
    if a.shape != r.shape:
        return False, {**st, "error": f"shape {tuple(a.shape)} != {tuple(r.shape)}"}
    nans = int(torch.isnan(a).sum())
    scale = float(r.abs().max()) if r.numel() else 0.0
    d = (a - r).abs()
    lim = tol * max(scale, 1e-30) + 1e-30
    bad = d > lim
    st.update(nan=nans, max_abs_err=float(d.max()) if d.numel() else 0.0, scale=scale,
              rel_err=float(d.max()) / max(scale, 1e-30) if d.numel() else 0.0,
              frac_over_tol=float(bad.double().mean()) if d.numel() else 0.0)
    ok = nans == 0
    if step > 0:
        ok &= st["frac_over_tol"] <= flips and bool((d[bad] <= step * 1.001 + lim).all())
    else:
        ok &= not bool(bad.any())
    return ok, st


def check_stream(device: str) -> list:
    """Noise stream of the device paths vs `noisyops.stream`: Triton words/uniforms bit-exact,
    normals <= 4 ulp; CUDA pre-pass normals (W = 0, σ = 1) <= 4 ulp."""
    from noisyops import stream as rs
    out = []
    cases = [(0, 0, 0, 0, 0), (2**64 - 1, 2**30 - 1, 3, 2**63 - 1, 2**33 - 100),
             (0x5EED1234ABC, 7, 2, 5 * 2**24 + 3, 999)]
    n = 4096 if device == "cuda" else 256
    for seed, key, purpose, inst, start in cases:
        e = torch.arange(start, start + n, dtype=torch.int64)
        w4 = torch.stack(rs.counter_words(seed, key, purpose, inst, e >> 2))
        ref_words = w4[e & 3, torch.arange(n)]
        ref_norm = rs.normals_at(seed, key, purpose, inst, e)
        rec = dict(what="triton stream", seed=seed, layer_key=key, purpose=purpose, instance=inst)
        try:
            if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
                from noisyops.kernels import stream as ks
                words, unif, norm = ks.stream_values(seed, key, purpose, inst, start, n, device=device)
                rec.update(words_equal=bool(torch.equal(words.cpu(), ref_words)),
                           uniforms_equal=bool(torch.equal(unif.cpu(), rs.uniforms_at(seed, key, purpose, inst, e))),
                           normal_ulps=_ulps(norm.cpu(), ref_norm))
                rec["ok"] = rec["words_equal"] and rec["uniforms_equal"] and rec["normal_ulps"] <= 4
            else:
                rec.update(ok=None, note="triton not run in this process")
        except Exception as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        out.append(rec)
        if device == "cuda" and purpose == 0 and start == 0:
            rec = dict(what="cuda pre-pass normals", seed=seed, layer_key=key, instance=inst)
            try:
                from noisyops import _ext
                C, why = _ext.cuda()
                if C is None:
                    raise RuntimeError(why)
                w = torch.zeros(n, device=device)
                wn = torch.empty((1, n), device=device)
                C.weight_prepass(w, wn, torch.tensor([inst], device=device), seed, key, -1.0, 1.0, 1.0,
                                 0.0, False, 0, True, False)
                rec["normal_ulps"] = _ulps(wn[0].cpu(), rs.normals(seed, key, 0, inst, n))
                rec["ok"] = rec["normal_ulps"] <= 4
            except Exception as exc:
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            out.append(rec)
    return out


def _ulps(a, b):
    spacing = torch.abs(torch.nextafter(b, torch.full_like(b, float("inf"))) - b)
    return float(((a - b).abs() / spacing).max())


def check_part(part: Part, device: str, routes, dtypes, smoke: bool, seed: int) -> dict:
    """Correctness of every route (module docstring). Triton runs its first pruned config without
    autotuning here (``NOISYOPS_TRITON_AUTOTUNE=0``): one compile per specialization."""
    saved = os.environ.get("NOISYOPS_TRITON_AUTOTUNE")
    os.environ["NOISYOPS_TRITON_AUTOTUNE"] = "0"
    try:
        return _check_part(part, device, routes, dtypes, smoke, seed)
    finally:
        if saved is None:
            os.environ.pop("NOISYOPS_TRITON_AUTOTUNE", None)
        else:
            os.environ["NOISYOPS_TRITON_AUTOTUNE"] = saved


def _check_part(part: Part, device: str, routes, dtypes, smoke: bool, seed: int) -> dict:
    from noisyops import dispatch
    results = {"seed": seed, "stream": check_stream(device), "cases": []}
    g = torch.Generator().manual_seed(seed)
    cfgs = check_configs()
    for sname, kind, xs, ws, stride, padding, groups in check_shapes(smoke):
        for cname, cfg in cfgs.items():
            x0 = torch.randn(xs, generator=g)
            w0 = torch.randn(ws, generator=g) * (2.0 / math.prod(ws[1:])) ** 0.5
            b0 = torch.randn(ws[0], generator=g) * 0.1
            n = xs[0]
            inst = (torch.arange(n) * 3 % 4 + 1) if cfg.sampling == "per_instance" else 5
            run = _op(kind, stride, padding, groups, cfg, inst.to(device) if torch.is_tensor(inst) else inst)
            run_ref = _op(kind, stride, padding, groups, cfg, inst)
            for dname in dtypes:
                if part.expired():
                    continue
                with dtype_mode(dname) as dt:
                    x, w, b = (t.to(dt) for t in (x0, w0, b0))
                    if kind == "conv":
                        x = x.contiguous(memory_format=torch.channels_last)
                    # the reference in float64, except with an ADC: a tile's sum sitting within the
                    # dtype's rounding of a quantizer level would flip it, so ADC configs compare to
                    # the reference run in the same dtype (product rounded to it, as the contract says)
                    rdt = dt if cfg.out_bits else torch.float64
                    with route_env("reference"):
                        yprobe = run_ref(x.to(rdt), w.to(rdt), b.to(rdt))
                        gy = torch.randn(yprobe.shape, generator=g).to(dt)
                        yr, gr = _fwd_bwd(run_ref, x.to(rdt), w.to(rdt), b.to(rdt), gy.to(rdt))
                    for route in routes:
                        if part.expired():
                            continue
                        rec = dict(shape=sname, config=cname, dtype=dname, route=route)
                        try:
                            dispatch.reset_counts()
                            xd, wd, bd = (t.to(device) for t in (x, w, b))
                            with route_env(route), poisoned_allocations():
                                y, grads = _fwd_bwd(run, xd, wd, bd, gy.to(device))
                            sync(device)
                            rec["ran"] = sorted(f"{k}:{v}" for k, v in dispatch.backend_counts())
                            step = 0.0
                            if cfg.out_bits:
                                lo, hi = cfg.out_range
                                step = (hi - lo) / (2 ** cfg.out_bits - 1)
                            tol = TOL[dname]
                            parts_ok, stats = [], []
                            for nm, a, r, st in (("y", y, yr, step), ("grad_x", grads[0], gr[0], 0.0),
                                                 ("grad_w", grads[1], gr[1], 0.0),
                                                 ("grad_b", grads[2], gr[2], 0.0)):
                                # out-mask bits may flip where a tile's sum sits on the ADC range
                                # edge in one precision and not the other: the gradients then
                                # differ at those few outputs
                                ok, s = _compare(nm, a, r, tol, st if nm == "y" else 0.0,
                                                 FLIPS[dname])
                                if not ok and cfg.out_bits and nm != "y":
                                    ok = s["nan"] == 0 and s["frac_over_tol"] <= FLIPS[dname]
                                parts_ok.append(ok)
                                stats.append(s)
                            if cname == "clean":
                                exact = _clean_exact(kind, xd, wd, bd, stride, padding, groups, y)
                                rec["clean_bit_exact"] = exact
                                # a forced Triton route runs its own GEMM (another summation order);
                                # the contract binds what dispatch picks, and the other backends
                                if not route.startswith("triton"):
                                    parts_ok.append(exact)
                            rec.update(ok=all(parts_ok), stats=stats)
                        except Exception as exc:
                            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                                       trace=traceback.format_exc()[-1500:])
                        results["cases"].append(rec)
                        if not rec["ok"]:
                            part.budget.say(f"check FAILED {sname} {cname} {dname} {route}: "
                                            f"{rec.get('error') or rec.get('stats')}")
    results["skipped_for_time"] = part.skipped
    return results


def _clean_exact(kind, x, w, b, stride, padding, groups, y) -> bool:
    """A clean call must equal the torch op bit for bit (SPEC section 1)."""
    if kind == "conv":
        want = TF.conv2d(x, w, b, stride, padding, 1, groups)
    else:
        want = TF.linear(x, w, b)
    return bool(torch.equal(y, want))


# ---- part 2: layer timings ----------------------------------------------------------------------
def resnet50_layers(batch: int, image: int = 224):
    """Unique conv/linear shapes of torchvision's ResNet-50 with their multiplicity:
    ``[dict(name, kind, x, w, stride, padding, groups, count)]`` (forward hooks on a meta model)."""
    import torchvision
    model = torchvision.models.resnet50().to("meta")
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            x = tuple(inp[0].shape)
            if isinstance(mod, torch.nn.Conv2d):
                key = ("conv", x, tuple(mod.weight.shape), mod.stride[0], mod.padding[0], mod.groups)
            else:
                key = ("linear", x, tuple(mod.weight.shape), None, None, 1)
            if key in seen:
                seen[key]["count"] += 1
            else:
                seen[key] = dict(name=name, kind=key[0], x=x, w=key[2], stride=key[3],
                                 padding=key[4], groups=key[5], count=1)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.empty(batch, 3, image, image, device="meta"))
    return list(seen.values())


def timing_configs(quick: bool):
    from noisyops import LayerConfig
    cfgs = {
        "wnoise_call": LayerConfig(eta=0.05, w_range=2.0),
        "tiles_adc_call": LayerConfig(eta=0.05, w_range=2.0, in_bits=8, in_range=(-3.0, 3.0),
                                      out_bits=8, out_range=(-8.0, 8.0), out_noise=0.05,
                                      tile_rows=512),
        "per_sample": LayerConfig(eta=0.05, w_range=2.0, sampling="per_sample"),
        "per_instance8": LayerConfig(eta=0.05, w_range=2.0, sampling="per_instance"),
    }
    if quick:
        cfgs.pop("per_instance8")
    return cfgs


def layer_flops_bytes(L, dt_bytes):
    n = L["x"][0]
    if L["kind"] == "conv":
        _, cin, h, w = L["x"]
        cout, cg, kh, kw = L["w"]
        s, p = L["stride"], L["padding"]
        oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        flops = 2.0 * n * oh * ow * cout * cg * kh * kw
        nbytes = dt_bytes * (n * cin * h * w + cout * cg * kh * kw + n * cout * oh * ow)
    else:
        cout, cin = L["w"]
        flops = 2.0 * n * cout * cin
        nbytes = dt_bytes * (n * cin + cout * cin + n * cout)
    return flops, nbytes


def layers_part(part: Part, device: str, routes, dtypes, layers, quick: bool) -> dict:
    from noisyops import dispatch
    from noisyops import functional as F
    rows = []
    cfgs = timing_configs(quick)
    for dname in dtypes:
        for L in layers:
            if part.expired():
                continue
            with dtype_mode(dname) as dt:
                rec = dict(layer=L["name"], kind=L["kind"], x=L["x"], w=L["w"], stride=L["stride"],
                           count=L["count"], dtype=dname, ms={}, ran={}, errors={})
                try:
                    x = torch.randn(L["x"], device=device, dtype=dt)
                    if L["kind"] == "conv":
                        x = x.contiguous(memory_format=torch.channels_last)
                    w = torch.randn(L["w"], device=device, dtype=dt) * 0.05
                    if L["kind"] == "conv":
                        clean = lambda: TF.conv2d(x, w, None, L["stride"], L["padding"], 1, L["groups"])  # noqa: E731
                    else:
                        clean = lambda: TF.linear(x, w)  # noqa: E731
                    rec["ms"]["clean"] = bench(clean, device, quick)
                    flops, nbytes = layer_flops_bytes(L, x.element_size())
                    rec["gflop"] = flops / 1e9
                    rec["clean_tflops"] = flops / rec["ms"]["clean"] / 1e9
                    rec["clean_gbs"] = nbytes / rec["ms"]["clean"] / 1e6
                except Exception as exc:
                    rec["errors"]["clean"] = f"{type(exc).__name__}: {exc}"
                    rows.append(rec)
                    continue
                for cname, cfg in cfgs.items():
                    inst = (torch.arange(L["x"][0], device=device) % 8) if cfg.sampling == "per_instance" else 1
                    for route in routes:
                        if part.expired() or (route.endswith("-loop") and not cfg.out_bits):
                            continue
                        key = f"{cname}/{route}"
                        try:
                            dispatch.reset_counts()
                            with route_env(route):
                                if L["kind"] == "conv":
                                    fn = lambda: F.noisy_conv2d(x, w, None, L["stride"], L["padding"], 1,  # noqa: E731
                                                                L["groups"], config=cfg, seed=1, instance=inst)
                                else:
                                    fn = lambda: F.noisy_linear(x, w, None, config=cfg, seed=1, instance=inst)  # noqa: E731
                                rec["ms"][key] = bench(fn, device, quick)
                            rec["ran"][key] = sorted({b for (_, b) in dispatch.backend_counts()})
                        except Exception as exc:
                            rec["errors"][key] = f"{type(exc).__name__}: {str(exc)[:300]}"
                del x, w
                rows.append(rec)
                part.budget.say(f"layers {dname} {L['name']} clean {rec['ms'].get('clean', float('nan')):.3f} ms, "
                                f"{len(rec['ms']) - 1} noisy timings, {len(rec['errors'])} errors")
    return {"rows": rows, "skipped_for_time": part.skipped}


# ---- part 3: whole model ------------------------------------------------------------------------
def build_model(smoke: bool):
    import torchvision
    if smoke:  # the same bottleneck blocks, one per stage and narrow: seconds on a CPU
        from torchvision.models.resnet import Bottleneck, ResNet
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=8)
    return torchvision.models.resnet50()


def model_flops_bytes(model, batch, image, dt_bytes, device):
    """Forward FLOPs and operand bytes of the model's convs/linears (hooks on a meta copy)."""
    import copy
    m = copy.deepcopy(model).to("meta")
    tot = [0.0, 0.0]

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, torch.nn.Conv2d):
            L = dict(kind="conv", x=tuple(x.shape), w=tuple(mod.weight.shape), stride=mod.stride[0],
                     padding=mod.padding[0])
        else:
            L = dict(kind="linear", x=tuple(x.shape), w=tuple(mod.weight.shape))
        f, b = layer_flops_bytes(L, dt_bytes)
        tot[0] += f
        tot[1] += b

    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.empty(batch, 3, image, image, device="meta"))
    return tot[0], tot[1]


def model_part(part: Part, device: str, dtypes, smoke: bool, quick: bool) -> dict:
    from noisyops import LayerConfig, dispatch
    batch, image, chips, chip_batch = (2, 32, 2, 2) if smoke else ((64, 224, 8, 8) if quick else (256, 224, 8, 32))
    compile_modes = ("eager",) if quick else ("eager", "compiled")
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    cfg = LayerConfig(eta=0.05, w_range=2.0)
    rows = []
    for dname in dtypes:
        for mode in compile_modes:
            for noisy in (False, True):
                for what in ("train_step", f"eval_{chips}chips"):
                    if smoke and mode == "compiled" and what != "train_step":
                        continue  # the smoke run compiles one graph pair only (CPU compile time)
                    # a compiled case cannot be cut short: start it only with time for the compile
                    if part.expired(60.0 if (mode == "compiled" and device == "cuda") else 0.0):
                        continue
                    rec = dict(what=what, dtype=dname, mode=mode, noisy=noisy, batch=batch)
                    try:
                        with dtype_mode(dname) as dt:
                            rec.update(_model_case(device, dt, dname, mode, noisy, what, batch, image,
                                                   chips, chip_batch, cfg, smoke, quick or smoke,
                                                   compile_backend))
                        rec["ran"] = sorted({b for (_, b) in dispatch.backend_counts()}) if noisy else []
                    except Exception as exc:
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                        rec["trace"] = traceback.format_exc()[-1500:]
                    rows.append(rec)
                    part.budget.say(f"model {what} {dname} {mode} {'noisy' if noisy else 'clean'}: "
                                    f"{rec.get('ms', rec.get('error'))}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return {"rows": rows, "skipped_for_time": part.skipped}


def _model_case(device, dt, dname, mode, noisy, what, batch, image, chips, chip_batch, cfg, smoke,
                quick, compile_backend):
    import noisyops
    from noisyops import dispatch
    torch.manual_seed(0)
    model = build_model(smoke)
    if noisy:
        model = noisyops.convert(model, cfg, seed=7)
    model = model.to(device=device, dtype=dt, memory_format=torch.channels_last)
    train = what == "train_step"
    n_img = batch if train else chip_batch
    x = torch.randn(n_img, 3, image, image, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10 if smoke else 1000, (n_img,), device=device)
    flops, nbytes = model_flops_bytes(build_model(smoke), n_img * (1 if train else chips), image,
                                      x.element_size(), device)
    if train:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            TF.cross_entropy(fwd(x).float(), y).backward()
            opt.step()
        flops, nbytes = 3 * flops, 3 * nbytes
        fwd = torch.compile(model, backend=compile_backend) if mode == "compiled" else model
        fn = step
    else:
        model.eval()
        fwd = torch.compile(model, backend=compile_backend) if mode == "compiled" else model
        xr = x.repeat(chips, 1, 1, 1)

        def fn():
            with torch.no_grad():
                if noisy:
                    return noisyops.run_chips(fwd, x, chips)
                return fwd(xr)
    t = time.time()
    fn()  # compile / autotune / warm caches outside the timing
    sync(device)
    first_s = time.time() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dispatch.reset_counts()
    ms = bench(fn, device, quick)
    out = dict(ms=ms, first_call_s=first_s, tflops=flops / ms / 1e9, gbs_operands=nbytes / ms / 1e6,
               images_per_s=(n_img * (1 if train else chips)) / ms * 1e3)
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- report -------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, host=platform.node(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable: {exc}"
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    try:
        from noisyops import dispatch
        env["backends"] = {k: list(v) for k, v in dispatch.status().items()}
    except Exception as exc:
        env["backends"] = f"noisyops import failed: {exc}"
    return env


def markdown(res: dict) -> str:
    e = res["env"]
    out = [f"# noisyops GPU check\n\n",
           f"`{res['command']}` — {e.get('gpu', 'CPU smoke run')}, torch {e['torch']}, triton {e.get('triton')}, "
           f"CUDA {e.get('cuda')}, commit {e.get('commit')}, {e['date']}; {res['seconds']:.0f} s of a "
           f"{res['budget_s']:.0f} s budget.\n"]
    for name, p in res["parts"].items():
        if "error" in p:
            out.append(f"\n**part {name} failed**: `{p['error']}`\n")
    chk = res["parts"].get("check", {})
    if "cases" in chk:
        bad = [c for c in chk["cases"] if not c.get("ok")]
        out.append(f"\n## Correctness\n\n{len(chk['cases'])} cases (seed {chk['seed']}), {len(bad)} failing, "
                   f"{chk.get('skipped_for_time', 0)} skipped for time; stream checks: "
                   f"{sum(1 for s in chk['stream'] if s.get('ok'))}/{len(chk['stream'])} ok "
                   f"({sum(1 for s in chk['stream'] if s.get('ok') is None)} not run here).\n")
        if bad:
            out.append("\n| shape | config | dtype | route | problem |\n| --- | --- | --- | --- | --- |\n")
            for c in bad[:40]:
                why = c.get("error") or "; ".join(f"{s['tensor']} rel {s.get('rel_err', 0):.2e} over {s.get('frac_over_tol', 0):.3f} nan {s.get('nan')}"
                                                  for s in c.get("stats", []))
                out.append(f"| {c['shape']} | {c['config']} | {c['dtype']} | {c['route']} | {why} |\n")
    lay = res["parts"].get("layers", {})
    if lay.get("rows"):
        keys = sorted({k for r in lay["rows"] for k in r["ms"] if k != "clean"})
        out.append("\n## ResNet-50 layers (ms per forward; ratio = noisy / clean)\n\n")
        out.append("| dtype | layer | count | GFLOP | clean ms | TFLOP/s | " + " | ".join(keys) + " |\n")
        out.append("| --- " * (6 + len(keys)) + "|\n")
        totals = {}
        for r in lay["rows"]:
            c = r["ms"].get("clean")
            cells = []
            for k in keys:
                v = r["ms"].get(k)
                cells.append(f"{v:.3f} ({v / c:.2f}x)" if v is not None and c else ("err" if k in r["errors"] else "-"))
            out.append(f"| {r['dtype']} | {r['layer']} | {r['count']} | {r.get('gflop', 0):.2f} | "
                       f"{c if c is None else f'{c:.3f}'} | {r.get('clean_tflops', 0):.0f} | " + " | ".join(cells) + " |\n")
            for k in ["clean"] + keys:
                if r["ms"].get(k) is not None:
                    t = totals.setdefault((r["dtype"], k), [0.0, 0])
                    t[0] += r["count"] * r["ms"][k]
                    t[1] += 1
        out.append("\nSum over the layers (ms × count) of each timing; `layers` says over how many "
                   "unique shapes (a sum over fewer layers than clean's is not comparable):\n\n")
        for (dname, k), (v, nl) in sorted(totals.items()):
            c = totals.get((dname, "clean"), [0, 0])
            ratio = f", {v / c[0]:.2f}x clean" if c[0] and nl == c[1] else ""
            out.append(f"- {dname} {k}: {v:.2f} ms over {nl} layers{ratio}\n")
    mod = res["parts"].get("model", {})
    if mod.get("rows"):
        out.append("\n## Whole ResNet-50\n\n| what | dtype | mode | noisy | ms | img/s | TFLOP/s | GB/s (operands) | peak GiB | backends |\n")
        out.append("| --- " * 10 + "|\n")
        for r in mod["rows"]:
            if "error" in r:
                out.append(f"| {r['what']} | {r['dtype']} | {r['mode']} | {r['noisy']} | error: `{r['error'][:120]}` | | | | | |\n")
                continue
            out.append(f"| {r['what']} | {r['dtype']} | {r['mode']} | {r['noisy']} | {r['ms']:.1f} | "
                       f"{r['images_per_s']:.0f} | {r['tflops']:.1f} | {r['gbs_operands']:.0f} | "
                       f"{r.get('peak_mem_gib', float('nan')):.2f} | {','.join(r.get('ran', []))} |\n")
    return "".join(out)


def interpret_subprocess(args, out_dir: str, budget: Budget) -> dict:
    """The Triton routes of the check under ``TRITON_INTERPRET=1`` in a child process (the
    interpreter is chosen at ``import triton``); returns its ``check`` part."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    sub = os.path.join(out_dir, "_interpret")
    os.makedirs(sub, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--cpu-smoke", "--parts", "check", "--routes",
           ",".join(INTERPRET_ROUTES), "--dtypes", "fp32", "--out", sub, "--budget-s",
           str(int(max(10, budget.left() - 5))), "--no-interpret-child"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(20, budget.left()))
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    with open(os.path.join(sub, "gpu_check.json")) as f:
        child = json.load(f)
    for name in os.listdir(sub):
        os.remove(os.path.join(sub, name))
    os.rmdir(sub)
    return child["parts"]["check"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results", "gpu_check"))
    ap.add_argument("--quick", action="store_true", help="short version (< 3 min with the build)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes: the code paths only")
    ap.add_argument("--parts", default="check,layers,model")
    ap.add_argument("--routes", default=None, help="comma list (default: every route of the device)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,tf32,bf16")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of this script (default 360 s; --quick 100 s; smoke 45 s)")
    ap.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, recorded)")
    ap.add_argument("--no-interpret-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device; use --cpu-smoke on a machine without a GPU")
        return 2
    budget = Budget(args.budget_s or (45 if smoke else (100 if args.quick else 360)))
    parts = args.parts.split(",")
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if smoke else list(DTYPES))
    routes = (args.routes.split(",") if args.routes else list(CPU_ROUTES if smoke else GPU_ROUTES))
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = dict(command=command, budget_s=budget.total, env=environment(device), parts={})
    budget.say(f"device {res['env'].get('gpu', 'cpu')}; parts {parts}; routes {routes}; dtypes {dtypes}; seed {seed}")
    # shares of the remaining budget: check 40%, layers 45% (of what is left then), model the rest
    shares = {"check": 0.4 if len(parts) > 1 else 1.0, "layers": 0.45 if "model" in parts else 1.0,
              "model": 1.0}
    for name in parts:
        part = Part(budget, name, shares.get(name, 1.0) * budget.left())
        t_part = time.time()
        budget.say(f"part {name}: {part.deadline - time.time():.0f} s allowed")
        try:
            if name == "check":
                r = check_part(part, device, routes, dtypes, smoke, seed)
                if smoke and not args.no_interpret_child:
                    try:
                        child = interpret_subprocess(args, args.out, budget)
                        r["cases"] += [dict(c, route=c["route"] + "(interpreter)") for c in child["cases"]]
                        r["stream"] += [dict(s, what=s["what"] + " (interpreter)") for s in child["stream"]]
                    except Exception as exc:
                        r["interpreter_error"] = f"{type(exc).__name__}: {exc}"
                        r["cases"].append(dict(shape="-", config="-", dtype="fp32", route="triton(interpreter)",
                                               ok=False, error=r["interpreter_error"]))
            elif name == "layers":
                layers = resnet50_layers(2 if smoke else 256, 16 if smoke else 224)
                if args.quick:  # one layer per stage and the classifier
                    layers = [L for L in layers if L["name"].endswith(("layer1.0.conv2", "layer2.0.conv2",
                                                                     "layer3.1.conv2", "layer4.1.conv2", "fc"))]
                if smoke:  # timings on a CPU mean nothing: one conv, the classifier, one route
                    layers = layers[:1] + layers[-1:]
                r = layers_part(part, device, routes[:1] if smoke else routes, ["bf16"] if args.quick and not smoke else
                                (["fp32"] if smoke else ["bf16", "tf32"]), layers, args.quick or smoke)
            elif name == "model":
                r = model_part(part, device, ["fp32"] if smoke else (["bf16"] if args.quick else ["bf16", "tf32"]),
                               smoke, args.quick)
            else:
                raise ValueError(f"--parts: unknown part {name!r} (expected check, layers, model)")
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            budget.say(f"part {name} FAILED: {r['error']}")
        r["seconds"] = round(time.time() - t_part, 1)
        res["parts"][name] = r
        res["seconds"] = budget.elapsed()
        _write(res, args.out)  # after every part: a later overrun still leaves the earlier parts
    res["seconds"] = budget.elapsed()
    _write(res, args.out)
    failing = [c for c in res["parts"].get("check", {}).get("cases", []) if not c.get("ok")]
    failing += [s for s in res["parts"].get("check", {}).get("stream", []) if s.get("ok") is False]
    errors = [n for n, p in res["parts"].items() if "error" in p]
    budget.say(f"done: {len(failing)} failing checks, parts with errors: {errors or 'none'}; "
               f"wrote {args.out}/gpu_check.json and .md")
    return 1 if failing or errors else 0


def _write(res: dict, out: str) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
