"""noisyops: fused noisy-analog-hardware ops for PyTorch (see SPEC.md and README.md).

Importing noisyops never touches CUDA and never fails for lack of a compiled backend:
`python -m noisyops.info` says which backends are available and why the others are not.
"""
from .config import LayerConfig
from . import functional, ops, dispatch  # noqa: F401  (ops registers the torch custom ops)

__version__ = "0.1.0"

__all__ = ["LayerConfig", "functional", "dispatch", "__version__"]
