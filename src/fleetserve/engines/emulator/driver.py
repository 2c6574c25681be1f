"""Drives a pure engine model on the wall clock: the emulated engine's heartbeat.

One asyncio task per engine sleeps until the model's next event (the end of the running iteration),
advances the model to the current time and hands each request its new tokens. An arrival, an abort or
an adapter load first brings the model up to date, then acts, then wakes the task, so the model never
sees an event before the iterations that ended earlier.

Model time is wall time since the driver started, divided by `time_scale`: with time_scale 2 every
iteration takes twice as long as the model predicts. `advance` (not `step`) keeps the model on the
wall clock when the event loop is late: iterations still end at their predicted times, and tokens whose
time has passed are delivered together instead of pushing every later iteration back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from fleetserve.errors import FleetserveError, InputError
from fleetserve.model.types import EngineRequest, ExportedRequest, StepResult, TokenOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SteppableEngine(Protocol):
    """The part of `fleetserve.model.engine.EngineModel` the driver uses."""

    def add_request(self, req: EngineRequest, now: float) -> None: ...

    def abort_request(self, request_id: str, now: float) -> None: ...

    def next_event_time(self) -> float | None: ...

    def advance(self, until: float) -> StepResult: ...

    def export_request(
        self, request_id: str, now: float, result: StepResult | None = None
    ) -> ExportedRequest | None: ...


class EngineFailed(FleetserveError, RuntimeError):
    """The engine model raised; every request in flight receives this instead of tokens."""


Sink = Callable[[TokenOutput | EngineFailed], None]


class EngineDriver:
    def __init__(
        self,
        engine: SteppableEngine,
        time_scale: float = 1.0,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        if time_scale <= 0:
            raise InputError(f"time_scale must be positive, got {time_scale}")
        self.engine = engine
        self.time_scale = time_scale
        self._on_step = on_step
        self._sinks: dict[str, Sink] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._origin = 0.0
        self._task: asyncio.Task[None] | None = None
        self.failure: EngineFailed | None = None

    # clock

    def start(self) -> None:
        """Start the heartbeat; model time 0 is now. Call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._origin = self._loop.time()
        self._task = self._loop.create_task(self._run(), name="engine-driver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def now(self) -> float:
        """Current model time."""
        assert self._loop is not None, "the driver has not started"
        return (self._loop.time() - self._origin) / self.time_scale

    def to_wall_seconds(self, model_seconds: float) -> float:
        """A model duration as the client experiences it."""
        return model_seconds * self.time_scale

    # actions

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        """Add `request` (its arrival_time is overwritten with now); `sink` receives its outputs in order.
        Raises what `add_request` raises (e.g. RequestRejected) and registers nothing in that case."""
        if self.failure is not None:
            raise self.failure

        def add(now: float) -> None:
            request.arrival_time = now
            self.engine.add_request(request, now)
            self._sinks[request.request_id] = sink

        self.apply(add)

    def abort(self, request_id: str) -> None:
        """Stop generating for `request_id` and free its blocks; a finished or unknown id is a no-op."""
        if self._sinks.pop(request_id, None) is None or self.failure is not None:
            return
        self.apply(lambda now: self.engine.abort_request(request_id, now))

    def export(self, request_id: str) -> ExportedRequest | None:
        """Take a decoding request off the engine to go on elsewhere (migration): its sink first gets
        every token the engine made for it, then nothing more. None when it is not decoding here."""
        if self.failure is not None or request_id not in self._sinks:
            return None

        def take(now: float) -> ExportedRequest | None:
            unreported = StepResult()
            exported = self.engine.export_request(request_id, now, unreported)
            self._hand_out(unreported)
            if exported is not None:
                self._sinks.pop(request_id, None)
            return exported

        return self.apply(take)

    def apply(self, action: Callable[[float], T]) -> T:
        """Run `action(now)` on an up-to-date model, then let the heartbeat see what changed."""
        now = self.now()
        self._advance(now)
        result = action(now)
        self._wake.set()
        return result

    # heartbeat

    async def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            while True:
                self._wake.clear()
                next_time = self.engine.next_event_time()
                if next_time is None:
                    await self._wake.wait()
                    continue
                deadline = self._origin + next_time * self.time_scale
                if deadline > loop.time():
                    timer = loop.call_at(deadline, self._wake.set)
                    await self._wake.wait()
                    timer.cancel()
                else:
                    await asyncio.sleep(0)  # late: still let connections be served between iterations
                self._advance(self.now())
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception("engine model failed")
            self._fail(EngineFailed(f"the engine model failed: {error!r}"))

    def _advance(self, now: float) -> None:
        if self.failure is not None:
            return
        try:
            result = self.engine.advance(now)
        except Exception as error:
            logger.exception("engine model failed")
            self._fail(EngineFailed(f"the engine model failed: {error!r}"))
            return
        if self._on_step is not None and (result.outputs or result.kv_events):
            self._on_step(result)
        self._hand_out(result)

    def _hand_out(self, result: StepResult) -> None:
        sinks = self._sinks
        for output in result.outputs:
            sink = sinks.pop(output.request_id, None) if output.finished else sinks.get(output.request_id)
            if sink is not None:
                sink(output)

    def _fail(self, failure: EngineFailed) -> None:
        self.failure = failure
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(failure)
