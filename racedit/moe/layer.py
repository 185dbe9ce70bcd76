"""The Mixture-of-Experts feed-forward that fills a DiT block's MLP slot (docs/spec/race-dit.md sections 2-5).

For tokens h (B, L, D), T = B*L:

    u = GELU(h W1 + b1)                   router trunk, (T, D)
    s = u Wg + bg                         gating-head logits, (T, E)
    g = G(s)                              gated scores: identity / sigmoid / softmax over E
    M = strategy(g)                       selection mask (T, E), docs/spec/race-dit.md section 3
    y_n = sum_e M[n,e] g[n,e] Expert_e(h_n)     no renormalisation, no capacity limit

Decisions (documented here, tested in tests/moe):
- **Routing scores are the gated values G(s).** Selection and gate weights use the same numbers, so
  with softmax gating expert race compares softmax probabilities across tokens, and with identity gating
  the raw logits (the paper's best setting). The RSL and balance loss use softmax(s) of the raw logits, as
  the spec writes them.
- Experts are stored stacked: ``w1`` (E, D, H), ``b1`` (E, H), ``w2`` (E, H, D), ``b2`` (E, D), with
  H = hidden / g (g = ``cfg.split``). All expert compute goes through ``racedit.kernels.dispatch``.
- Init (``init_weights``, after DiT's xavier init of every nn.Linear): each expert's ``w1[e]`` and ``w2[e]``
  get xavier-uniform as the equivalent ``nn.Linear`` would, biases zero. The router trunk, gating head and
  target head keep DiT's xavier-uniform / zero-bias init (gating-head logits then spread over O(1), so
  identity gates are O(1) and expert race starts with a spread of scores, not ties).
- The router trunk uses tanh-approximated GELU, like DiT's MLP and the experts.
- The PLR target head (D -> p*p*C) exists only when ``cfg.plr_weight > 0`` (no unused parameters for DDP
  otherwise) and runs only in training mode with an ``aux`` container.
- Eval-mode expert race routes ``g >= tau`` (``cfg.eval_routing="threshold"``) once tau was initialised
  by at least one training step; before that, and with ``eval_routing="topk"``, it uses the batch top-K.
  Other strategies route the same way in train and eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from racedit.interfaces import FeedForward, ForwardAux, RoutingRecord
from racedit.kernels import dispatch
from racedit.moe.config import MoEConfig
from racedit.moe.threshold import Threshold, in_backward_recompute

GATING = {
    "identity": lambda s: s,
    "sigmoid": torch.sigmoid,
    "softmax": lambda s: torch.softmax(s, dim=-1),
}


class Router(nn.Module):
    """Trunk ``u = GELU(Linear(D, D))``, gating head ``Linear(D, E)``, optional PLR target head."""

    def __init__(self, dim: int, num_experts: int, target_dim: int | None):
        super().__init__()
        self.trunk = nn.Linear(dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.gate = nn.Linear(dim, num_experts)
        self.target_head = nn.Linear(dim, target_dim) if target_dim else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, D) -> (u (T, D), logits s (T, E)).

        Under autocast the gating head runs in float32 (the trunk stays in the autocast dtype), the "selective
        precision" of Switch Transformer's router. bf16 logits keep 8 significant bits, and the expert race's one
        cut over all T*E scores then ties hundreds of them (226 at T = 8192, E = 32, k = 4, D = 1152: a freshly
        initialised layer on random inputs, measured on CPU; 1 in float32), cut by flat index, i.e. by position
        in the batch: the first samples would win. The head is D x E multiply-adds per token, ~0.2% of a
        DiT-XL/2 block's."""
        u = self.act(self.trunk(x))
        device = u.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return u, self.gate(u.float())
        return u, self.gate(u)


class MoEFeedForward(FeedForward):
    """E fine-grained experts (D -> hidden/g -> D), k active per token on average, one routing strategy."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, layer_index: int, target_dim: int):
        super().__init__()
        E, g = cfg.num_experts, cfg.split
        H = hidden // g
        if H < 1:
            raise ValueError(f"hidden size {hidden} split into g={g} parts leaves no expert hidden units")
        if cfg.gating not in GATING:
            raise ValueError(f"unknown gating {cfg.gating!r}; choose one of {sorted(GATING)}")
        self.cfg = cfg
        self.layer_index = layer_index
        self.dim, self.expert_hidden, self.num_experts = dim, H, E
        self.strategy = cfg.routing_strategy()  # k, ties, routing kernels and race scope bound once
        self.gating = GATING[cfg.gating]
        self.router = Router(dim, E, target_dim if cfg.plr_weight > 0 else None)
        self.w1 = nn.Parameter(torch.empty(E, dim, H))  # (E, D, H)
        self.b1 = nn.Parameter(torch.zeros(E, H))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(E, H, dim))  # (E, H, D)
        self.b2 = nn.Parameter(torch.zeros(E, dim))  # (E, D)
        self.threshold = Threshold(cfg.threshold_decay)
        self.init_weights()

    # ----------------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Experts: xavier-uniform per expert (fan_in, fan_out of its own Linear), zero biases."""
        E, D, H = self.w1.shape
        bound = (6.0 / (D + H)) ** 0.5
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def output_weights(self) -> list[Tensor]:
        return [self.w2]  # (E, H, D): every expert's output projection

    def no_weight_decay(self) -> set[str]:
        return {"b1", "b2"}  # stacked biases are 2-D; keep them out of weight decay like other biases

    # ---------------------------------------------------------------------------- forward

    def eval_uses_threshold(self) -> bool:
        """Whether eval-mode routing is ``score >= tau`` (expert race, eval_routing=threshold, tau set)."""
        return (
            self.strategy.uses_threshold
            and self.cfg.eval_routing == "threshold"
            and self.threshold.initialized
        )

    def eval_batch_dependent(self) -> bool:
        """Whether a sample's eval-mode output depends on the other samples of its batch: the strategy
        ranks across B (bl, be, race) and no per-token threshold replaces the ranking."""
        return self.strategy.ranks_across_batch and not self.eval_uses_threshold()

    def route(self, scores: Tensor) -> dispatch.RoutePlan:
        """Gated scores (B, L, E) -> plan over the T = B*L tokens. Training: the strategy's top-K (the race
        over every process's scores with ``race_scope=global``). Eval: ``score >= tau`` where the threshold
        routes, otherwise the top-K of this process's batch alone (processes may sample different numbers
        of eval batches, so no collective there)."""
        if self.training:
            return self.strategy.plan(scores)
        if self.eval_uses_threshold():
            return self.strategy.threshold_plan(scores, self.threshold.tau)  # tau fp32, compared in fp32
        return self.strategy.local().plan(scores)

    def forward(self, h: Tensor, aux: ForwardAux | None = None) -> Tensor:
        B, L, D = h.shape
        E = self.num_experts
        x = h.reshape(B * L, D)  # (T, D)
        u, logits = self.router(x)  # (T, D), (T, E)
        scores = self.gating(logits)  # (T, E) gated G(s): selection and gates
        plan = self.route(scores.view(B, L, E))
        y = dispatch.expert_ffn(x, plan, self.w1, self.b1, self.w2, self.b2, self.cfg.impl)  # (T, D)

        recompute = in_backward_recompute()  # gradient checkpointing re-runs this forward inside backward
        if self.training and self.strategy.uses_threshold and not recompute:
            # T_K of the global batch: the race's own K-th value, or a radix select over every process
            self.threshold.update(self.strategy.threshold_kth(scores, plan.kth))
        if aux is not None:
            self._record(aux, B, L, logits, plan, u, keep=not recompute)
        return y.view(B, L, D)

    @torch.compiler.disable
    def _record(
        self, aux: ForwardAux, B: int, L: int, logits: Tensor, plan: dispatch.RoutePlan, u: Tensor, keep: bool
    ) -> None:
        """This layer's routing record, handed to ``aux`` if ``keep``. Built in both passes of gradient checkpointing,
        so the recompute saves the same tensors for backward (the PLR head's forward); only the first pass keeps it.

        Run eagerly under ``torch.compile``: traced, the list append and this layer's index would be guarded
        per layer (``len(aux.layers) == i``), one recompile per MoE layer until dynamo's recompile limit (8)
        sends the rest of every deeper layer's forward back to eager."""
        head = self.router.target_head
        record = RoutingRecord(
            layer=self.layer_index,
            logits=logits,  # (T, E), with grad
            mask=plan.mask().view(B, L, self.num_experts),  # (B, L, E)
            tau=self.threshold.tau.detach().clone() if self.strategy.uses_threshold else None,
            plr_pred=head(u).view(B, L, -1) if self.training and head is not None else None,
        )
        if keep:
            aux.add(record)

    # ------------------------------------------------------------------------- accounting

    def _expert_params(self) -> int:
        return self.w1.numel() + self.b1.numel() + self.w2.numel() + self.b2.numel()

    def flops(self, num_tokens: int) -> int:
        """Router trunk + gating head + k activated experts per token (one MAC = one FLOP)."""
        D, H, E, k = self.dim, self.expert_hidden, self.num_experts, self.cfg.k
        return num_tokens * (D * D + D * E + 2 * k * D * H)

    def inactive_params(self) -> int:
        E, k = self.num_experts, self.cfg.k
        return self._expert_params() * (E - k) // E

    def training_only_params(self) -> int:
        head = self.router.target_head
        return 0 if head is None else sum(p.numel() for p in head.parameters())

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"layer={self.layer_index}, {c.k}in{c.num_experts}, expert_hidden={self.expert_hidden}, "
            f"router={c.router}, gating={c.gating}, ties={c.ties}"
        )


def inference_batch_dependence(model: nn.Module) -> str | None:
    """Why a sample's eval-mode output depends on the rest of its batch, or None when it does not.

    Token, expert and LE choice rank within one sample; expert race routing ``score >= tau`` compares each
    token with a constant. BL and BE choice, and expert race with ``eval_routing=topk`` (or before any
    training step has set tau), rank across the batch: the selection of one sample changes with the other
    samples (and, under classifier-free guidance with joint halves, with the unconditional half)."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.eval_batch_dependent()]
    if not layers:
        return None
    layer = layers[0]
    cfg = layer.cfg
    if not layer.strategy.uses_threshold:
        why = f"router {cfg.router!r} ranks across the batch"
    elif cfg.eval_routing == "topk":
        why = "expert race with eval_routing=topk ranks across the batch"
    else:
        why = "expert race threshold was never set by a training step, so it ranks across the batch (top-K)"
    return f"{why} in {len(layers)} MoE layer(s)"


__all__ = ["GATING", "MoEFeedForward", "Router", "inference_batch_dependence"]
