"""GPU profiles for the mix planner: the highest request rate one replica sustains within the SLO, per
length bucket, measured by the simulator with the engine model (Mélange profiles on real GPUs; the
AIBrix GPU optimizer needs a profile someone ran, and finds none for a new GPU: aibrix#1713).

A bucket's workload is synthetic and the same for every trace: requests whose input and output lengths
are drawn log-uniformly within the bucket (an open bucket reaches 4x its lower edge, within the model's
context), arriving as a Poisson process. A probe at rate `r` replays `PROFILE_SECONDS` of it (at least
`MIN_REQUESTS` and at most `MAX_REQUESTS` requests): a fixed number of requests would arrive, at a high
rate, as one batch that any engine serves within the SLO, which says nothing about a steady state.
The capacity is the highest rate, between `MIN_RATE` and `MAX_RATE`, at which one replica meets the
target (doubling or halving from 1 req/s, then bisection to `PROFILE_TOLERANCE`). Prefix sharing is
left out, so a profile errs on the safe side for traces that share prompts; the planner's replay of the
real trace checks the plan.

Profiles are cached on disk, one JSON file per key. The key is a digest of everything the figure
depends on: the model's and the GPU's catalog entries, the TP degree, the engine arguments, the SLO, the
attainment target, the bucket, the workload's size and this module's `PROFILE_VERSION`, and
fleetserve's version (the engine model changes between versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetserve import __version__
from fleetserve.autoscale.mix import Bucket, GpuOption, option_name
from fleetserve.config import EngineGroup, FleetConfig, RouterConfig, SLOConfig
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.sim.capacity import bracket_rate
from fleetserve.sim.simulator import SimOptions, simulate
from fleetserve.workload import TraceRequest

PROFILE_VERSION = 1
PROFILE_SECONDS = 120.0
MIN_REQUESTS = 300
MAX_REQUESTS = 3000
MIN_RATE = 1 / 64  # below this a replica counts as unable to serve the bucket
MAX_RATE = 1024.0
OPEN_BUCKET_SPAN = 4  # an open bucket's workload reaches this x its lower edge
PROFILE_TOLERANCE = 0.05
MAX_PROBES = 18


def default_profile_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetserve" / "profiles"


@dataclass(frozen=True)
class ProfileRequest:
    """One measurement: a replica of `group` serving `bucket` within `slo` for `target` of requests."""

    group: EngineGroup
    bucket: Bucket
    slo: SLOConfig
    target: float

    @property
    def option(self) -> str:
        return option_name(self.group.gpu or "", self.group.tp)

    def key(self, catalog: Catalog) -> str:
        identity = {
            "version": PROFILE_VERSION,
            "fleetserve": __version__,
            "model": dataclasses.asdict(catalog.model(self.group.model)),
            "gpu": dataclasses.asdict(catalog.gpu(self.group.gpu or "")),
            "tp": self.group.tp,
            "engine_args": self.group.engine_args.model_dump(),
            "slo": self.slo.model_dump(),
            "target": self.target,
            "bucket": self.bucket.key,
            "workload": [PROFILE_SECONDS, MIN_REQUESTS, MAX_REQUESTS, MIN_RATE, MAX_RATE, PROFILE_TOLERANCE],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ProfileStore:
    """Measured capacities on disk under `directory` (created on first write); None: no cache."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.hits = 0
        self.measured = 0

    def get(self, key: str) -> float | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            record = json.loads(path.read_text())
            value = float(record["capacity_rps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: measure again
        self.hits += 1
        return value

    def put(self, key: str, record: dict[str, Any]) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.json"
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=1, sort_keys=True))
        partial.replace(path)  # a reader never sees half a file


def bucket_workload(bucket: Bucket, max_context: int, rate_rps: float) -> list[TraceRequest]:
    """A probe's synthetic requests at `rate_rps`; empty when the bucket's shortest request does not fit
    the model's context. The same lengths at every rate: only the arrival times stretch."""
    output_high = bucket.output_high or max(bucket.output_low, 1) * OPEN_BUCKET_SPAN
    output_low = max(bucket.output_low, 1)
    input_low = max(bucket.input_low, 1)
    input_high = min(bucket.input_high or input_low * OPEN_BUCKET_SPAN, max_context - output_low)
    if input_high <= input_low:
        return []
    count = min(MAX_REQUESTS, max(MIN_REQUESTS, math.ceil(rate_rps * PROFILE_SECONDS)))
    lengths = random.Random(f"{bucket.key}/lengths")
    gaps = random.Random(f"{bucket.key}/arrivals")
    requests = []
    clock_ms = 0.0
    for _ in range(count):
        clock_ms += gaps.expovariate(rate_rps) * 1000.0
        output_length = _log_uniform(lengths, output_low, output_high)
        input_length = _log_uniform(lengths, input_low, min(input_high, max_context - output_length))
        requests.append(TraceRequest(round(clock_ms, 3), input_length, output_length))
    return requests


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    if high <= low + 1:
        return low
    return min(high - 1, int(math.exp(rng.uniform(math.log(low), math.log(high)))))


def measure(request: ProfileRequest, catalog: Catalog) -> dict[str, Any]:
    """The highest rate at which one replica meets the target on the bucket's workload."""
    max_context = catalog.model(request.group.model).max_context
    if not bucket_workload(request.bucket, max_context, 1.0):
        return {"capacity_rps": 0.0, "why": "the bucket's prompts do not fit the model's context"}
    single = request.group.model_copy(update={"replicas": 1, "autoscale": None, "port": None})
    config = FleetConfig(engines=[single], slo=request.slo, router=RouterConfig(policy="least_request"))
    options = SimOptions(load_samples=0, give_up_below=request.target)
    probes: list[tuple[float, float]] = []

    def meets(rate: float) -> bool:
        workload = bucket_workload(request.bucket, max_context, rate)
        summary = simulate(config, workload, "least_request", options=options).summary
        probes.append((rate, summary["slo_attainment"]))
        return summary["slo_attainment"] >= request.target

    low, _ = bracket_rate(
        meets, 1.0, tolerance=PROFILE_TOLERANCE, max_probes=MAX_PROBES, lowest=MIN_RATE, highest=MAX_RATE
    )
    return {"capacity_rps": low or 0.0, "probes": [[r, round(a, 4)] for r, a in probes]}


def planned_options(
    config: FleetConfig,
    buckets: Iterable[Bucket],
    store: ProfileStore,
    catalog: Catalog | None = None,
    on_measured: Callable[[ProfileRequest, float, bool], None] | None = None,
    workers: int = 1,
) -> dict[str, GpuOption]:
    """Group name -> its GPU option (price, profiled capacity per bucket), for every group the `planned`
    autoscaler sizes: what `FleetConfig.autoscaled_groups` needs for them."""
    catalog = catalog or default_catalog()
    wanted = list(buckets)
    options: dict[str, GpuOption] = {}
    for group in config.planned_groups():  # one at a time: groups of two models may share a GPU type
        assert group.autoscale is not None
        target = group.autoscale.plan_target
        requests = [ProfileRequest(group, bucket, config.slo, target) for bucket in wanted]
        name = option_name(group.gpu or "", group.tp)
        capacities = profile_capacities(requests, store, catalog, on_measured, workers).get(name, {})
        options[group.name] = GpuOption(
            name, catalog.gpu(group.gpu or "").usd_per_hour * group.tp, capacities
        )
    return options


def profile_capacities(
    requests: list[ProfileRequest],
    store: ProfileStore,
    catalog: Catalog | None = None,
    on_measured: Callable[[ProfileRequest, float, bool], None] | None = None,
    workers: int = 1,
) -> dict[str, dict[str, float]]:
    """option name -> bucket key -> capacity (req/s), from the store where it has the key. `workers` > 1
    measures the missing profiles in that many forked processes (call it from a process with no threads
    running, as the CLI does before it serves)."""
    catalog = catalog or default_catalog()
    keys = [request.key(catalog) for request in requests]
    found = [store.get(key) for key in keys]
    missing = [request for request, value in zip(requests, found, strict=True) if value is None]
    measured = iter(_measure_all(missing, catalog, workers))
    capacities: dict[str, dict[str, float]] = {}
    for request, key, value in zip(requests, keys, found, strict=True):
        cached = value is not None
        if value is None:
            record = next(measured)
            record.update(option=request.option, bucket=request.bucket.key, target=request.target)
            store.put(key, record)
            store.measured += 1
            value = float(record["capacity_rps"])
        capacities.setdefault(request.option, {})[request.bucket.key] = value
        if on_measured is not None:
            on_measured(request, value, cached)
    return capacities


def _measure_all(requests: list[ProfileRequest], catalog: Catalog, workers: int) -> Iterator[dict[str, Any]]:
    """Each request's measurement, in order (lazily, so progress is reported as they come)."""
    if workers <= 1 or len(requests) <= 1:
        return (measure(request, catalog) for request in requests)
    pool = ProcessPoolExecutor(min(workers, len(requests)), mp_context=multiprocessing.get_context("fork"))

    def results() -> Iterator[dict[str, Any]]:
        with pool:
            yield from pool.map(measure, requests, [catalog] * len(requests))

    return results()
