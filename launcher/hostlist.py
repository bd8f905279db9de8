"""Expands Slurm host-list expressions (`SLURM_JOB_NODELIST`) into host names, without calling `scontrol`.

Syntax (as Slurm writes it): comma-separated items; an item is text with bracket groups of numbers and ranges,
``node[01-03,07]``; several groups multiply out (``rack[1-2]-gpu[1-2]``); the width of a range's lower bound sets
the zero padding (``[08-10]`` -> 08 09 10, ``[8-10]`` -> 8 9 10). Names may hold dots, ``127.0.0.[1-2]``.
"""

from __future__ import annotations

import itertools
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class HostListError(ValueError):
    """The text is not a valid Slurm host list."""


def expand_hostlist(text: str) -> list[str]:
    """``"node[01-03,07],gpu-a[1-2]"`` -> ``["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]``; the order
    is kept as written."""
    return [host for item in _split_top_level(text.strip()) for host in _expand_item(item, text)]


def first_host(text: str) -> str:
    hosts = expand_hostlist(text)
    if not hosts:
        raise HostListError(f"empty host list {text!r}")
    return hosts[0]


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise HostListError(f"nested brackets in host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostListError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise HostListError(f"unbalanced '[' in host list {text!r}")
    items.append("".join(current))
    if text and any(not item.strip() for item in items):
        raise HostListError(f"empty item in host list {text!r}")
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, text: str) -> list[str]:
    # re.split with a group keeps the bracket contents at the odd positions: text, ranges, text, ranges, ..., text
    parts = re.split(r"\[([^\]]*)\]", item)
    choices = [[part] if index % 2 == 0 else _expand_ranges(part, text) for index, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(ranges: str, text: str) -> list[str]:
    numbers = []
    for piece in ranges.split(","):
        match = _RANGE.match(piece.strip())
        if not match:
            raise HostListError(f"bad range {piece!r} in host list {text!r}")
        low_text, high_text = match.group(1), match.group(2) or match.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise HostListError(f"range {piece!r} runs backwards in host list {text!r}")
        width = len(low_text)
        numbers.extend(str(number).zfill(width) for number in range(low, high + 1))
    return numbers
