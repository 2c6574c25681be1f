"""A server started as a subprocess in its own process group, ready-checked over HTTP and always stopped.

Every router (and the emulated fleet) runs through `serving(...)`: the process group is signalled on the
way out whatever happened, so a failed readiness check, an exception in a benchmark or Ctrl-C never
leaves a router behind. SIGTERM first (routers drain and exit), SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

STOP_GRACE_S = 10.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_BYTES = 3000


class ServerFailed(RuntimeError):
    """The server exited, or did not become ready in time; the message ends with its log's tail."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: its command, extra environment and the files it needs written first."""

    name: str
    argv: Sequence[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)


ReadyCheck = Callable[[aiohttp.ClientSession, str], Awaitable[bool]]


class ManagedProcess:
    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for path, text in self.spec.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                list(self.spec.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.spec.env},
                start_new_session=True,  # its own process group: stop() reaches every child it forks
            )

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may have exited while children of its group linger (e.g. uvicorn workers).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    async def wait_ready(self, ready: ReadyCheck, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                if self.exited():
                    raise ServerFailed(f"{self.spec.name} exited during startup:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    if await ready(session, self.spec.url):
                        return
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{self.spec.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(POLL_INTERVAL_S)


@contextlib.asynccontextmanager
async def serving(
    spec: ServerSpec, log_path: Path, ready: ReadyCheck, timeout_s: float = 90.0
) -> AsyncIterator[ManagedProcess]:
    """Start `spec`, wait until `ready` holds, yield, and stop the process group on the way out."""
    process = ManagedProcess(spec, log_path)
    try:
        process.start()
        await process.wait_ready(ready, timeout_s)
        yield process
    finally:
        process.stop()


def http_ok(path: str) -> ReadyCheck:
    """Ready when GET `path` answers 200."""

    async def check(session: aiohttp.ClientSession, url: str) -> bool:
        async with session.get(url + path) as response:
            return response.status == 200

    return check


def completion_ok(model: str, path: str = "/v1/completions") -> ReadyCheck:
    """Ready when a one-token completion goes through: the router has at least one worker it routes to."""

    async def check(session: aiohttp.ClientSession, url: str) -> bool:
        body = {"model": model, "prompt": "ready?", "max_tokens": 1, "ignore_eos": True}
        async with session.post(url + path, json=body) as response:
            await response.read()
            return response.status == 200

    return check


def all_of(*checks: ReadyCheck) -> ReadyCheck:
    async def check(session: aiohttp.ClientSession, url: str) -> bool:
        for one in checks:
            if not await one(session, url):
                return False
        return True

    return check
