"""Routing layout and expert computation: PyTorch reference, Triton kernels, and the dispatch point."""

from racedit.kernels.reference import RoutePlan, combine, expert_ffn, plan_from_mask

__all__ = ["RoutePlan", "combine", "expert_ffn", "plan_from_mask"]
