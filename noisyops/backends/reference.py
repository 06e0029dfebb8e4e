"""The ``reference`` backend: the pure-torch kernels of `noisyops.reference`, on every device."""
from ..reference import conv2d_bwd, conv2d_fwd, linear_bwd, linear_fwd  # noqa: F401

DEVICES = ("cpu", "cuda", "meta")


def available():
    return True, "pure torch, runs on every device"
