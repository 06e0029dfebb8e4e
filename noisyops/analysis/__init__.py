"""Robustness analysis: η sweeps and the train-η × inference-η grid (`sweeps`), the bias/variance
decomposition of the loss (`bias_variance`), mutual information by binning (`mutual_info`), per-layer
Walking Noise sensitivity (`walking_noise`), figures (`plots`) and the Markdown report (`report`).
Command line: ``python -m noisyops.evaluate --help``. Repeated noisy evaluation itself is in
`noisyops.evaluation`.
"""
from .bias_variance import (bias_variance, bias_variance_sweep, crossover_ratio, decompose, decompose_log_loss,
                            decompose_squared, eta_for_ratio)
from .mutual_info import (bin_edges, binned_mutual_information, discretize, entropy_bits, level_at_fraction,
                          mutual_information_sweep)
from .sweeps import eta_sweep, train_infer_grid
from .walking_noise import WalkingNoiseResult, log_grid, midpoint_level, walking_noise
from ._common import KINDS, TARGETS, configs_restored, set_noise, with_noise

__all__ = ["bias_variance", "bias_variance_sweep", "crossover_ratio", "decompose", "decompose_log_loss",
           "decompose_squared", "eta_for_ratio", "bin_edges", "binned_mutual_information", "discretize",
           "entropy_bits", "level_at_fraction", "mutual_information_sweep",
           "eta_sweep", "train_infer_grid", "WalkingNoiseResult", "log_grid", "midpoint_level",
           "walking_noise", "KINDS", "TARGETS", "configs_restored", "set_noise", "with_noise"]
