"""How a format adapter rejects a file record: the exception that carries the reason, the field's path and a message,
raised by `fail` and by the value checks every adapter shares; `records.convert_record` turns it into a BadRecord."""

from __future__ import annotations

import re
from typing import Any, NoReturn

_SURROGATE = re.compile("[\ud800-\udfff]")

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


class Reject(Exception):
    """Raised inside the adapters to abandon a record; becomes a BadRecord."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def fail(reason: str, field: str | None, detail: str) -> NoReturn:
    raise Reject(reason, field, detail)


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages ("object", "array", "null", ...)."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def check_utf8(text: str, path: str) -> None:
    """Text with lone surrogates (non-UTF-8 bytes decoded with surrogateescape, or a JSON escape) cannot be
    tokenized: `non_utf8`."""
    if not text.isascii() and (match := _SURROGATE.search(text)):
        fail("non_utf8", path, f"text is not valid UTF-8 (a lone surrogate at character {match.start()})")
