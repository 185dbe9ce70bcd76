"""Typed configuration: YAML files validated into dataclasses, with dotted command-line overrides.

A config file is data. It is read into nested dataclasses; an unknown key, or a value of the wrong
type, is an error that names the full dotted key and what was expected. Any key can be overridden
from the command line as ``section.key=value`` (the value is parsed as YAML: ``3``, ``1e-4``,
``true``, ``[1, 2]``, ``null``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent-only floats (``1e-4``, ``3E5``) as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str, source: str = "<string>", positions: bool = True) -> Any:
    """Parse YAML ``text`` (safe constructors only); a syntax error is a ConfigError naming
    ``source:line:column`` and the parser's reason."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None and positions else source
        reason = err.problem or err.context or "syntax error"
        ctx = err.context_mark
        if err.context and err.problem and ctx is not None and positions:
            reason += f" ({err.context} that starts at line {ctx.line + 1}, column {ctx.column + 1})"
        elif err.context and err.problem:
            reason += f" ({err.context})"
        raise ConfigError(f"{where}: invalid YAML: {reason}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(err).split())}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"config key '{key}': {value!r} matches none of {_type_name(tp)}"
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if hasattr(tp, "from_config_data"):  # a section that expands itself (e.g. a zoo name)
            return tp.from_config_data(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(
            f"unknown config key {where}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # missing required fields
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    except ConfigError:
        raise
    except ValueError as err:  # the dataclass's own checks (__post_init__): say which section
        message = str(err)
        if prefix and not message.startswith(f"{prefix}."):
            message = f"config section '{prefix}': {message}"
        raise ConfigError(message) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict / list / scalars, ready for YAML or JSON."""
    if hasattr(obj, "to_config_data") and not isinstance(obj, type):
        return obj.to_config_data()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml_load(raw, source=f"override {text!r}", positions=False) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (in place; returns it)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (configs live under configs/)")
    data = yaml_load(path.read_text(), source=str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:  # `base: other.yaml` inherits, this file's keys win
        parent = load_yaml(path.parent / base)
        data = deep_merge(parent, data)
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursively; the one merge every config layer uses.

    A mapping merged onto a mapping merges key by key; any other value (a list, a scalar, ``None``)
    replaces what ``base`` held, so ``moe: null`` removes a section. Neither input is modified.
    """
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML) into ``cls``, apply ``overrides``, validate."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def dump_yaml(obj: Any, path: str | Path) -> None:
    with Path(path).open("w") as fh:
        yaml.safe_dump(to_dict(obj), fh, sort_keys=False)
