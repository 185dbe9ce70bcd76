"""Auxiliary losses of the MoE layers: PLR, router-similarity loss, Switch balance loss.

docs/spec/race-dit.md sections 4-5. Every MoE layer appends one ``RoutingRecord`` to ``ForwardAux.layers``
(``racedit/interfaces.py``); ``aux_losses`` turns the records into weighted terms that the trainer adds
to the diffusion loss:

    L = L_diffusion + plr_weight * sum_l L_PLR,l + rsl_weight * sum_l L_sim,l + balance_weight * sum_l L_bal,l

Global batch under data parallelism: the no-grad statistics (co-selection matrix M', loads f) are
all-reduced over ranks; the differentiable part (P' = P^T P, mean probabilities) stays local and is
normalised by the local token count. Averaged over ranks (what DDP does to gradients) this equals the
loss on the global batch exactly when ranks hold equal token counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from racedit.interfaces import ForwardAux
from racedit.moe.config import MoEConfig


def _all_reduce_sum(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def plr_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-layer regularization of one layer: pred, target (B, L, p*p*C) -> scalar.

    Mean squared error over batch, tokens and channels (DiT's ``mean_flat`` convention of the diffusion
    MSE, so ``plr_weight`` is relative to the diffusion loss). No stop-gradient on either side's inputs:
    the target is the (constant) regression target, the prediction backpropagates into the router trunk
    and through it into every earlier block.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"PLR prediction {tuple(pred.shape)} and target tokens {tuple(target.shape)} differ; pass "
            "model.patchify(target) of the regression target without the learned-sigma channels"
        )
    return (pred.float() - target.float()).pow(2).mean()


def router_similarity_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """RSL (docs/spec/race-dit.md section 5): logits s (N, E) with grad, mask M (N, E) bool -> scalar.

    P = softmax_E(s); P' = P^T P; M' = M^T M (no grad, summed over ranks);
    W_ii = E * M'_ii / sum_j M'_jj;  W_ij = (E^2 - E) * M'_ij / sum_{a!=b} M'_ab  (i != j);
    L_sim = (1/N) sum_ij W_ij P'_ij. A zero denominator (no selection / no co-selection) gives W = 0.
    """
    N, E = logits.shape
    P = torch.softmax(logits.float(), dim=-1)  # (N, E)
    P_sim = P.T @ P  # (E, E), differentiable
    with torch.no_grad():
        Mf = mask.reshape(N, E).float()
        M_sim = _all_reduce_sum(Mf.T @ Mf)  # (E, E) co-selection counts of the global batch
        diag = torch.diagonal(M_sim)
        off = M_sim - torch.diag_embed(diag)
        W = torch.diag_embed(E * diag / diag.sum().clamp_min(1e-12))
        W = W + (E * E - E) * off / off.sum().clamp_min(1e-12)
    return (W * P_sim).sum() / N


def balance_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Switch balance loss ``E * sum_i f_i * Pbar_i``: logits (N, E), mask (N, E) bool -> scalar.

    f_i = share of all selected (token, expert) pairs that went to expert i (global batch, no grad; this
    generalises Switch's top-1 dispatch fraction to k experts per token, sum_i f_i = 1);
    Pbar_i = mean over tokens of softmax_E(s)_i. Equals 1 for perfectly uniform routing.
    """
    N, E = logits.shape
    P_mean = torch.softmax(logits.float(), dim=-1).mean(0)  # (E,)
    with torch.no_grad():
        counts = _all_reduce_sum(mask.reshape(N, E).float().sum(0))  # (E,)
        f = counts / counts.sum().clamp_min(1e-12)
    return E * (f * P_mean).sum()


def aux_losses(aux: ForwardAux, target_tokens: Tensor | None, cfg: MoEConfig) -> dict[str, Tensor]:
    """Weighted auxiliary terms summed over the MoE layers of one forward; zero-weight terms are omitted.

    target_tokens: ``model.patchify(target)`` (B, L, p*p*C), needed when ``cfg.plr_weight > 0`` and the
    forward was in training mode (records then hold ``plr_pred``).
    """
    out: dict[str, Tensor] = {}
    records = aux.layers
    if not records:
        return out
    if cfg.plr_weight > 0:
        preds = [r.plr_pred for r in records if r.plr_pred is not None]
        if preds:
            if target_tokens is None:
                raise ValueError("aux_losses: plr_weight > 0 needs target_tokens = model.patchify(target)")
            out["plr"] = cfg.plr_weight * sum(plr_loss(p, target_tokens) for p in preds)
    if cfg.rsl_weight > 0:
        out["rsl"] = cfg.rsl_weight * sum(router_similarity_loss(r.logits, r.mask) for r in records)
    if cfg.balance_weight > 0:
        out["balance"] = cfg.balance_weight * sum(balance_loss(r.logits, r.mask) for r in records)
    return out
