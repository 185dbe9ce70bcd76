"""The learnable threshold of expert race (docs/spec/race-dit.md section 3).

Each MoE layer owns a ``Threshold`` with two persistent buffers (saved by ``state_dict`` and
``save_pretrained``):
- ``tau`` (float32 scalar): EMA of the K-th largest routing score T_K seen in training,
  ``tau <- a * tau + (1 - a) * T_K``; the first update sets ``tau = T_K`` directly;
- ``updates`` (int64 scalar): how many EMA updates happened; 0 means "not initialised", so a checkpoint
  restores the initialisation state too.

When the EMA advances (decisions other parts must know):
- in every training-mode forward (also under ``torch.no_grad``, because reentrant checkpointing runs the
  first forward without grad); put the model in ``eval()`` for validation forwards;
- never while autograd's engine is running, i.e. not during the recomputation of a gradient-checkpointed
  block (``torch.utils.checkpoint``, reentrant or not, re-runs the forward inside the backward pass; we
  detect that with ``torch._C._current_graph_task_id() != -1``). So tau advances once per forward of a
  (micro-)batch; with gradient accumulation it advances once per micro-batch.
- T_K is the K-th largest score of the *global* batch when ``torch.distributed`` is initialised: the
  detached scores of all ranks are all-gathered (padded to the largest rank) and the exact K-th value of
  their union is taken, K = k * (global token count). The routing itself stays local to each rank.

The EMA-of-weights model (``racedit.training.ema``) averages ``tau`` at its own decay, like its weights,
so it routes with a threshold that matches its lagging router; an EMA model that has never seen a set
threshold takes the live one at its first update (an average up from the placeholder 0 would route far
too many experts). ``sync_thresholds`` copies threshold state between two models of the same
architecture (e.g. to give a freshly built model a trained model's thresholds); the trainer does not
call it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def in_backward_recompute() -> bool:
    """True while autograd's engine runs (e.g. gradient checkpointing recomputes a forward)."""
    return torch._C._current_graph_task_id() != -1


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a flat tensor (scalar): the (n - k + 1)-th smallest, one selection pass."""
    flat = values.reshape(-1)
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def global_kth(scores: Tensor, k_per_token: int, local_kth: Tensor | None = None) -> Tensor:
    """T_K of the global batch: scores (T, E) local, detached; K = k * (sum of T over ranks).

    On a single process this is the local T_K; ``local_kth`` (the routing's own K-th value, when the
    selection already computed it) is then returned as is, with no second selection pass.
    """
    scores = scores.detach().float()
    T = scores.shape[0]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_kth.detach().float() if local_kth is not None else kth_largest(scores, k_per_token * T)
    world = dist.get_world_size()
    sizes = torch.tensor([scores.numel()], device=scores.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    max_size = int(max(s.item() for s in all_sizes))
    flat = torch.full((max_size,), float("-inf"), device=scores.device)
    flat[: scores.numel()] = scores.reshape(-1)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    total_tokens = sum(int(s.item()) for s in all_sizes) // scores.shape[1]
    return kth_largest(torch.cat(gathered), k_per_token * total_tokens)


class Threshold(nn.Module):
    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def initialized(self) -> bool:
        return bool(self.updates.item() > 0)

    @torch.no_grad()
    def update(self, kth: Tensor) -> None:
        """Fold one T_K (scalar) into the EMA; the first call sets tau = T_K."""
        kth = kth.detach().float().to(self.tau.device)
        ema = self.decay * self.tau + (1.0 - self.decay) * kth
        self.tau.copy_(torch.where(self.updates > 0, ema, kth))  # no host sync
        self.updates.add_(1)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


@torch.no_grad()
def sync_thresholds(dst: nn.Module, src: nn.Module) -> int:
    """Copy every ``Threshold`` state (tau, updates) of ``src`` into the same-named one of ``dst``.

    For EMA-of-weights copies of a model: ``sync_thresholds(ema_model, model)``. Returns how many were copied.
    """
    src_thresholds = {name: m for name, m in src.named_modules() if isinstance(m, Threshold)}
    copied = 0
    for name, m in dst.named_modules():
        if isinstance(m, Threshold):
            if name not in src_thresholds:
                raise ValueError(
                    f"sync_thresholds: source model has no threshold {name!r}; same architecture?"
                )
            m.tau.copy_(src_thresholds[name].tau)
            m.updates.copy_(src_thresholds[name].updates)
            copied += 1
    return copied
