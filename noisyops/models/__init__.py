"""Reference networks: CIFAR ResNet-20/32/44/56 (option-A shortcuts), LeNet-5 and Caffe's
MNIST LeNet.

Plain torch models (``nn.Conv2d`` / ``nn.Linear``); make them noisy with `noisyops.convert`.
"""
from .cifar_resnet import (CifarResNet, cifar_normalization, default_weights_dir, load_cifar_resnet,
                           resnet20, resnet32, resnet44, resnet56)
from .lenet import CaffeLeNet, LeNet5, lenet5, lenet_caffe

__all__ = ["CaffeLeNet", "CifarResNet", "LeNet5", "cifar_normalization", "default_weights_dir", "lenet5",
           "lenet_caffe", "load_cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56"]
