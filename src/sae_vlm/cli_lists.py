"""Comma-separated flag values (`--width 8,16,64`, `--latents 39,120`), parsed once for every command."""

from __future__ import annotations

from typing import Callable, TypeVar

import typer

T = TypeVar("T")


def comma_list(text: str, flag: str, cast: Callable[[str], T] = str, what: str = "values") -> tuple[T, ...]:
    """`"8, 16,64"` -> (8.0, 16.0, 64.0) with cast=float; a bad or empty list is a one-line usage error."""
    try:
        vals = tuple(cast(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not vals:
        raise typer.BadParameter(f"{flag} {text!r}: expected at least one of the {what}")
    return vals
