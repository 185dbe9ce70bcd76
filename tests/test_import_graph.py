"""The import graph docs/design.md draws holds in the code: no package imports one above it, the leaves
import nothing of racedit, and importing a leaf does not load the toolkit."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> packages it must never import (directly, at any depth of its modules)
FORBIDDEN = {
    "kernels": {"routing", "moe", "models", "training", "cli", "diffusion", "sampling", "data"},
    "routing": {"moe", "models", "training", "cli", "diffusion", "sampling", "data"},
    "moe": {"models", "training", "cli", "diffusion", "sampling", "data"},
    "connections": {"models", "moe", "training", "cli"},
    "diffusion": {"models", "moe", "training", "cli", "sampling", "data"},
    "sampling": {"models", "moe", "training", "cli"},
    "models": {"training", "cli"},
    "data": {"models", "moe", "training", "cli", "sampling", "metrics"},
    "metrics": {"training", "cli"},
    "vae": {"models", "moe", "training", "cli", "sampling", "data"},
    "analysis": {"training", "cli"},
    "training": {"cli"},
    "interfaces": {"*"},
    "errors": {"*"},
    "io": {"*"},
    "progress": {"*"},
    "distributed": {"*"},
}


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for f in (ROOT / "racedit").rglob("*.py"):
        if (
            f.name == "__main__.py"
        ):  # `python -m racedit.data` etc.: entry aliases of racedit/cli, not library
            continue
        rel = f.relative_to(ROOT).with_suffix("").parts  # ("racedit", pkg, ...)
        src = rel[1] if len(rel) > 1 else "racedit"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "racedit" and len(parts) > 1 and parts[1] != src:
                    edges[src].add(parts[1])
    return edges


def test_no_package_imports_one_above_it() -> None:
    edges = package_edges()
    assert edges, "no imports found: the walk is broken"
    wrong = []
    for src, bans in FORBIDDEN.items():
        for dst in edges.get(src, set()):
            if "*" in bans or dst in bans:
                wrong.append(f"{src} -> {dst}")
    assert not wrong, f"imports against the graph: {wrong}; all edges: {dict(edges)}"
    assert "interfaces" in edges["moe"] and "interfaces" in edges["diffusion"]  # the walk sees real edges


def test_importing_routing_does_not_load_the_toolkit() -> None:
    code = (
        "import sys, racedit.routing; "
        "print(sorted(m for m in ('diffusers', 'accelerate', 'racedit.models', 'racedit.training') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_command_lives_in_cli() -> None:
    """The console scripts and the ``python -m`` aliases all run a module of racedit/cli/."""
    import re

    block = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(racedit-[\w-]+) = "([\w.:]+)"', block, flags=re.M))  # (3.10: no tomllib)
    assert len(scripts) == 6, block
    assert {
        name: target.split(":")[0].rsplit(".", 1)[0] for name, target in scripts.items()
    } == dict.fromkeys(scripts, "racedit.cli")
    for alias in ("racedit/data/__main__.py", "racedit/models/__main__.py", "fid/__main__.py"):
        imports = [
            n for n in ast.walk(ast.parse((ROOT / alias).read_text())) if isinstance(n, ast.ImportFrom)
        ]
        assert [n.module for n in imports] and all(n.module.startswith("racedit.cli.") for n in imports), (
            alias
        )
