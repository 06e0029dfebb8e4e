"""Model-level API: `convert` a network to noisy layers and manage their state.

``convert(model, config)`` swaps every ``nn.Conv2d`` and ``nn.Linear`` (any subclass, grouped and
depthwise convs, every padding mode) for `NoisyConv2d` / `NoisyLinear`, and every
``nn.MultiheadAttention`` for `NoisyMultiheadAttention` (its packed in-projection and its
``out_proj`` become two noisy layers). Layer keys are 0, 1, 2, ... over the ORIGINAL model's
eligible layers in ``named_modules()`` order (an attention block counts its in-projection, then
its ``out_proj``); layers left clean keep their number unused, so skipping a layer never changes
the noise of the others.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.utils.parametrize  # noqa: F401
from torch import nn

from .config import LayerConfig
from .nn.base import NoisyModuleMixin
from .nn.noisy_attention import NoisyMultiheadAttention
from .nn.noisy_conv import NoisyConv2d
from .nn.noisy_linear import NoisyLinear

_CLEAN = object()


def _eligible(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, module)]`` of the layers `convert` numbers, in ``named_modules()`` order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, NoisyModuleMixin):
            raise ValueError(f"model: module {name!r} is already a {type(m).__name__}: "
                             f"convert expects a clean model (use set_config to change configs)")
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)):
            out.append((name, m))
    return out


def _check_convertible(name: str, m: nn.Module) -> None:
    w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else getattr(m, "weight", None)
    if torch.nn.utils.parametrize.is_parametrized(m):
        raise ValueError(f"model: {name!r} has parametrizations (e.g. weight_norm); remove them "
                         f"(torch.nn.utils.parametrize.remove_parametrizations) before convert, "
                         f"or skip the layer")
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"model: {name!r} is a lazy module with uninitialised weights: run "
                         f"one forward pass before convert")


_PLAIN_FORWARD = {nn.Conv2d: nn.Conv2d.forward, nn.Linear: nn.Linear.forward}


def _warn_custom_forward(name: str, m: nn.Module) -> None:
    for base, fwd in _PLAIN_FORWARD.items():
        if isinstance(m, base) and type(m).forward is not fwd:
            warnings.warn(f"convert: {name!r} is a {type(m).__name__} with its own forward(); the noisy "
                          f"{base.__name__} replaces it with the standard one (skip or override it "
                          f"with None to keep it)", stacklevel=3)


def _match(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _lookup(name: str, overrides: Mapping[str, Optional[LayerConfig]]):
    """The override for ``name``: an exact name wins over patterns; patterns in dict order."""
    if name in overrides:
        return name, overrides[name]
    for pat, cfg in overrides.items():
        if fnmatch.fnmatchcase(name, pat):
            return pat, cfg
    return None, _CLEAN


def convert(model: nn.Module, config: LayerConfig, *, seed: int = 0,
            overrides: Optional[Mapping[str, Optional[LayerConfig]]] = None, skip: Iterable[str] = (),
            skip_first: bool = False, skip_last: bool = False, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its conv / linear / attention layers made noisy.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own); not yet converted.
        config: the `LayerConfig` of every converted layer.
        seed: the noise seed of every layer (in [0, 2^64)); layers differ by ``layer_key``.
        overrides: ``{module name or fnmatch pattern: LayerConfig or None}``; None leaves the layer
            clean (not converted). An exact name wins over patterns; patterns apply in dict order.
            Names are ``named_modules()`` names (for an attention block, the block's name covers
            its in-projection and ``<name>.out_proj`` its out-projection). A key that matches no
            layer raises ``ValueError`` (typos are not ignored).
        skip: names / patterns left clean (same matching; a non-matching entry raises).
        skip_first, skip_last: leave the first / last eligible layer clean (e.g. the stem conv and
            the classifier head, as many papers keep them digital).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns: the converted model. Its layer keys are 0, 1, 2, ... in ``named_modules()`` order over
    the original model's eligible layers, counting skipped ones. A clean ``state_dict`` of the
    original loads into it (the noise buffers are optional keys; loading clean weights re-fixes
    the weight ranges on them).

    Transformer layers (``nn.TransformerEncoderLayer``/``DecoderLayer``) that contain noisy layers
    get their fused inference fast path disabled (it would bypass the noisy modules).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LayerConfig):
        raise TypeError(f"config={config!r}: expected a noisyops.LayerConfig")
    overrides = dict(overrides or {})
    for k, v in overrides.items():
        if not isinstance(k, str):
            raise TypeError(f"overrides: keys must be module names or patterns (str), got {k!r}")
        if v is not None and not isinstance(v, LayerConfig):
            raise TypeError(f"overrides[{k!r}]={v!r}: expected a LayerConfig or None")
    skip = [skip] if isinstance(skip, str) else list(skip)
    if not inplace:
        model = copy.deepcopy(model)
    layers = _eligible(model)
    # keys: an attention block takes two (in_proj, then its out_proj, which follows it)
    keys: Dict[str, int] = {}
    next_key = 0
    mha_out = {}
    for name, m in layers:
        if name in mha_out:
            keys[name] = mha_out[name]
            continue
        keys[name] = next_key
        next_key += 1
        if isinstance(m, nn.MultiheadAttention):
            out_name = f"{name}.out_proj" if name else "out_proj"
            mha_out[out_name] = next_key
            next_key += 1
    used = set()
    configs: Dict[str, Optional[LayerConfig]] = {}
    for i, (name, m) in enumerate(layers):
        cfg: Optional[LayerConfig] = config
        pat, ov = _lookup(name, overrides)
        if ov is not _CLEAN:
            used.add(pat)
            cfg = ov
        for s in skip:
            if _match(name, s):
                used.add(("skip", s))
                cfg = None
        if (skip_first and i == 0) or (skip_last and i == len(layers) - 1):
            cfg = None
        configs[name] = cfg
    unused = [k for k in overrides if k not in used] + [s for s in skip if ("skip", s) not in used]
    if unused:
        raise ValueError(f"overrides/skip: {unused} match no conv/linear/attention layer of the "
                         f"model (names look like {[n for n, _ in layers[:3]]})")

    replaced: Dict[int, nn.Module] = {}
    for name, m in layers:
        cfg = configs[name]
        if isinstance(m, nn.MultiheadAttention):
            out_name = f"{name}.out_proj" if name else "out_proj"
            out_cfg = configs.get(out_name)
            if not NoisyMultiheadAttention.supports(m):
                warnings.warn(f"convert: {name!r} ({type(m).__name__} with kdim/vdim != embed_dim) is "
                              f"not supported and stays clean, including its out_proj", stacklevel=2)
                configs[out_name] = None
                continue
            if cfg is None and out_cfg is None:
                continue
            _check_convertible(name, m)
            if cfg is None:  # only the out-projection is noisy: the in-projection runs clean
                cfg_in = LayerConfig()
            else:
                cfg_in = cfg
            new = NoisyMultiheadAttention.from_module(
                m, cfg_in, seed=seed, layer_key=keys[name],
                out_config=False if out_cfg is None else out_cfg, out_layer_key=keys[out_name])
            configs[out_name] = None  # handled by the attention block
            replaced[id(m)] = new
        elif cfg is not None:
            _check_convertible(name, m)
            _warn_custom_forward(name, m)
            cls = NoisyConv2d if isinstance(m, nn.Conv2d) else NoisyLinear
            replaced[id(m)] = cls.from_module(m, cfg, seed=seed, layer_key=keys[name])
    if id(model) in replaced:
        return replaced[id(model)]
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[child_name] = replaced[id(child)]
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and \
                any(isinstance(c, NoisyModuleMixin) for c in m.modules()):
            m.activation_relu_or_gelu = 0  # disables the fused fast paths (they read weights directly)
    return model


def noisy_layers(model: nn.Module) -> List[Tuple[str, NoisyModuleMixin]]:
    """``[(name, module)]`` of every noisy layer, in ``layer_key`` order.

    An attention block appears once (its in-projection); its ``out_proj`` appears separately
    when it is noisy."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NoisyModuleMixin)]
    return sorted(found, key=lambda nm: nm[1].layer_key)


def _select(model: nn.Module, names) -> List[Tuple[str, NoisyModuleMixin]]:
    layers = noisy_layers(model)
    if names is None:
        return layers
    names = [names] if isinstance(names, str) else list(names)
    out = [(n, m) for n, m in layers if any(_match(n, s) for s in names)]
    missing = [s for s in names if not any(_match(n, s) for n, _ in layers)]
    if missing:
        raise ValueError(f"names: {missing} match no noisy layer (have {[n for n, _ in layers[:3]]}...)")
    return out


def set_config(model: nn.Module, config: Union[LayerConfig, Callable[[str, LayerConfig], LayerConfig]],
               names=None) -> None:
    """Change the config of all noisy layers, or of those whose name matches ``names`` (names or
    fnmatch patterns). ``config`` is a `LayerConfig` or ``fn(name, old_config) -> LayerConfig``."""
    for n, m in _select(model, names):
        m.config = config(n, m.config) if callable(config) and not isinstance(config, LayerConfig) else config


def set_seed(model: nn.Module, seed: int) -> None:
    """Set the seed of every noisy layer (each still adds the per-rank offset under DDP unless
    its ``per_rank_noise`` is False; see `noisyops.nn.base`)."""
    for _, m in noisy_layers(model):
        m.set_seed(seed)


def set_per_rank_noise(model: nn.Module, enabled: bool) -> None:
    """Whether ranks of a distributed run draw their own noise (default True) or share it."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r}: expected a bool")
    for _, m in noisy_layers(model):
        m.per_rank_noise = enabled
        m._refresh()


def reset_calls(model: nn.Module, value: int = 0) -> None:
    """Set every noisy layer's call counter to ``value`` (0: the noise sequence starts over)."""
    for _, m in noisy_layers(model):
        m.reset_calls(value)


def set_noise_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the weight/output noise of every noisy layer off (False) or back on (True)."""
    for _, m in noisy_layers(model):
        m.noise_enabled = enabled


def export_clean(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every noisy layer replaced by its plain torch module
    (``nn.Conv2d`` / ``nn.Linear`` / ``nn.MultiheadAttention``) holding the clean weights."""
    model = copy.deepcopy(model)
    if isinstance(model, NoisyModuleMixin):
        return model.to_clean()
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, NoisyModuleMixin):
                parent._modules[child_name] = child.to_clean()
    return model


@torch.no_grad()
def project_weights(model: nn.Module) -> None:
    """Clip every noisy layer's clean weights into its weight range, in place (call after
    ``optimizer.step()``). Layers whose config has no ``w_range`` (noise reference only) and
    layers without a fixed range are left unchanged."""
    for _, m in noisy_layers(model):
        if m.config.w_range is None or m.weight_range is None:
            continue
        lo, hi = m.weight_range
        m._noisy_weight().clamp_(lo, hi)


class WeightProjection:
    """Clip weights into their ranges after every step of ``optimizer``:
    ``WeightProjection(model).attach(optimizer)`` (an optimizer step post-hook), or call the
    object itself after ``optimizer.step()``. ``remove()`` detaches it."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self._handle = None

    def __call__(self, *args, **kwargs) -> None:
        project_weights(self.model)

    def attach(self, optimizer: torch.optim.Optimizer) -> "WeightProjection":
        self._handle = optimizer.register_step_post_hook(lambda opt, a, k: self())
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
