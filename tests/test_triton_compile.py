"""AOT compile of the Triton kernels for sm_80 and sm_90 as the JIT specializes them for a ResNet-50
layer (no GPU needed): runs `benchmarks/compile_report.py --quick` in a subprocess WITHOUT
TRITON_INTERPRET (the interpreter accepts code the real compiler rejects) and requires every
compile to succeed without spills; checks the record format of the committed docs/compile_report.json."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"kernel", "arch", "BM", "BN", "BK", "num_warps", "num_stages", "registers", "spill_bytes",
          "mma", "specialization", "family", "smem", "ok"}


def _check_records(records):
    assert isinstance(records, list) and records
    for r in records:
        assert FIELDS <= set(r), sorted(FIELDS - set(r))
        assert r["arch"] in ("sm_80", "sm_90") and r["specialization"] == "jit"
        assert r["mma"] in ("wgmma", "mma", "fma")
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    kernels = {r["kernel"] for r in records}
    assert {"conv_fwd", "conv_bwd_x", "conv_bwd_w", "weight_prepass[fwd]"} <= kernels, kernels


def test_compile_report_jit_specialization(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_report.py"),
                           "--quick", "--out", str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1500)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((tmp_path / "report.json").read_text())
    _check_records(records)
    assert proc.returncode == 0, log
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in records), log
    fwd = [r for r in records if r["kernel"] == "conv_fwd"]
    # the JIT's specialization: channels-last x has a unit channel stride, stride/padding 1 are
    # constants, and 16-divisible ints carry the divisibility hint
    assert all({"sxc", "syc", "stride_h", "pad_h"} <= set(r["unit_constants"]) for r in fwd), fwd[0]
    assert all("Cg" in r["divisible_by_16"] for r in fwd)
    # without in-kernel RNG (pre-pass weights, no tile epilogue) the forward is a >= 128x128 wgmma
    lean = [r for r in fwd if r["arch"] == "sm_90" and r["family"] == "GEMM"]
    assert lean and all(r["mma"] == "wgmma" and r["BM"] * r["BN"] >= 128 * 128 for r in lean)
    assert all(r["mma"] in ("mma", "wgmma") for r in records if r["BM"] and r["dtype"] == "bf16")
    # one flattened K loop over K-major weights: every GEMM's loads are pipelined with cp.async
    assert all(r["cp_async"] for r in records if r["BM"] and r["kernel"] != "conv_bwd_w"), \
        [r for r in records if r["BM"] and not r["cp_async"]][:1]
    # channels-last y with C_out % 32 == 0: the forward's mask words come from registers, no atomics
    assert not any(r["atomics"] for r in fwd), [r for r in fwd if r["atomics"]][:1]
    # per_sample regenerates its weights in registers at a >= 128x128 wgmma tile on sm_90
    regen = [r for r in fwd if r["arch"] == "sm_90" and r["case"] == "per_sample" and r["strategy"] == "regen"]
    assert regen and all(r["mma"] == "wgmma" and r["BM"] * r["BN"] >= 128 * 128 for r in regen)


def test_committed_report_format():
    path = os.path.join(REPO, "docs", "compile_report.json")
    with open(path) as f:
        _check_records(json.load(f))
