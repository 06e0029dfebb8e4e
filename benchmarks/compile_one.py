"""Compile ONE kernel launch of the compile report with a chosen tile, for tile / register studies.

    python benchmarks/compile_one.py LABEL CASE STRATEGY SHAPE_INDEX ARCH BM BN BK WARPS STAGES [MAXNREG]

e.g. ``python benchmarks/compile_one.py conv_fwd tiles prepass 0 90 64 128 32 8 3``: the launch
``LABEL`` (``conv_fwd``, ``conv_bwd_x``, ``linear_fwd`` ...) of `compile_report.launches` for
``compile_report.SHAPES[SHAPE_INDEX]``, case (``tiles`` / ``per_sample``) and weight strategy
(``regen`` / ``prepass``), bf16, compiled for sm_``ARCH`` under the JIT's specialization
(`compile_report.compile_one`); prints registers, spill bytes, MMA kind, atomics, ``cp.async``,
shared memory. ``SW="OUT_NOISE=0,IN_Q=0"`` overrides constexpr switches (what-if studies only: the
glue never launches those combinations). Must run WITHOUT ``TRITON_INTERPRET``. The ad-hoc numbers
in docs/triton.md and kernels/configs.py come from this script.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import compile_report as cr  # noqa: E402  (sets the ptxas-log environment, refuses the interpreter)
import torch  # noqa: E402


def main(argv):
    label, case, strat, si, arch, BM, BN, BK, w, s = argv[:10]
    maxnreg = int(argv[10]) if len(argv) > 10 else None
    for lab, fn, largs, lkw in cr.launches(cr.SHAPES[int(si)], case, strat, torch.bfloat16):
        if lab != label:
            continue
        kw = dict(lkw, BM=int(BM), BN=int(BN), BK=int(BK), num_warps=int(w), num_stages=int(s))
        if maxnreg:
            kw["maxnreg"] = maxnreg
        for item in filter(None, os.environ.get("SW", "").split(",")):
            k, v = item.split("=")
            kw[k] = bool(int(v))
        t = time.time()
        r = cr.compile_one(fn, largs, kw, int(arch))
        print(label, case, strat, cr.SHAPES[int(si)][0], f"sm_{arch}", f"{BM}x{BN}x{BK}/{w}w/{s}s",
              "regs", r["registers"], "spill", r["spill_bytes"], r["mma"], "atom", r["atomics"],
              "cp.async", r["cp_async"], os.environ.get("SW", ""), "smem", r["smem"],
              f"{time.time() - t:.0f}s", flush=True)
        return 0
    print(f"no launch {label!r} for that shape/case/strategy", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
