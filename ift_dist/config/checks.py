"""How a config value is judged wrong: ConfigError, named by the dotted key, and the checks every section shares."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ift_dist.config.choices import Choice


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message starts with the dotted key."""


def check_choices(section: Any, key: str) -> None:
    """Every Choice-typed field of `section` holds a member of its Enum (a plain string, as a section built in code
    may hold, is converted); OmegaConf already did this for a loaded config."""
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        kind = hints[item.name]
        if isinstance(kind, type) and issubclass(kind, Choice):
            value = getattr(section, item.name)
            if value not in kind.values():
                raise ConfigError(f"{key}.{item.name}: {value!r} is not one of {', '.join(kind.values())}")
            setattr(section, item.name, kind(value))


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
