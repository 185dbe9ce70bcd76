"""The model-zoo table: parameters and FLOPs of every registered model, without allocating weights."""

from __future__ import annotations

import re
from typing import Any

import torch

from racedit.models.loading import build_model
from racedit.models.registry import zoo_names


def describe(name: str, input_size: int = 32) -> dict[str, Any]:
    """One row of the zoo: architecture, parameter counts and forward GFLOPs at ``input_size`` latents."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(name, input_size=input_size)
    arch = model.arch
    counts = model.param_counts()
    row: dict[str, Any] = {
        "name": name,
        "depth": arch.depth,
        "width": arch.hidden_size,
        "heads": arch.num_heads,
        "patch": arch.patch_size,
        "experts": f"{arch.moe.k}in{arch.moe.num_experts}" if arch.moe else "-",
        "connection": arch.connection.suffix or "residual",
        **counts,
        "gflops": model.flops() / 1e9,
    }
    base = re.sub(r"-m?D?(HC|FC)x\d+$", "", name)
    if base != name:
        with torch.device("meta"):
            ref = build_model(base, input_size=input_size)
        row["overhead_params"] = counts["params_total"] - ref.param_counts()["params_total"]
        row["overhead_pct"] = 100.0 * row["overhead_params"] / ref.param_counts()["params_total"]
    else:
        row["overhead_params"], row["overhead_pct"] = 0, 0.0
    return row


def zoo_table(
    pattern: str | None = None, input_size: int = 32, connections: bool = True
) -> list[dict[str, Any]]:
    names = [
        n for n in zoo_names(include_connections=connections) if pattern is None or re.search(pattern, n)
    ]
    return [describe(n, input_size) for n in names]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:,.1f}M"

    head = (
        "| model | depth | width | heads | patch | experts | blocks total | blocks activated | "
        "full model | GFLOPs | connection overhead |\n"
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        over = f"+{r['overhead_params']:,} ({r['overhead_pct']:.4f}%)" if r["overhead_params"] else "-"
        lines.append(
            f"| {r['name']} | {r['depth']} | {r['width']} | {r['heads']} | {r['patch']} | {r['experts']} | "
            f"{m(r['block_params_total'])} | {m(r['block_params_activated'])} | {m(r['params_total'])} | "
            f"{r['gflops']:.1f} | {over} |"
        )
    return "\n".join(lines)
