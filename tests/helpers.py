"""Helpers shared by the test suites: free ports, polling with a deadline, and process liveness.

Tests synchronise by polling a condition with `wait_until`, never by sleeping a fixed time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel picks it; another process could still
    take it before the caller binds, which is rare enough on loopback for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports, for commands that take a base port."""
    for _ in range(100):
        base = free_port(host)
        if base + count <= 65535 and all(port_is_free(base + offset, host) for offset in range(1, count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Call `predicate` until it returns something truthy and return that; fail the test with
    `message` if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s: {message or predicate!r}")
        time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        interval = min(interval * 1.5, 0.25)


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process. A zombie counts as dead: it has exited, and in a container
    whose init does not reap orphans it can stay in the process table indefinitely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    state = stat[stat.rindex(")") + 2]
    return state not in "ZX"


def stop_process_group(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process's group (it was started with `start_new_session=True`), SIGKILL it if it does
    not exit within `timeout`, and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
