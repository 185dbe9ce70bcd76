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

A strategy object carries its settings, bound once (``MoEConfig.routing_strategy()`` builds the MoE
layer's): ``k`` experts per token on average, ``ties``, the routing kernels ``impl``, and the race
``scope``. ``k_for`` is the one place K is computed, for the selection and, through the race's K-th
value, for the learnable threshold.

Ties: exact K per group, the lowest flat index inside the group wins (the group's candidates are
enumerated in the order of the original (B, L, E) flat index), or ``ties="all"`` keeps every entry
>= the K-th value. A K that is not an integer (e.g. k*L/E with L not a multiple of E/k) is rounded
to the nearest integer, and at least 1.

The MoE layer calls ``strategy.plan(scores)``, which returns the kernel layout (``RoutePlan``); expert
race overrides it to use the fused ``dispatch.race_plan``, and alone has ``threshold_plan(scores, tau)``
(inference: ``score >= tau``) and ``threshold_kth`` (the T_K its threshold follows). No layer code
branches on the strategy's name.

Scope (expert race only): ``scope="local"`` races each process's own scores; ``scope="global"`` takes the
cut over the union of every process's scores (``racedit.routing.distributed``: a radix select whose
communication does not grow with the batch), rank-major flat order for ties, while each process still
dispatches only its own tokens. Without a process group the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal, get_args

from torch import Tensor

from racedit.kernels import dispatch
from racedit.kernels.reference import RoutePlan, Ties, check_ties
from racedit.routing.distributed import global_race_mask, is_distributed, radix_kth
from racedit.routing.topk import topk_mask

Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = get_args(Scope)
_DIMS = {"B": 0, "L": 1, "E": 2}


@dataclass(frozen=True)
class Selection:
    mask: Tensor  # (B, L, E) bool
    kth: Tensor  # (groups,) the K-th largest score of each group (detached)


def _check_scores(scores: Tensor) -> tuple[int, int, int]:
    if scores.ndim != 3:
        raise ValueError(f"routing scores must be (B, L, E), got shape {tuple(scores.shape)}")
    B, L, E = scores.shape
    return B, L, E


@dataclass(frozen=True)
class GroupedTopK:
    """Exact top-K over the dims ``over`` (a subset of "BLE"), independently for every index of the rest.

    K is chosen so that a token gets ``k`` experts on average: K = k * size(over) / E (``k_for``).
    """

    name: str
    over: str  # dims selected over, e.g. "E" (token choice), "BLE" (expert race)
    k: int  # experts per token on average
    ties: Ties = "index"
    impl: dispatch.RoutingImpl = "auto"  # routing kernels (racedit/kernels/dispatch.py)
    scope: Scope = "local"

    uses_threshold: ClassVar[bool] = False  # inference may replace the batch top-K by score >= tau

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k (experts per token) must be >= 1, got {self.k}")
        check_ties(self.ties)
        dispatch.check_routing_impl(self.impl)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "global" and self.over != "BLE":
            raise ValueError(
                "scope='global' is defined for the expert race (one top-K over every score); the "
                f"{self.name!r} strategy selects within each sample or token and is always local"
            )

    @property
    def ranks_across_batch(self) -> bool:
        """Whether a sample's selection depends on the other samples of its batch (B is ranked over)."""
        return "B" in self.over

    def k_for(self, shape: tuple[int, int, int]) -> int:
        """K of each group: k experts per token on average, so K = k * (#tokens in the group) / (#experts
        in the group), i.e. k * prod(size of over) / E."""
        B, L, E = shape
        size = 1
        for d in self.over:
            size *= shape[_DIMS[d]]
        return max(1, round(self.k * size / E))

    def local(self) -> GroupedTopK:
        """This strategy racing only this process's scores (eval batches: processes may run different
        numbers of them, so no collective)."""
        return self if self.scope == "local" else replace(self, scope="local")

    def select(self, scores: Tensor) -> Selection:
        """scores (B, L, E) -> Selection(mask (B, L, E) bool, kth (G,)). ``scope="global"`` (expert race):
        the cut over every process's scores, K = k x the tokens of all processes (collective); this process
        selects the entries of its own scores above the cut, which need not be k*B*L."""
        B, L, E = _check_scores(scores)
        if self.scope == "global":
            mask, kth = global_race_mask(scores.reshape(B * L, E), self.k, self.ties)
            return Selection(mask.view(B, L, E), kth.reshape(1))
        over = [_DIMS[d] for d in self.over]
        indep = [d for d in range(3) if d not in over]
        perm = indep + over  # over-dims last, each kept in original order -> flat-index ties
        permuted = scores.permute(perm)
        G = 1
        for d in indep:
            G *= scores.shape[d]
        mask, kth = topk_mask(permuted.reshape(G, -1), self.k_for((B, L, E)), self.ties)  # (G, N)
        inverse = [perm.index(d) for d in range(3)]
        return Selection(mask.reshape(permuted.shape).permute(inverse).contiguous(), kth)

    def plan(self, scores: Tensor) -> RoutePlan:
        """scores (B, L, E) gated G(s) -> RoutePlan over the T = B*L tokens (gates = the same scores)."""
        B, L, E = _check_scores(scores)
        sel = self.select(scores)
        return dispatch.plan_from_mask(sel.mask.reshape(B * L, E), scores.reshape(B * L, E), self.impl)

    # Only the expert race has a learnable threshold (``uses_threshold``); the others refuse to pretend.
    def threshold_plan(self, scores: Tensor, tau: Tensor) -> RoutePlan:
        raise TypeError(self._no_threshold())

    def threshold_kth(self, scores: Tensor, race_kth: Tensor) -> Tensor:
        raise TypeError(self._no_threshold())

    def _no_threshold(self) -> str:
        return f"the {self.name!r} strategy has no threshold: only the expert race routes by score >= tau"


@dataclass(frozen=True)
class ExpertRace(GroupedTopK):
    """Expert race: one top-K over all B*L*E scores (K = B*L*k); at inference ``score >= tau``."""

    uses_threshold: ClassVar[bool] = True

    def plan(self, scores: Tensor) -> RoutePlan:
        """The exact-K race, fused with the layout; ``plan.kth`` is the K-th value (``scope="global"``: the
        cut over all processes, ``plan.kth`` the global K-th value)."""
        B, L, E = _check_scores(scores)
        flat = scores.reshape(B * L, E)  # flat index t*E + e with t = b*L + l: same order as (B, L, E)
        if self.scope == "global":
            mask, kth = global_race_mask(flat, self.k, self.ties)
            plan = dispatch.plan_from_mask(mask, flat, self.impl)
            plan.kth = kth
            return plan
        return dispatch.race_plan(flat, k_total=self.k_for((B, L, E)), ties=self.ties, impl=self.impl)

    def threshold_plan(self, scores: Tensor, tau: Tensor) -> RoutePlan:
        """Inference: route ``score >= tau`` (compared in fp32), per token, no communication."""
        B, L, E = _check_scores(scores)
        return dispatch.race_plan(scores.reshape(B * L, E), tau=tau, ties=self.ties, impl=self.impl)

    def threshold_kth(self, scores: Tensor, race_kth: Tensor) -> Tensor:
        """The T_K the learnable threshold follows: the K-th largest score of the global batch, K = k x the
        tokens of every process. ``race_kth`` is ``plan(...).kth`` of this forward, which already is that
        value on one process or with ``scope="global"``; with ``scope="local"`` under a process group the
        distributed radix select finds it over every process's scores (T, E) (collective)."""
        if self.scope == "global" or not is_distributed():
            return race_kth
        return radix_kth(scores.detach(), self.k)


# name -> (strategy class, dims its top-K runs over)
STRATEGIES: dict[str, tuple[type[GroupedTopK], str]] = {
    "token": (GroupedTopK, "E"),
    "expert": (GroupedTopK, "L"),
    "bl": (GroupedTopK, "BL"),
    "be": (GroupedTopK, "BE"),
    "le": (GroupedTopK, "LE"),
    "race": (ExpertRace, "BLE"),
}


def get_strategy(
    name: str, k: int, ties: Ties = "index", impl: dispatch.RoutingImpl = "auto", scope: Scope = "local"
) -> GroupedTopK:
    """The strategy ``name`` with its settings bound: ``get_strategy("race", k=2).plan(scores)``."""
    try:
        cls, over = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown routing strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(name, over, k, ties, impl, scope)


def select(scores: Tensor, strategy: str, k: int, ties: Ties = "index", scope: Scope = "local") -> Tensor:
    """Training-mode selection: scores (B, L, E) -> bool mask (B, L, E) (docs/spec/race-dit.md section 3).

    ``scope="global"`` (strategy "race", under an initialised process group; collective): rank r's mask is
    the r-th slice of ``select(torch.cat(all ranks' scores), "race", k)`` on one process, bit for bit."""
    return get_strategy(strategy, k, ties, scope=scope).select(scores).mask
