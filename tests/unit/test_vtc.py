"""The `vtc` stage: the Virtual Token Counter between tenants, priority bands, shedding, cost per GPU."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.pipeline import PROCEED, Hold, Outcome, Refuse
from fleetserve.routing.base import EngineView, FleetView, RequestInfo
from fleetserve.tenants import FairQueueStage, Limits, Tenant, TenantDirectory

ONE_SLOT = FleetView({"e": EngineView("e", "m", gpu="a100-80g")})
_ids = iter(range(10**9))


def request(tenant: str, prompt: int = 100, output: int = 10, model: str = "m") -> RequestInfo:
    return RequestInfo(f"r{next(_ids)}", model, prompt_len=prompt, max_output_tokens=output, tenant=tenant)


def stage(*tenants: Tenant, **params: object) -> FairQueueStage:
    return FairQueueStage(slots_per_engine=1, tenants=TenantDirectory(tenants), **params)  # type: ignore[arg-type]


def finish(vtc: FairQueueStage, info: RequestInfo, output: int = 10, gpu: str = "a100-80g") -> None:
    vtc.on_finish(info, Outcome(200, info.prompt_len, output, "e", gpu), 0.0)


def drain(vtc: FairQueueStage, running: RequestInfo, outputs: dict[str, int] | None = None) -> list[str]:
    """Finish the running request, then each released one in turn; the tenants in release order."""
    order = []
    while True:
        finish(vtc, running, (outputs or {}).get(running.tenant or "", 10))
        released = vtc.release(ONE_SLOT, 0.0)
        if released is None:
            return order
        order.append(released.tenant)
        running = released


def test_a_tenant_that_floods_does_not_go_first_and_fifo_would() -> None:
    vtc = stage(Tenant("a"), Tenant("b"))
    first = request("c")
    assert vtc.admit(first, ONE_SLOT, 0.0) is PROCEED
    for tenant in ("a", "a", "a", "b"):
        assert isinstance(vtc.admit(request(tenant), ONE_SLOT, 0.0), Hold)
    assert drain(vtc, first) == ["a", "b", "a", "a"]


def test_weights_share_service_in_proportion() -> None:
    vtc = stage(Tenant("heavy", weight=3.0), Tenant("light"))
    first = request("x")
    vtc.admit(first, ONE_SLOT, 0.0)
    for _ in range(40):
        vtc.admit(request("heavy"), ONE_SLOT, 0.0)
        vtc.admit(request("light"), ONE_SLOT, 0.0)
    order = drain(vtc, first)[:40]  # while both are backlogged
    assert order.count("heavy") == 30 and order.count("light") == 10


def test_a_tenant_back_from_idle_banks_no_credit() -> None:
    vtc = stage(Tenant("busy"), Tenant("idle"))
    running = request("busy")
    vtc.admit(running, ONE_SLOT, 0.0)
    for _ in range(20):
        vtc.admit(request("busy"), ONE_SLOT, 0.0)
    for _ in range(10):  # busy alone for a while: its counter runs ahead
        finish(vtc, running)
        running = vtc.release(ONE_SLOT, 0.0)  # type: ignore[assignment]
    for _ in range(10):
        vtc.admit(request("idle"), ONE_SLOT, 0.0)
    order = drain(vtc, running)[:10]
    # lifted to busy's counter, idle alternates with busy instead of taking ten turns in a row
    assert order.count("idle") <= 6


def test_bands_share_by_band_share_and_the_low_band_is_not_starved() -> None:
    vtc = stage(Tenant("gold", priority=1), Tenant("bronze"), band_share=3.0)
    first = request("x")
    vtc.admit(first, ONE_SLOT, 0.0)
    for _ in range(40):
        vtc.admit(request("gold"), ONE_SLOT, 0.0)
        vtc.admit(request("bronze"), ONE_SLOT, 0.0)
    order = drain(vtc, first)[:40]
    assert order.count("gold") == 30 and order.count("bronze") == 10


def test_sheddable_tenants_are_refused_when_the_fleet_is_full() -> None:
    vtc = stage(Tenant("batch", priority=-1))
    assert vtc.admit(request("batch"), ONE_SLOT, 0.0) is PROCEED  # room: it goes through
    verdict = vtc.admit(request("batch"), ONE_SLOT, 0.0)
    assert isinstance(verdict, Refuse) and verdict.reason == "shed"


def test_the_wait_is_bounded_by_the_tenants_max_queue_s() -> None:
    vtc = stage(Tenant("a", limits=Limits(max_queue_s=7.0)))
    vtc.admit(request("a"), ONE_SLOT, 0.0)
    held = vtc.admit(request("a"), ONE_SLOT, 100.0)
    assert isinstance(held, Hold) and held.until == 107.0 and held.on_timeout.status == 429


def test_withdrawn_requests_leave_the_queue() -> None:
    vtc = stage(Tenant("a"))
    first, waiting = request("a"), request("a")
    vtc.admit(first, ONE_SLOT, 0.0)
    vtc.admit(waiting, ONE_SLOT, 0.0)
    vtc.withdraw(waiting)
    assert vtc.waiting == 0
    finish(vtc, first)
    assert vtc.release(ONE_SLOT, 0.0) is None


def test_gpu_seconds_charge_a_token_on_an_l4_more_than_on_an_h100() -> None:
    vtc = FairQueueStage(tenants=TenantDirectory([Tenant("a"), Tenant("b")]), charge="gpu_seconds")
    view = FleetView(
        {"l4": EngineView("l4", "llama-3-8b", "l4"), "h100": EngineView("h100", "llama-3-8b", "h100-80g")}
    )
    for tenant, gpu in (("a", "l4"), ("b", "h100-80g")):
        info = request(tenant, model="llama-3-8b")
        assert vtc.admit(info, view, 0.0) is PROCEED
        vtc.on_finish(info, Outcome(200, 100, 10, gpu, gpu), 0.0)
    assert vtc.counter("a") > 2 * vtc.counter("b") > 0
    assert vtc.counter("a") < 1.0  # seconds, not tokens


def test_service_other_replicas_charged_moves_the_counters() -> None:
    vtc = stage(Tenant("a"), Tenant("b", weight=2.0))
    first = request("a")
    vtc.admit(first, ONE_SLOT, 0.0)
    finish(vtc, first)
    assert vtc.take_service() == {"a": 120.0}  # 100 prompt tokens x1 + 10 output tokens x2
    assert vtc.take_service() == {}
    vtc.absorb({"b": 400.0})
    assert vtc.counter("b") == 200.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    tenants=st.integers(2, 5),
    steps=st.integers(20, 120),
)
def test_backlogged_tenants_stay_within_one_request_of_each_other(
    seed: int, tenants: int, steps: int
) -> None:
    """VTC's bound: while tenants stay backlogged, their counters differ by at most about the cost of one
    request (here, 2 x the largest), so every backlogged tenant is served within a bounded wait."""
    rng = random.Random(seed)
    names = [f"t{i}" for i in range(tenants)]
    vtc = stage(*(Tenant(name) for name in names))
    running = request(names[0], 10, 1)
    vtc.admit(running, ONE_SLOT, 0.0)
    largest = 0.0
    for _ in range(steps):
        for name in names:  # everyone always has work waiting
            while sum(1 for key in vtc._queues if key[1] == name and vtc._queues[key]) == 0:
                prompt, output = rng.randint(1, 300), rng.randint(1, 200)
                largest = max(largest, prompt + 2 * output)
                vtc.admit(request(name, prompt, output), ONE_SLOT, 0.0)
        finish(vtc, running, running.max_output_tokens)
        running = vtc.release(ONE_SLOT, 0.0)  # type: ignore[assignment]
        counters = [vtc.counter(name) for name in names]
        assert max(counters) - min(counters) <= 2 * largest
