"""Ahead-of-time compile of the Triton kernels of noisyops exactly as the JIT specializes them for
ResNet-50 layer shapes, for sm_80 (A100) and sm_90 (H100), without a GPU.

How: the real host glue (`noisyops.kernels.noisy_conv2d.conv2d_fwd`, `..._backward.conv2d_bwd`,
`noisy_linear.*`) runs on ``meta`` tensors of the layer's shapes (batch 256, channels-last) with
every kernel launch captured instead of run. Each captured launch is specialized by Triton's own
binder (`triton.runtime.jit.create_function_from_signature` + `JITFunction._pack_args`, the code
path of a real launch): ints equal to 1 become constants, ints divisible by 16 and 16-byte aligned
pointers get ``tt.divisibility = 16``, the constexpr switches are the ones the glue really passes.
Then ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` for every autotune config of that kernel (`noisyops.kernels.configs`, pruned for the shape
as the launcher prunes them). Registers and spills come from the ptxas ``-v`` log
(``TRITON_DUMP_PTXAS_LOG=1``), the MMA kind from the PTX (``wgmma.mma_async`` -> ``"wgmma"``,
``mma.sync`` -> ``"mma"``, else ``"fma"``), shared memory from the kernel's metadata.

Writes ``<out>.json`` (a list of records: kernel, case, dtype, arch, BM, BN, BK, num_warps,
num_stages, maxnreg, registers, spill_bytes, mma, smem, specialization = "jit", ok, problem)
and ``<out>.md``; exits non-zero on any spill, over-limit shared memory or compile failure.
Must run WITHOUT ``TRITON_INTERPRET``.

    python benchmarks/compile_report.py [--out docs/compile_report] [--archs 80,90] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py: unset TRITON_INTERPRET (the interpreter does not compile)")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel prints no ptxas log

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from noisyops.kernels import configs  # noqa: E402
from noisyops.kernels import noisy_conv2d as kconv  # noqa: E402
from noisyops.kernels import noisy_conv2d_backward as kconvb  # noqa: E402
from noisyops.kernels import noisy_linear as klin  # noqa: E402
from noisyops.params import OpParams  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
BATCH = 256
SEED = 0x5EED1234ABC  # a seed whose Philox key words are not multiples of 16 (as real seeds)

# ResNet-50 layers (torchvision, 224x224, batch 256): (name, kind, x shape, w shape, stride, pad)
SHAPES = [
    ("layer3.conv3x3", "conv", (BATCH, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ("layer2.0.conv3x3_s2", "conv", (BATCH, 128, 56, 56), (128, 128, 3, 3), 2, 1),
    ("layer3.conv1x1", "conv", (BATCH, 1024, 14, 14), (256, 1024, 1, 1), 1, 0),
    ("fc", "linear", (BATCH, 2048), (1000, 2048), None, None),
]
# the two cases that need the fused kernels (issue #8): crossbar tiles with DAC, ADC and output
# noise (per_call), and per_sample weight noise
CASES = {
    "tiles": dict(eta=0.05, w_std_k=0.0, w_lo=-0.1, w_hi=0.1, w_clip=1, in_bits=8, in_lo=-3.0,
                  in_hi=3.0, out_bits=8, out_lo=-8.0, out_hi=8.0, out_noise=0.05, tile_rows=512),
    "per_sample": dict(eta=0.05, w_std_k=0.0, w_lo=-0.1, w_hi=0.1, w_clip=1, sampling=1),
}
# tiles_split: the same call with the tile-parallel crossbar forward forced (the default keeps the
# loop for more than one crossbar tile: kernels/noisy_conv2d.py `crossbar_split`)
CASES["tiles_split"] = dict(CASES["tiles"])
CASE_ENV = {"tiles_split": {"NOISYOPS_TRITON_CROSSBAR_FWD": "split"}}
STRATEGIES = ("regen", "prepass")


@contextlib.contextmanager
def captured_launches():
    """Every ``kernel[grid](...)`` inside records ``(JITFunction, args, kwargs)`` and runs nothing."""
    from triton.runtime.jit import JITFunction
    calls = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
        return None

    JITFunction.run = run
    try:
        yield calls
    finally:
        JITFunction.run = orig


def launches(shape, case: str, strategy: str, dtype: torch.dtype):
    """``[(label, fn, args, kwargs)]``: the kernel launches of one forward + backward call."""
    name, kind, xs, ws, stride, pad = shape
    kw = dict(CASES[case], seed_lo=SEED & 0xFFFFFFFF, seed_hi=SEED >> 32, layer_key=7)
    p = OpParams(**kw)
    x = torch.empty(xs, device="meta", dtype=dtype)
    w = torch.empty(ws, device="meta", dtype=dtype)
    inst = torch.tensor(3)
    env = {"NOISYOPS_TRITON_WEIGHTS": strategy, "NOISYOPS_TRITON_CROSSBAR_FWD": None,
           **CASE_ENV.get(case, {})}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        with captured_launches() as calls:
            if kind == "conv":
                x = x.contiguous(memory_format=torch.channels_last)
                geo = ([stride] * 2, [pad] * 2, [1, 1], 1)
                y, mask = kconv.conv2d_fwd(x, w, None, *geo, p, inst)
                n_fwd = len(calls)
                g = torch.empty_like(y)
                kconvb.conv2d_bwd(g, x, w, *geo, p, inst, mask, y.stride())
            else:
                y, mask = klin.linear_fwd(x, w, None, p, inst)
                n_fwd = len(calls)
                klin.linear_bwd(torch.empty_like(y), x, w, p, inst, mask, y.stride())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = []
    for i, (fn, args, kwargs) in enumerate(calls):
        base = {"_conv_fwd_kernel": "fwd", "_conv_bwd_x_kernel": "bwd_x", "_conv_bwd_w_kernel": "bwd_w",
                "_prepass_kernel": "weight_prepass", "_tile_sum_kernel": "tile_sum"}.get(fn.__name__, fn.__name__)
        if base != "weight_prepass":
            base = f"{kind}_{base}"
        else:
            base += "[fwd]" if i < n_fwd else "[bwd]"
        out.append((base, fn, args, kwargs))
    return out


def jit_specialization(fn, args, kwargs, arch: int):
    """``(signature, constexprs, attrs, options)`` exactly as `JITFunction.run` forms them for
    these arguments on a ``cuda`` target of ``arch`` (Triton's own binder)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma"


def compile_one(fn, args, kwargs, arch: int) -> dict:
    """Compile one launch for ``arch``; the numbers of one record."""
    signature, constexprs, attrs, options = jit_specialization(fn, args, kwargs, arch)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    log = buf.getvalue()
    regs = [int(v) for v in _REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _PTXAS.findall(log)]
    ptx = k.asm.get("ptx", "")
    names = list(fn.arg_names)
    unit = sorted(names[path[0]] for path, v in constexprs.items()
                  if len(path) == 1 and signature.get(names[path[0]]) == "constexpr" and v == 1
                  and not names[path[0]].isupper())
    div16 = sorted(names[path[0]] for path, a in attrs.items() if a and len(path) == 1)
    switches = {names[path[0]]: v for path, v in constexprs.items()
                if len(path) == 1 and names[path[0]].isupper() and names[path[0]] not in ("BM", "BN", "BK", "BLOCK")}
    return dict(registers=max(regs) if regs else None,
                spill_bytes=(max((s[1] for s in spills), default=0) + max((s[2] for s in spills), default=0))
                if spills else None,
                spill_stores=max((s[1] for s in spills), default=None),
                spill_loads=max((s[2] for s in spills), default=None),
                stack=max((s[0] for s in spills), default=None),
                mma=mma_kind(ptx), cp_async="cp.async" in ptx, atomics=bool(re.search(r"\batom\.|\bred\.", ptx)),
                smem=int(k.metadata.shared), smem_limit=SMEM_LIMIT[arch],
                seconds=round(time.time() - t0, 1), ptxas_log_found=bool(regs),
                unit_constants=unit, divisible_by_16=div16, switches=switches)


def configs_for(label: str, arch: int, args_by_name: dict):
    """``(family, configs)`` the launcher would try for this launch (``None, [None]``: an
    elementwise kernel, launched with its own block size)."""
    if "weight_prepass" in label or label.endswith("tile_sum"):
        return None, [None]
    operand = args_by_name.get("x_ptr")
    fam = configs.family("WGRAD" if label.endswith("bwd_w") else "GEMM", args_by_name,
                         operand.element_size() if operand is not None else 2)
    return fam, configs.pruned(fam, arch, args_by_name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "compile_report"))
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--quick", action="store_true",
                    help="first shape, bf16, first config of each kernel only (the CI test)")
    ap.add_argument("--fp32", action="store_true",
                    help="also fp32 operands (as tf32) on the first shape (not in the committed report)")
    ap.add_argument("--kernels", default=None,
                    help="comma list of kernel labels (e.g. conv_bwd_w,linear_bwd_w): compile only those")
    ap.add_argument("--merge", action="store_true",
                    help="with --kernels: replace those kernels' records (of --archs) in the existing <out>.json")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    only = set(args.kernels.split(",")) if args.kernels else None
    ap_fp32 = args.fp32 and not args.quick
    dtypes = {"bf16": torch.bfloat16, **({"fp32(tf32)": torch.float32} if ap_fp32 else {})}
    shapes = SHAPES[:1] if args.quick else SHAPES
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 products as tf32: what training uses on GPUs
    records, seen = [], set()
    t_start = time.time()
    for dname, dtype in dtypes.items():
        for shape in (shapes if dname == "bf16" else shapes[:1]):  # fp32: one shape (CPU time)
            for case in CASES:
                for strategy in STRATEGIES:
                    for label, fn, largs, lkw in launches(shape, case, strategy, dtype):
                        if only is not None and label not in only:
                            continue
                        by_name = {**dict(zip(fn.arg_names, largs)), **lkw}
                        for arch in archs:
                            fam, cfgs = configs_for(label, arch, by_name)
                            for cfg in (cfgs[:1] if args.quick else cfgs):
                                kw = dict(lkw)
                                if cfg is not None:
                                    kw.update(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"],
                                              num_stages=cfg["num_stages"])
                                    if cfg.get("maxnreg"):
                                        kw["maxnreg"] = cfg["maxnreg"]
                                rec = dict(kernel=label, case=case, strategy=strategy, shape=shape[0],
                                           dtype=dname, arch=f"sm_{arch}", BM=kw.get("BM"), BN=kw.get("BN"),
                                           BK=kw.get("BK"), BLOCK=kw.get("BLOCK"), num_warps=kw.get("num_warps", 4),
                                           num_stages=kw.get("num_stages", 3), maxnreg=kw.get("maxnreg"),
                                           family=fam, specialization="jit")
                                try:
                                    sig = jit_specialization(fn, largs, kw, arch)
                                    key = (fn.__name__, arch, repr(sig[0]), repr(sorted(sig[1].items())),
                                           repr(sorted((k, repr(v)) for k, v in sig[2].items())),
                                           repr(sorted(sig[3].__dict__.items())))
                                    if key in seen:  # the same binary as a record already made
                                        continue
                                    seen.add(key)
                                    rec.update(compile_one(fn, largs, kw, arch))
                                    why = []
                                    if not rec["ptxas_log_found"]:
                                        why.append("no ptxas -v log captured")
                                    if rec["spill_bytes"]:
                                        why.append("register spills")
                                    if rec["smem"] > rec["smem_limit"]:
                                        why.append("shared memory over the device limit")
                                    rec.update(ok=not why, problem="; ".join(why))
                                except Exception as exc:
                                    rec.update(ok=False, problem=f"{type(exc).__name__}: {str(exc)[:300]}")
                                records.append(rec)
                                tile = (f"{rec['BM']}x{rec['BN']}x{rec['BK']}" if rec["BM"] else f"BLOCK{rec['BLOCK']}")
                                print(f"{rec['arch']} {label:22s} {case:10s} {strategy:7s} {shape[0]:20s} {dname:10s} "
                                      f"{tile:12s} w{rec['num_warps']} s{rec['num_stages']} regs={rec.get('registers')} "
                                      f"spill={rec.get('spill_bytes')} {rec.get('mma')} {rec.get('seconds')}s "
                                      f"{'OK' if rec['ok'] else 'FAIL ' + rec['problem']}", flush=True)
    total = time.time() - t_start
    argline = " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge and only is not None and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = [r for r in json.load(f)
                   if r["kernel"] not in only or r["arch"] not in {f"sm_{a}" for a in archs}]
        records = old + records
        argline = f"` then `python benchmarks/compile_report.py {argline}"
    write(records, args.out, total, argline)
    bad = [r for r in records if not r["ok"]]
    print(f"{len(records)} compiles in {total:.0f} s, {len(bad)} failing; wrote {args.out}.md/.json")
    return 1 if bad else 0


def goal_table(records):
    """Per GEMM kernel on sm_90: the largest spill-free wgmma tile (the issue's goal: >= 128x128)."""
    best = {}
    for r in records:
        if r["arch"] != "sm_90" or not r.get("BM") or not r["ok"]:
            continue
        k = (r["kernel"], r["case"], r["strategy"], r["dtype"])
        area = r["BM"] * r["BN"] if r.get("mma") == "wgmma" else 0
        if area > best.get(k, (0, None))[0]:
            best[k] = (area, r)
    return best


def write(records, out: str, seconds: float, argline: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(records, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(f"# Triton AOT compile report (JIT specialization)\n\nGenerated by `python "
                f"benchmarks/compile_report.py {argline}".rstrip() + f"` (triton {triton.__version__}, "
                f"{len(records)} compiles, {seconds:.0f} s). Every launch of the host glue for ResNet-50 "
                f"shapes at batch {BATCH} (channels-last), specialized by Triton's own binder; shared memory "
                f"limits: sm_80 {SMEM_LIMIT[80]} B, sm_90 {SMEM_LIMIT[90]} B per block. `spill` = spill "
                f"stores + loads (bytes). Duplicate binaries (same specialization) are listed once.\n\n")
        f.write("| arch | kernel | case | weights | shape | dtype | tile | warps | stages | regs | spill | mma | "
                "smem | cp.async | atomics | ok |\n" + "| --- " * 16 + "|\n")
        for r in records:
            tile = f"{r['BM']}x{r['BN']}x{r['BK']}" if r.get("BM") else f"BLOCK {r.get('BLOCK')}"
            f.write(f"| {r['arch']} | {r['kernel']} | {r['case']} | {r['strategy']} | {r['shape']} | {r['dtype']} | "
                    f"{tile} | {r['num_warps']} | {r['num_stages']} | {r.get('registers')} | {r.get('spill_bytes')} | "
                    f"{r.get('mma')} | {r.get('smem')} | {r.get('cp_async')} | {r.get('atomics')} | "
                    f"{'yes' if r['ok'] else 'NO: ' + r['problem']} |\n")
        best = goal_table(records)
        f.write("\n## Goal: a spill-free >= 128x128 wgmma config per GEMM kernel on sm_90\n\n"
                "| kernel | case | weights | dtype | largest spill-free wgmma tile | met |\n| --- | --- | --- | --- | --- | --- |\n")
        keys = sorted({(r["kernel"], r["case"], r["strategy"], r["dtype"]) for r in records
                       if r["arch"] == "sm_90" and r.get("BM")})
        for k in keys:
            area, r = best.get(k, (0, None))
            tile = f"{r['BM']}x{r['BN']}x{r['BK']} w{r['num_warps']} s{r['num_stages']}" if r else "none"
            f.write(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {tile} | {'yes' if area >= 128 * 128 else 'no'} |\n")
        if records:
            first = records[0]
            f.write(f"\nSpecialization of the first record ({first['kernel']}): unit constants "
                    f"{first.get('unit_constants')}, divisible by 16 {first.get('divisible_by_16')}, "
                    f"switches {first.get('switches')}.\n")


if __name__ == "__main__":
    sys.exit(main())
