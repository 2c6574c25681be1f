"""Tables printed to a pipe or a file keep their width instead of wrapping at 80 columns."""

from __future__ import annotations

import io

from fleetserve.cli.console import PIPE_WIDTH, make_console


def test_a_console_writing_to_a_file_is_wide() -> None:
    console = make_console(file=io.StringIO())
    assert not console.is_terminal and console.width >= PIPE_WIDTH
