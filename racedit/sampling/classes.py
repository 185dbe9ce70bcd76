"""Class names: ImageNet's 1000 (shipped as data) and parsing ``--classes`` given as ids or names."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-id order (torchvision's short, unique names)."""
    text = resources.files("racedit").joinpath("assets/imagenet_classes.txt").read_text()
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"racedit/assets/imagenet_classes.txt has {len(names)} names, expected 1000")
    return names


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet names for 1000-class models; "class i" otherwise."""
    if num_classes == 1000:
        return list(imagenet_class_names())
    return [str(i) for i in range(num_classes)]


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def parse_classes(specs: Sequence[str], class_names: Sequence[str], num_classes: int) -> list[int]:
    """``["207", "golden retriever", "1,2"]`` -> class ids. Each item is an id, a comma-separated list of
    ids, or a class name (case and '_' vs ' ' do not matter; an unambiguous prefix is accepted)."""
    lookup = {_normalise(n): i for i, n in enumerate(class_names)}
    ids: list[int] = []
    for spec in specs:
        spec = spec.strip()
        parts = (
            [p.strip() for p in spec.split(",")]
            if all(p.strip().isdigit() for p in spec.split(","))
            else [spec]
        )
        for part in parts:
            if part.isdigit():
                idx = int(part)
            else:
                key = _normalise(part)
                if key in lookup:
                    idx = lookup[key]
                else:
                    matches = sorted({i for n, i in lookup.items() if n.startswith(key)})
                    if len(matches) == 1:
                        idx = matches[0]
                    elif matches:
                        shown = ", ".join(f"{i} {class_names[i]!r}" for i in matches[:8])
                        raise ValueError(f"class name {part!r} is ambiguous: {shown}; give the id")
                    else:
                        close = sorted(n for n in lookup if key in n)[:8]
                        hint = f" (names containing it: {close})" if close else ""
                        raise ValueError(
                            f"unknown class name {part!r}{hint}; give an id in [0, {num_classes})"
                        )
            if not 0 <= idx < num_classes:
                raise ValueError(f"class id {idx} is out of range: this model has {num_classes} classes")
            ids.append(idx)
    return ids
