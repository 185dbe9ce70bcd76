"""Routing strategies: "top-K along some dims of the scores, independently over the rest".

docs/spec/race-dit.md section 3. Scores have shape (B, L, E) (samples, tokens, experts). Each strategy is one
``GroupedTopK`` object that names the dims it selects over; everything else is independent groups:

| strategy | independent over | top-K over | K            |
|----------|------------------|------------|--------------|
| token    | B*L              | E          | k            |
| expert   | B*E              | L          | k*L/E        |
| bl       | E                | B*L        | B*L*k/E      |
| be       | L                | B*E        | B*k          |
| le       | B                | L*E        | L*k          |
| race     | nothing          | B*L*E      | B*L*k        |

Ties: exact K per group, the lowest flat index inside the group wins (the group's candidates are
enumerated in the order of the original (B, L, E) flat index), or ``ties="all"`` keeps every entry
>= the K-th value. A K that is not an integer (e.g. k*L/E with L not a multiple of E/k) is rounded
to the nearest integer, and at least 1.

The MoE layer calls ``strategy.plan(...)``, which returns the kernel layout (``RoutePlan``); expert
race overrides it to use the fused ``dispatch.race_plan`` (training) or the learnable threshold
(inference). No layer code branches on the strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from racedit.kernels import dispatch
from racedit.kernels.reference import RoutePlan
from racedit.routing.topk import Ties, topk_mask

_DIMS = {"B": 0, "L": 1, "E": 2}


@dataclass(frozen=True)
class Selection:
    mask: Tensor  # (B, L, E) bool
    kth: Tensor  # (groups,) the K-th largest score of each group (detached)
    k_per_group: int


@dataclass(frozen=True)
class GroupedTopK:
    """Exact top-K over the dims ``over`` (a subset of "BLE"), independently for every index of the rest.

    K is chosen so that a token gets k experts on average: K = k * size(over) / E (see ``k_for``).
    """

    name: str
    over: str  # dims selected over, e.g. "E" (token choice), "BLE" (expert race)
    uses_threshold: bool = False  # inference may replace the batch top-K by score >= tau

    @property
    def ranks_across_batch(self) -> bool:
        """Whether a sample's selection depends on the other samples of its batch (B is ranked over)."""
        return "B" in self.over

    def k_for(self, shape: tuple[int, int, int], k: int) -> int:
        """K of each group: k experts per token on average, so K = k * (#tokens in the group) / (#experts
        in the group), i.e. k * prod(size of over) / E."""
        B, L, E = shape
        size = 1
        for d in self.over:
            size *= shape[_DIMS[d]]
        return max(1, round(k * size / E))

    def select(self, scores: Tensor, k: int, ties: Ties = "index") -> Selection:
        """scores (B, L, E) -> Selection(mask (B, L, E) bool, kth (G,), K)."""
        if scores.ndim != 3:
            raise ValueError(f"routing scores must be (B, L, E), got shape {tuple(scores.shape)}")
        over = [_DIMS[d] for d in self.over]
        indep = [d for d in range(3) if d not in over]
        K = self.k_for(tuple(scores.shape), k)
        perm = indep + over  # over-dims last, each kept in original order -> flat-index ties
        permuted = scores.permute(perm)
        G = 1
        for d in indep:
            G *= scores.shape[d]
        mask, kth = topk_mask(permuted.reshape(G, -1), K, ties)  # (G, N)
        inverse = [perm.index(d) for d in range(3)]
        return Selection(mask.reshape(permuted.shape).permute(inverse).contiguous(), kth, K)

    def plan(
        self,
        scores: Tensor,
        k: int,
        ties: Ties = "index",
        impl: dispatch.Impl = "auto",
        tau: Tensor | None = None,
    ) -> RoutePlan:
        """scores (B, L, E) gated G(s) -> RoutePlan over the T = B*L tokens (gates = the same scores)."""
        B, L, E = scores.shape
        sel = self.select(scores, k, ties)
        return dispatch.plan_from_mask(sel.mask.reshape(B * L, E), scores.reshape(B * L, E), impl)


@dataclass(frozen=True)
class ExpertRace(GroupedTopK):
    """Expert race: one top-K over all B*L*E scores (K = B*L*k); at inference ``score >= tau``."""

    def plan(
        self,
        scores: Tensor,
        k: int,
        ties: Ties = "index",
        impl: dispatch.Impl = "auto",
        tau: Tensor | None = None,
    ) -> RoutePlan:
        B, L, E = scores.shape
        flat = scores.reshape(B * L, E)  # flat index t*E + e with t = b*L + l: same order as (B, L, E)
        if tau is not None:
            return dispatch.race_plan(flat, tau=tau, ties=ties, impl=impl)
        return dispatch.race_plan(flat, k_total=self.k_for((B, L, E), k), ties=ties, impl=impl)


STRATEGIES: dict[str, GroupedTopK] = {
    "token": GroupedTopK("token", "E"),
    "expert": GroupedTopK("expert", "L"),
    "bl": GroupedTopK("bl", "BL"),
    "be": GroupedTopK("be", "BE"),
    "le": GroupedTopK("le", "LE"),
    "race": ExpertRace("race", "BLE", uses_threshold=True),
}


def get_strategy(name: str) -> GroupedTopK:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown routing strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None


def select(scores: Tensor, strategy: str, k: int, ties: Ties = "index") -> Tensor:
    """Training-mode selection: scores (B, L, E) -> bool mask (B, L, E) (docs/spec/race-dit.md section 3)."""
    return get_strategy(strategy).select(scores, k, ties).mask
