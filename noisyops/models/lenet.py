"""LeNet-5 (LeCun et al. 1998) for 28x28 single-channel inputs (MNIST), ReLU + max-pool variant."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNet5(nn.Module):
    """``conv1`` 1→6 5x5 (padding 2) → ReLU → maxpool 2 → ``conv2`` 6→16 5x5 → ReLU → maxpool 2 →
    ``fc1`` 400→120 → ReLU → ``fc2`` 120→84 → ReLU → ``fc3`` 84→num_classes.

    Input ``[N, in_channels, 28, 28]``, output logits ``[N, num_classes]``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: expected an int >= 1")


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """A freshly initialised `LeNet5`."""
    _check_num_classes(num_classes)
    return LeNet5(num_classes, in_channels)


class CaffeLeNet(nn.Module):
    """The LeNet of Caffe's MNIST example (``examples/mnist/lenet.prototxt``), ReLU variant:
    ``conv1`` 1→20 5x5 → maxpool 2 → ``conv2`` 20→50 5x5 → maxpool 2 → ``fc1`` 800→500 → ReLU →
    ``fc2`` 500→num_classes (no padding; the Caffe original has no ReLU after the convs, this one
    adds it as `LeNet5` has). 2.3 M multiply-adds per image and 431 k parameters (`LeNet5`: 0.42 M
    and 62 k).

    Input ``[N, in_channels, 28, 28]``, output logits ``[N, num_classes]``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def lenet_caffe(num_classes: int = 10, in_channels: int = 1) -> CaffeLeNet:
    """A freshly initialised `CaffeLeNet`."""
    _check_num_classes(num_classes)
    return CaffeLeNet(num_classes, in_channels)
