"""Many simulations at once: policies x fleet shapes x arrival rates, on local processes or on Ray.

Each cell is an independent simulation of the same trace, so the sweep is embarrassingly parallel. The
trace is shipped to each worker once (a process-pool initializer, or one Ray object), never per cell.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from fleetserve.config import FleetConfig
from fleetserve.sim.simulator import SimOptions, rate_of, simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.transform import scale_rate


@dataclass(frozen=True)
class SweepCell:
    fleet_name: str
    config: FleetConfig
    policy: str
    rate_rps: float | None  # None: the trace's own rate
    seed: int
    options: SimOptions | None


def plan_cells(
    fleets: Sequence[tuple[str, FleetConfig]],
    policies: Sequence[str],
    rates: Sequence[float | None],
    seed: int = 0,
    options: SimOptions | None = None,
) -> list[SweepCell]:
    return [
        SweepCell(name, config, policy, rate, seed, options)
        for (name, config), policy, rate in itertools.product(fleets, policies, rates)
    ]


def run_cell(cell: SweepCell, trace: Sequence[TraceRequest]) -> dict[str, Any]:
    """One simulation; the summary without the per-engine time series, which a sweep does not plot."""
    base_rate = rate_of(trace)
    if cell.rate_rps is not None and math.isfinite(base_rate):
        trace = scale_rate(trace, cell.rate_rps / base_rate)
    summary = simulate(cell.config, trace, cell.policy, cell.seed, options=cell.options).summary
    summary.pop("load_over_time", None)
    summary["fleet_name"] = cell.fleet_name
    summary["rate_rps"] = cell.rate_rps if cell.rate_rps is not None else base_rate
    return summary


_worker_trace: Sequence[TraceRequest] = ()


def _init_worker(trace: Sequence[TraceRequest]) -> None:
    global _worker_trace
    _worker_trace = trace


def _run_in_worker(cell: SweepCell) -> dict[str, Any]:
    return run_cell(cell, _worker_trace)


CellDone = Callable[[int, int], None]  # (cells finished, total)


def run_sweep(
    cells: Sequence[SweepCell],
    trace: Sequence[TraceRequest],
    *,
    workers: int = 1,
    ray_address: str | None = None,
    on_done: CellDone | None = None,
) -> list[dict[str, Any]]:
    """Results in the order of `cells`, however the work was spread."""
    if ray_address is not None:
        return _run_on_ray(cells, trace, ray_address, on_done)
    results: list[dict[str, Any] | None] = [None] * len(cells)
    if workers <= 1:
        for position, cell in enumerate(cells):
            results[position] = run_cell(cell, trace)
            if on_done is not None:
                on_done(position + 1, len(cells))
        return [r for r in results if r is not None]
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(trace,)) as pool:
        futures = {pool.submit(_run_in_worker, cell): position for position, cell in enumerate(cells)}
        for finished, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_done is not None:
                on_done(finished, len(cells))
    return [r for r in results if r is not None]


def _run_on_ray(
    cells: Sequence[SweepCell], trace: Sequence[TraceRequest], address: str, on_done: CellDone | None
) -> list[dict[str, Any]]:
    """One Ray task per cell. `address` is what `ray.init` takes ("auto", "ray://host:10001", "local")."""
    import ray  # the `ray` extra; imported here so sweeps without --ray do not need it

    owns_connection = not ray.is_initialized()
    if owns_connection:
        ray.init(address=address, log_to_driver=False)
    try:
        remote_cell = ray.remote(run_cell)
        trace_ref = ray.put(list(trace))
        pending = {remote_cell.remote(cell, trace_ref): position for position, cell in enumerate(cells)}
        results: list[dict[str, Any] | None] = [None] * len(cells)
        finished = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                results[pending.pop(ref)] = ray.get(ref)
                finished += 1
                if on_done is not None:
                    on_done(finished, len(cells))
        return [r for r in results if r is not None]
    finally:
        if owns_connection:
            ray.shutdown()
