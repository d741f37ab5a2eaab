"""Values of command-line flags and their AGW_* variables, parsed and checked.

Each parser takes the text of a flag or variable and returns its value, or
raises :class:`argparse.ArgumentTypeError` with a sentence saying what was
expected; argparse turns that into a usage error (exit code 2).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from gateway.policy import NAME

__all__ = [
    "LOG_LEVELS",
    "boolean",
    "count",
    "environment_name",
    "from_environment",
    "log_level",
    "port",
    "positive_seconds",
    "seconds",
    "text",
]

T = TypeVar("T")

#: The levels --log-level accepts, in any case.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Numbers as an operator writes them: int() and float() also take "1_000",
# "+5", "1e3" and digits of other scripts, which no one means in a setting.
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _invalid(what: str, value: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"not {what}: {value!r}")


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise _invalid("a boolean (1/0, true/false, yes/no)", value)


def count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A parser of whole numbers from ``minimum`` (up to ``maximum``)."""
    what = f"a whole number from {minimum}"
    if maximum is not None:
        what += f" to {maximum}"

    def parse(value: str) -> int:
        digits = value.strip(" \t")
        if _WHOLE.fullmatch(digits) is None:
            raise _invalid(what, value)
        number = int(digits)
        if number < minimum or (maximum is not None and number > maximum):
            raise _invalid(what, value)
        return number

    return parse


def port(value: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    try:
        return count(0, 65535)(value)
    except argparse.ArgumentTypeError:
        raise _invalid("a port (0 to 65535)", value) from None


def _number(value: str) -> float:
    """The decimal number ``value`` spells, else NaN (which every bound refuses)."""
    text = value.strip(" \t")
    if _DECIMAL.fullmatch(text) is None:
        return math.nan
    return float(text)


def seconds(value: str) -> float:
    """A finite duration of zero seconds or more."""
    duration = _number(value)
    if not duration >= 0:
        raise _invalid("a number of seconds, 0 or more", value)
    return duration


def positive_seconds(value: str) -> float:
    """A finite duration of more than zero seconds."""
    duration = _number(value)
    if not duration > 0:
        raise _invalid("a number of seconds, more than 0", value)
    return duration


def log_level(value: str) -> str:
    """One of LOG_LEVELS, in capitals."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise _invalid("one of " + ", ".join(LOG_LEVELS), value)
    return level


def environment_name(value: str) -> str:
    """A name as the control plane accepts one (1-63 of a-z, 0-9 and -)."""
    if NAME.fullmatch(value) is None:
        what = "a name (1 to 63 of a-z, 0-9 and -, a letter or digit at each end)"
        raise _invalid(what, value)
    return value


def text(value: str) -> str:
    """Any text but the empty one; never echoed, as it may hold a password."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def from_environment(
    environ: Mapping[str, str], variable: str, parse: Callable[[str], T]
) -> T | None:
    """The parsed value of ``variable``, None when unset.

    A bad value raises :class:`argparse.ArgumentTypeError` naming the
    variable. The caller reports it with ``parser.error`` once every flag is
    added, so that the usage line printed with it is complete.
    """
    if variable not in environ:
        return None
    try:
        return parse(environ[variable])
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{variable}: {exc}") from None
