"""`vtc`: fair queueing between tenants while the fleet is saturated, by the Virtual Token Counter (Sheng
et al., "Fairness in Serving Large Language Models", OSDI'24), with priority bands on top.

While the fleet has room for a model (`pipeline/saturation.py`: slots per unit of capacity) a request
goes straight through. Once it is full, requests wait here and each finish releases one, chosen in two
steps, each a VTC:

- bands: a tenant's `priority` is its band; the backlogged band with the lowest counter goes first, a
  band's counter growing by what its requests cost divided by `band_share ** priority`, so band 1 gets
  `band_share` times band 0's service under contention and band 0 is never starved (llm-d's strict
  bands starve the low ones). A band below 0 is sheddable: when its request would wait, it is refused.
- tenants within a band: the backlogged tenant with the lowest counter goes first; a tenant's counter
  grows by what its requests cost divided by its `weight`. A tenant that becomes backlogged is lifted to
  the lowest counter of the backlogged tenants (or, when none is, to the counter of the tenant served
  last), so idling banks no credit: the paper's rule, which bounds the gap between any two backlogged
  tenants' service.

What a request costs (`charge`): `tokens`, the paper's, `input_weight` per prompt token when released
and `output_weight` per output token when it ends; or, since a token on an L4 is not a token on an
H100, `gpu_seconds` (or `usd`) of the GPU that served it, from the engine model: prompt tokens at the
GPU's prefill time per token and output tokens at its decode time per token in a full batch. Those are
charged at release from the mean of the model's engines and corrected at the end for the engine that
served it; an engine the catalog cannot model is charged at the dearest known rates of its model.
A request waits at most its tenant's `max_queue_s`, then gets 429.

What VTC cannot do: a tenant whose random arrivals come close to its share of a saturated fleet is a
critically loaded queue of its own (it is served at its share when backlogged, no faster), so its
waits grow whatever the order; below its share it is served about as fast as on an idle fleet
(docs/benchmarks.md, tenant fairness). Bringing it closer would take preempting or moving the flooding
tenant's running requests, which a queue in front of the engines cannot do.

Several gateway replicas share counters through Redis: `take_service` hands out what this replica
charged since last asked, `absorb` adds what the others charged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from fleetserve.errors import InputError
from fleetserve.model.capacity import engine_cost
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.pipeline.saturation import fleet_slots
from fleetserve.pipeline.stage import PROCEED, Hold, Outcome, Refuse, Stage, Verdict
from fleetserve.routing.base import FleetView, RequestInfo
from fleetserve.tenants.directory import Tenant, TenantDirectory

Member = TypeVar("Member", bound=Hashable)
Charge = Literal["tokens", "gpu_seconds", "usd"]
CHARGES = ("tokens", "gpu_seconds", "usd")
# the point of the engine model at which a token's GPU time is read: a 1024-token prompt alone, and one
# decode step of a full batch at 1024 tokens of context, shared by its sequences
PREFILL_PROBE_TOKENS = 1024
DECODE_PROBE_BATCH = 32
DECODE_PROBE_CONTEXT = 1024


class VirtualCounters(Generic[Member]):
    """One VTC: counters of the members of a group (tenants of a band, or the bands), the backlogged
    ones, and the lift rule."""

    __slots__ = ("_last_served", "backlogged", "counters")

    def __init__(self) -> None:
        self.counters: dict[Member, float] = {}
        self.backlogged: set[Member] = set()
        self._last_served: Member | None = None

    def activate(self, member: Member) -> None:
        """`member` has a request waiting and had none: lift it so idle time banks no credit."""
        if member in self.backlogged:
            return
        counters = self.counters
        own = counters.get(member, 0.0)
        if self.backlogged:
            floor = min(counters[other] for other in self.backlogged)
        elif self._last_served is not None:
            floor = counters.get(self._last_served, 0.0)
        else:
            floor = own
        counters[member] = max(own, floor)
        self.backlogged.add(member)

    def deactivate(self, member: Member) -> None:
        self.backlogged.discard(member)

    def charge(self, member: Member, amount: float) -> None:
        self.counters[member] = self.counters.get(member, 0.0) + amount

    def served(self, member: Member) -> None:
        self._last_served = member

    def order(self) -> list[Member]:
        """The backlogged members, lowest counter first (ties by name, so runs repeat)."""
        return sorted(self.backlogged, key=lambda member: (self.counters[member], member))


@dataclass(slots=True)
class _Waiting:
    request: RequestInfo
    tenant: Tenant


class FairQueueStage(Stage):
    name = "vtc"

    def __init__(
        self,
        *,
        slots_per_engine: int = 32,
        charge: Charge = "tokens",
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        band_share: float = 4.0,
        tenants: TenantDirectory | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        if slots_per_engine < 1:
            raise InputError("slots_per_engine must be at least 1")
        if charge not in CHARGES:
            raise InputError(f"charge must be one of {', '.join(CHARGES)}, not {charge!r}")
        if not input_weight >= 0 or not output_weight >= 0:
            raise InputError("input_weight and output_weight must be >= 0")
        if not band_share >= 1:
            raise InputError("band_share must be >= 1 (1: bands share equally)")
        self.slots_per_engine = slots_per_engine
        self.charge = charge
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.band_share = band_share
        self.tenants = tenants or TenantDirectory()
        self._catalog = catalog
        self.bands: VirtualCounters[int] = VirtualCounters()
        self._members: dict[int, VirtualCounters[str]] = {}  # band -> its tenants' VTC
        self._queues: dict[tuple[int, str], deque[_Waiting]] = {}
        self._entries: dict[str, tuple[int, str]] = {}  # waiting request id -> its queue
        self._waiting_of: dict[str, int] = {}  # model -> requests waiting for it
        self._through: dict[str, int] = {}  # model -> let through, not yet finished
        self._charged: dict[str, float] = {}  # request id -> charged at release
        self._unsynced: dict[str, float] = {}  # tenant -> service charged here since take_service
        self._rates: dict[tuple[str, str, int], tuple[float, float] | None] = {}

    @property
    def waiting(self) -> int:
        return len(self._entries)

    def counter(self, tenant: str) -> float:
        """The tenant's virtual counter (service divided by weight) in its band."""
        tenant_of = self.tenants.get(tenant)
        members = self._members.get(tenant_of.priority)
        return 0.0 if members is None else members.counters.get(tenant, 0.0)

    # -- the stage -------------------------------------------------------------------------------

    def admit(self, request: RequestInfo, view: FleetView, now: float) -> Verdict:
        tenant = self.tenants.get(request.tenant)
        model = request.model
        if self._has_room(model, view) and not self._model_waits(model):
            self._let_through(request, tenant, view)
            return PROCEED
        if tenant.priority < 0:
            return Refuse(
                503,
                f"the fleet is at capacity and tenant {tenant.name}'s requests are sheddable",
                "shed",
                1.0,
            )
        band = tenant.priority
        key = (band, tenant.name)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        if not queue:
            self._activate(band, tenant.name)
        queue.append(_Waiting(request, tenant))
        self._entries[request.request_id] = key
        self._waiting_of[model] = self._waiting_of.get(model, 0) + 1
        wait = tenant.limits.max_queue_s
        timeout = Refuse(
            429,
            f"the fleet stayed at capacity for {wait:g} s while this request of tenant {tenant.name} waited",
            "queue_timeout",
            1.0,
            code="rate_limit_exceeded",
        )
        return Hold("fair_queue", now + wait, timeout)

    def release(self, view: FleetView, now: float) -> RequestInfo | None:
        if not self._entries:
            return None
        room: dict[str, bool] = {}
        for band in self.bands.order():
            members = self._members[band]
            for tenant_name in members.order():
                queue = self._queues[(band, tenant_name)]
                for position, waiting in enumerate(queue):
                    model = waiting.request.model
                    if model not in room:
                        room[model] = self._has_room(model, view)
                    if room[model]:
                        del queue[position]
                        return self._released(band, tenant_name, waiting, view)
        return None

    def withdraw(self, request: RequestInfo) -> None:
        key = self._entries.get(request.request_id)
        if key is None:
            return
        self._unqueued(request)
        queue = self._queues[key]
        for position, waiting in enumerate(queue):
            if waiting.request.request_id == request.request_id:
                del queue[position]
                break
        if not queue:
            self._deactivate(*key)

    def on_finish(self, request: RequestInfo, outcome: Outcome, now: float) -> None:
        self._through[request.model] -= 1
        charged = self._charged.pop(request.request_id, 0.0)
        if outcome.engine_id is None and not outcome.output_tokens:
            cost = 0.0  # it never reached an engine: nothing was served
        else:
            cost = self._cost(
                request.model, outcome.gpu, outcome.tp, outcome.prompt_tokens, outcome.output_tokens
            )
        self._bill(self.tenants.get(request.tenant), cost - charged)

    # -- replicas --------------------------------------------------------------------------------

    def take_service(self) -> dict[str, float]:
        """tenant -> service (before weights) charged here since the last call."""
        taken, self._unsynced = self._unsynced, {}
        return taken

    def absorb(self, remote: dict[str, float]) -> None:
        """Service other gateway replicas charged: counters follow the whole fleet's."""
        for name, amount in remote.items():
            if amount:
                self._count(self.tenants.get(name), amount)

    # -- inside ----------------------------------------------------------------------------------

    def _has_room(self, model: str, view: FleetView) -> bool:
        return self._through.get(model, 0) < fleet_slots(model, view, self.slots_per_engine)

    def _model_waits(self, model: str) -> bool:
        return self._waiting_of.get(model, 0) > 0

    def _unqueued(self, request: RequestInfo) -> None:
        del self._entries[request.request_id]
        self._waiting_of[request.model] -= 1

    def _activate(self, band: int, tenant: str) -> None:
        members = self._members.get(band)
        if members is None:
            members = self._members[band] = VirtualCounters[str]()
        if not members.backlogged:
            self.bands.activate(band)
        members.activate(tenant)

    def _deactivate(self, band: int, tenant: str) -> None:
        members = self._members[band]
        members.deactivate(tenant)
        if not members.backlogged:
            self.bands.deactivate(band)

    def _released(self, band: int, tenant_name: str, waiting: _Waiting, view: FleetView) -> RequestInfo:
        request = waiting.request
        self._unqueued(request)
        self._members[band].served(tenant_name)
        self.bands.served(band)
        if not self._queues[(band, tenant_name)]:
            self._deactivate(band, tenant_name)
        self._let_through(request, waiting.tenant, view)
        return request

    def _let_through(self, request: RequestInfo, tenant: Tenant, view: FleetView) -> None:
        self._through[request.model] = self._through.get(request.model, 0) + 1
        estimate = self._input_estimate(request, view)
        self._charged[request.request_id] = estimate
        self._bill(tenant, estimate)

    def _bill(self, tenant: Tenant, amount: float) -> None:
        if amount:
            self._count(tenant, amount)
            self._unsynced[tenant.name] = self._unsynced.get(tenant.name, 0.0) + amount

    def _count(self, tenant: Tenant, amount: float) -> None:
        band = tenant.priority
        members = self._members.get(band)
        if members is None:
            members = self._members[band] = VirtualCounters[str]()
        members.charge(tenant.name, amount / tenant.weight)
        self.bands.charge(band, amount / self.band_share**band)

    def _input_estimate(self, request: RequestInfo, view: FleetView) -> float:
        if self.charge == "tokens":
            return self.input_weight * request.prompt_len
        costs = [
            self._cost(request.model, engine.gpu, engine.tp, request.prompt_len, 0)
            for engine in view.engines.values()
            if engine.model == request.model
        ]
        return sum(costs) / len(costs) if costs else 0.0

    def _cost(self, model: str, gpu: str | None, tp: int, prompt_tokens: int, output_tokens: int) -> float:
        """What serving the tokens cost, in the stage's `charge` unit."""
        rates = None if self.charge == "tokens" else self._rates_of(model, gpu, tp)
        if rates is None:
            rates = self._fallback_rates(model)
        prefill, decode = rates
        return prefill * prompt_tokens + decode * output_tokens

    def _fallback_rates(self, model: str) -> tuple[float, float]:
        """For the token charge, and for an engine the catalog cannot model: the paper's weights when no
        engine of the model can be modelled either (one unit for all), else the dearest known rates
        of the model (an unknown GPU is not assumed cheap)."""
        known = [rates for (name, _, _), rates in self._rates.items() if name == model and rates is not None]
        if self.charge == "tokens" or not known:
            return self.input_weight, self.output_weight
        return max(rate[0] for rate in known), max(rate[1] for rate in known)

    def _rates_of(self, model: str, gpu: str | None, tp: int) -> tuple[float, float] | None:
        """(cost per prompt token, cost per output token) on the GPU, in the charge's unit."""
        key = (model, gpu or "", tp)
        if key not in self._rates:
            catalog = self._catalog or default_catalog()
            cost = engine_cost(gpu, model, tp, catalog)
            if cost is None:
                self._rates[key] = None
            else:
                prefill = cost.prefill_time(PREFILL_PROBE_TOKENS) / PREFILL_PROBE_TOKENS
                decode = cost.decode_step_time(DECODE_PROBE_CONTEXT, DECODE_PROBE_BATCH) / DECODE_PROBE_BATCH
                scale = float(tp)  # GPU-seconds: every GPU of the engine is busy
                if self.charge == "usd":
                    scale *= catalog.gpu(gpu or "").usd_per_hour / 3600.0
                self._rates[key] = (prefill * scale, decode * scale)
        return self._rates[key]
