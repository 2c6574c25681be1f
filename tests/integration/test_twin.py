"""A tiny twin check: a dozen requests through `fleetserve serve -c` (gateway and emulated engines) and
through the simulator agree on TTFT and TPOT medians.

Deterministic by construction: round robin assigns requests to engines in arrival order on both sides
(no random tie-breaks, no dependence on load figures), the engines generate exactly the trace's lengths,
and a time scale of 8 makes every engine iteration last 8x its model time, so the few milliseconds of
gateway, HTTP and scheduling overhead (and CPU noise from other jobs) are small against the latencies
compared. The bound (25%) is looser than the benchmark's 10% for the same reason.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.twin_check import TwinSettings, check_twin

SETTINGS = TwinSettings(
    requests=12,
    rate=8.0,
    time_scale=8.0,
    output_tokens=(16, 48),
    fleet=(("h100", "h100-80g", 2),),
)


def test_live_and_simulated_medians_agree(tmp_path: Path) -> None:
    (run,) = check_twin(["round_robin"], SETTINGS, tmp_path, progress=lambda line: None)

    assert run.live.completed == run.live.requests == SETTINGS.requests
    assert run.sim.completed == run.sim.requests == SETTINGS.requests
    # the same engines got the same requests
    assert run.live_shares == run.sim_shares == {"h100-0": 6, "h100-1": 6}
    ttft_error, tpot_error = run.errors()
    assert ttft_error <= 0.25, (run.live.ttft_ms, run.sim.ttft_ms)
    assert tpot_error <= 0.25, (run.live.tpot_ms, run.sim.tpot_ms)


HETERO = TwinSettings(
    requests=10,
    rate=0.5,  # mostly one request at a time: the fleet is idle at most arrivals, so ties decide
    time_scale=0.5,
    output_tokens=(16, 24),
    fleet=(("h100", "h100-80g", 1), ("l4", "l4", 2)),
)


def test_live_and_simulated_fleets_break_ties_the_same_way(tmp_path: Path) -> None:
    """The decisions this project changed (ties to the fastest engine, prefix_aware's bounded load and its
    choice for a new prefix) are taken alike by the gateway and by the twin on a mixed fleet."""
    runs = check_twin(["least_request", "prefix_aware"], HETERO, tmp_path, progress=lambda line: None)
    for run in runs:
        assert run.live_shares == run.sim_shares, (run.live_shares, run.sim_shares)
        assert run.live_shares["h100"] >= 7  # an idle fleet's requests go to its fastest engine


MIGRATING = TwinSettings(
    requests=80,
    rate=80.0,  # a burst: round robin gives the L4 as many requests as the H100, and the L4 queues
    time_scale=4.0,  # the live burst is then 20 requests a second of wall time: 2 busy cores keep up
    output_tokens=(60, 120),
    fleet=(("l4", "l4", 1), ("h100", "h100-80g", 1)),
    migration=(("policy", "drain_time"), ("interval_s", 0.25)),
)


def test_live_and_simulated_fleets_migrate_alike(tmp_path: Path) -> None:
    """The same migration controller over the gateway's engine loads and over the simulator's engine
    models moves about as many requests, for the same reason, with the same latencies as a result."""
    (run,) = check_twin(["round_robin"], MIGRATING, tmp_path, progress=lambda line: None)
    assert run.live.completed == run.sim.completed == MIGRATING.requests
    assert set(run.live_migrations) == set(run.sim_migrations) == {"load"}
    live, sim = run.live_migrations["load"], run.sim_migrations["load"]
    assert sim >= 4 and abs(live - sim) <= max(2, 0.3 * sim), (live, sim)
    ttft_error, tpot_error = run.errors()
    assert ttft_error <= 0.25, (run.live.ttft_ms, run.sim.ttft_ms)
    assert tpot_error <= 0.25, (run.live.tpot_ms, run.sim.tpot_ms)


PLAN_SPANS = ("0-128", "128-512", "512-1024", "1024-2048", "2048-3072", "3072-4096", "4096-6144", "6144-8192")
PLANNED = TwinSettings(
    requests=12,
    rate=0.5,
    time_scale=0.5,
    output_tokens=(16, 24),
    fleet=(("h100", "h100-80g", 1), ("l4", "l4", 2)),
    router_params=(
        ("routes", {f"in:{span},out:0-32": {"h100-80g": 1.0, "l4": 2.0} for span in (*PLAN_SPANS, "8192+")}),
    ),
)


def test_live_and_simulated_fleets_follow_a_plan_alike(tmp_path: Path) -> None:
    """The `planned` policy (a GPU-mix plan's routes) sends the same requests to the same GPU types live
    and in the twin, in the plan's proportions: a third to the H100, two thirds to the L4s."""
    (run,) = check_twin(["planned"], PLANNED, tmp_path, progress=lambda line: None)
    # which L4 takes a request depends on whether the other one has just finished one, which a few
    # milliseconds decide; the plan's decision is the GPU type
    assert run.live_shares["h100"] == run.sim_shares["h100"], (run.live_shares, run.sim_shares)
    # the turns are kept per bucket, and the prompts fall in two buckets: a third each, rounded
    assert 3 <= run.live_shares["h100"] <= 5
    assert run.live_shares["l4-0"] + run.live_shares["l4-1"] == 12 - run.live_shares["h100"]
