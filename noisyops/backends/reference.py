"""The ``reference`` backend: the pure-torch kernels of `noisyops.reference`, on every device.

The oracle re-derives everything from the op's arguments (it is the independent statement the
fast paths are tested against), so the plan dispatch hands every kernel is not used here.
"""
from .. import reference as _ref

DEVICES = ("cpu", "cuda", "meta")


def available():
    return True, "pure torch, runs on every device"


def conv2d_fwd(*args, plan=None):
    return _ref.conv2d_fwd(*args)


def conv2d_bwd(*args, plan=None):
    return _ref.conv2d_bwd(*args)


def linear_fwd(*args, plan=None):
    return _ref.linear_fwd(*args)


def linear_bwd(*args, plan=None):
    return _ref.linear_bwd(*args)
