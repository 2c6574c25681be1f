"""The simulated fleet: one engine model per engine replica of the fleet file, and the views a routing
policy sees of them.

A view mixes two kinds of facts, as in the gateway: `in_flight` is the router's own count and always
exact, while `running`, `waiting` and `kv_usage` are what the engine last reported; the simulator
refreshes those when it syncs the fleet, which mirrors the gateway's scrape interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.config import EngineGroup, FleetConfig
from fleetserve.model.catalog import Catalog, UnknownEntry, default_catalog
from fleetserve.model.cost import CostModel
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
    in_flight: int = 0
    dispatched: int = 0
    busy_since: float | None = None
    busy_time: float = 0.0

    def dispatch(self, now: float) -> None:
        if self.in_flight == 0:
            self.busy_since = now
        self.in_flight += 1
        self.dispatched += 1
        self.view.in_flight = self.in_flight

    def finish(self, now: float) -> None:
        self.in_flight -= 1
        self.view.in_flight = self.in_flight
        if self.in_flight == 0 and self.busy_since is not None:
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
    only when an engine's adapters do (simulated engines never turn unhealthy), and policies ask for
    every request. The simulator calls `forget_candidates` when adapters change."""

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
    engines: list[SimEngine]
    view: SimFleetView
    skipped: list[str] = field(default_factory=list)  # engines the simulator cannot model, with why

    @property
    def models(self) -> set[str]:
        return {engine.group.model for engine in self.engines}


def build_fleet(config: FleetConfig, catalog: Catalog | None = None) -> SimFleet:
    """One EngineModel per replica whose GPU and model are in the catalog (any kind: a vLLM engine on an
    H100 is simulated like an emulated one); the others are listed in `skipped` with the reason."""
    catalog = catalog or default_catalog()
    built: list[tuple[str, EngineGroup, CostModel]] = []
    skipped: list[str] = []
    for instance in config.instances():
        group = instance.group
        if group.gpu is None:
            skipped.append(f"{instance.engine_id}: no gpu given, so no engine model")
            continue
        try:
            cost = CostModel(catalog.gpu(group.gpu), catalog.model(group.model), tp=group.tp)
        except UnknownEntry as exc:
            skipped.append(f"{instance.engine_id}: {exc}")
            continue
        built.append((instance.engine_id, group, cost))
    if not built:
        raise SimInputError("no engine of the fleet can be simulated:\n" + "\n".join(skipped))

    # capacity is relative, as the gateway computes it: the slowest engine of each model is 1.0
    reference: dict[str, float] = {}
    for _, group, cost in built:
        absolute = cost.capacity_tokens_per_s
        reference[group.model] = min(absolute, reference.get(group.model, absolute))
    engines: list[SimEngine] = []
    for index, (engine_id, group, cost) in enumerate(built):
        # quiet reporting: a request shows up when its first token is out and when it finishes, so a
        # skip over many decode iterations costs the same however many requests are decoding
        config_args = SchedulerConfig.from_args(group.engine_args)
        model = EngineModel(cost, config_args, report_every_token=False, enable_kv_events=False)
        for adapter in group.adapters:
            model.load_adapter(adapter, 0.0)
        metrics = model.metrics
        view = EngineView(
            engine_id=engine_id,
            model=group.model,
            gpu=group.gpu,
            tp=group.tp,
            adapters=frozenset(model.adapters),
            capacity=cost.capacity_tokens_per_s / reference[group.model],
            max_loras=group.engine_args.max_loras,
            num_gpu_blocks=metrics.num_gpu_blocks,
            block_size=metrics.block_size,
            predictor=model.predict_ttft,
        )
        engines.append(
            SimEngine(
                index=index,
                engine_id=engine_id,
                group=group,
                model=model,
                view=view,
                usd_per_hour=cost.gpu.usd_per_hour * group.tp,
                vocab_size=cost.model.vocab_size,
            )
        )
    return SimFleet(engines, SimFleetView({e.engine_id: e.view for e in engines}), skipped)
