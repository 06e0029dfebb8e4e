"""noisyops: fused noisy-analog-hardware ops for PyTorch (see SPEC.md and README.md).

Importing noisyops never touches CUDA and never fails for lack of a compiled backend:
`python -m noisyops.info` says which backends are available and why the others are not.
"""
from .config import LayerConfig
from . import functional, ops, dispatch  # noqa: F401  (ops registers the torch custom ops)
from . import nn, models  # noqa: F401  (noisy modules; reference networks, no torchvision)
from .convert import (convert, export_clean, noisy_layers, project_weights, reset_calls, set_config,
                      set_noise_enabled, set_per_rank_noise, set_seed, WeightProjection)
from .calibrate import calibrate
from .chips import chips, run_chips

__version__ = "0.1.0"

__all__ = ["LayerConfig", "functional", "dispatch", "__version__",
           "nn", "models", "convert", "export_clean", "noisy_layers", "project_weights", "reset_calls",
           "set_config", "set_noise_enabled", "set_per_rank_noise", "set_seed", "WeightProjection",
           "calibrate", "chips", "run_chips"]
