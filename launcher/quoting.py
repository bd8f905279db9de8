"""Makes user-supplied values safe to write into a batch script, or refuses them: shell words are single-quoted,
`#SBATCH` values are checked against a strict character set.

Two different parsers read a batch script. bash reads the body: every value there goes through `shell_word`
(shlex.quote), so `$(...)`, backticks, `;`, quotes and spaces stay literal text. sbatch reads the `#SBATCH` lines
itself, before any shell, with its own rules for quotes, backslashes, `#` (comment) and whitespace; a value there
must not need quoting at all, so `sbatch_value` accepts only characters that mean nothing to that parser.
Control characters (newline, NUL, tab, escape, ...) are refused everywhere: a newline would end a directive or
start a new command, and NUL cannot exist in a command line.
"""

from __future__ import annotations

import re
import shlex

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters with no meaning to sbatch's directive parser (no whitespace, quotes, backslash, '#', '$', '%', '`').
# Covers node lists, times, memory sizes, partitions, accounts and constraint expressions (&, |, [ ], *, ( )).
_SBATCH_SAFE = re.compile(r"[A-Za-z0-9_.,:=+\-/@\[\]&|*()!~]+")
# In --output/--error '%' starts a filename pattern (%j = job id); a path given by the user must not contain one.
_PATH_SAFE = re.compile(r"[A-Za-z0-9_.,:=+\-/@~]+")


class UnsafeValueError(ValueError):
    """A user-supplied value cannot be written into the batch script safely; the message names the option."""


def shell_word(value: object, what: str) -> str:
    """One shell word that bash reads back as exactly `value`."""
    text = str(value)
    _refuse_control(text, what)
    return shlex.quote(text)


def shell_words(values: list[str], what: str) -> str:
    return " ".join(shell_word(value, what) for value in values)


def sbatch_value(value: object, what: str) -> str:
    """A value for an `#SBATCH --option=value` line, returned unchanged, or UnsafeValueError."""
    text = str(value)
    _refuse_control(text, what)
    if not _SBATCH_SAFE.fullmatch(text):
        bad = sorted({char for char in text if not _SBATCH_SAFE.fullmatch(char)})
        raise UnsafeValueError(
            f"{what}: {text!r} cannot go into an #SBATCH line (sbatch parses these lines itself); "
            f"refused character(s): {''.join(bad)!r}"
        )
    return text


def sbatch_path(value: object, what: str) -> str:
    """A file path for `#SBATCH --output`: no '%' (Slurm's filename patterns), no spaces or quotes."""
    text = str(value)
    _refuse_control(text, what)
    if not _PATH_SAFE.fullmatch(text):
        bad = sorted({char for char in text if not _PATH_SAFE.fullmatch(char)})
        raise UnsafeValueError(
            f"{what}: the path {text!r} cannot go into an #SBATCH --output line; refused character(s): "
            f"{''.join(bad)!r} (use an output_dir made of letters, digits and . _ - / + , : = @ ~)"
        )
    return text


def _refuse_control(text: str, what: str) -> None:
    match = _CONTROL.search(text)
    if match:
        raise UnsafeValueError(
            f"{what}: {text!r} contains the control character {match.group()!r} "
            "(newline, tab, NUL, escape, ...), which cannot be written into a batch script safely"
        )
