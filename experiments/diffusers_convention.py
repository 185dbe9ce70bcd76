"""How much diffusers' DiT numerics move a model: the same weights run with DiT's (official) timestep
frequencies and with diffusers' (``Timesteps(downscale_freq_shift=1)``), and with diffusers' default MLP
LayerNorm eps (1e-5 where DiT has 1e-6).

    python -m experiments.diffusers_convention --ckpt runs/demo/final

Prints two markdown tables:
1. one forward per timestep t in {0, 250, 999} on held-out digits noised to t (the same noise for every
   variant): max and mean |output - official output|, and the mean relative to mean |official output|;
2. for a pixel-space digits model: the demo metrics (``racedit.metrics.demo``) of samples drawn with the
   same seeds and settings under each variant, and how far the uint8 samples moved.

The checkpoint is run as trained (its own convention is the reference); any racedit-loadable model works
for table 1 (an official DiT .pt too, with random latents in place of digits).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

VARIANTS = {  # name -> load_model overrides
    "official (as DiT)": {"timestep_convention": "official", "mlp_norm_eps": 1e-6},
    "diffusers timesteps": {"timestep_convention": "diffusers", "mlp_norm_eps": 1e-6},
    "diffusers eps 1e-5": {"timestep_convention": "official", "mlp_norm_eps": 1e-5},
    "diffusers, both": {"timestep_convention": "diffusers", "mlp_norm_eps": 1e-5},
}
TIMESTEPS = (0, 250, 999)


def noised_inputs(model, objective, n: int, t_model: int, seed: int):
    """(x_t, t, y): held-out digits (or N(0,1) latents for other models) noised to model time ``t_model``."""
    from racedit.data import build_dataset
    from racedit.data.config import DataConfig

    arch = model.arch
    gen = torch.Generator().manual_seed(seed)
    if arch.in_channels == 1 and arch.num_classes == 10:
        held = build_dataset(DataConfig(kind="digits", image_size=arch.input_size), split="heldout")
        idx = torch.randperm(len(held), generator=gen)[:n]
        x0 = torch.stack([held[int(i)][0] for i in idx])
        y = torch.tensor([int(held[int(i)][1]) for i in idx])
    else:
        x0 = torch.randn(n, arch.in_channels, arch.input_size, arch.input_size, generator=gen)
        y = torch.randint(0, arch.num_classes, (n,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    if objective.kind == "flow":
        s = torch.full((n,), t_model / objective.cfg.time_scale)
        x_t = objective.interpolate(x0, s, noise)
    else:
        x_t = objective.q_sample(x0, torch.full((n,), t_model, dtype=torch.long), noise)
    return x_t, torch.full((n,), float(t_model)), y


@torch.no_grad()
def forward_table(models, objective, n: int, seed: int) -> list[str]:
    ref_name = next(iter(models))
    rows = [
        "| variant | t | max abs diff | mean abs diff | mean diff / mean abs output |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in TIMESTEPS:
        x, tt, y = noised_inputs(models[ref_name], objective, n, t, seed)
        ref = models[ref_name](x, tt, y)
        for name, model in list(models.items())[1:]:
            d = (model(x, tt, y) - ref).abs()
            rows.append(
                f"| {name} | {t} | {d.max():.3g} | {d.mean():.3g} | {100 * float(d.mean() / ref.abs().mean()):.3g}% |"
            )
    return rows


def samples_table(
    models, meta, objective, per_class: int, steps: int, cfg_scale: float, seed: int
) -> list[str]:
    from racedit.data.config import DataConfig
    from racedit.metrics.demo import demo_report
    from racedit.sampling import generate

    sampler = objective.samplers[0]
    rows = [
        f"sampler {sampler}, {steps} steps, guidance {cfg_scale}, {per_class} samples per class, seed {seed}",
        "",
        "| variant | accuracy | Frechet vs train | Frechet vs held-out | mean abs pixel change | pixels changed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reference = None
    data_cfg = DataConfig(kind="digits", image_size=meta.image_size or 8)
    for name, model in models.items():
        images = {}

        def sample_fn(labels, seed, model=model, images=images):
            images["x"] = generate(
                model, labels, objective=objective, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                batch_size=256,
            )  # fmt: skip
            return images["x"]

        with tempfile.TemporaryDirectory() as out:
            report = demo_report(
                data_cfg, sample_fn, per_class=per_class, seed=seed, out_dir=Path(out), log=lambda s: None
            )
        x = images["x"].to(torch.int16)
        reference = x if reference is None else reference
        change = (x - reference).abs()
        g = report["generated"]
        rows.append(
            f"| {name} | {g['accuracy']:.3f} | {g['frechet_vs_train']:.3f} | {g['frechet_vs_heldout']:.3f} | "
            f"{float(change.float().mean()):.3f} / 255 | {float((change > 0).float().mean()):.1%} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a racedit-loadable model (e.g. runs/demo/final)")
    p.add_argument("--n", type=int, default=64, help="inputs per timestep in the forward table")
    p.add_argument("--per-class", type=int, default=50, help="digits model: samples per class (demo: 50)")
    p.add_argument("--steps", type=int, default=25, help="digits model: sampling steps (the demo uses 10)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="digits model: guidance (demo: 2.0)")
    p.add_argument("--seed", type=int, default=10_000, help="seed (the demo report uses sample.seed + 10000)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from racedit.diffusion import build_objective
    from racedit.models import load_model
    from racedit.sampling.meta import official_dit_meta, read_sampling_meta

    trained = load_model(args.ckpt).arch
    models = {}
    for name, overrides in VARIANTS.items():
        if name.startswith("official"):
            overrides = {
                "timestep_convention": trained.timestep_convention,
                "mlp_norm_eps": trained.mlp_norm_eps,
            }
            name = f"as trained ({trained.timestep_convention}, eps {trained.mlp_norm_eps:g})"
        elif overrides == {
            "timestep_convention": trained.timestep_convention,
            "mlp_norm_eps": trained.mlp_norm_eps,
        }:
            continue
        models[name] = load_model(args.ckpt, **overrides)
    meta = read_sampling_meta(args.ckpt) if Path(args.ckpt).is_dir() else None
    meta = meta or official_dit_meta(image_size=trained.input_size * 8)
    objective = build_objective(meta.diffusion_config(), trained.learn_sigma)
    print(f"checkpoint: {args.ckpt}; reference: the first row's model, run as trained\n")
    print(f"one forward, {args.n} inputs per t ({objective.kind} objective; model time t):\n")
    print("\n".join(forward_table(models, objective, args.n, args.seed)))
    if meta.space == "pixel" and trained.in_channels == 1 and trained.num_classes == 10:
        print("\ndemo metrics of samples with the same seeds:\n")
        print(
            "\n".join(
                samples_table(models, meta, objective, args.per_class, args.steps, args.cfg_scale, args.seed)
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
