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

Scope (expert race only): ``scope="local"`` races each process's own scores; ``scope="global"`` takes the
cut over the union of every process's scores (``racedit.routing.distributed``: a radix select whose
communication does not grow with the batch), rank-major flat order for ties, while each process still
dispatches only its own tokens. Without a process group the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from racedit.kernels import dispatch
from racedit.kernels.reference import RoutePlan
from racedit.routing.topk import Ties, topk_mask

Scope = Literal["local", "global"]
SCOPES = ("local", "global")
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

    def check_scope(self, scope: Scope) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "global" and self.over != "BLE":
            raise ValueError(
                f"scope='global' is defined for the expert race (one top-K over every score); the {self.name!r} "
                "strategy selects within each sample or token and is always local"
            )

    def select(self, scores: Tensor, k: int, ties: Ties = "index", scope: Scope = "local") -> Selection:
        """scores (B, L, E) -> Selection(mask (B, L, E) bool, kth (G,), K). ``scope="global"`` (expert race):
        the cut over every process's scores (collective); K is then this process's share k*B*L."""
        if scores.ndim != 3:
            raise ValueError(f"routing scores must be (B, L, E), got shape {tuple(scores.shape)}")
        self.check_scope(scope)
        if scope == "global":
            from racedit.routing.distributed import global_race_mask

            B, L, E = scores.shape
            mask, kth = global_race_mask(scores.reshape(B * L, E), k, ties)
            return Selection(mask.view(B, L, E), kth.reshape(1), self.k_for((B, L, E), k))
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
        scope: Scope = "local",
    ) -> RoutePlan:
        """scores (B, L, E) gated G(s) -> RoutePlan over the T = B*L tokens (gates = the same scores)."""
        B, L, E = scores.shape
        sel = self.select(scores, k, ties, scope)
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
        scope: Scope = "local",
    ) -> RoutePlan:
        """Training: the exact-K race (``scope="global"``: cut over all processes, ``plan.kth`` the global
        K-th value); inference with ``tau``: ``score >= tau``, per token, no communication."""
        B, L, E = scores.shape
        self.check_scope(scope)
        flat = scores.reshape(B * L, E)  # flat index t*E + e with t = b*L + l: same order as (B, L, E)
        if tau is not None:
            return dispatch.race_plan(flat, tau=tau, ties=ties, impl=impl)
        if scope == "global":
            from racedit.routing.distributed import global_race_mask

            mask, kth = global_race_mask(flat, k, ties)
            plan = dispatch.plan_from_mask(mask, flat, impl)
            plan.kth = kth
            return plan
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


def select(scores: Tensor, strategy: str, k: int, ties: Ties = "index", scope: Scope = "local") -> Tensor:
    """Training-mode selection: scores (B, L, E) -> bool mask (B, L, E) (docs/spec/race-dit.md section 3).

    ``scope="global"`` (strategy "race", under an initialised process group; collective): rank r's mask is
    the r-th slice of ``select(torch.cat(all ranks' scores), "race", k)`` on one process, bit for bit."""
    return get_strategy(strategy).select(scores, k, ties, scope).mask
