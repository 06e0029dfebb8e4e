"""Shape checks of the noisy ops that run before any kernel (SPEC section 5).

Everything here reads shapes and Python numbers only (no tensor value, so no host sync): a call
that torch would reject deep inside a kernel is rejected here first, with a `ValueError` that
names the argument, the value and what was expected. `noisyops.functional` and the modules
(`noisyops.nn`) call these.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def conv2d_geometry(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int) -> None:
    """Check a batched conv2d call: ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``.

    Rejects (ValueError): ``groups`` not dividing ``C_in`` or ``C_out``; a channel mismatch;
    empty channels or kernels (``C_in``, ``C_out``, ``kh`` or ``kw`` = 0); an empty spatial
    input (H or W = 0); an effective kernel ``dilation·(k − 1) + 1`` larger than the padded input
    ``H + 2·padding`` (the output would have no rows or columns). An empty batch (N = 0) is valid.
    """
    c_in, (h, w) = x.shape[1], x.shape[2:]
    c_out, cin_g, kh, kw = weight.shape
    if c_in % groups:
        raise ValueError(f"groups={groups}: expected a divisor of the input's C_in={c_in} "
                         f"(input shape {tuple(x.shape)})")
    if c_out % groups:
        raise ValueError(f"weight: C_out={c_out} must be divisible by groups={groups}")
    if c_in != cin_g * groups:
        raise ValueError(f"input: expected {cin_g * groups} channels (weight {tuple(weight.shape)} "
                         f"with groups={groups}), got shape {tuple(x.shape)}")
    if c_in == 0 or c_out == 0 or kh == 0 or kw == 0:
        raise ValueError(f"weight: expected C_out, C_in/groups, kh and kw >= 1, got shape "
                         f"{tuple(weight.shape)}")
    if h == 0 or w == 0:
        raise ValueError(f"input: expected non-empty spatial dims (H, W >= 1), got shape "
                         f"{tuple(x.shape)}")
    for i, (size, k) in enumerate(((h, kh), (w, kw))):
        span = dilation[i] * (k - 1) + 1
        padded = size + 2 * padding[i]
        if span > padded:
            dim = "HW"[i]
            raise ValueError(
                f"weight: kernel {tuple(weight.shape[2:])} with dilation={list(dilation)} spans "
                f"{span} along {dim}, but the padded input has {padded} ({dim}={size} + "
                f"2·padding={2 * padding[i]}): expected a kernel no larger than the padded input")


def linear_geometry(x: Tensor, weight: Tensor) -> None:
    """Check a linear call: ``x [*, in]``, ``weight [out, in]`` (``in`` or ``out`` may be 0, as in
    ``F.linear``)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input: expected last dim {weight.shape[1]} (weight {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
