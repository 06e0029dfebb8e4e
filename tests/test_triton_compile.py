"""AOT compile of every Triton kernel and autotune config for sm_80 and sm_90 (no GPU needed):
runs `benchmarks/compile_report.py` in a subprocess WITHOUT TRITON_INTERPRET (the interpreter
accepts code the real compiler rejects) and requires it to pass: no spills, shared memory within
the device limits, every compile succeeding."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_report_sm80_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALWAYS_COMPILE"] = "1"  # the ptxas -v log is only printed on a real compile
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_report.py"),
                           "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    report = json.loads((tmp_path / "report.json").read_text())
    archs = {r["arch"] for r in report["rows"]}
    assert archs == {"sm_80", "sm_90"}
    kernels = {r["kernel"].split("[")[0] for r in report["rows"]}
    assert {"conv_fwd", "conv_bwd_x", "conv_bwd_w", "weight_prepass", "quantize", "stream"} <= kernels
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
