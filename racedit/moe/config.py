"""Configuration of a Mixture-of-Experts feed-forward (docs/spec/race-dit.md sections 2-5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    ties: Literal["index", "all"] = "index"  # exact K (lowest flat index wins) or keep every tie
    threshold_decay: float = 0.95  # EMA decay of the learnable threshold tau (expert race)
    eval_routing: Literal["threshold", "topk"] = "threshold"  # race at eval: score >= tau, or batch top-K
    # The defaults are the Race-DiT paper's full method (its B/2 2-in-8 ablation: FID 8.03): every
    # RaceDiT-* name trains with PLR and RSL on; an ablation switches a term off explicitly (0.0).
    plr_weight: float = 1e-2  # per-layer regularization weight; 0 = off (no PLR head is built)
    rsl_weight: float = 1e-4  # router-similarity loss weight; 0 = off
    balance_weight: float = 0.0  # Switch balance loss weight (the baseline)
    impl: Literal["auto", "torch", "triton", "grouped_mm"] = "auto"  # auto: Triton on CUDA, reference on CPU

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.k < 1 or self.k > self.num_experts:
            raise ValueError(
                f"MoE needs 1 <= k <= num_experts, got k={self.k}, num_experts={self.num_experts}"
            )
        if self.hidden_split is not None and self.hidden_split < 1:
            raise ValueError(f"hidden_split must be >= 1, got {self.hidden_split}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {self.threshold_decay}")

    @property
    def split(self) -> int:
        return self.hidden_split if self.hidden_split is not None else self.k

    def is_moe_block(self, layer_index: int) -> bool:
        return (layer_index + 1) % self.every == 0
