"""Start engine server processes, wait until they answer, and stop them without leaving orphans.

Four guards keep a launched engine, and any worker it forks, from outliving fleetserve:

- every engine runs in its own session (and so its own process group), so `stop()` can signal the
  engine together with any workers it forked, and a Ctrl-C in the terminal reaches fleetserve only,
  which then shuts the engines down in order;
- on Linux each engine asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), which
  covers fleetserve being killed with SIGKILL or crashing before it could clean up;
- a watchdog process (`fleetserve.engines.reaper`) holds a pipe from the launcher and kills the
  engines' whole process groups when that pipe closes, which also catches the workers the
  parent-death signal does not reach;
- `stop()` sends SIGTERM to each process group, waits a grace period, then sends SIGKILL to whatever
  is left of the group before reaping the engine.

The parent-death signal fires when the *thread* that started the engine exits, so call `start` from
a thread that lives as long as the engines: the main thread or the event loop's thread (`astart`
spawns on the loop's thread and only waits for readiness off it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fleetserve.errors import FleetserveError

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000


@dataclass(frozen=True)
class EngineSpec:
    """How to start one engine server and how to tell that it is ready."""

    name: str
    argv: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    ready_path: str = "/v1/models"
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class LaunchedEngine:
    """A running engine server: where it listens, its process, and the file it logs to."""

    spec: EngineSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, self.log_path.stat().st_size - _LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")
        except OSError:
            return ""


class EngineStartError(FleetserveError, RuntimeError):
    """An engine exited or did not become ready in time; the message carries the end of its log."""


class EngineLauncher:
    """Owns a set of engine processes. Use as `with EngineLauncher(specs) as launcher:` or
    `async with ...`; `launcher.engines` lists the running engines, all stopped on exit."""

    def __init__(
        self,
        specs: Sequence[EngineSpec] = (),
        *,
        ready_timeout: float = 120.0,
        stop_grace: float = 10.0,
        log_dir: str | Path | None = None,
    ) -> None:
        self._initial_specs = tuple(specs)
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self._own_log_dir = log_dir is None
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._engines: list[LaunchedEngine] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: int | None = None

    @property
    def engines(self) -> list[LaunchedEngine]:
        return list(self._engines)

    # -- starting --------------------------------------------------------------------------------

    def start(self, specs: Sequence[EngineSpec]) -> list[LaunchedEngine]:
        """Start engines and block until every one answers its ready path. On failure, the engines
        of this call are stopped and EngineStartError says which one failed and why."""
        started = self._spawn_all(specs)
        try:
            _wait_ready(started, time.monotonic() + self.ready_timeout)
        except BaseException:
            self._stop_engines(started)
            raise
        return started

    async def astart(self, specs: Sequence[EngineSpec]) -> list[LaunchedEngine]:
        """`start` for asyncio code: spawns on the loop's thread, waits for readiness in a worker."""
        started = self._spawn_all(specs)
        try:
            await asyncio.to_thread(_wait_ready, started, time.monotonic() + self.ready_timeout)
        except BaseException:
            await asyncio.to_thread(self._stop_engines, started)
            raise
        return started

    def _spawn_all(self, specs: Sequence[EngineSpec]) -> list[LaunchedEngine]:
        started: list[LaunchedEngine] = []
        try:
            for spec in specs:
                started.append(self._spawn(spec))
        except BaseException:
            self._stop_engines(started)
            raise
        return started

    def _spawn(self, spec: EngineSpec) -> LaunchedEngine:
        log_path = self._logs() / f"{spec.name}.log"
        self._start_watchdog()
        with log_path.open("wb") as log:
            # Engines write to a file, not a pipe: nobody drains a pipe, and a full one blocks the engine.
            process = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        engine = LaunchedEngine(spec, process, log_path)
        self._engines.append(engine)
        self._tell_watchdog(f"+{process.pid}")
        return engine

    def _start_watchdog(self) -> None:
        if self._watchdog_pipe is None:
            read_end, write_end = os.pipe()
            try:
                # Its own session, so a Ctrl-C meant for fleetserve cannot take the watchdog down first.
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-m", "fleetserve.engines.reaper", str(read_end)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(read_end,),
                    start_new_session=True,
                )
            except BaseException:
                os.close(write_end)
                raise
            finally:
                os.close(read_end)
            self._watchdog_pipe = write_end

    def _tell_watchdog(self, line: str) -> None:
        # A watchdog that died leaves the parent-death signal as the guard; it must not block a stop.
        if self._watchdog_pipe is not None:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._watchdog_pipe, f"{line}\n".encode())

    def _stop_watchdog(self) -> None:
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)  # end-of-file with no group left to kill: the watchdog exits
            self._watchdog_pipe = None
        if self._watchdog is not None:
            self._watchdog.wait()
            self._watchdog = None

    def _logs(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="fleetserve-engines-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    # -- watching and stopping -------------------------------------------------------------------

    def exited(self) -> list[LaunchedEngine]:
        """Engines whose process has ended on its own since they were started."""
        return [engine for engine in self._engines if engine.process.poll() is not None]

    def stop(self) -> None:
        """Stop every engine (SIGTERM, then SIGKILL after the grace period) and remove the logs
        directory if the launcher created it."""
        self._stop_engines(list(self._engines))
        self._stop_watchdog()
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def stop_engine(self, engine: LaunchedEngine) -> None:
        """Stop one engine, e.g. when the fleet scales in."""
        self._stop_engines([engine])

    def _stop_engines(self, engines: Sequence[LaunchedEngine]) -> None:
        # Only engines still owned: a reaped engine's pid may already belong to another process.
        engines = [engine for engine in engines if engine in self._engines]
        for engine in engines:
            _signal_group(engine.process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for engine in engines:
            _wait_exited(engine.process, deadline - time.monotonic())
        for engine in engines:
            # An unreaped leader keeps its pid (the group id) from being reused; after `exited()` reaped
            # it, the kernel still keeps the id reserved while any worker of the group lives.
            _signal_group(engine.process, signal.SIGKILL)
            self._tell_watchdog(f"-{engine.pid}")
            engine.process.wait()
            self._engines.remove(engine)

    # -- context managers ------------------------------------------------------------------------

    def __enter__(self) -> EngineLauncher:
        try:
            self.start(self._initial_specs)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EngineLauncher:
        try:
            await self.astart(self._initial_specs)
        except BaseException:
            await self.astop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGKILL the child when its parent goes away."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None).prctl  # resolved before fork: the child only calls it

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _wait_exited(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to `timeout` for the process to exit, without reaping it, so its pid stays reserved."""
    if process.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        # No pidfd (not Linux, or an old kernel): fall back to waiting, which also reaps.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(timeout, 0))
        return
    try:
        select.select([pidfd], [], [], max(timeout, 0))
    finally:
        os.close(pidfd)


def _wait_ready(engines: Sequence[LaunchedEngine], deadline: float) -> None:
    pending = list(engines)
    delay = 0.05
    while pending:
        for engine in list(pending):
            if engine.process.poll() is not None:
                raise EngineStartError(
                    f"engine {engine.name} exited with code {engine.process.returncode} before it "
                    f"was ready; end of {engine.log_path}:\n{engine.log_tail()}"
                )
            if _answers(engine.url + engine.spec.ready_path):
                pending.remove(engine)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(engine.name for engine in pending)
            tails = "\n".join(f"--- {engine.name} ---\n{engine.log_tail()}" for engine in pending)
            raise EngineStartError(f"engines not ready before the deadline: {names}\n{tails}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


# Engines listen on loopback: a proxy configured in the environment must not see these probes.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    try:
        with _direct.open(url, timeout=2.0) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
