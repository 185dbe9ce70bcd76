"""Routing layout and expert computation: PyTorch reference, Triton kernels, ``torch._grouped_mm``, and the
dispatch point.

Importing this package never imports Triton; ``dispatch`` loads the kernels on first use.
"""

from racedit.kernels.reference import RoutePlan, combine, expert_ffn, plan_from_mask

__all__ = ["RoutePlan", "combine", "expert_ffn", "plan_from_mask"]
