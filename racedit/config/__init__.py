from racedit.config.core import (
    ConfigError,
    apply_overrides,
    deep_merge,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    to_dict,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "deep_merge",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_override",
    "to_dict",
]
