"""The simulation loop: trace arrivals take the same request path as in the gateway (the pipeline's
stages, then the same policy object) and are added to engine models, advanced on a virtual clock.

Engines are advanced lazily, which is what makes a million requests affordable: an engine is touched
only when a request is dispatched to it and when the fleet is synced. A sync advances every engine with
due work and refreshes the views' scraped fields (running, waiting, KV usage), every
`sync_interval_s` of simulated time: by default the gateway's scrape interval, so policies see metrics
exactly as stale as they are live. Between touches the engine model skips over runs of decode
iterations in one call. Setting `sync_interval_s=0` syncs before every arrival instead: policy hooks
and scraped fields are then exact, at the price of advancing busy engines one iteration at a time.
While a stage holds requests the fleet is advanced one engine event at a time, so a held request is
released at the moment a finish makes room, as in the gateway.

The fleet may change shape during a run: `SimOptions.fleet_script` steps (and any caller of
`Simulator.actuator`) start, drain and stop engines on the virtual clock (see `sim/actuator.py`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from fleetserve.autoscale.activator import ActivatorStage
from fleetserve.autoscale.loop import FleetAutoscaler, MetricSource
from fleetserve.autoscale.mix import GpuOption
from fleetserve.config import FleetConfig
from fleetserve.control import EngineEvent, FleetStep
from fleetserve.migration import Move, engine_load
from fleetserve.model.catalog import Catalog, UnknownEntry
from fleetserve.model.engine import RequestRejected
from fleetserve.model.types import EngineRequest, ExportedRequest, StepResult
from fleetserve.pipeline import Answer, Hold, Refuse, Refused, RequestPath, RequestSession
from fleetserve.routing import Policy, make_policy
from fleetserve.sim.actuator import SimActuator
from fleetserve.sim.autoscaling import sim_autoscaler
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.events import VirtualClock, WakeupQueue
from fleetserve.sim.fleet import SimEngine, SimFleet, build_fleet
from fleetserve.sim.metrics import SLO, RequestMetrics
from fleetserve.sim.migrations import MigrationLog
from fleetserve.sim.prompts import LazyPromptTokens
from fleetserve.sim.result import LoadSeries, SimResult, arrival_rate_over_time, build_result
from fleetserve.tenants import TenantStage
from fleetserve.workload import TraceRequest

ProgressCallback = Callable[[int, int], None]  # (requests arrived so far, total)
SERVED, ENGINE_FAILED, ENGINE_STOPPED = 200, 500, 503


@dataclass(frozen=True)
class SimOptions:
    sync_interval_s: float | None = None  # None: the fleet file's gateway.scrape_interval_s
    load_samples: int = 200  # points of the per-engine load-over-time series
    default_model: str | None = None  # for trace requests that name no model; None: the first engine's
    prompt_seed: int = 0  # seeds the tokens of prompts no other request shares
    # stop the run as soon as SLO attainment can no longer reach this (a capacity probe far past capacity
    # needs no more than that); the summary then says `stopped_early`
    give_up_below: float | None = None
    # engines started, drained and stopped during the run, at seconds after its first arrival
    fleet_script: Sequence[FleetStep] = field(default_factory=tuple)
    # where autoscaled groups' metrics come from instead of the engine models (a scripted source, to
    # replay the metrics a live run saw)
    autoscale_metrics: MetricSource | None = None
    # each `planned` group's GPU option, with its profiled capacity per length bucket
    # (`sim.profiles.planned_options`); needed when a group's autoscaler is planned
    planned_options: Mapping[str, GpuOption] | None = None


class _Live:
    """A dispatched request that has not finished."""

    __slots__ = ("engine", "index", "last_token_time", "session", "tokens")

    def __init__(self, index: int, session: RequestSession, engine: SimEngine) -> None:
        self.index = index
        self.session = session
        self.engine = engine
        self.tokens = 0
        self.last_token_time = 0.0


class Simulator:
    def __init__(
        self,
        config: FleetConfig,
        trace: Sequence[TraceRequest],
        policy: Policy,
        options: SimOptions | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config
        self.trace = sorted(trace, key=attrgetter("timestamp_ms"))
        self.policy = policy
        self.options = options = options or SimOptions()
        self.fleet: SimFleet = build_fleet(
            config,
            catalog,
            may_start_empty=any(step.action == "start" for step in options.fleet_script)
            or any(group.autoscale is not None and group.replicas == 0 for group in config.engines),
        )
        groups = {group.name for group in config.engines}
        for step in options.fleet_script:
            if step.action == "start" and step.target not in groups:
                raise SimInputError(
                    f"the fleet script starts an engine of group {step.target!r}, which the fleet file does"
                    f" not define; groups: {', '.join(sorted(groups))}"
                )
        self.slo = SLO(config.slo.ttft_ms / 1000.0, config.slo.tpot_ms / 1000.0)
        stages = config.stages(self.fleet.catalog)
        if config.tenants:  # the gateway checks these before its pipeline, against its shared ledger
            stages.insert(0, TenantStage(tenants=config.tenant_directory()))
        self.path = RequestPath(
            policy, stages, ttft_slo_ms=config.slo.ttft_ms, tpot_slo_ms=config.slo.tpot_ms
        )
        self.actuator = SimActuator(self, config.gateway.drain_timeout_s)
        self.clock = VirtualClock()
        self.metrics = RequestMetrics(len(self.trace))
        self._wakeups = WakeupQueue(len(self.fleet.engines))
        self._live: dict[str, _Live] = {}
        self._by_id = {engine.engine_id: engine for engine in self.fleet.engines}
        self._held: dict[str, tuple[int, TraceRequest]] = {}  # request id -> where it is in the trace
        self._stale: set[int] = set()  # engines advanced since their view was last refreshed
        # fleet changes due at a virtual time: (time, order, action), run before what comes later
        self._due: list[tuple[float, int, Callable[[float], None]]] = []
        self._due_order = itertools.count()
        # An engine's adapters change only when it loads one on the fly for a request that names it: until
        # such a request arrives, syncs need not compare them.
        self._adapter_requests = False
        self._step = StepResult()
        self._last_finish = -math.inf
        self._default_model = options.default_model or (
            self.fleet.engines[0].group.model if self.fleet.engines else config.engines[0].model
        )
        self._vocab_size = {engine.group.model: engine.vocab_size for engine in self.fleet.engines}
        for group in config.engines:  # models only a fleet script brings
            if group.gpu is not None and group.model not in self._vocab_size:
                with contextlib.suppress(UnknownEntry):
                    self._vocab_size[group.model] = self.fleet.catalog.model(group.model).vocab_size
        interval = (
            config.gateway.scrape_interval_s if options.sync_interval_s is None else options.sync_interval_s
        )
        self._sync_interval = max(0.0, interval)
        span = (self.trace[-1].timestamp_ms - self.trace[0].timestamp_ms) / 1000.0 if self.trace else 0.0
        self._sample_interval = max(span / max(options.load_samples, 1), self._sync_interval, 1e-3)
        self.load = LoadSeries([engine.engine_id for engine in self.fleet.engines])
        # with give_up_below: how many requests may miss the SLO before the target is out of reach
        self._allowed_misses = (
            None if options.give_up_below is None else (1.0 - options.give_up_below) * len(self.trace)
        )
        self._late = 0  # finished requests that missed the SLO
        self.stopped_early = False
        settings = config.migration
        self.migration = settings.controller()
        self._migration_interval = settings.interval_s
        self.autoscaling: FleetAutoscaler | None = None  # set up by run(), from the groups' autoscale:
        self._activator = next((stage for stage in stages if isinstance(stage, ActivatorStage)), None)
        self._next_migration = -math.inf
        self.migrations = MigrationLog()

    # -- the fleet changing shape (called by SimActuator) ------------------------------------------

    def at(self, when: float, action: Callable[[float], None]) -> None:
        """Run `action(when)` once the virtual clock reaches `when`."""
        heapq.heappush(self._due, (when, next(self._due_order), action))

    def engine_added(self, engine: SimEngine) -> None:
        self._wakeups.grow(len(self.fleet.engines))
        self._by_id[engine.engine_id] = engine
        self.load.engine_ids.append(engine.engine_id)
        self._vocab_size.setdefault(engine.group.model, engine.vocab_size)

    def engine_stopped(self, engine: SimEngine, now: float) -> None:
        """Fail the requests still on a stopped engine and stop advancing it."""
        for request_id, live in list(self._live.items()):
            if live.engine is engine:
                del self._live[request_id]
                live.session.finished(now, ENGINE_STOPPED, live.tokens)
                engine.finish(now)
                self.metrics.fail(live.index, "engine_stopped")
        self._wakeups.schedule(engine.index, None)

    def _run_due(self, until: float) -> None:
        """Fleet changes due by `until`, each at its own time."""
        due = self._due
        while due and due[0][0] <= until:
            when, _, action = heapq.heappop(due)
            when = max(when, self.clock.now)
            self.clock.advance_to(when)
            action(when)
            if self.path.held:
                self._release(when)

    # -- the run -----------------------------------------------------------------------------------

    def run(self, progress: ProgressCallback | None = None) -> SimResult:
        started = time.perf_counter()
        total = len(self.trace)
        report_every = max(total // 100, 1)
        start = self.trace[0].timestamp_ms / 1000.0 if total else 0.0
        self.clock = VirtualClock(start)
        for step in self.options.fleet_script:
            self.at(start + step.at_s, self._scripted(step))
        self.autoscaling = sim_autoscaler(
            self.config,
            self.fleet,
            self.actuator,
            self.path,
            start,
            self._catch_up,
            None if self._activator is None else self._activator.waiting,
            self.options.autoscale_metrics,
            self.options.planned_options,
        )
        if self.autoscaling is not None:
            self.at(start, self._autoscale)
        # ticks are when the fleet is synced; they also drive the load samples
        tick = self._sync_interval or self._sample_interval
        next_tick = start
        next_sample = start
        sync_each_arrival = self._sync_interval == 0.0
        for index, request in enumerate(self.trace):
            now = request.timestamp_ms / 1000.0
            if next_tick <= now and not self._wakeups and not self._due and not self.path.held:
                # an idle fleet through a gap in the trace: jump to the last tick before the arrival
                next_tick += math.floor((now - next_tick) / tick) * tick
            while next_tick <= now:
                next_sample = self._tick(next_tick, next_sample)
                next_tick += tick
            if self._due:
                self._run_due(now)
            self.clock.advance_to(now)
            if sync_each_arrival:
                self._sync(now)
            self._arrive(index, request, now)
            if progress is not None and index % report_every == 0:
                progress(index, total)
            if self._allowed_misses is not None and self._out_of_reach():
                self.stopped_early = True
                break
        # drain: keep syncing (and sampling) until every engine is idle and nothing is held
        while (self._wakeups or self.path.held) and not self.stopped_early:
            next_tick = max(next_tick, self.clock.now)
            next_sample = self._tick(next_tick, next_sample)
            next_tick += tick
            if self._allowed_misses is not None and self._out_of_reach():
                self.stopped_early = True
        for live in self._live.values():  # stuck for good, e.g. waiting for an adapter no one loads
            self.metrics.fail(live.index, "unfinished" if not self.stopped_early else "not_simulated")
        for index, _ in self._held.values():
            self.metrics.fail(index, "not_simulated" if self.stopped_early else "unfinished")
        last_arrival = self.trace[-1].timestamp_ms / 1000.0 if total else start
        end = max(self._last_finish, last_arrival)
        for engine in self.fleet.engines:
            if engine.busy_since is not None:  # only requests that never finish leave an engine busy
                engine.busy_time += end - engine.busy_since
        if progress is not None:
            progress(total, total)
        result = build_result(
            config=self.config,
            policy=self.policy.name,
            fleet=self.fleet,
            metrics=self.metrics,
            slo=self.slo,
            start=start,
            end=end,
            load=self.load,
            wall_s=time.perf_counter() - started,
            offered_rps=rate_of(self.trace),
            tenants=[request.tenant for request in self.trace],
            weights=self.config.tenant_directory().weights(),
        )
        if self.stopped_early:
            result.summary["stopped_early"] = True
        if self.migration is not None:
            result.summary.update(self.migrations.summary(self.config.migration.policy))
        if self.autoscaling is not None:
            result.summary.update(self.autoscaling.summary())
            result.summary["arrival_rate_over_time"] = arrival_rate_over_time(result.requests.arrival, start)
        return result

    def _autoscale(self, now: float) -> None:
        assert self.autoscaling is not None
        self.autoscaling.run(now)
        self.at(self.autoscaling.due(), self._autoscale)

    def _scripted(self, step: FleetStep) -> Callable[[float], None]:
        actuator = self.actuator

        def act(now: float) -> None:
            if step.action == "start":
                actuator.start(step.target, now)
            elif step.action == "drain":
                actuator.drain(step.target, now, step.timeout_s)
            else:
                actuator.stop(step.target, now)

        return act

    # -- migration (the controller is fleetserve.migration's, as live) -----------------------------

    def _migrate(self, now: float) -> None:
        assert self.migration is not None
        loads = []
        for engine in self.fleet.engines:
            if engine.state in (EngineEvent.READY, EngineEvent.DRAINING):
                self._catch_up(engine, now)
                draining = engine.state is EngineEvent.DRAINING
                loads.append(
                    engine_load(engine.engine_id, engine.group.model, engine.model, draining=draining)
                )
        for move in self.migration.decide(loads):
            self.migration.started(move)
            if move.copy is None:  # recompute: the request leaves now and is prefilled at the destination
                self._pause(move, now, 0.0)
            else:
                pause_at = now + move.copy.copy_s - move.copy.downtime_s
                self.at(pause_at, lambda when, move=move: self._pause(move, when, move.copy.downtime_s))

    def _pause(self, move: Move, now: float, downtime_s: float) -> None:
        """The last stage: the request stops on the source; it lands on the destination `downtime_s`
        later. Abandoned if it finished meanwhile or the destination has no room for it."""
        assert self.migration is not None
        source, destination = self._by_id[move.source], self._by_id[move.destination]
        live = self._live.get(move.request_id)
        if live is None or live.engine is not source or destination.state is not EngineEvent.READY:
            self.migration.ended(move.request_id)
            return
        self._catch_up(source, now)
        exported = None
        if destination.model.can_hold(move.context_tokens):
            result = self._step
            exported = source.model.export_request(move.request_id, now, result)
            if result.outputs:  # the tokens it made on the source and the source had not reported
                self._absorb(source, result)
                result.outputs.clear()
        if exported is None:
            self.migrations.aborted += 1
            self.migration.ended(move.request_id)
            return
        self._wakeups.schedule(source.index, source.model.next_event_time())
        self._stale.add(source.index)
        live.session.moved(destination.view, now)
        source.finish(now)
        destination.dispatch(now)
        live.engine = destination
        if source.state is EngineEvent.DRAINING and source.in_flight == 0:
            self.actuator.drained(source, now)
        self.at(now + downtime_s, lambda when: self._land(move, exported, live, when, downtime_s))

    def _land(
        self, move: Move, exported: ExportedRequest, live: _Live, now: float, downtime_s: float
    ) -> None:
        assert self.migration is not None
        self.migration.ended(move.request_id)
        destination = live.engine
        if destination.state is not EngineEvent.READY or live.session.info.request_id not in self._live:
            return  # the destination stopped meanwhile: engine_stopped failed the request
        self._catch_up(destination, now)
        destination.model.import_request(exported, now, with_kv=move.copy is not None)
        self._wakeups.schedule(destination.index, destination.model.next_event_time())
        self._stale.add(destination.index)
        self.migrations.record(move, downtime_s)

    def _out_of_reach(self) -> bool:
        """More requests have missed the SLO (failed, or finished late) than the target allows."""
        assert self._allowed_misses is not None
        return self._late + sum(self.metrics.failures.values()) > self._allowed_misses

    def _tick(self, now: float, next_sample: float) -> float:
        if self._due:
            self._run_due(now)
        self.clock.advance_to(max(now, self.clock.now))
        self._sync(now)
        if self.migration is not None and now >= self._next_migration:
            self._next_migration = now + self._migration_interval
            self._migrate(now)
        if now >= next_sample:
            self.load.sample(now, self.fleet.engines)
            next_sample = now + self._sample_interval
        return next_sample

    def _sync(self, now: float) -> None:
        if self.path.held:
            self._step_while_held(now)
        engines = self.fleet.engines
        for key in self._wakeups.pop_due(now):
            self._advance(engines[key], now)
        self._refresh_views()
        if self.path.held:
            self._release(now)

    def _step_while_held(self, now: float) -> None:
        """While requests are held: advance the fleet one engine event at a time up to `now`, releasing
        held requests as soon as a finish makes room, as the gateway does."""
        engines, wakeups = self.fleet.engines, self._wakeups
        while self.path.held and (when := wakeups.next_time()) <= now:
            for key in wakeups.pop_due(when):
                self._advance(engines[key], when)
            self._refresh_views()
            self._release(when)

    def _refresh_views(self) -> None:
        engines = self.fleet.engines
        adapters_changed = False
        check_adapters = self._adapter_requests
        for key in self._stale:
            adapters_changed |= engines[key].refresh_view(check_adapters)
        self._stale.clear()
        if adapters_changed:
            self.fleet.view.forget_candidates()

    def _catch_up(self, engine: SimEngine, now: float) -> None:
        """Bring the engine model up to `now` if an iteration of it has ended by then."""
        if self._wakeups.pending(engine.index) <= now:
            self._advance(engine, now)

    def _advance(self, engine: SimEngine, until: float) -> None:
        model = engine.model
        # one StepResult for every advance, emptied after use: the simulator reads only its outputs
        result = model.advance(until, self._step)
        if result.outputs:
            self._absorb(engine, result)
            result.outputs.clear()
        if result.preempted or result.kv_events:
            result.preempted.clear()
            result.kv_events.clear()
        self._wakeups.schedule(engine.index, model.next_event_time())
        self._stale.add(engine.index)

    def _arrive(self, index: int, request: TraceRequest, now: float) -> None:
        metrics = self.metrics
        metrics.arrival[index] = now
        metrics.prompt_tokens[index] = request.input_length
        model = request.model or self._default_model
        vocab_size = self._vocab_size.get(model)
        if vocab_size is None:
            metrics.fail(index, "model_not_served")
            return
        token_ids = LazyPromptTokens(request, vocab_size, index, self.options.prompt_seed)
        session = self.path.open(
            str(index),
            model,
            adapter=request.adapter,
            prompt_len=request.input_length,
            max_output_tokens=max(request.output_length, 1),
            prompt_token_ids=token_ids,
            tenant=request.tenant,
            session=request.session,
            priority=request.priority,
            arrival=now,
        )
        if self.path.stages:
            if self.path.held:
                self._release(now)
            verdict = session.admit(self.fleet.view, now)
            if isinstance(verdict, Hold):
                self._held[session.info.request_id] = (index, request)
                if self.autoscaling is not None and verdict.reason == "scale_from_zero":
                    self.autoscaling.activate(now)
                return
            if not self._admitted(index, request, session, verdict, now):
                return
        self._dispatch(index, request, session, now)

    def _admitted(
        self, index: int, request: TraceRequest, session: RequestSession, verdict: object, now: float
    ) -> bool:
        """Settle a Refuse or an Answer from a stage; True when the request goes on to routing."""
        if isinstance(verdict, Refuse):
            session.finished(now, verdict.status)
            self.metrics.fail(index, verdict.reason)
            return False
        if isinstance(verdict, Answer):
            metrics = self.metrics
            metrics.first_token[index] = metrics.finish[index] = now
            metrics.output_tokens[index] = max(request.output_length, 1)
            session.finished(now, verdict.status, max(request.output_length, 1), 0.0)
            return False
        return True

    def _release(self, now: float) -> None:
        """Held requests whose wait ran out fail; those their stage lets go on continue."""
        path = self.path
        for session, refusal in path.expired(now):
            index, _ = self._held.pop(session.info.request_id)
            session.finished(now, refusal.status)
            self.metrics.fail(index, refusal.reason)
        for session in path.release(self.fleet.view, now):
            index, request = self._held.pop(session.info.request_id)
            verdict = session.admit(self.fleet.view, now)
            if isinstance(verdict, Hold):
                self._held[session.info.request_id] = (index, request)
            elif self._admitted(index, request, session, verdict, now):
                self._dispatch(index, request, session, now)

    def _dispatch(self, index: int, request: TraceRequest, session: RequestSession, now: float) -> None:
        metrics = self.metrics
        try:
            decision = session.choose(self.fleet.view, now)
        except Refused as refused:
            session.finished(now, refused.refusal.status)
            metrics.fail(index, refused.refusal.reason)
            return
        engine = self._by_id[decision.engine_id]
        if request.adapter is not None:
            self._adapter_requests = True
        if self._wakeups.pending(engine.index) <= now:
            self._advance(engine, now)
        session.dispatched(now)
        engine.dispatch(now)
        info = session.info
        # without hash_ids no other request shares a block of this prompt (its tokens are unique to its
        # index), so the engine needs its length only
        engine_request = EngineRequest(
            info.request_id,
            info.prompt_token_ids,  # type: ignore[arg-type]  # the LazyPromptTokens of _arrive
            info.max_output_tokens,
            now,
            request.adapter,
            request.priority,
            unique_prompt=not request.hash_ids,
        )
        try:
            engine.model.add_request(engine_request, now)
        except RequestRejected:
            session.finished(now, 400)
            engine.finish(now)
            metrics.fail(index, "engine_rejected")
            return
        metrics.engine[index] = engine.index
        self._live[info.request_id] = _Live(index, session, engine)
        self._wakeups.schedule(engine.index, engine.model.next_event_time())
        self._stale.add(engine.index)

    def _absorb(self, engine: SimEngine, result: StepResult) -> None:
        """Turn an engine's token outputs into request metrics and the request path's hooks."""
        live_requests = self._live
        metrics = self.metrics
        itl = metrics.itl
        produced = 0
        # a TokenOutput is a NamedTuple: unpacking it in field order beats reading seven attributes
        for request_id, count, first, last, finished, finish_reason, cached_tokens in result.outputs:
            live = live_requests[request_id]
            if live.tokens == 0:
                metrics.first_token[live.index] = first
                metrics.cached_tokens[live.index] = cached_tokens
                live.session.first_token(first)
            else:
                itl.add(first - live.last_token_time)
            if count > 1:
                itl.add((last - first) / (count - 1), count - 1)
            live.tokens += count
            produced += count
            live.last_token_time = last
            if finished:
                del live_requests[request_id]
                failed = finish_reason in ("abort", "error")
                live.session.finished(
                    last, ENGINE_FAILED if failed else SERVED, live.tokens, last - metrics.arrival[live.index]
                )
                engine.finish(last)
                if failed:
                    metrics.fail(live.index, f"engine_{finish_reason}")
                else:
                    metrics.finish[live.index] = last
                    metrics.output_tokens[live.index] = live.tokens
                    if self._allowed_misses is not None and self._missed(live, last):
                        self._late += 1
                if last > self._last_finish:
                    self._last_finish = last
                if engine.state is EngineEvent.DRAINING and engine.in_flight == 0:
                    self.actuator.drained(engine, last)
        engine.output_tokens += produced

    def _missed(self, live: _Live, last: float) -> bool:
        first = self.metrics.first_token[live.index]
        if first - self.metrics.arrival[live.index] > self.slo.ttft_s:
            return True
        return live.tokens > 1 and (last - first) / (live.tokens - 1) > self.slo.tpot_s


def simulate(
    config: FleetConfig,
    trace: Sequence[TraceRequest],
    policy: str | Policy | None = None,
    seed: int = 0,
    *,
    params: dict | None = None,
    options: SimOptions | None = None,
    progress: ProgressCallback | None = None,
) -> SimResult:
    """Replay `trace` on the fleet `config` describes, routed by `policy` (a name, a policy object, or
    None for the fleet file's router.policy). Deterministic for a given seed."""
    if not isinstance(policy, Policy):
        name = policy or config.router.policy
        if params is None:
            params = dict(config.router.params) if name == config.router.policy else {}
        policy = make_policy(name, params, seed)
    return Simulator(config, trace, policy, options).run(progress)


def rate_of(trace: Sequence[TraceRequest]) -> float:
    """Mean arrival rate (requests/s) of a trace; inf when all requests arrive at once."""
    if len(trace) < 2:
        return math.inf
    times = [request.timestamp_ms for request in trace]
    span = (max(times) - min(times)) / 1000.0
    return (len(trace) - 1) / span if span > 0 else math.inf
