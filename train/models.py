"""Model factory for the training entry point and teacher-weight loading."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

__all__ = ["build_model", "load_weights", "MODELS"]

MODELS = ("lenet5", "lenet_caffe", "resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "resnet50")


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """``lenet5``, ``lenet_caffe`` and the CIFAR ResNets from `noisyops.models`; ``resnet18``/``resnet50`` from
    torchvision (random init; pass ImageNet weights as ``teacher.checkpoint``)."""
    name = name.lower()
    if name in ("lenet5", "lenet_caffe"):
        import noisyops.models as M
        return getattr(M, name)(num_classes=num_classes)
    if name in ("resnet20", "resnet32", "resnet44", "resnet56"):
        import noisyops.models as M
        fn = getattr(M, name)
        try:
            return fn(num_classes=num_classes)
        except TypeError:
            if num_classes != 10:
                raise ValueError(f"model {name!r}: num_classes={num_classes} is not supported")
            return fn()
    if name in ("resnet18", "resnet50"):
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    raise ValueError(f"model.name={name!r}: expected one of {MODELS}")


def load_weights(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load a plain ``state_dict`` file, or the ``model`` entry of a checkpoint of this tool, into
    ``model`` (strict). A ``module.`` prefix (DDP) is stripped. Returns the loaded dict."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj["model"] if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) else obj
    if not isinstance(sd, dict):
        raise TypeError(f"teacher checkpoint {path!r}: expected a state_dict or a checkpoint with 'model'")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    model.load_state_dict(sd)
    return sd
