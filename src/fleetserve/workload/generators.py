"""Seeded synthetic workloads: arrivals, length mixes, multi-turn sessions, per-tenant system prompts and
LoRA adapter popularity.

Every random stream (arrivals, turns, lengths, tenants, ...) comes from its own child of one seed, so a
spec and a seed always give the same trace, and asking for a longer trace only appends to a shorter one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fleetserve.errors import InputError
from fleetserve.workload.trace import DEFAULT_BLOCK_SIZE, TraceRequest, paused_gc

ARRIVALS = ("poisson", "gamma")
# How many mean conversation spans (think time x (turns - 1)) of conversations start before time 0.
WARMUP_SPANS = 10


class LengthDistribution(Protocol):
    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` token lengths (int64, >= 1)."""
        ...


@dataclass(frozen=True, slots=True)
class FixedLengths:
    length: int

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return np.full(count, self.length, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class UniformLengths:
    low: int
    high: int

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=count, endpoint=True, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class ZipfLengths:
    """Heavy-tailed lengths with a given mean: a rank r in 1..support drawn with P(r) ~ r^-theta, scaled
    so the mean length is `mean`. theta=1 spreads ranks evenly in log scale (median ~ mean / 4)."""

    mean: float
    theta: float = 1.0
    support: int = 1000

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        ranks = np.arange(1, self.support + 1, dtype=np.float64)
        weights = ranks**-self.theta
        probabilities = weights / weights.sum()
        scale = self.mean / float(ranks @ probabilities)
        drawn = rng.choice(ranks, size=count, p=probabilities)
        return np.maximum(1, np.rint(drawn * scale)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class EmpiricalLengths:
    """Lengths resampled (with replacement) from observed values, e.g. a real trace's prompts."""

    values: np.ndarray = field(repr=False)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return np.maximum(1, rng.choice(self.values, size=count))


def parse_length_spec(spec: str, *, side: str = "input") -> LengthDistribution:
    """Parse a length spec: ``fixed:N``, ``uniform:LOW:HIGH``, ``zipf:MEAN[:THETA]`` or ``empirical:TRACE``.

    `side` ("input" or "output") picks which lengths an empirical trace contributes.
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind == "fixed":
            return FixedLengths(_positive_int(rest))
        if kind == "uniform":
            low, high = (_positive_int(part) for part in rest.split(":"))
            if low > high:
                raise InputError(f"LOW {low} > HIGH {high}")
            return UniformLengths(low, high)
        if kind == "zipf":
            mean, _, theta = rest.partition(":")
            distribution = ZipfLengths(float(mean), float(theta) if theta else 1.0)
            if distribution.mean < 1 or distribution.theta < 0:
                raise InputError("need MEAN >= 1 and THETA >= 0")
            return distribution
        if kind == "empirical":
            return empirical_lengths(rest, side=side)
    except ValueError as error:
        raise InputError(f"bad length spec {spec!r}: {error}") from None
    raise InputError(
        f"bad length spec {spec!r}: expected fixed:N, uniform:LOW:HIGH, zipf:MEAN[:THETA] or empirical:TRACE"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise InputError(f"{value} is not >= 1")
    return value


def empirical_lengths(path: str | Path, *, side: str = "input") -> EmpiricalLengths:
    """The input (or output) lengths of any trace `read_trace` understands."""
    from fleetserve.workload.readers import read_trace

    if side not in ("input", "output"):
        raise InputError(f"side must be 'input' or 'output', not {side!r}")
    requests = read_trace(path)
    if not requests:
        raise InputError(f"trace {path} holds no requests")
    attribute = "input_length" if side == "input" else "output_length"
    return EmpiricalLengths(np.fromiter((getattr(r, attribute) for r in requests), np.int64, len(requests)))


def arrival_gaps(rng: np.random.Generator, count: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """`count` inter-arrival gaps in seconds with mean 1/rate from a Gamma(shape=burstiness) renewal
    process: CV^2 = 1/burstiness, so 1 is Poisson, below 1 burstier, above 1 smoother."""
    if rate <= 0 or burstiness <= 0:
        raise InputError("rate and burstiness must be > 0")
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=count)


def diurnal_times(times: np.ndarray, peak_to_trough: float, period_s: float) -> np.ndarray:
    """Arrival times of a constant-rate process (negative ones, before the trace, unchanged) moved so
    that the rate follows mean x (1 - a cos(2 pi t / period)), a = (P - 1) / (P + 1): a trough at 0 and
    every period, a peak P times higher half a period later, the same mean (time rescaling: t is the
    inverse of the cumulative rate t - a period / (2 pi) sin(2 pi t / period) at the given time)."""
    if peak_to_trough == 1 or not times.size or times.max() <= 0:
        return times
    swing = (peak_to_trough - 1) / (peak_to_trough + 1)
    end = float(times.max()) + period_s
    clock = np.linspace(0.0, end, max(2, int(4096 * end / period_s)))
    cumulative = clock - swing * period_s / (2 * math.pi) * np.sin(2 * math.pi * clock / period_s)
    return np.where(times > 0, np.interp(times, cumulative, clock), times)


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    """Popularity of items 0..count-1: P(i) ~ (i+1)^-exponent (0 is uniform)."""
    weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to generate. `rate` is requests per second; give exactly one of `num_requests`, `duration_s`."""

    rate: float
    num_requests: int | None = None
    duration_s: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    # a day's rhythm: the arrival rate swings between a trough at 0 (and every period) and a peak
    # `diurnal` times higher half a period later, around the same mean `rate`; 1 is flat
    diurnal: float = 1.0
    period_s: float = 86400.0
    input_lengths: LengthDistribution = ZipfLengths(1024)
    output_lengths: LengthDistribution = ZipfLengths(256)
    max_input_length: int = 131072
    max_output_length: int = 16384
    # Mean turns per session (geometric); 1 makes every request its own single-turn conversation.
    turns: float = 1.0
    think_time_s: float = 30.0
    tenants: int = 0
    tenant_zipf: float = 0.0
    # relative request rates of tenant-0, tenant-1, ... (one tenant flooding: 10, 1, 1); replaces Zipf
    tenant_shares: Sequence[float] = ()
    system_prompt_tokens: int = 0
    adapters: int = 0
    adapter_zipf: float = 1.0
    adapter_fraction: float = 1.0
    adapter_prefix: str = "lora-"
    models: Sequence[tuple[str, float]] = ()
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: int = 0

    def validate(self) -> None:
        if (self.num_requests is None) == (self.duration_s is None):
            raise InputError("give exactly one of num_requests and duration_s")
        if self.num_requests is not None and self.num_requests < 0:
            raise InputError("num_requests must be >= 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise InputError("duration_s must be > 0")
        if self.arrival not in ARRIVALS:
            raise InputError(f"arrival must be one of {ARRIVALS}, not {self.arrival!r}")
        if self.arrival == "poisson" and self.burstiness != 1.0:
            raise InputError("burstiness applies to gamma arrivals; poisson is burstiness 1")
        if self.rate <= 0 or self.burstiness <= 0:
            raise InputError("rate and burstiness must be > 0")
        if self.diurnal < 1 or self.period_s <= 0:
            raise InputError("diurnal (peak-to-trough ratio) must be >= 1 and period_s > 0")
        if self.turns < 1 or self.think_time_s < 0:
            raise InputError("turns must be >= 1 and think_time_s >= 0")
        if self.tenants < 0 or self.adapters < 0 or self.system_prompt_tokens < 0:
            raise InputError("tenants, adapters and system_prompt_tokens must be >= 0")
        if self.tenant_shares and len(self.tenant_shares) != self.tenants:
            raise InputError(f"{len(self.tenant_shares)} tenant shares for {self.tenants} tenants")
        if any(not share > 0 for share in self.tenant_shares):
            raise InputError("tenant shares must be > 0")
        if self.system_prompt_tokens and not self.tenants:
            raise InputError("a system prompt is shared per tenant: set tenants >= 1")
        if not 0 <= self.adapter_fraction <= 1:
            raise InputError("adapter_fraction must be within [0, 1]")
        if self.block_size < 1 or self.max_input_length < 1 or self.max_output_length < 1:
            raise InputError("block_size and the maximum lengths must be >= 1")
        if any(weight <= 0 for _, weight in self.models):
            raise InputError("model weights must be > 0")


def generate(spec: WorkloadSpec) -> list[TraceRequest]:
    """The trace `spec` describes, ordered by timestamp."""
    spec.validate()
    if spec.duration_s is not None:
        return _generate_window(spec, spec.duration_s)
    wanted = spec.num_requests or 0
    if wanted == 0:
        return []
    # A window cut at `horizon` is complete (no later session can add a turn before it), so grow the
    # window until it holds enough requests and keep the earliest.
    horizon = (wanted + 4 * math.sqrt(wanted) + 16) / spec.rate
    while True:
        requests = _generate_window(spec, horizon)
        if len(requests) >= wanted:
            return requests[:wanted]
        horizon *= 1.5


@dataclass(slots=True)
class _Streams:
    arrivals: np.random.Generator
    turns: np.random.Generator
    think: np.random.Generator
    inputs: np.random.Generator
    outputs: np.random.Generator
    tenants: np.random.Generator
    adapters: np.random.Generator
    models: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> _Streams:
        children = np.random.SeedSequence(seed).spawn(8)
        return cls(*(np.random.default_rng(child) for child in children))


def _session_starts(spec: WorkloadSpec, rng: np.random.Generator, horizon_s: float) -> np.ndarray:
    session_rate = spec.rate / spec.turns
    burstiness = spec.burstiness if spec.arrival == "gamma" else 1.0
    expected = session_rate * horizon_s
    count = int(expected + 6 * math.sqrt(expected / burstiness) + 16)
    while True:
        starts = np.cumsum(arrival_gaps(rng, count, session_rate, burstiness))
        if starts[-1] >= horizon_s:
            return starts[starts < horizon_s]
        count *= 2


def _generate_window(spec: WorkloadSpec, horizon_s: float) -> list[TraceRequest]:
    with paused_gc():
        return _build_window(spec, horizon_s)


def _build_window(spec: WorkloadSpec, horizon_s: float) -> list[TraceRequest]:
    streams = _Streams.from_seed(spec.seed)
    # Conversations start before time 0 too, so the trace opens in steady state (sessions already under
    # way, full request rate) rather than ramping up while the first conversations reach later turns.
    warmup_s = WARMUP_SPANS * spec.think_time_s * (spec.turns - 1)
    starts = diurnal_times(
        _session_starts(spec, streams.arrivals, warmup_s + horizon_s) - warmup_s, spec.diurnal, spec.period_s
    )
    starts = starts[starts < horizon_s].tolist()
    sessions = len(starts)
    if spec.turns > 1:
        turn_counts = streams.turns.geometric(1.0 / spec.turns, size=sessions).tolist()
    else:
        turn_counts = [1] * sessions
    total_turns = sum(turn_counts)
    think_gaps = (
        streams.think.exponential(spec.think_time_s, size=total_turns).tolist()
        if spec.think_time_s
        else [0.0] * total_turns
    )
    message_lengths = np.minimum(
        spec.input_lengths.sample(streams.inputs, total_turns), spec.max_input_length
    )
    output_lengths = np.minimum(
        spec.output_lengths.sample(streams.outputs, total_turns), spec.max_output_length
    )
    messages = message_lengths.tolist()
    answers = output_lengths.tolist()
    tenant_of, adapter_of, model_of = _session_labels(spec, streams, sessions)
    session_names = [f"session-{session}" for session in range(sessions)] if spec.turns > 1 else None
    block_size = spec.block_size
    system_blocks = spec.system_prompt_tokens // block_size
    next_block = 0
    tenant_prefix: dict[str, tuple[int, ...]] = {}
    requests: list[TraceRequest] = []
    turn_index = 0
    for session in range(sessions):
        tenant = tenant_of[session]
        hash_ids: tuple[int, ...] = ()
        context_length = 0
        if tenant is not None:
            if tenant not in tenant_prefix:
                tenant_prefix[tenant] = tuple(range(next_block, next_block + system_blocks))
                next_block += system_blocks
            hash_ids = tenant_prefix[tenant]
            context_length = spec.system_prompt_tokens
        session_name = session_names[session] if session_names is not None else None
        timestamp_s = starts[session]
        for turn in range(turn_counts[session]):
            index = turn_index + turn
            if turn > 0:
                timestamp_s += think_gaps[index]
            input_length = context_length + messages[index]
            # A conversation ends when it no longer fits the context window, as chat front ends do.
            if timestamp_s >= horizon_s or input_length > spec.max_input_length:
                break
            new_blocks = -(-input_length // block_size) - len(hash_ids)
            hash_ids += tuple(range(next_block, next_block + new_blocks))
            next_block += new_blocks
            output_length = answers[index]
            # The next turn's prompt is this prompt, the answer, then the next user message.
            context_length = input_length + output_length
            if timestamp_s < 0:
                continue
            requests.append(
                TraceRequest(
                    timestamp_s * 1000.0,
                    input_length,
                    output_length,
                    hash_ids,
                    block_size,
                    model_of[session],
                    adapter_of[session],
                    tenant,
                    session_name,
                )
            )
        turn_index += turn_counts[session]
    if spec.turns > 1:
        # Later turns of early sessions interleave with later sessions.
        requests.sort(key=lambda request: request.timestamp_ms)
    return requests


def _session_labels(
    spec: WorkloadSpec, streams: _Streams, sessions: int
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Each session's tenant, adapter and model names (None where the spec asks for none)."""
    if spec.tenant_shares:
        shares = np.asarray(spec.tenant_shares, dtype=np.float64)
        tenant_index = streams.tenants.choice(spec.tenants, size=sessions, p=shares / shares.sum())
    else:
        tenant_index = _popularity_draws(streams.tenants, sessions, spec.tenants, spec.tenant_zipf)
    adapter_index = _popularity_draws(streams.adapters, sessions, spec.adapters, spec.adapter_zipf)
    if spec.adapters and spec.adapter_fraction < 1:
        adapter_index[streams.adapters.random(sessions) >= spec.adapter_fraction] = -1
    tenant_names = [f"tenant-{i}" for i in range(spec.tenants)]
    adapter_names = [f"{spec.adapter_prefix}{i}" for i in range(spec.adapters)]
    tenants = [tenant_names[i] if i >= 0 else None for i in tenant_index.tolist()]
    adapters = [adapter_names[i] if i >= 0 else None for i in adapter_index.tolist()]
    if not spec.models:
        return tenants, adapters, [None] * sessions
    names = [name for name, _ in spec.models]
    weights = np.array([weight for _, weight in spec.models], dtype=np.float64)
    model_index = streams.models.choice(len(names), size=sessions, p=weights / weights.sum())
    return tenants, adapters, [names[i] for i in model_index.tolist()]


def _popularity_draws(rng: np.random.Generator, count: int, population: int, exponent: float) -> np.ndarray:
    """Index of each of `count` sessions' label in 0..population-1 (Zipf popularity), -1 when unlabelled."""
    if population == 0:
        return np.full(count, -1, dtype=np.int64)
    return rng.choice(population, size=count, p=zipf_weights(population, exponent))
