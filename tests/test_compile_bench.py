"""`benchmarks/compile_cpu.py --quick` on a tiny residual CNN: it runs, times both variants, and
inductor's output code shows the quantizers fused into the neighbouring kernels."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _check_census(clean, noisy, layers):
    assert noisy["noisyops_ops"] == layers  # one noise pre-pass per layer, no opaque op
    assert noisy["extern_calls"] == clean["extern_calls"]  # the same convolutions / GEMMs
    assert noisy["rounding_kernels"] >= 1 and clean["rounding_kernels"] == 0
    # the quantizers live in kernels the clean graph has anyway; what is added: one scalar kernel per
    # layer advancing its call counter, and the last layer's ADC (nothing pointwise follows it). With
    # channels-last pre-pass weights the first layer's DAC of the graph input stands alone too (it
    # writes the channels-last copy of the input that clean makes as well; with row-major weights
    # inductor fuses it with a weight copy)
    assert noisy["standalone_quantizers"] <= 2
    assert noisy["cpp_kernels"] - noisy["counter_kernels"] <= clean["cpp_kernels"] + 1
    assert noisy["counter_kernels"] <= layers


def test_quick_eval_fuses_quantizers():
    import compile_cpu
    from noisyops import decomposition
    out = compile_cpu.main(["--quick", "--eval-only", "--cl-weights"])
    r = out["results"][0]
    assert r["retraced_graphs"]["eval"] == 0  # every variant timed with the graphs it was compiled to
    k = r["kernels"]
    _check_census(k["eval/clean"], k["eval/noisy"], layers=4)
    assert r["ratio"]["eval"]["noisy"] > 0 and r["ratio"]["eval"]["noisy_cl_weights"] > 0
    # row-major pre-pass weights (default): inductor copies them channels-last; channels-last ones:
    # only the input is copied
    assert k["eval/noisy_cl_weights"]["layout_copies"] <= 1 < k["eval/noisy"]["layout_copies"]
    assert not decomposition.CHANNELS_LAST_WEIGHTS and decomposition.ENABLED  # flags restored
    assert decomposition.RECOMPUTE_STE
    split = r["eval_cost_split_s"]["noisy"]
    assert split["noise_prepass"] > 0 and split["convolution"] > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_quick_train_fuses_quantizers():
    import compile_cpu
    out = compile_cpu.main(["--quick", "--saved-masks"])
    r = out["results"][0]
    assert r["retraced_graphs"] == {"eval": 0, "train": 0}
    k = r["kernels"]
    # the default forward graph stores no bool masks for the backward; the variant that lets the
    # partitioner save them does
    assert k["train/noisy"]["bool_outputs"] <= k["train/clean"]["bool_outputs"] < k["train/noisy_saved_masks"]["bool_outputs"]
    _check_census(k["eval/clean"], k["eval/noisy"], layers=4)
    assert k["train/noisy"]["noisyops_ops"] == 4  # the pre-pass in forward; its backward is pointwise
    assert k["train/noisy"]["standalone_quantizers"] <= 2
    torch._dynamo.reset()


def test_quantizer_micro_compares_the_same_bits():
    """`--quantizer`: the two ±Inf masks compile to different graphs with identical outputs."""
    import compile_cpu
    torch._dynamo.reset()
    res = compile_cpu.quantizer_micro(shape=(2, 8, 6, 6), repeats=1)
    assert res["bit_identical"] is True
    assert set(res["median_s"]) == {"relu_only", "abs_eq_inf", "torch_isinf"}
    assert all(v > 0 for v in res["median_s"].values())
    torch._dynamo.reset()


def test_kernel_profile_lists_each_generated_kernel():
    """`--kernel-profile`: every generated C++ kernel is its own profiler event, counted under
    ``generated_kernels`` (and not in ``other``), listed by name; the inductor flag is restored."""
    import compile_cpu
    import torch._inductor.config as inductor_config
    out = compile_cpu.main(["--quick", "--eval-only", "--kernel-profile"])
    r = out["results"][0]
    assert not inductor_config.cpp.enable_kernel_profile
    for variant in ("clean", "noisy"):
        split = r["eval_cost_split_s"][variant]
        assert split["generated_kernels"] > 0
        names = [k[0] for k in split["kernels"]]
        assert names and all("cpp_fused_" in n for n in names)
        assert sum(k[1] for k in split["kernels"]) == pytest.approx(split["generated_kernels"], abs=1e-4)
    # the noisy graph's kernels include the quantizers' (named after the ops they fuse)
    launched = set(r["kernels"]["eval/noisy"]["launched"])
    profiled = {n.split("cpp_fused_", 1)[1] for n, _, _ in r["eval_cost_split_s"]["noisy"]["kernels"]}
    assert profiled <= {n.split("cpp_fused_", 1)[1] for n in launched}
    torch._dynamo.reset()
