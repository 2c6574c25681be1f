"""Engine `/metrics` scraping: Prometheus text in, one `EngineMetrics` snapshot out.

Each engine family names the same few figures differently (and vLLM renamed some between versions), so a
`Dialect` maps our names to theirs. The parser is a single pass over the lines that only looks at wanted
metric names: vLLM's exposition is mostly histogram buckets we do not need, and a general Prometheus
parser would spend its time on them at every scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import DIALECTS, Dialect, EngineMetrics, EngineState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sample:
    labels: dict[str, str]
    value: float


def parse_metrics(text: str, dialect: Dialect) -> EngineMetrics:
    """Parse Prometheus text exposition. Series of one metric (per model, per data-parallel rank) are
    summed, except KV usage, which is averaged because it is a fraction."""
    wanted = dialect.wanted()
    samples: dict[str, list[_Sample]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = len(line)
        for separator in ("{", " "):
            found = line.find(separator, 0, name_end)
            if found >= 0:
                name_end = found
        name = line[:name_end]
        if name not in wanted:
            continue
        sample = _parse_sample(line, name_end)
        if sample is not None:
            samples.setdefault(name, []).append(sample)

    def total(names: tuple[str, ...]) -> float | None:
        for name in names:
            if name in samples:
                return sum(s.value for s in samples[name])
        return None

    def mean(names: tuple[str, ...]) -> float | None:
        for name in names:
            if name in samples:
                return sum(s.value for s in samples[name]) / len(samples[name])
        return None

    running, waiting = total(dialect.running), total(dialect.waiting)
    block_size = num_gpu_blocks = None
    if dialect.cache_config_info and dialect.cache_config_info in samples:
        labels = samples[dialect.cache_config_info][0].labels
        block_size = _int_label(labels, "block_size")
        num_gpu_blocks = _int_label(labels, "num_gpu_blocks")
    running_adapters = waiting_adapters = frozenset[str]()
    max_loras = None
    if dialect.lora_info and dialect.lora_info in samples:
        # the gauge's value is the time it was set; the newest series is the current state
        latest = max(samples[dialect.lora_info], key=lambda s: s.value).labels
        running_adapters = _label_set(latest, "running_lora_adapters")
        waiting_adapters = _label_set(latest, "waiting_lora_adapters")
        max_loras = _int_label(latest, "max_lora")
    return EngineMetrics(
        running=None if running is None else int(running),
        waiting=None if waiting is None else int(waiting),
        kv_usage=mean(dialect.kv_usage),
        num_gpu_blocks=num_gpu_blocks,
        block_size=block_size,
        prefix_cache_queries=total(dialect.prefix_cache_queries),
        prefix_cache_hits=total(dialect.prefix_cache_hits),
        running_adapters=running_adapters,
        waiting_adapters=waiting_adapters,
        max_loras=max_loras,
        generation_tokens=total(dialect.generation_tokens),
        ttft_buckets=_buckets(
            samples.get(dialect.ttft_histogram + "_bucket", []) if dialect.ttft_histogram else []
        ),
    )


def _buckets(samples: list[_Sample]) -> tuple[tuple[float, float], ...]:
    """A cumulative histogram's buckets, series of the same `le` summed (per model, per rank)."""
    counts: dict[float, float] = {}
    for sample in samples:
        bound = sample.labels.get("le")
        if bound is not None:
            counts[float(bound)] = counts.get(float(bound), 0.0) + sample.value
    return tuple(sorted(counts.items()))


def _parse_sample(line: str, name_end: int) -> _Sample | None:
    labels: dict[str, str] = {}
    rest = line[name_end:]
    if rest.startswith("{"):
        close = _closing_brace(rest)
        if close < 0:
            return None
        labels = _parse_labels(rest[1:close])
        rest = rest[close + 1 :]
    fields = rest.split()
    if not fields:
        return None
    try:
        return _Sample(labels, float(fields[0]))
    except ValueError:
        return None


def _closing_brace(text: str) -> int:
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "}" and not in_quotes:
            return index
    return -1


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    index = 0
    while index < len(text):
        equals = text.find("=", index)
        if equals < 0 or equals + 1 >= len(text) or text[equals + 1] != '"':
            break
        key = text[index:equals].strip().lstrip(",").strip()
        value_chars: list[str] = []
        cursor = equals + 2
        while cursor < len(text) and text[cursor] != '"':
            if text[cursor] == "\\" and cursor + 1 < len(text):
                cursor += 1
                value_chars.append({"n": "\n"}.get(text[cursor], text[cursor]))
            else:
                value_chars.append(text[cursor])
            cursor += 1
        labels[key] = "".join(value_chars)
        index = cursor + 1
    return labels


def _int_label(labels: dict[str, str], key: str) -> int | None:
    try:
        return int(float(labels[key]))
    except (KeyError, ValueError):
        return None


def _label_set(labels: dict[str, str], key: str) -> frozenset[str]:
    return frozenset(part for part in labels.get(key, "").split(",") if part)


class MetricsScraper:
    """Scrapes every engine's /metrics each `interval_s`, concurrently; a failed or absent scrape leaves
    the engine's last figures in place, so engines without metrics are simply routed on in-flight counts."""

    def __init__(
        self,
        registry: EngineRegistry,
        session: aiohttp.ClientSession,
        interval_s: float,
        timeout_s: float,
        on_scrape: Callable[[EngineState, bool], None] | None = None,
    ) -> None:
        self._registry = registry
        self._session = session
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._on_scrape = on_scrape

    async def run(self) -> None:
        while True:
            engines = [e for e in self._registry.engines() if e.spec.dialect in DIALECTS]
            if engines:
                await asyncio.gather(*(self.scrape(engine) for engine in engines))
            await asyncio.sleep(self._interval_s)

    async def scrape(self, engine: EngineState) -> None:
        ok = False
        try:
            async with self._session.get(engine.url + "/metrics", timeout=self._timeout) as response:
                if response.status == 200:
                    engine.metrics = parse_metrics(await response.text(), DIALECTS[engine.spec.dialect])
                    ok = True
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            log.debug("scrape of %s failed: %r", engine.engine_id, exc)
        if self._on_scrape is not None:
            self._on_scrape(engine, ok)
