"""EMA of weights and floating buffers (tau), and the resumable per-process batch order."""

from __future__ import annotations

import torch
from torch import nn

from racedit.training.data import BatchStream
from racedit.training.ema import EMA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("tau", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))


def test_ema_tracks_parameters_float_buffers_and_copies_integer_buffers() -> None:
    live = Tiny()
    ema = EMA(live, decay=0.9)
    w0 = live.lin.weight.detach().clone()
    with torch.no_grad():
        live.lin.weight.add_(1.0)
        live.tau.fill_(2.0)
        live.updates.fill_(7)
    ema.update(live, step=0)
    assert torch.allclose(ema.model.lin.weight, w0 + 0.1, atol=1e-6)
    assert float(ema.model.tau) == torch.tensor(0.2).item()
    assert int(ema.model.updates) == 7
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())


def test_ema_warmup() -> None:
    ema = EMA(Tiny(), decay=0.999, warmup=True)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10**6) == 0.999


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def _take(stream: BatchStream, n: int) -> list[list[int]]:
    return [next(stream)[1].tolist() for _ in range(n)]


def test_batch_stream_resume_position_and_rank_sharding() -> None:
    full = _take(BatchStream(Items(), 4, seed=3), 30)  # 12 batches per epoch: crosses two epochs
    s = BatchStream(Items(), 4, seed=3)
    first = _take(s, 17)
    state = s.state_dict()
    assert state == {"epoch": 1, "batch": 5}
    resumed = BatchStream(Items(), 4, seed=3)
    resumed.load_state_dict(state)
    assert first + _take(resumed, 13) == full
    # two ranks: disjoint halves of the same epoch order, together a permutation without the dropped tail
    r0 = sum(_take(BatchStream(Items(), 4, seed=3, rank=0, world_size=2), 6), [])
    r1 = sum(_take(BatchStream(Items(), 4, seed=3, rank=1, world_size=2), 6), [])
    assert not set(r0) & set(r1) and len(set(r0 + r1)) == 48
    assert sorted(sum(full[:12], [])) == sorted(r0 + r1)


def test_ema_takes_a_threshold_at_its_first_update_then_averages_it() -> None:
    import racedit

    torch.manual_seed(0)
    model = racedit.build_model(
        "RaceDiT-S/2-2in8", input_size=4, num_classes=3, hidden_size=16, depth=1, num_heads=2, in_channels=1
    )
    ema = EMA(model, decay=0.9999)  # copied before the first step: its tau is the placeholder 0
    x, t, y = torch.randn(4, 1, 4, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    model.train()
    layer = model.blocks[0].mlp.threshold
    model(x, t, y)
    first = float(layer.tau)
    ema.update(model, step=0)
    ema_layer = ema.model.blocks[0].mlp.threshold
    assert float(ema_layer.tau) == first != 0.0 and int(ema_layer.updates) == 1
    model(x * 3, t, y)
    ema.update(model, step=1)
    expected = first + (1 - 0.9999) * (float(layer.tau) - first)
    assert float(layer.tau) != first and abs(float(ema_layer.tau) - expected) < 1e-7


def test_ema_model_tau_is_the_ema_of_the_live_tau_at_the_weights_decay() -> None:
    """One rule (racedit/training/ema.py): the EMA model's tau = first live tau, then the same lerp as its
    weights at decay_at(step), warmup included; never a copy of the live tau once set."""
    import racedit

    torch.manual_seed(0)
    model = racedit.build_model(
        "RaceDiT-S/2-2in8", input_size=4, num_classes=3, hidden_size=16, depth=2, num_heads=2, in_channels=1
    )
    ema = EMA(model, decay=0.99, warmup=True)
    model.train()
    g = torch.Generator().manual_seed(1)
    want: dict[str, float] = {}
    for step in range(6):
        x = torch.randn(4, 1, 4, 4, generator=g) * (1 + step)  # scores grow: the live tau moves every step
        model(x, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0]))
        ema.update(model, step)
        d = ema.decay_at(step)
        for name, b in model.named_buffers():
            if name.endswith("threshold.tau"):
                live = float(b)
                want[name] = live if name not in want else d * want[name] + (1 - d) * live
    got = dict(ema.model.named_buffers())
    live = dict(model.named_buffers())
    for name, value in want.items():
        # float32 lerp in the EMA vs float64 recursion here: a few float32 ulps of tau over 6 steps
        assert abs(float(got[name]) - value) < 1e-6 * max(1.0, abs(value)), name
        assert abs(float(got[name]) - float(live[name])) > 1e-4  # not the live threshold
        assert int(got[name.removesuffix("tau") + "updates"]) == 6  # the counter is copied
