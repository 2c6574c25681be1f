"""The simulated fleet: one engine model per engine, and the views a routing policy sees of them.

A view mixes two kinds of facts, as in the gateway: `in_flight` is the router's own count and always
exact, while `running`, `waiting` and `kv_usage` are what the engine last reported; the simulator
refreshes those when it syncs the fleet, which mirrors the gateway's scrape interval.

Engines can join and leave during a run (`SimFleet.add`, `SimEngine.state`): a joining engine is
`starting` (in the view, not ready) until its cold start is over, a draining one is not ready either,
and a gone one leaves the view. Capacities are recomputed, as the gateway does, whenever the set of
engines changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.config import EngineGroup, FleetConfig
from fleetserve.control import EngineEvent
from fleetserve.model.capacity import relative_capacities
from fleetserve.model.catalog import Catalog, UnknownEntry, default_catalog
from fleetserve.model.cost import CostModel, UnsupportedParallelism
from fleetserve.model.engine import EngineModel
from fleetserve.model.scheduler import SchedulerConfig
from fleetserve.routing.base import EngineView, FleetView, RequestInfo
from fleetserve.sim.errors import SimInputError


@dataclass(eq=False)
class SimEngine:
    index: int
    engine_id: str
    group: EngineGroup
    model: EngineModel
    view: EngineView
    usd_per_hour: float  # the whole replica: GPU price times tp
    vocab_size: int
    absolute_capacity: float
    joined_at: float | None = None  # None: part of the fleet from the start
    state: EngineEvent = EngineEvent.READY
    left_at: float | None = None
    dispatched: int = 0
    busy_since: float | None = None
    busy_time: float = 0.0
    output_tokens: int = 0  # generated so far (the tokens_per_s autoscaling metric reads it)

    @property
    def in_flight(self) -> int:
        return self.view.in_flight

    def dispatch(self, now: float) -> None:
        """Count a request the request path has just dispatched here (its in-flight count is updated)."""
        self.dispatched += 1
        if self.view.in_flight == 1:
            self.busy_since = now

    def finish(self, now: float) -> None:
        """A request the request path has just finished here."""
        if self.view.in_flight == 0 and self.busy_since is not None:
            self.busy_time += now - self.busy_since
            self.busy_since = None

    def refresh_view(self, adapters_may_change: bool = True) -> bool:
        """Copy what a metrics scrape would report into the view; True when its adapters changed. Pass
        `adapters_may_change=False` to skip comparing the adapters when none can have changed."""
        model, view = self.model, self.view
        scheduler = model.scheduler
        view.running = len(scheduler.running)
        view.waiting = len(scheduler.waiting)
        view.kv_usage = model.kv.usage
        if not adapters_may_change:
            return False
        adapters = model.adapters
        if len(adapters) != len(view.adapters) or not view.adapters.issuperset(adapters):
            view.adapters = frozenset(adapters)
            return True
        return False


@dataclass(slots=True)
class SimFleetView(FleetView):
    """A fleet view that remembers each (model, adapter)'s candidates: which engines serve what changes
    only when an engine's adapters or state do, and policies ask for every request. The simulator calls
    `forget_candidates` when they change."""

    _candidates: dict[tuple[str, str | None], list[EngineView]] = field(default_factory=dict)

    def candidates(self, request: RequestInfo) -> list[EngineView]:
        key = (request.model, request.adapter)
        found = self._candidates.get(key)
        if found is None:
            found = self._candidates[key] = FleetView.candidates(self, request)
        return list(found)  # a copy: a policy may reorder what it is given

    def forget_candidates(self) -> None:
        self._candidates.clear()


@dataclass
class SimFleet:
    engines: list[SimEngine] = field(default_factory=list)  # every engine of the run, gone ones too
    view: SimFleetView = field(default_factory=lambda: SimFleetView({}))
    skipped: list[str] = field(default_factory=list)  # engines the simulator cannot model, with why
    catalog: Catalog = field(default_factory=default_catalog)

    @property
    def models(self) -> set[str]:
        return {engine.group.model for engine in self.engines}

    def add(self, engine_id: str, group: EngineGroup, joined_at: float | None = None) -> SimEngine | None:
        """Add an engine of `group`: ready at once when `joined_at` is None (the fleet at the start),
        else `starting` until the caller makes it ready. None (and a line in `skipped`) when the catalog
        cannot model it."""
        if group.gpu is None:
            self.skipped.append(f"{engine_id}: no gpu given, so no engine model")
            return None
        try:
            cost = CostModel(self.catalog.gpu(group.gpu), self.catalog.model(group.model), tp=group.tp)
        except (UnknownEntry, UnsupportedParallelism) as exc:
            self.skipped.append(f"{engine_id}: {exc}")
            return None
        # quiet reporting: a request shows up when its first token is out and when it finishes, so a
        # skip over many decode iterations costs the same however many requests are decoding
        model = EngineModel(
            cost,
            SchedulerConfig.from_args(group.engine_args),
            report_every_token=False,
            enable_kv_events=False,
        )
        for adapter in group.adapters:
            model.load_adapter(adapter, 0.0 if joined_at is None else joined_at)
        metrics = model.metrics
        view = EngineView(
            engine_id=engine_id,
            model=group.model,
            gpu=group.gpu,
            tp=group.tp,
            adapters=frozenset(model.adapters),
            ready=joined_at is None,
            max_loras=group.engine_args.max_loras,
            num_gpu_blocks=metrics.num_gpu_blocks,
            block_size=metrics.block_size,
            predictor=model.predict_ttft,
        )
        engine = SimEngine(
            index=len(self.engines),
            engine_id=engine_id,
            group=group,
            model=model,
            view=view,
            usd_per_hour=cost.gpu.usd_per_hour * group.tp,
            vocab_size=cost.model.vocab_size,
            absolute_capacity=cost.capacity_tokens_per_s,
            joined_at=joined_at,
            state=EngineEvent.READY if joined_at is None else EngineEvent.STARTING,
        )
        self.engines.append(engine)
        self.view.engines[engine_id] = view  # type: ignore[index]  # the simulator's view is a dict
        self.membership_changed()
        return engine

    def set_state(self, engine: SimEngine, state: EngineEvent, now: float) -> None:
        engine.state = state
        engine.view.ready = state is EngineEvent.READY
        if state is EngineEvent.GONE:
            engine.left_at = now
            del self.view.engines[engine.engine_id]  # type: ignore[attr-defined]
        self.membership_changed()

    def live(self) -> list[SimEngine]:
        """Engines not gone."""
        return [engine for engine in self.engines if engine.state is not EngineEvent.GONE]

    def membership_changed(self) -> None:
        """Recompute relative capacities (the slowest engine of a model may have come or gone) and the
        candidates' cache."""
        live = self.live()
        capacities = relative_capacities(
            {engine.index: (engine.group.model, engine.absolute_capacity) for engine in live}
        )
        for engine in live:
            engine.view.capacity = capacities[engine.index]
        self.view.forget_candidates()


def build_fleet(
    config: FleetConfig, catalog: Catalog | None = None, *, may_start_empty: bool = False
) -> SimFleet:
    """One EngineModel per replica whose GPU and model are in the catalog (any kind: a vLLM engine on an
    H100 is simulated like an emulated one); the others are listed in `skipped` with the reason.
    `may_start_empty`: a fleet script will start engines, so a fleet of no engines is fine."""
    fleet = SimFleet(catalog=catalog or default_catalog())
    for instance in config.instances():
        fleet.add(instance.engine_id, instance.group)
    if not fleet.engines and not may_start_empty:
        raise SimInputError("no engine of the fleet can be simulated:\n" + "\n".join(fleet.skipped))
    return fleet
