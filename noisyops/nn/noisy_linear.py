"""`NoisyLinear`: a drop-in ``nn.Linear`` running on a simulated analog crossbar."""
from __future__ import annotations

from torch import Tensor, nn

from .. import checks
from ..config import LayerConfig
from .. import functional as _functional
from ..functional import linear_with_params
from ..params import PER_CALL
from .base import NoisyModuleMixin


class NoisyLinear(NoisyModuleMixin, nn.Linear):
    """``nn.Linear`` (same arguments, parameters ``weight``/``bias``, ``isinstance`` of it) whose
    forward is `noisyops.functional` ``noisy_linear`` with the module's state.

    Shapes: input ``[*, in]`` → ``[*, out]``; for ``per_sample``/``per_instance`` the input must
    be at least 2-D and dim 0 is the sample index (true for ``[B, in]``, ``[B, L, in]`` and
    channels-last ``[B, H, W, in]`` as in ConvNeXt).

    Keyword-only: ``config``, ``seed``, ``layer_key``. State and RNG contract: see
    `noisyops.nn.base`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, config: LayerConfig = LayerConfig(), seed: int = 0,
                 layer_key: int = 0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_noisy(config, seed, layer_key)

    @classmethod
    def from_module(cls, linear: nn.Linear, config: LayerConfig, *, seed: int = 0,
                    layer_key: int = 0) -> "NoisyLinear":
        """A `NoisyLinear` sharing ``linear``'s parameters (not copies) and training flag."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                dtype=linear.weight.dtype, config=config, seed=seed, layer_key=layer_key)
        m.weight = linear.weight
        m.bias = linear.bias
        m.train(linear.training)
        for name, buf in m._buffers.items():
            if buf is not None and buf.device != linear.weight.device:
                m._buffers[name] = buf.to(linear.weight.device)
        m.set_weight_range()
        return m

    def _noisy_weight(self) -> Tensor:
        return self.weight

    def to_clean(self, cls=nn.Linear) -> nn.Linear:
        """A plain ``cls`` (``nn.Linear``) sharing this module's parameters."""
        c = cls(self.in_features, self.out_features, self.bias is not None, device="meta",
                dtype=self.weight.dtype)
        c.weight, c.bias = self.weight, self.bias
        c.train(self.training)
        return c

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 1:
            raise ValueError(f"input: expected at least a 1-D tensor, got shape {tuple(input.shape)}")
        if input.dtype != self.weight.dtype and not _functional._autocasting(input):
            raise TypeError(f"input has dtype {input.dtype} but weight has {self.weight.dtype}: "
                            f"expected one dtype")
        checks.linear_geometry(input, self.weight)
        p = self._op_params()
        if input.dim() == 1 and p.sampling != PER_CALL:
            raise ValueError(f"input: {self._config.sampling} sampling needs a batch dim (>= 2-D "
                             f"input), got shape {tuple(input.shape)}")
        batch = input.shape[0] if input.dim() > 1 else 1
        inst = self._next_instance(p, batch, input.device)
        return self._linear(input, self.weight, self.bias, p, inst)

    def _linear(self, x: Tensor, weight: Tensor, bias, p, inst) -> Tensor:
        if self._observer is None:
            return linear_with_params(x, weight, bias, p, inst,
                                      chip_weights=self._chip_weights(p, weight, x))
        y = linear_with_params(x, weight, None, p, inst)  # calibration: pre-bias product
        self._observer(self, x, y)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._noisy_repr()
