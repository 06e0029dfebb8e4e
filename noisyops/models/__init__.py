"""Reference networks: CIFAR ResNet-20/32/44/56 (option-A shortcuts) and LeNet-5.

Plain torch models (``nn.Conv2d`` / ``nn.Linear``); make them noisy with `noisyops.convert`.
"""
from .cifar_resnet import (CifarResNet, cifar_normalization, default_weights_dir, load_cifar_resnet,
                           resnet20, resnet32, resnet44, resnet56)
from .lenet import LeNet5, lenet5

__all__ = ["CifarResNet", "LeNet5", "cifar_normalization", "default_weights_dir", "lenet5",
           "load_cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56"]
