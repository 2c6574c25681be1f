"""The rich console every command prints with."""

from __future__ import annotations

from typing import Any

from rich.console import Console

PIPE_WIDTH = 120  # rich's 80 columns, when output goes to a pipe or a file, would wrap the tables


def make_console(**options: Any) -> Console:
    """A console as wide as the terminal, or `PIPE_WIDTH` columns when the output is not a terminal."""
    console = Console(**options)
    if not console.is_terminal:
        console = Console(**options, width=max(console.width, PIPE_WIDTH))
    return console
