"""`NoisyConv2d`: a drop-in ``nn.Conv2d`` running on a simulated analog crossbar."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks
from ..config import LayerConfig
from .. import functional as _functional
from ..functional import conv2d_with_params
from .base import NoisyModuleMixin


class NoisyConv2d(NoisyModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters ``weight``/``bias``, ``isinstance`` of it) whose
    forward is `noisyops.functional` ``noisy_conv2d`` with the module's state.

    Shapes: input ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``; output as ``nn.Conv2d``.
    Padding modes other than ``'zeros'`` (and asymmetric ``padding='same'``) pad the input with
    ``F.pad`` first, exactly as ``nn.Conv2d`` does, then run the op with padding 0.

    Keyword-only: ``config`` (`LayerConfig`, default clean), ``seed`` (in [0, 2^64)),
    ``layer_key`` (in [0, 2^30)). State and RNG contract: see `noisyops.nn.base`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, config: LayerConfig = LayerConfig(), seed: int = 0,
                 layer_key: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self._init_noisy(config, seed, layer_key)

    @classmethod
    def from_module(cls, conv: nn.Conv2d, config: LayerConfig, *, seed: int = 0,
                    layer_key: int = 0) -> "NoisyConv2d":
        """A `NoisyConv2d` sharing ``conv``'s parameters (not copies) and training flag."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                dtype=conv.weight.dtype, config=config, seed=seed, layer_key=layer_key)
        m.weight = conv.weight
        m.bias = conv.bias
        m.train(conv.training)
        m._buffers_to(conv.weight.device)
        m.set_weight_range()
        return m

    def _buffers_to(self, device) -> None:
        for name, buf in self._buffers.items():
            if buf is not None and buf.device != device:
                self._buffers[name] = buf.to(device)

    def _noisy_weight(self) -> Tensor:
        return self.weight

    def to_clean(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this module's parameters."""
        c = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                      self.padding, self.dilation, self.groups, self.bias is not None,
                      self.padding_mode, device="meta", dtype=self.weight.dtype)
        c.weight, c.bias = self.weight, self.bias
        c.train(self.training)
        return c

    # ---- padding -------------------------------------------------------------------------------
    def _padding_plan(self):
        """``(pre_pad or None, F.pad mode, op padding)`` reproducing ``nn.Conv2d``'s padding."""
        if self.padding_mode != "zeros":
            return list(self._reversed_padding_repeated_twice), self.padding_mode, [0, 0]
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return None, "constant", [0, 0]
            rp = list(self._reversed_padding_repeated_twice)  # [w_l, w_r, h_t, h_b]
            if rp[0] == rp[1] and rp[2] == rp[3]:
                return None, "constant", [rp[2], rp[0]]
            return rp, "constant", [0, 0]
        return None, "constant", list(self.padding)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (3, 4):
            raise ValueError(f"input: expected a 3-D or 4-D tensor, got shape {tuple(input.shape)}")
        if input.dtype != self.weight.dtype and not _functional._autocasting(input):
            raise TypeError(f"input has dtype {input.dtype} but weight has {self.weight.dtype}: "
                            f"expected one dtype")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        pre_pad, mode, padding = self._padding_plan()
        if pre_pad is not None:
            x = F.pad(x, pre_pad, mode=mode)
        stride, dilation = list(self.stride), list(self.dilation)
        checks.conv2d_geometry(x, self.weight, stride, padding, dilation, self.groups)
        p = self._op_params()
        inst = self._next_instance(p, x.shape[0], x.device)
        if self._observer is None:
            y = conv2d_with_params(x, self.weight, self.bias, stride, padding, dilation, self.groups,
                                   p, inst, chip_weights=self._chip_weights(p, self.weight, x))
        else:  # calibration: observe the pre-bias product (what the ADC sees)
            y = conv2d_with_params(x, self.weight, None, stride, padding, dilation, self.groups, p, inst)
            self._observer(self, x, y)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._noisy_repr()
