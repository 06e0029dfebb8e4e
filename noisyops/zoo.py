"""Build a clean network from a model spec string (the ``--model`` of ``python -m noisyops.evaluate``).

Spec forms:

* ``lenet5``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``: `noisyops.models`;
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=W, **kwargs)``;
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=bool(W), **kwargs)``;
* ``package.module:factory``: ``importlib.import_module("package.module").factory(**kwargs)``
  (any callable returning an ``nn.Module``; dots after the colon walk attributes, e.g.
  ``mypkg.nets:Zoo.small``).

``W`` is the ``weights`` argument: None (default) = the constructor's random initialisation;
for torchvision a weights enum name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), for timm anything true
(``pretrained=True``). Pretrained weights come from the library's cache or are downloaded by that
library: they are fetched only when ``weights`` is given. ``kwargs`` (e.g. ``{"num_classes": 10}``)
go to the constructor.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

from torch import nn

__all__ = ["BUILTIN_MODELS", "build_network", "parse_model_spec"]

BUILTIN_MODELS = ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56")


def parse_model_spec(spec: str):
    """``(kind, name)`` with kind in {"builtin", "torchvision", "timm", "factory"}; raises ValueError
    naming the spec and the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model={spec!r}: expected a non-empty string")
    spec = spec.strip()
    forms = (f"one of {BUILTIN_MODELS}, torchvision:NAME, timm:NAME or package.module:factory")
    if ":" not in spec:
        if spec.lower() in BUILTIN_MODELS:
            return "builtin", spec.lower()
        raise ValueError(f"model={spec!r}: expected {forms}")
    head, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model={spec!r}: nothing after ':'; expected {forms}")
    if head in ("torchvision", "tv"):
        return "torchvision", name
    if head == "timm":
        return "timm", name
    if not all(part.isidentifier() for part in head.split(".")) or \
            not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"model={spec!r}: {head!r}:{name!r} is not a module path and an attribute; "
                         f"expected {forms}")
    return "factory", spec


def build_network(spec: str, *, weights: Optional[str] = None,
                  kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The clean ``nn.Module`` of ``spec`` (module docstring), in eval mode."""
    kind, name = parse_model_spec(spec)
    kw = dict(kwargs or {})
    if kind == "builtin":
        if weights is not None:
            raise ValueError(f"weights={weights!r}: built-in model {name!r} has no weight names; load its "
                             f"weights with --checkpoint (e.g. --checkpoint pretrained for the CIFAR ResNets)")
        from . import models
        net = getattr(models, name)(**kw)
    elif kind == "torchvision":
        import torchvision
        try:
            net = torchvision.models.get_model(name, weights=weights, **kw)
        except ValueError as e:
            if name not in torchvision.models.list_models():
                raise ValueError(f"model='torchvision:{name}': torchvision has no model {name!r} "
                                 f"(torchvision.models.list_models() lists them)") from None
            raise
    elif kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"model='timm:{name}' needs timm (pip install timm)") from e
        if not timm.is_model(name):
            raise ValueError(f"model='timm:{name}': timm has no model {name!r} (timm.list_models() lists them)")
        net = timm.create_model(name, pretrained=bool(weights), **kw)
    else:
        if weights is not None:
            raise ValueError(f"weights={weights!r}: a factory model takes its weights from --checkpoint")
        mod_name, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model={spec!r}: cannot import module {mod_name!r} ({e})") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"model={spec!r}: {obj!r} has no attribute {part!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ValueError(f"model={spec!r}: {attr!r} is not callable")
        net = obj(**kw)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model={spec!r}: the constructor returned {type(net).__name__}, expected an nn.Module")
    return net.eval()
