"""Triton kernels of noisyops (installed as ``noisyops.kernels``).

Liger-Kernel layout: each op's Triton kernel, its launcher and its glue live side by side.

* `stream`          the SPEC noise stream (Philox4x32-10 counters, Triton's uniform/normal maps)
* `quantize`        the uniform quantizer ``Q(v; lo, hi, bits)`` and an activation-quantizer kernel
* `weight_prepass`  clip, quantize and perturb a weight once per call/instance (pre-pass strategy);
                    `use_prepass` picks pre-pass or regenerate from `noisyops.backends.gpu_cost`
* `noisy_conv2d`    implicit-GEMM forward (NHWC walk, any stride/padding/dilation/groups)
* `noisy_conv2d_backward`  input grad through the regenerated noisy weights, weight grad (STE)
* `noisy_linear`    the linear op as a 1x1 implicit GEMM over rows
* `configs`         autotune configurations (sm_80, sm_90) and the interpreter's single config

Importing this package needs triton; `noisyops.backends.triton` guards that import.
"""
