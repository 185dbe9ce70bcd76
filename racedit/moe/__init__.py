"""Mixture-of-Experts feed-forward (Race-DiT): layer, auxiliary losses, learnable threshold, metrics."""

from racedit.moe.config import MoEConfig
from racedit.moe.layer import MoEFeedForward, inference_batch_dependence
from racedit.moe.losses import aux_losses
from racedit.moe.metrics import RoutingStats, plot_allocation_heatmap
from racedit.moe.threshold import Threshold

__all__ = [
    "MoEConfig",
    "MoEFeedForward",
    "RoutingStats",
    "Threshold",
    "aux_losses",
    "inference_batch_dependence",
    "plot_allocation_heatmap",
]
