"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56 with option-A shortcuts.

Layout and state_dict keys match the pretrained weights in ``../shared/weights`` (converted from
akamaster/pytorch_resnet_cifar10): ``conv1``/``bn1``, ``layer1..3`` of n ``BasicBlock`` each
(``conv1``, ``bn1``, ``conv2``, ``bn2``), ``linear`` (64 → classes). Option A: where the shape
changes, the shortcut is ``x[:, :, ::2, ::2]`` zero-padded by ``(planes − in_planes)/2`` channels
on each side (no parameters). Inputs are ``[N, 3, 32, 32]`` pixels in [0, 1] normalised with
`cifar_normalization`.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def cifar_normalization() -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """``(mean, std)`` per RGB channel the pretrained CIFAR ResNets expect (weights README)."""
    return _MEAN, _STD


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA((planes - in_planes) // 2)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``forward`` returns logits ``[N, num_classes]``."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _make(name: str, num_classes: int) -> CifarResNet:
    return CifarResNet(_DEPTHS[name], num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27 M parameters), randomly initialised."""
    return _make("resnet20", num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (0.46 M parameters), randomly initialised."""
    return _make("resnet32", num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44, randomly initialised."""
    return _make("resnet44", num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56, randomly initialised."""
    return _make("resnet56", num_classes)


def default_weights_dir() -> str:
    """``$NOISYOPS_WEIGHTS``, else ``../shared/weights`` next to the source checkout."""
    env = os.environ.get("NOISYOPS_WEIGHTS")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared", "weights")


def load_cifar_resnet(name: str, path: Optional[str] = None, *, map_location="cpu") -> CifarResNet:
    """A CIFAR-10 ResNet (``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``) with the
    pretrained state_dict at ``path`` (default ``<weights dir>/<name>_cifar10.pt``, see
    `default_weights_dir`), in eval mode."""
    if name not in _DEPTHS:
        raise ValueError(f"name={name!r}: expected one of {sorted(_DEPTHS)}")
    if path is None:
        path = os.path.join(default_weights_dir(), f"{name}_cifar10.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r}: no pretrained weights for {name} there (pass path= "
                                f"or set NOISYOPS_WEIGHTS to the folder of <name>_cifar10.pt)")
    model = _make(name, 10)
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
