"""The simulation loop: trace arrivals are routed by the same policy object the gateway runs and added
to engine models, which are advanced on a virtual clock.

Engines are advanced lazily, which is what makes a million requests affordable: an engine is touched
only when a request is dispatched to it and when the fleet is synced. A sync advances every engine with
due work and refreshes the views' scraped fields (running, waiting, KV usage), every
`sync_interval_s` of simulated time: by default the gateway's scrape interval, so policies see metrics
exactly as stale as they are live. Between touches the engine model skips over runs of decode
iterations in one call. Setting `sync_interval_s=0` syncs before every arrival instead: policy hooks
and scraped fields are then exact, at the price of advancing busy engines one iteration at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from fleetserve.config import FleetConfig
from fleetserve.model.catalog import Catalog
from fleetserve.model.engine import RequestRejected
from fleetserve.model.types import EngineRequest, StepResult
from fleetserve.routing import NoEngineAvailable, Policy, RejectRequest, RequestInfo, make_policy
from fleetserve.sim.events import VirtualClock, WakeupQueue
from fleetserve.sim.fleet import SimEngine, SimFleet, build_fleet
from fleetserve.sim.metrics import SLO, RequestMetrics
from fleetserve.sim.prompts import LazyPromptTokens
from fleetserve.sim.result import LoadSeries, SimResult, build_result
from fleetserve.workload import TraceRequest

ProgressCallback = Callable[[int, int], None]  # (requests arrived so far, total)


@dataclass(frozen=True)
class SimOptions:
    sync_interval_s: float | None = None  # None: the fleet file's gateway.scrape_interval_s
    load_samples: int = 200  # points of the per-engine load-over-time series
    default_model: str | None = None  # for trace requests that name no model; None: the first engine's
    prompt_seed: int = 0  # seeds the tokens of prompts no other request shares
    # stop the run as soon as SLO attainment can no longer reach this (a capacity probe far past capacity
    # needs no more than that); the summary then says `stopped_early`
    give_up_below: float | None = None


class _Live:
    """A dispatched request that has not finished."""

    __slots__ = ("engine", "index", "info", "last_token_time", "tokens")

    def __init__(self, index: int, info: RequestInfo, engine: SimEngine) -> None:
        self.index = index
        self.info = info
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
        self.fleet: SimFleet = build_fleet(config, catalog)
        self.slo = SLO(config.slo.ttft_ms / 1000.0, config.slo.tpot_ms / 1000.0)
        self._ttft_slo_ms, self._tpot_slo_ms = config.slo.ttft_ms, config.slo.tpot_ms
        self.clock = VirtualClock()
        self.metrics = RequestMetrics(len(self.trace))
        self._wakeups = WakeupQueue(len(self.fleet.engines))
        self._live: dict[str, _Live] = {}
        self._by_id = {engine.engine_id: engine for engine in self.fleet.engines}
        self._stale: set[int] = set()  # engines advanced since their view was last refreshed
        # An engine's adapters change only when it loads one on the fly for a request that names it: until
        # such a request arrives, syncs need not compare them.
        self._adapter_requests = False
        self._step = StepResult()
        self._last_finish = -math.inf
        self._default_model = options.default_model or self.fleet.engines[0].group.model
        self._vocab_size = {engine.group.model: engine.vocab_size for engine in self.fleet.engines}
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

    def run(self, progress: ProgressCallback | None = None) -> SimResult:
        started = time.perf_counter()
        total = len(self.trace)
        report_every = max(total // 100, 1)
        start = self.trace[0].timestamp_ms / 1000.0 if total else 0.0
        self.clock = VirtualClock(start)
        # ticks are when the fleet is synced; they also drive the load samples
        tick = self._sync_interval or self._sample_interval
        next_tick = start
        next_sample = start
        sync_each_arrival = self._sync_interval == 0.0
        for index, request in enumerate(self.trace):
            now = request.timestamp_ms / 1000.0
            if next_tick <= now and not self._wakeups:
                # an idle fleet through a gap in the trace: jump to the last tick before the arrival
                next_tick += math.floor((now - next_tick) / tick) * tick
            while next_tick <= now:
                next_sample = self._tick(next_tick, next_sample)
                next_tick += tick
            self.clock.advance_to(now)
            if sync_each_arrival:
                self._sync(now)
            self._arrive(index, request, now)
            if progress is not None and index % report_every == 0:
                progress(index, total)
            if self._allowed_misses is not None and self._out_of_reach():
                self.stopped_early = True
                break
        # drain: keep syncing (and sampling) until every engine is idle
        while self._wakeups and not self.stopped_early:
            next_tick = max(next_tick, self.clock.now)
            next_sample = self._tick(next_tick, next_sample)
            next_tick += tick
            if self._allowed_misses is not None and self._out_of_reach():
                self.stopped_early = True
        for live in self._live.values():  # stuck for good, e.g. waiting for an adapter no one loads
            self.metrics.fail(live.index, "unfinished" if not self.stopped_early else "not_simulated")
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
        )
        if self.stopped_early:
            result.summary["stopped_early"] = True
        return result

    def _out_of_reach(self) -> bool:
        """More requests have missed the SLO (failed, or finished late) than the target allows."""
        assert self._allowed_misses is not None
        return self._late + sum(self.metrics.failures.values()) > self._allowed_misses

    def _tick(self, now: float, next_sample: float) -> float:
        self.clock.advance_to(max(now, self.clock.now))
        self._sync(now)
        if now >= next_sample:
            self.load.sample(now, self.fleet.engines)
            next_sample = now + self._sample_interval
        return next_sample

    def _sync(self, now: float) -> None:
        engines = self.fleet.engines
        for key in self._wakeups.pop_due(now):
            self._advance(engines[key], now)
        adapters_changed = False
        check_adapters = self._adapter_requests
        for key in self._stale:
            adapters_changed |= engines[key].refresh_view(check_adapters)
        self._stale.clear()
        if adapters_changed:
            self.fleet.view.forget_candidates()

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
        output_len = max(request.output_length, 1)
        info = RequestInfo(
            request_id=str(index),
            model=model,
            adapter=request.adapter,
            prompt_len=request.input_length,
            max_output_tokens=output_len,
            prompt_token_ids=token_ids,
            tenant=request.tenant,
            session=request.session,
            priority=request.priority,
            ttft_slo_ms=self._ttft_slo_ms,
            tpot_slo_ms=self._tpot_slo_ms,
            arrival_time=now,
        )
        try:
            decision = self.policy.choose(info, self.fleet.view, now)
        except NoEngineAvailable:
            metrics.fail(index, "no_engine")
            return
        except RejectRequest:
            metrics.fail(index, "rejected")
            return
        engine = self._by_id[decision.engine_id]
        if request.adapter is not None:
            self._adapter_requests = True
        if self._wakeups.pending(engine.index) <= now:
            self._advance(engine, now)
        self.policy.on_dispatch(info, engine.engine_id, now)
        engine.dispatch(now)
        # without hash_ids no other request shares a block of this prompt (its tokens are unique to its
        # index), so the engine needs its length only
        engine_request = EngineRequest(
            info.request_id,
            token_ids,
            output_len,
            now,
            request.adapter,
            request.priority,
            unique_prompt=not request.hash_ids,
        )
        try:
            engine.model.add_request(engine_request, now)
        except RequestRejected:
            engine.finish(now)
            self.policy.on_finish(info, engine.engine_id, now)
            metrics.fail(index, "engine_rejected")
            return
        metrics.engine[index] = engine.index
        self._live[info.request_id] = _Live(index, info, engine)
        self._wakeups.schedule(engine.index, engine.model.next_event_time())
        self._stale.add(engine.index)

    def _absorb(self, engine: SimEngine, result: StepResult) -> None:
        """Turn an engine's token outputs into request metrics and policy hooks."""
        live_requests = self._live
        metrics = self.metrics
        itl = metrics.itl
        policy = self.policy
        # a TokenOutput is a NamedTuple: unpacking it in field order beats reading seven attributes
        for request_id, count, first, last, finished, finish_reason, cached_tokens in result.outputs:
            live = live_requests[request_id]
            if live.tokens == 0:
                metrics.first_token[live.index] = first
                metrics.cached_tokens[live.index] = cached_tokens
                policy.on_first_token(live.info, engine.engine_id, first)
            else:
                itl.add(first - live.last_token_time)
            if count > 1:
                itl.add((last - first) / (count - 1), count - 1)
            live.tokens += count
            live.last_token_time = last
            if finished:
                del live_requests[request_id]
                engine.finish(last)
                policy.on_finish(live.info, engine.engine_id, last)
                if finish_reason in ("abort", "error"):
                    metrics.fail(live.index, f"engine_{finish_reason}")
                else:
                    metrics.finish[live.index] = last
                    metrics.output_tokens[live.index] = live.tokens
                    if self._allowed_misses is not None and self._missed(live, last):
                        self._late += 1
                if last > self._last_finish:
                    self._last_finish = last

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
