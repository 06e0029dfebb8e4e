"""`benchmarks/gpu_check.py --cpu-smoke`: the GPU check's code paths on tiny CPU shapes, so the one
command a GPU session runs keeps working. Runs in a subprocess without TRITON_INTERPRET (the
script starts its own interpreter child for the Triton routes)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_smoke(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torchvision")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NOISYOPS_BACKEND", "OUT")}
    # a generous budget: on a loaded 2-core machine the smoke run must not be cut short
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--cpu-smoke",
                           "--out", str(tmp_path), "--budget-s", "900"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.md"]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all("error" not in p for p in res["parts"].values()), log
    chk = res["parts"]["check"]
    assert chk["skipped_for_time"] == 0
    routes = {c["route"] for c in chk["cases"]}
    assert routes == {"cpu", "reference", "triton-regen(interpreter)", "triton-prepass(interpreter)"}
    configs = {c["config"] for c in chk["cases"]}
    assert {"clean", "wnoise_call", "tiles_adc_call", "sample_tiles", "sample_plain", "instance_adc"} <= configs
    assert all(c["ok"] for c in chk["cases"])
    interp_stream = [s for s in chk["stream"] if "interpreter" in s["what"]]
    assert interp_stream and all(s["ok"] and s["words_equal"] for s in interp_stream)
    # clean calls equal F.conv2d / F.linear bit for bit on the CPU backends
    assert all(c["clean_bit_exact"] for c in chk["cases"] if c["config"] == "clean" and c["route"] == "cpu")
    layers = res["parts"]["layers"]["rows"]
    assert layers and all(len(r["ms"]) > 1 and not r["errors"] for r in layers)
    model = res["parts"]["model"]["rows"]
    assert {(r["what"], r["mode"], r["noisy"]) for r in model} >= {
        ("train_step", "eager", True), ("train_step", "compiled", True), ("eval_2chips", "eager", True)}
    assert all("error" not in r and r["ms"] > 0 for r in model), [r.get("error") for r in model]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Correctness" in md and "## Whole ResNet-50" in md
