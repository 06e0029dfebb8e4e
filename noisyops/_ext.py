"""Load the compiled extensions without ever failing: each loader returns (module or None, reason)."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load(name: str):
    """``(module, "ok")`` or ``(None, why not)`` for ``noisyops._C`` / ``noisyops._C_cuda``."""
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        return importlib.import_module(f"noisyops.{name}"), "ok"
    except ImportError as exc:
        return None, (f"noisyops.{name} is not built ({exc}); install with "
                      f"`pip install --no-build-isolation -e .`")
    except OSError as exc:  # e.g. libcudart missing at load time
        return None, f"noisyops.{name} failed to load: {exc}"


def cpu():
    return load("_C")


def cuda():
    return load("_C_cuda")
