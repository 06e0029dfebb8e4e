"""Backends of the noisy ops; each module offers `available()`, `DEVICES` and its kernels.

See `noisyops.dispatch` for how one is chosen. Importing this package imports no backend.
"""
