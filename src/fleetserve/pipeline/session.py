"""The path every request takes from admission to an engine, the same under both clocks.

`RequestPath` is one per gateway or simulation: the routing policy, the pipeline's stages and the SLO.
`RequestPath.open` gives a `RequestSession` per request; its caller (the gateway with HTTP and the wall
clock, the simulator with its virtual clock) drives it through the same steps:

    session = path.open(...)                    # builds the RequestInfo policies and stages see
    verdict = session.admit(view, now)          # the stages, in order: Proceed, Hold, Answer or Refuse
    decision = session.choose(view, now)        # the policy (raises Refused when it cannot place it)
    session.dispatched(now)                     # in-flight accounting and the policy's hooks
    session.first_token(now)
    session.finished(now, status, output_tokens, latency_s)   # hooks, and every stage it passed

A held request is parked in the path; `path.release(view, now)` gives back those a stage lets go on
(the caller continues them with `admit`), `path.expired(now)` those whose wait ran out. A retry is one
more `choose`/`dispatched` after `attempt_ended`. The in-flight count lives on the `EngineView` the
policy chose from, which both callers keep for the engine's whole life.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from fleetserve.errors import FleetserveError, InternalError
from fleetserve.pipeline.stage import PROCEED, Hold, Outcome, Proceed, Refuse, Stage, Verdict
from fleetserve.routing.base import (
    Decision,
    EngineView,
    FleetView,
    NoEngineAvailable,
    Policy,
    RejectRequest,
    RequestInfo,
)


class Refused(FleetserveError):
    """The request cannot be placed; `refusal` says how to answer it."""

    def __init__(self, refusal: Refuse) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class RequestPath:
    def __init__(
        self,
        policy: Policy,
        stages: Sequence[Stage] = (),
        *,
        ttft_slo_ms: float | None = None,
        tpot_slo_ms: float | None = None,
    ) -> None:
        self.policy = policy
        self.stages = tuple(stages)
        self.ttft_slo_ms = ttft_slo_ms
        self.tpot_slo_ms = tpot_slo_ms
        self._observers: tuple[Callable[[RequestInfo], None], ...] = ()
        self._held: dict[str, RequestSession] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (until, order, request id), lazily pruned
        self._hold_order = 0

    def open(
        self,
        request_id: str,
        model: str,
        *,
        adapter: str | None = None,
        prompt_len: int = 0,
        max_output_tokens: int = 0,
        prompt_token_ids: Sequence[int] | None = None,
        tenant: str | None = None,
        session: str | None = None,
        priority: int = 0,
        arrival: float = 0.0,
        policy: Policy | None = None,
    ) -> RequestSession:
        """A session for one request; `policy` overrides the path's (the x-fleetserve-policy header)."""
        info = RequestInfo(
            request_id=request_id,
            model=model,
            adapter=adapter,
            prompt_len=prompt_len,
            max_output_tokens=max_output_tokens,
            prompt_token_ids=prompt_token_ids,
            tenant=tenant,
            session=session,
            priority=priority,
            ttft_slo_ms=self.ttft_slo_ms,
            tpot_slo_ms=self.tpot_slo_ms,
            arrival_time=arrival,
        )
        for observer in self._observers:
            observer(info)
        return RequestSession(self, info, policy or self.policy)

    def observe(self, observer: Callable[[RequestInfo], None]) -> None:
        """Call `observer` with every request opened from now on (what a planner counts as traffic)."""
        self._observers = (*self._observers, observer)

    @property
    def held(self) -> int:
        """Requests parked in a stage right now."""
        return len(self._held)

    def release(self, view: FleetView, now: float) -> list[RequestSession]:
        """Held requests their stage lets go on now, in the order it lets them; continue each with
        `admit`, which runs the stages after the one that held it."""
        released: list[RequestSession] = []
        if not self._held:
            return released
        for stage in self.stages:
            while (info := stage.release(view, now)) is not None:
                session = self._held.pop(info.request_id)
                session._hold = None
                session._stage += 1
                released.append(session)
        return released

    def expired(self, now: float) -> list[tuple[RequestSession, Refuse]]:
        """Held requests whose wait has run out by `now`, withdrawn from their stage, with the answer
        each gets."""
        out: list[tuple[RequestSession, Refuse]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, request_id = heapq.heappop(deadlines)
            session = self._held.get(request_id)
            if session is not None and session._hold is not None and session._hold.until <= now:
                refusal = session._hold.on_timeout
                self.withdraw(session)
                out.append((session, refusal))
        return out

    def next_deadline(self) -> float:
        """When the earliest held request's wait runs out; inf when none is held."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2] not in self._held:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else math.inf

    def withdraw(self, session: RequestSession) -> None:
        """A held request leaves without being released (its wait ran out, its client went away)."""
        if self._held.pop(session.info.request_id, None) is not None:
            self.stages[session._stage].withdraw(session.info)
            session._hold = None

    def _park(self, session: RequestSession, hold: Hold) -> None:
        session._hold = hold
        self._held[session.info.request_id] = session
        self._hold_order += 1
        heapq.heappush(self._deadlines, (hold.until, self._hold_order, session.info.request_id))


class RequestSession:
    """One request on its way through a `RequestPath`."""

    __slots__ = ("_attempt_open", "_ended", "_hold", "_path", "_stage", "engine", "info", "policy")

    def __init__(self, path: RequestPath, info: RequestInfo, policy: Policy) -> None:
        self.info = info
        self.policy = policy
        self.engine: EngineView | None = None  # of the current (or last) attempt
        self._path = path
        self._stage = 0  # stages before this index let the request through
        self._hold: Hold | None = None
        self._attempt_open = False
        self._ended = False

    def admit(self, view: FleetView, now: float) -> Verdict:
        """Run the stages not yet passed. A Hold parks the request in the path."""
        stages = self._path.stages
        while self._stage < len(stages):
            verdict = stages[self._stage].admit(self.info, view, now)
            if not isinstance(verdict, Proceed):
                if isinstance(verdict, Hold):
                    self._path._park(self, verdict)
                return verdict
            self._stage += 1
        return PROCEED

    def choose(self, view: FleetView, now: float) -> Decision:
        """Ask the policy for an engine of `view`; raises Refused when none can take the request."""
        policy = self.policy
        try:
            decision = policy.choose(self.info, view, now)
        except NoEngineAvailable as exc:
            raise Refused(Refuse(503, str(exc), "no_engine")) from None
        except RejectRequest as exc:
            raise Refused(Refuse(exc.status, exc.message, "rejected")) from None
        engine = view.engines.get(decision.engine_id)
        if engine is None:
            raise InternalError(
                f"policy {policy.name} chose {decision.engine_id!r}, which is not in its view"
            )
        self.engine = engine
        return decision

    def dispatched(self, now: float) -> None:
        """The request was sent to the engine `choose` picked."""
        engine = self.engine
        assert engine is not None, "dispatched before choose"
        engine.in_flight += 1
        self._attempt_open = True
        self.policy.on_dispatch(self.info, engine.engine_id, now)

    def first_token(self, now: float) -> None:
        assert self.engine is not None
        self.policy.on_first_token(self.info, self.engine.engine_id, now)

    def attempt_ended(self, now: float) -> None:
        """The current attempt is over (it failed and may be retried, or the request finished)."""
        if self._attempt_open:
            engine = self.engine
            assert engine is not None
            self._attempt_open = False
            engine.in_flight -= 1
            self.policy.on_finish(self.info, engine.engine_id, now)

    def moved(self, engine: EngineView, now: float) -> None:
        """The request goes on on another engine (it migrated): the attempt there replaces this one."""
        self.attempt_ended(now)
        self.engine = engine
        self.dispatched(now)

    def finished(self, now: float, status: int, output_tokens: int = 0, latency_s: float = math.nan) -> None:
        """The request has ended for good, served (200) or not (its error status; 499: client gone).
        Every stage it passed learns how; calling it twice changes nothing."""
        if self._ended:
            return
        self._ended = True
        self.attempt_ended(now)
        if self._hold is not None:
            self._path.withdraw(self)
        if self._stage:  # some stage let it through
            engine = self.engine
            outcome = Outcome(
                status,
                self.info.prompt_len,
                output_tokens,
                None if engine is None else engine.engine_id,
                None if engine is None else engine.gpu,
                latency_s,
                1 if engine is None else engine.tp,
            )
            for stage in self._path.stages[: self._stage]:
                stage.on_finish(self.info, outcome, now)
