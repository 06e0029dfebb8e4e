"""Ahead-of-time compile of every Triton kernel of noisyops, for every autotune config, for sm_80
(A100) and sm_90 (H100), without a GPU. Writes a Markdown and a JSON table of registers, spills
and shared memory (ptxas ``-v`` log and the compiled kernel's metadata) and exits non-zero on any
spill, over-limit shared memory, or compile failure.

Specialization: as the JIT would for 16-byte aligned tensors (pointer args ``tt.divisibility=16``),
int arguments unspecialized (values neither 1 nor multiples of 16), the constexpr switches of the
heaviest variant (every option on: input/weight/output quantizers, both weight noises, output
noise, bias, tiles), for each input dtype (fp16, bf16, fp32) and for both weight strategies
(regenerate on-chip, pre-pass). Must run WITHOUT ``TRITON_INTERPRET``.

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

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from noisyops.kernels import configs, noisy_conv2d, noisy_conv2d_backward, quantize, stream, weight_prepass  # noqa: E402,E501

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _signature(fn, ptrs: dict, floats: set, consts: dict):
    """Triton signature dict: pointer types from ``ptrs``, ``fp32`` for ``floats``, ``constexpr``
    for ``consts``, ``i32`` for every other argument."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptrs}
    return sig, attrs


def _floats(fn):
    names = ("lo", "hi", "delta", "eta_mul", "sigma", "out_noise")
    return {n for n in fn.arg_names if n.endswith(names) or n in names}


def variants():
    """``(kernel label, jit fn, ptr types, constexprs, config family)`` for every compiled case."""
    out = []
    on = dict(IN_Q=True, W_CLIP=True, W_Q=True, NOISE_MUL=True, NOISE_ADD=True)
    for dt, ptr in DTYPES.items():
        prec = "ieee"
        for pre in (False, True):
            if pre and dt != "fp16":
                continue
            wn = ptr if pre else "*fp32"
            fwd = noisy_conv2d._conv_fwd_kernel
            out.append((f"conv_fwd[{dt},{'prepass' if pre else 'regen'}]", fwd,
                        dict(x_ptr=ptr, w_ptr=ptr, wn_ptr=wn if pre else ptr, b_ptr=ptr, y_ptr=ptr,
                             mask_ptr="*i32", inst_ptr="*i64", slot_ptr="*i32"),
                        dict(HAS_BIAS=True, **on, W_PRE=pre, OUT_NOISE=True, OUT_Q=True,
                             DOT_PREC=prec), "GEMM"))
            bx = noisy_conv2d_backward._conv_bwd_x_kernel
            out.append((f"conv_bwd_x[{dt},{'prepass' if pre else 'regen'}]", bx,
                        dict(g_ptr=ptr, w_ptr=ptr, wn_ptr=wn if pre else ptr, x_ptr=ptr, gx_ptr=ptr,
                             mask_ptr="*i32", inst_ptr="*i64", slot_ptr="*i32"),
                        dict(**on, W_PRE=pre, HAS_OMASK=True, DOT_PREC=prec), "GEMM"))
        bw = noisy_conv2d_backward._conv_bwd_w_kernel
        out.append((f"conv_bwd_w[{dt}]", bw,
                    dict(g_ptr=ptr, x_ptr=ptr, w_ptr=ptr, gw_ptr="*fp32", mask_ptr="*i32"),
                    dict(IN_Q=True, W_CLIP=True, HAS_OMASK=True, DOT_PREC=prec), "WGRAD"))
    blk = dict(BLOCK=configs.ELEMENTWISE_BLOCK)
    out.append(("weight_prepass[fp16]", weight_prepass._prepass_kernel,
                dict(w_ptr="*fp16", out_ptr="*fp16", inst_ptr="*i64"),
                dict(W_CLIP=True, W_Q=True, NOISE_MUL=True, NOISE_ADD=True, **blk), None))
    out.append(("quantize[fp16]", quantize._quantize_kernel, dict(x_ptr="*fp16", y_ptr="*fp16"),
                dict(blk), None))
    out.append(("stream", stream._stream_kernel,
                dict(words_ptr="*i32", unif_ptr="*fp32", norm_ptr="*fp32"), dict(blk), None))
    return out


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_one(fn, ptrs, consts, cfg, arch):
    """Compile one specialization; ``dict`` of the numbers for the table."""
    consts = dict(consts)
    opts = {"num_warps": 4, "num_stages": 3}
    if cfg is not None:
        consts.update(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"])
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        if cfg.get("maxnreg"):
            opts["maxnreg"] = cfg["maxnreg"]
    sig, attrs = _signature(fn, ptrs, _floats(fn), consts)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    log = buf.getvalue()
    regs = [int(v) for v in _REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _PTXAS.findall(log)]
    md = k.metadata
    return dict(regs=max(regs) if regs else None,
                spill_stores=max((s[1] for s in spills), default=None),
                spill_loads=max((s[2] for s in spills), default=None),
                stack=max((s[0] for s in spills), default=None),
                shared=int(md.shared), smem_limit=SMEM_LIMIT[arch], seconds=round(time.time() - t0, 1),
                ptxas_log_found=bool(regs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "compile_report"))
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--quick", action="store_true", help="first config of each family only")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    rows, bad = [], []
    t_start = time.time()
    for arch in archs:
        for label, fn, ptrs, consts, family in variants():
            cfgs = getattr(configs, family)[arch] if family else [None]
            if args.quick:
                cfgs = cfgs[:1]
            for cfg in cfgs:
                cfg_s = ("BM{BM} BN{BN} BK{BK} w{num_warps} s{num_stages}".format(**cfg)
                         + (f" maxnreg{cfg['maxnreg']}" if cfg.get("maxnreg") else "")
                         if cfg else f"BLOCK{configs.ELEMENTWISE_BLOCK} w4")
                row = dict(arch=f"sm_{arch}", kernel=label, config=cfg_s)
                try:
                    row.update(compile_one(fn, ptrs, consts, cfg, arch))
                    why = []
                    if not row["ptxas_log_found"]:
                        why.append("no ptxas -v log captured")
                    if (row["spill_stores"] or 0) > 0 or (row["spill_loads"] or 0) > 0:
                        why.append("register spills")
                    if row["shared"] > row["smem_limit"]:
                        why.append("shared memory over the device limit")
                    row["ok"] = not why
                    row["problem"] = "; ".join(why)
                except Exception as exc:  # a compile error is a failure of the table
                    row.update(ok=False, problem=f"{type(exc).__name__}: {str(exc)[:300]}")
                rows.append(row)
                if not row["ok"]:
                    bad.append(row)
                print(f"{row['arch']} {label:28s} {cfg_s:28s} regs={row.get('regs')} "
                      f"spills={row.get('spill_stores')}/{row.get('spill_loads')} "
                      f"smem={row.get('shared')} {row.get('seconds')}s {'OK' if row['ok'] else 'FAIL ' + row['problem']}",
                      flush=True)
    total = time.time() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(triton=triton.__version__, seconds=round(total, 1), rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Triton AOT compile report\n\nGenerated by `python benchmarks/compile_report.py` "
                f"(triton {triton.__version__}, {len(rows)} compiles, {total:.0f} s). Shared memory "
                f"limits: sm_80 {SMEM_LIMIT[80]} B, sm_90 {SMEM_LIMIT[90]} B per block.\n\n")
        f.write("| arch | kernel | config | regs | spill st/ld (B) | stack (B) | smem (B) | ok |\n")
        f.write("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            f.write(f"| {r['arch']} | {r['kernel']} | {r['config']} | {r.get('regs')} | "
                    f"{r.get('spill_stores')}/{r.get('spill_loads')} | {r.get('stack')} | "
                    f"{r.get('shared')} | {'yes' if r['ok'] else 'NO: ' + r['problem']} |\n")
    print(f"{len(rows)} compiles in {total:.0f} s, {len(bad)} failing; wrote {args.out}.md/.json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
