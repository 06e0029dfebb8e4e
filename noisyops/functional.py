"""Public functional noisy ops: `noisy_conv2d` and `noisy_linear` (SPEC sections 1-5).

Both check their arguments (section 5), resolve the `LayerConfig` to numbers (`OpParams`) and call
the custom ops of `noisyops.ops`, which are differentiable (straight-through backward) and work
under ``torch.compile``. Plain eager calls take `noisyops.eager` instead: the same plan and
kernels without the custom-op dispatch (bit-identical results, microseconds instead of
milliseconds of overhead per call).

RNG contract: the noise is a pure function of ``(seed, layer_key, purpose, instance, element)``
(SPEC section 3). The same arguments give the same noise on every call, in forward and backward,
on every backend. ``instance`` says which noise instance each sample sees (SPEC section 2):

* ``per_call``: ``instance`` is the call counter (an int >= 0); the whole batch shares one draw.
* ``per_sample``: ``instance`` is the call counter; sample s uses ``instance·2^24 + s``.
* ``per_instance``: ``instance`` is an int64 tensor ``[N]`` of chip ids >= 0; sample s uses chip
  ``instance[s]``, and a chip has the same noisy weights on every call.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import LayerConfig
from .params import PER_INSTANCE, PER_SAMPLE, SAMPLE_STRIDE, OpParams, resolve
from . import checks, decomposition, eager, ops

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IntOrPair = Union[int, Sequence[int]]


# ---- argument checks (SPEC section 5) --------------------------------------------------------------
def _check_tensor(name: str, t, ranks: Tuple[int, ...]):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def _autocasting(input: Tensor) -> bool:
    """Under torch.autocast the op casts its inputs to one dtype itself (`noisyops.ops`)."""
    dev = input.device.type
    return dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and input.dtype != torch.float64


def _check_same(input: Tensor, others: dict):
    for name, t in others.items():
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}: "
                             f"expected all tensors on one device")
        if t.dtype != input.dtype and not _autocasting(input):
            raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}: "
                            f"expected one dtype")


def _pair(name: str, v: IntOrPair, minimum: int) -> list:
    vals = [v, v] if isinstance(v, int) and not isinstance(v, bool) else list(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, int) for a in vals):
        raise TypeError(f"{name}={v!r}: expected an int or a pair of ints")
    if any(a < minimum for a in vals):
        raise ValueError(f"{name}={v!r}: expected values >= {minimum}")
    return vals


def _check_seed_key(seed, layer_key):
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int in [0, 2^64)")
    if isinstance(layer_key, bool) or not isinstance(layer_key, int):
        raise TypeError(f"layer_key={layer_key!r}: expected an int in [0, 2^30)")


def _on_host(t: Tensor) -> bool:
    """Reading a CPU tensor is a memory load; reading a GPU tensor would sync the stream."""
    return t.device.type == "cpu"


def _check_ids_async(ok: Tensor, message: str) -> None:
    """``ok`` (0-d bool) must hold: checked now on the host, asynchronously on a device
    (``torch._assert_async``: no sync; a failure surfaces at a later kernel launch)."""
    if torch.compiler.is_compiling():
        return
    if _on_host(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def instance_tensor(p: OpParams, instance, batch: int, device: torch.device, *,
                    checked: bool = False) -> Tensor:
    """Validate ``instance`` for the sampling mode and return it as the op's int64 tensor.

    No host sync: an int is checked before it becomes a tensor; a tensor's values are checked on
    the host when it lives there, else by an asynchronous device assert. ``checked=True`` skips the
    value checks (callers that made the ids themselves: `noisyops.chips`, the modules' counter).
    """
    if p.sampling == PER_INSTANCE:
        if not isinstance(instance, Tensor):
            raise TypeError(f"instance={instance!r}: per_instance sampling expects an int64 tensor "
                            f"of one chip id per sample, shape [{batch}]")
        if instance.dtype != torch.int64 or instance.shape != (batch,):
            raise ValueError(f"instance: per_instance sampling expects an int64 tensor of shape "
                             f"[{batch}], got {instance.dtype} {tuple(instance.shape)}")
        if instance.device != device:
            raise ValueError(f"instance is on {instance.device} but input is on {device}: "
                             f"expected all tensors on one device")
        if not checked and batch:
            if _on_host(instance) and not torch.compiler.is_compiling():
                low = int(instance.min())
                if low < 0:
                    raise ValueError(f"instance: chip ids must be >= 0, got min {low}")
            else:
                _check_ids_async(instance.min() >= 0, "instance: chip ids must be >= 0")
        return instance
    limit = (1 << 39) if p.sampling == PER_SAMPLE else (1 << 63)
    if p.sampling == PER_SAMPLE and batch > SAMPLE_STRIDE:
        raise ValueError(f"input: per_sample sampling supports batches up to 2^24, got {batch}")
    if isinstance(instance, Tensor):
        if instance.dim() != 0 or instance.dtype != torch.int64:
            raise ValueError(f"instance: {('per_call', 'per_sample')[p.sampling]} sampling expects an "
                             f"int or a 0-d int64 tensor (the call counter), got {instance.dtype} "
                             f"{tuple(instance.shape)}")
        if not checked:
            if _on_host(instance) and not torch.compiler.is_compiling():
                c = int(instance)
                if not 0 <= c < limit:
                    raise ValueError(f"instance={c}: expected a call counter in [0, {limit})")
            else:
                _check_ids_async((instance >= 0) & (instance < limit),
                                 f"instance: expected a call counter in [0, {limit})")
        return instance
    if isinstance(instance, bool) or not isinstance(instance, int):
        raise TypeError(f"instance={instance!r}: expected an int >= 0 (the call counter)")
    if not 0 <= instance < limit:
        raise ValueError(f"instance={instance}: expected a call counter in [0, {limit})")
    return torch.tensor(instance, dtype=torch.int64, device=device)


# ---- conv2d ---------------------------------------------------------------------------------------
def _conv_padding(padding, weight: Tensor, dilation: list, stride: list) -> list:
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same":
            if stride != [1, 1]:
                raise ValueError(f"padding='same' with stride={stride}: expected stride 1")
            total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' needs symmetric padding (odd effective kernel); "
                                 "pad the input with F.pad instead")
            return [t // 2 for t in total]
        raise ValueError(f"padding={padding!r}: expected an int, a pair, 'valid' or 'same'")
    return _pair("padding", padding, 0)


def noisy_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
                 padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1, groups: int = 1, *,
                 config: LayerConfig, seed: int, layer_key: int = 0, instance=0) -> Tensor:
    """A conv2d on a simulated analog crossbar (SPEC section 1), differentiable.

    Shapes: ``input [N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``), ``weight
    [C_out, C_in/groups, kh, kw]``, ``bias [C_out]``; returns ``[N, C_out, H', W']`` in the input's
    memory format (channels-last stays channels-last).

    Formula: ``y = Σ_t Q_out(conv(Q_in(x), Wn|tile t) + out_noise·ε''_t) + b`` with
    ``Wn = Q_w(clip(W))·(1 + eta_mul·ε') + eta·(w_max − w_min)·ε``. With ``config.w_range`` None
    or ``k``, the range is ``±2·std(W)`` or ``±k·std(W)`` measured on this call's weights.

    RNG contract: see the module docstring; ``seed`` in [0, 2^64), ``layer_key`` in [0, 2^30).
    Backward: straight-through (zero gradient where a quantizer or clip saturated); the input
    gradient uses the same noisy weights (regenerated), or the noise-free ones with
    ``config.clean_grad_input``.
    """
    _check_tensor("input", input, (3, 4))
    _check_tensor("weight", weight, (4,))
    if bias is not None:
        _check_tensor("bias", bias, (1,))
    _check_same(input, {"weight": weight, "bias": bias})
    _check_seed_key(seed, layer_key)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r}: expected an int >= 1")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    c_out = weight.shape[0]
    stride_ = _pair("stride", stride, 1)
    dilation_ = _pair("dilation", dilation, 1)
    padding_ = _conv_padding(padding, weight, dilation_, stride_)
    checks.conv2d_geometry(x, weight, stride_, padding_, dilation_, groups)
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias: expected shape [{c_out}], got {tuple(bias.shape)}")
    p = resolve(config, seed=seed, layer_key=layer_key)
    inst = instance_tensor(p, instance, x.shape[0], x.device)
    y = conv2d_with_params(x, weight, bias, stride_, padding_, dilation_, groups, p, inst)
    return y.squeeze(0) if unbatched else y


def conv2d_with_params(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                       groups: int, p: OpParams, instance: Tensor, *,
                       chip_weights: Optional[Tensor] = None) -> Tensor:
    """The op with already-checked arguments and resolved `OpParams` (modules call this).
    ``chip_weights``: the caller's noisy weights of its per_instance chips (`noisyops.ops`)."""
    if chip_weights is None and torch.compiler.is_compiling() and decomposition.route(
            p, weight.shape[1], weight.shape[2] * weight.shape[3]) == decomposition.DECOMPOSED:
        return decomposition.conv2d(x, weight, bias, stride, padding, dilation, groups, p, instance)
    if eager.eligible(x, weight, bias, instance, chip_weights):  # same kernels, no op dispatch
        return eager.conv2d(x, weight, bias, list(stride), list(padding), list(dilation), groups, p,
                            instance, chip_weights)
    fparams, iparams = p.to_op_args()
    y, _ = ops.noisy_conv2d_op(x, weight, bias, stride, padding, dilation, groups, fparams, iparams,
                               instance, chip_weights)
    return y


# ---- linear ---------------------------------------------------------------------------------------
def noisy_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                 config: LayerConfig, seed: int, layer_key: int = 0, instance=0) -> Tensor:
    """A linear layer on a simulated analog crossbar (SPEC section 1), differentiable.

    Shapes: ``input [*, in]`` (for ``per_sample``/``per_instance`` at least 2-D, the sample index
    being dim 0), ``weight [out, in]``, ``bias [out]``; returns ``[*, out]``.

    Formula and RNG contract as `noisy_conv2d`, with ``xq @ Wnᵀ`` as the product and tiles of
    ``tile_rows`` input features.
    """
    _check_tensor("input", input, tuple(range(1, 9)))
    _check_tensor("weight", weight, (2,))
    if bias is not None:
        _check_tensor("bias", bias, (1,))
    _check_same(input, {"weight": weight, "bias": bias})
    _check_seed_key(seed, layer_key)
    checks.linear_geometry(input, weight)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    p = resolve(config, seed=seed, layer_key=layer_key)
    if input.dim() == 1 and p.sampling != 0:
        raise ValueError(f"input: {config.sampling} sampling needs a batch dim (>= 2-D input), "
                         f"got shape {tuple(input.shape)}")
    batch = input.shape[0] if input.dim() > 1 else 1
    inst = instance_tensor(p, instance, batch, input.device)
    return linear_with_params(input, weight, bias, p, inst)


def linear_with_params(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: OpParams,
                       instance: Tensor, *, chip_weights: Optional[Tensor] = None) -> Tensor:
    """The op with already-checked arguments and resolved `OpParams` (modules call this).
    ``chip_weights``: the caller's noisy weights of its per_instance chips (`noisyops.ops`)."""
    if chip_weights is None and torch.compiler.is_compiling() and decomposition.route(
            p, weight.shape[1], 1) == decomposition.DECOMPOSED:
        return decomposition.linear(x, weight, bias, p, instance)
    if eager.eligible(x, weight, bias, instance, chip_weights):  # same kernels, no op dispatch
        return eager.linear(x, weight, bias, p, instance, chip_weights)
    fparams, iparams = p.to_op_args()
    y, _ = ops.noisy_linear_op(x, weight, bias, fparams, iparams, instance, chip_weights)
    return y
