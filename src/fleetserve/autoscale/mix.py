"""The GPU mix: the cheapest fleet whose replicas carry every length bucket of a workload (Mélange).

Mélange (Griggs et al., 2024) casts GPU allocation as bin packing. The workload is cut into (input
length, output length) buckets. Each bucket's request rate is cut into `slice_factor` equal slices, and
each slice goes to exactly one GPU type. A slice of rate `r` takes `r / capacity` of one replica of that
type, where `capacity` is the highest rate one replica sustains for that bucket within the SLO. A type's
load must fit its replica count. The objective is the fleet's $/hour. Slices let one bucket be shared
between types, which is where a heterogeneous mix beats any single GPU.

Unlike the anchors, the assignment is kept: `MixPlan.routes` says which rate of each bucket goes to
which type (Mélange's `x_ij`), and the `planned` routing policy serves it.

Pure: plain numbers in, a plan out; scipy's `milp` (HiGHS) does the search.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from fleetserve.errors import InputError

DEFAULT_SLICE_FACTOR = 4
# upper edges of the length buckets (the last bucket is open). Prompts are cut finer above 1k tokens,
# where prefill time decides whether a GPU meets the TTFT objective at all: a bucket of 2k-8k prompts
# profiled as one would be judged by its 8k prompts, and lose a GPU that serves most of them in time
DEFAULT_INPUT_EDGES = (128, 512, 1024, 2048, 3072, 4096, 6144, 8192)
DEFAULT_OUTPUT_EDGES = (32, 128, 512)


class NoFeasibleMix(InputError):
    """Some bucket's traffic fits no GPU type (every type's capacity for it is 0), or the solver failed."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """Requests with `input_low <= input < input_high` and `output_low <= output < output_high`."""

    input_low: int
    input_high: int | None  # None: open
    output_low: int
    output_high: int | None

    @property
    def key(self) -> str:
        """A stable name, also the key of the `planned` policy's routes: `in:128-512,out:32-128`."""
        return f"in:{_span(self.input_low, self.input_high)},out:{_span(self.output_low, self.output_high)}"


def _span(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high}"


@dataclass(frozen=True, slots=True)
class LengthBuckets:
    """The grid of buckets given by the upper edges of input and output lengths."""

    input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES
    output_edges: tuple[int, ...] = DEFAULT_OUTPUT_EDGES

    def __post_init__(self) -> None:
        for name, edges in (("input_edges", self.input_edges), ("output_edges", self.output_edges)):
            if any(edge <= 0 for edge in edges) or list(edges) != sorted(set(edges)):
                raise InputError(f"{name} must be positive and strictly increasing, got {list(edges)}")

    def bucket_of(self, input_length: int, output_length: int) -> Bucket:
        i = bisect.bisect_right(self.input_edges, input_length)
        o = bisect.bisect_right(self.output_edges, output_length)
        return Bucket(*_bounds(self.input_edges, i), *_bounds(self.output_edges, o))

    def all(self) -> list[Bucket]:
        """Every bucket of the grid, row by row."""
        return [
            Bucket(*_bounds(self.input_edges, i), *_bounds(self.output_edges, o))
            for i in range(len(self.input_edges) + 1)
            for o in range(len(self.output_edges) + 1)
        ]

    def input_bucket_keys(self, input_length: int) -> list[str]:
        """Every bucket of the input length's row, whatever the output."""
        row = self._row(input_length)
        return [Bucket(*row, *_bounds(self.output_edges, o)).key for o in range(len(self.output_edges) + 1)]

    def row_key(self, input_length: int) -> str:
        """The input length's row as a name: `in:128-512`."""
        return f"in:{_span(*self._row(input_length))}"

    def _row(self, input_length: int) -> tuple[int, int | None]:
        return _bounds(self.input_edges, bisect.bisect_right(self.input_edges, input_length))


def _bounds(edges: Sequence[int], index: int) -> tuple[int, int | None]:
    low = edges[index - 1] if index > 0 else 0
    high = edges[index] if index < len(edges) else None
    return low, high


def option_name(gpu: str, tp: int = 1) -> str:
    """How plans and the `planned` policy name a kind of replica: the GPU, with `-tpN` above TP 1."""
    return gpu if tp == 1 else f"{gpu}-tp{tp}"


@dataclass(frozen=True, slots=True)
class GpuOption:
    """One kind of replica the fleet may use: its name (the GPU, and TP degree when above 1), its price,
    and per bucket key the highest request rate one replica sustains within the SLO (0: it cannot)."""

    name: str
    usd_per_hour: float
    capacity_rps: Mapping[str, float]
    min_replicas: int = 0
    max_replicas: int | None = None


@dataclass(frozen=True, slots=True)
class MixPlan:
    replicas: dict[str, int]  # option name -> replicas (every option, 0 included)
    routes: dict[str, dict[str, float]]  # bucket key -> option name -> request rate sent there
    usd_per_hour: float
    utilisation: dict[str, float]  # option name -> planned load over its replicas (0..1)


def solve_mix(
    demand: Mapping[str, float],
    options: Sequence[GpuOption],
    *,
    slice_factor: int = DEFAULT_SLICE_FACTOR,
    headroom: float = 1.0,
    time_limit_s: float = 60.0,
) -> MixPlan:
    """The cheapest replica counts that carry `demand` (bucket key -> requests/s) and the routes that
    fill them. `headroom` < 1 plans each replica to that fraction of its profiled capacity. A search
    that reaches `time_limit_s` answers the best mix it has found."""
    if slice_factor < 1:
        raise InputError(f"slice_factor must be >= 1, got {slice_factor}")
    if not 0 < headroom <= 1:
        raise InputError(f"headroom must be in (0, 1], got {headroom}")
    if not options:
        raise InputError("the mix needs at least one GPU type")
    buckets = [key for key, rate in demand.items() if rate > 0]
    for key in buckets:
        if not any(option.capacity_rps.get(key, 0.0) > 0 for option in options):
            raise NoFeasibleMix(
                f"no GPU type serves bucket {key} within the SLO (every profile's capacity is 0):"
                " allow a faster GPU, a higher TP degree, or a looser SLO"
            )
    n_options = len(options)
    n_assign = len(buckets) * n_options
    # variables: per (bucket, option) how many of the bucket's slices go there (slices of one bucket are
    # alike, so counting them instead of one binary per slice removes the search's symmetry), then per
    # option its replica count
    price = np.array([option.usd_per_hour for option in options])
    cost = np.concatenate([np.zeros(n_assign), price])
    lower = np.zeros(n_assign + n_options)
    upper = np.full(n_assign + n_options, float(slice_factor))
    for b, key in enumerate(buckets):
        for g, option in enumerate(options):
            if option.capacity_rps.get(key, 0.0) <= 0:
                upper[b * n_options + g] = 0.0
    for g, option in enumerate(options):
        lower[n_assign + g] = option.min_replicas
        upper[n_assign + g] = np.inf if option.max_replicas is None else option.max_replicas
    # every slice of each bucket goes somewhere
    all_slices = np.zeros((len(buckets), n_assign + n_options))
    for b in range(len(buckets)):
        all_slices[b, b * n_options : (b + 1) * n_options] = 1.0
    # each option's load (replicas' worth of its slices) fits its replicas
    fits = np.zeros((n_options, n_assign + n_options))
    for b, key in enumerate(buckets):
        for g, option in enumerate(options):
            capacity = option.capacity_rps.get(key, 0.0) * headroom
            if capacity > 0:
                fits[g, b * n_options + g] = demand[key] / slice_factor / capacity
    for g in range(n_options):
        fits[g, n_assign + g] = -1.0
    result = milp(
        cost,
        constraints=[
            LinearConstraint(all_slices, slice_factor, slice_factor),
            LinearConstraint(fits, -np.inf, 0.0),
        ],
        integrality=np.ones(n_assign + n_options),
        bounds=Bounds(lower, upper),
        options={"time_limit": time_limit_s},
    )
    if result.x is None:
        raise NoFeasibleMix(f"the integer program has no solution: {result.message}")
    chosen = np.round(result.x).astype(int)
    replicas = {option.name: int(chosen[n_assign + g]) for g, option in enumerate(options)}
    routes: dict[str, dict[str, float]] = {key: {} for key in buckets}
    load = dict.fromkeys(replicas, 0.0)
    for b, key in enumerate(buckets):
        for g, option in enumerate(options):
            count = chosen[b * n_options + g]
            if count:
                routes[key][option.name] = float(demand[key] * count / slice_factor)
                load[option.name] += float(fits[g, b * n_options + g] * count)
    utilisation = {name: load[name] / count if count else 0.0 for name, count in replicas.items()}
    usd = sum(count * option.usd_per_hour for option, count in zip(options, replicas.values(), strict=True))
    return MixPlan(replicas, routes, usd, utilisation)


def replicas_for(demand: Mapping[str, float], option: GpuOption, headroom: float = 1.0) -> int:
    """The fewest replicas of one option that carry all of `demand` (the homogeneous fleet's count;
    slices do not matter with one type). Raises NoFeasibleMix when the option cannot serve a bucket."""
    load = 0.0
    for key, rate in demand.items():
        if rate <= 0:
            continue
        capacity = option.capacity_rps.get(key, 0.0) * headroom
        if capacity <= 0:
            raise NoFeasibleMix(f"{option.name} serves no traffic of bucket {key} within the SLO")
        load += rate / capacity
    return max(option.min_replicas, math.ceil(load - 1e-9))
