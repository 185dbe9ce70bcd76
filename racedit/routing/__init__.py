"""Routing strategies: scores (B, L, E) in, boolean selection mask out."""

from racedit.routing.topk import topk_mask

__all__ = ["topk_mask"]
