"""What ptxas makes of the quantizer's division: compile a ``tl.div_rn(v - lo, Δ)`` kernel and the
activation-quantizer kernel (`noisyops.kernels.quantize`) ahead of time for sm_90 and print their
SASS instruction classes (``MUFU.RCP``, ``FFMA``, ``FCHK``, branches) with Triton's bundled
``cuobjdump``. No GPU needed; must run WITHOUT ``TRITON_INTERPRET``.

    python benchmarks/sass_quantizer.py [--arch 90]

docs/triton.md ("Known limits", the reciprocal quantizer) quotes its output.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sass_quantizer.py: unset TRITON_INTERPRET (the interpreter does not compile)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from noisyops.kernels import quantize as kq  # noqa: E402


@triton.jit
def div_kernel(x_ptr, y_ptr, n, lo, delta, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, tl.div_rn(v - lo, delta), mask=offs < n)


KERNELS = (
    (div_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "lo": "fp32", "delta": "fp32",
                  "BLOCK": "constexpr"}),
    (kq._quantize_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "lo": "fp32", "hi": "fp32",
                           "delta": "fp32", "BLOCK": "constexpr"}),
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        for fn, sig in KERNELS:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 1024}),
                               target=GPUTarget("cuda", args.arch, 32))
            path = os.path.join(tmp, fn.__name__ + ".cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
            ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?P\d\s+)?([A-Z0-9.]+)", sass, re.M))
            keep = {o: c for o, c in sorted(ops.items()) if re.match(r"MUFU|FFMA|FMUL|FCHK|BRA|CALL", o)}
            print(f"{fn.__name__} sm_{args.arch}: {sum(ops.values())} instructions; {keep}")
            print("  div.rn.f32 in PTX:", k.asm["ptx"].count("div.rn.f32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
