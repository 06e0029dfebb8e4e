"""Test session setup.

TRITON_INTERPRET is read once, at `import triton` (torchvision imports triton too), so it is set
here before anything else is imported: Triton kernels then run on CPU tensors in this process.
Ahead-of-time compile checks need the real compiler and run in subprocesses without it.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("NOISYOPS_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


@pytest.fixture
def backend_env(monkeypatch):
    """Force a backend for one test: ``backend_env("cpu")``."""
    def force(name):
        monkeypatch.setenv("NOISYOPS_BACKEND", name)
    return force


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
