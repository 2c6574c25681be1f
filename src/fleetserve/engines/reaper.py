"""The launcher's watchdog: a small process that kills the engines' process groups if the launcher dies.

PR_SET_PDEATHSIG only reaches an engine's first process; engines such as vLLM and SGLang fork
workers that it does not cover. The launcher therefore starts this watchdog with the read end of a
pipe and writes `+PGID` when an engine starts and `-PGID` once it has stopped it. The pipe reaches
end-of-file when the launcher closes it or when the launcher's process ends for any reason, SIGKILL
included; the watchdog then sends SIGKILL to every group still listed, and exits.

Run as `python -m fleetserve.engines.reaper FD`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def guard(fd: int) -> None:
    groups: set[int] = set()
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            pgid = int(line[1:])
            if line.startswith(b"+"):
                groups.add(pgid)
            else:
                groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    guard(int(sys.argv[1]))
