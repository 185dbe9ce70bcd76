"""Routing strategies: scores (B, L, E) in, boolean selection mask out (docs/spec/race-dit.md section 3)."""

from racedit.routing.strategies import STRATEGIES, ExpertRace, GroupedTopK, Selection, get_strategy, select
from racedit.routing.topk import topk_mask

__all__ = ["STRATEGIES", "ExpertRace", "GroupedTopK", "Selection", "get_strategy", "select", "topk_mask"]
