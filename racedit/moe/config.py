"""Configuration of a Mixture-of-Experts feed-forward (docs/spec/race-dit.md sections 2-5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from racedit.kernels.dispatch import ExpertImpl, RoutingImpl
from racedit.kernels.reference import Ties
from racedit.routing import GroupedTopK, Scope, get_strategy

Router = Literal["race", "token", "expert", "bl", "be", "le"]
Gating = Literal["identity", "sigmoid", "softmax"]


@dataclass
class MoEConfig:
    num_experts: int = 8  # E
    k: int = 2  # experts activated per token on average
    hidden_split: int | None = None  # g: each expert is D -> mlp_ratio*D/g -> D; None means g = k
    every: int = 1  # every n-th block is MoE (blocks n-1, 2n-1, ...); 1 = all blocks
    router: Router = "race"  # routing strategy (docs/spec/race-dit.md section 3)
    gating: Gating = "identity"  # gating function G applied to router scores
    ties: Ties = "index"  # exact K (lowest flat index wins) or keep every tie
    # expert race under several processes: race each process's scores ("local"), or take the cut over the
    # union of all processes' scores ("global": K = k x global tokens, ties rank-major; training only)
    race_scope: Scope = "local"
    threshold_decay: float = 0.95  # EMA decay of the learnable threshold tau (expert race)
    eval_routing: Literal["threshold", "topk"] = "threshold"  # race at eval: score >= tau, or batch top-K
    # The defaults are the Race-DiT paper's full method (its B/2 2-in-8 ablation: FID 8.03): every
    # RaceDiT-* name trains with PLR and RSL on; an ablation switches a term off explicitly (0.0).
    plr_weight: float = 1e-2  # per-layer regularization weight; 0 = off (no PLR head is built)
    rsl_weight: float = 1e-4  # router-similarity loss weight; 0 = off
    balance_weight: float = 0.0  # Switch balance loss weight (the baseline)
    # Kernels (racedit/kernels/dispatch.py): "auto" = Triton on CUDA, the PyTorch reference on CPU; "torch";
    # "triton"; "grouped_mm" = torch._grouped_mm for the expert GEMMs, routing kernels on "auto".
    impl: ExpertImpl = "auto"

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.k < 1 or self.k > self.num_experts:
            raise ValueError(
                f"MoE needs 1 <= k <= num_experts, got k={self.k}, num_experts={self.num_experts}"
            )
        if self.hidden_split is not None and self.hidden_split < 1:
            raise ValueError(f"hidden_split must be >= 1, got {self.hidden_split}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.race_scope == "global" and self.router != "race":
            raise ValueError(
                f"race_scope='global' needs router='race' (got router={self.router!r}); other strategies "
                "select within a sample or token and are always local"
            )
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {self.threshold_decay}")

    @property
    def routing_impl(self) -> RoutingImpl:
        """The routing kernels' implementation: ``impl``, except that ``grouped_mm`` (an expert-GEMM backend
        with no routing kernel) routes with ``auto``."""
        return "auto" if self.impl == "grouped_mm" else self.impl

    def routing_strategy(self) -> GroupedTopK:
        """The routing strategy of an MoE layer, its settings bound once: ``router``, ``k``, ``ties``, the
        routing kernels and ``race_scope`` (the scope of training forwards; eval batches race locally)."""
        return get_strategy(self.router, self.k, self.ties, self.routing_impl, self.race_scope)

    @property
    def split(self) -> int:
        return self.hidden_split if self.hidden_split is not None else self.k

    def is_moe_block(self, layer_index: int) -> bool:
        return (layer_index + 1) % self.every == 0
