"""Loading a run config: the YAML file and the command line's dotted overrides merged onto the schema through
OmegaConf (the only omegaconf importer besides the schema's MISSING), every key checked against the schema (an unknown
key names the closest valid one), then validated; and writing it back as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import EnumNode

from ift_dist.config.checks import ConfigError
from ift_dist.config.schema import Config

# --------------------------------------------------------------------------------------------------- keys


def _fields(hint: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a dataclass annotation (`X | None` too); None for a list, mapping or value."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if not dataclasses.is_dataclass(hint):
        return None
    hints = typing.get_type_hints(hint)
    return {item.name: hints[item.name] for item in dataclasses.fields(hint)}


def schema_key(parts: list[str], schema: type = Config, where: str = "") -> str:
    """A key given as its parts (``["data", "sources", "0", "weight"]``), checked against the schema and written as
    errors name it (``data.sources[0].weight``). Raises ConfigError for a part that is not a field of its section,
    naming the closest valid key (`where` is appended, e.g. the file). Keys inside a mapping field (``placeholders``,
    ``columns``, ...) are free."""
    hint, shown = schema, ""
    for index, part in enumerate(parts):
        fields = _fields(hint)
        if typing.get_origin(hint) is list and part.isdigit():
            hint, shown = typing.get_args(hint)[0], f"{shown}[{part}]"
        elif fields is None:
            return ".".join([shown, *parts[index:]])
        elif part not in fields:
            key = f"{shown}.{part}" if shown else part
            close = difflib.get_close_matches(part, list(fields), n=1)
            if close:
                suggestion = f"did you mean {shown}{'.' if shown else ''}{close[0]}?"
            else:
                suggestion = f"the keys of {shown or 'a config'} are {', '.join(fields)}"
            raise ConfigError(f"{key}: unknown key; {suggestion}{where}")
        else:
            hint, shown = fields[part], f"{shown}.{part}" if shown else part
    return shown


def _leaf_keys(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """The key of every value of a YAML document, as parts (a list element's index is a part)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    empty = True
    for name, item in items:
        empty = False
        yield from _leaf_keys(item, (*prefix, str(name)))
    if empty and prefix:
        yield list(prefix)


def check_keys(document: Any, schema: type = Config, where: str = "") -> None:
    """Every key of a loaded YAML document must be in the schema; ConfigError names the first one that is not."""
    for parts in _leaf_keys(document):
        schema_key(parts, schema, where)


# --------------------------------------------------------------------------------------------------- load


def _format_omegaconf_error(
    error: OmegaConfBaseException, document: Any = None, schema: type = Config
) -> str:
    key = getattr(error, "full_key", None)
    if key and "." not in key and document is not None:
        # OmegaConf names a bad value inside a list element (data.sources[1]) by its own field only: find the
        # document's key that ends in that field and holds that value.
        for parts in _leaf_keys(document):
            if (
                len(parts) > 1
                and parts[-1] == key
                and _value_at(document, parts) == getattr(error, "value", None)
            ):
                key = schema_key(parts, schema)
                break
    node = getattr(error, "child_node", None)
    if key and isinstance(node, EnumNode) and isinstance(getattr(error, "value", None), str):
        # A value outside a Choice: the same message as for a section built in code (checks.check_choices).
        return f"{key}: {error.value!r} is not one of {', '.join(node.enum_type.values())}"
    message = (getattr(error, "msg", None) or str(error)).splitlines()[0]  # one line; OmegaConf adds details
    return f"{key}: {message}" if key else message


def _value_at(document: Any, parts: list[str]) -> Any:
    for part in parts:
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def _apply_override(merged: Any, item: str, schema: type) -> None:
    """One ``key=value`` from the command line. Keys may index lists: ``data.sources.0.weight=2`` or
    ``data.sources[0].weight=2``. The value is parsed as YAML (``true``, ``3``, ``[a, b]``, ``{k: v}``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    shown = schema_key(key.split("."), schema, where=f" (from the command line override {item!r})")
    value = OmegaConf.create({"value": yaml.safe_load(raw) if raw.strip() else ""})["value"]
    if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
        raise ConfigError(f"{shown}: not in the config (from the command line override {item!r})")
    OmegaConf.update(merged, key, value, merge=True)


_ABSENT = object()


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema: type = Config
) -> Any:
    """YAML file (optional) + CLI dotlist overrides (``data.max_length=4096``) -> validated dataclass."""
    document = None
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            document = OmegaConf.to_container(OmegaConf.load(path))
            check_keys(document, schema, where=f" (in {path})")
            merged = OmegaConf.merge(merged, document)
        for item in overrides or []:
            _apply_override(merged, item, schema)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(_format_omegaconf_error(error, document, schema) + where) from error
    config.validate()
    return config


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, as saved into the run directory and sent to W&B."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain Python values (a Choice as its string), e.g. for JSON, W&B and resume comparisons."""
    return dataclasses.asdict(config, dict_factory=_plain_dict)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {name: value.value if isinstance(value, Enum) else value for name, value in items}


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))
