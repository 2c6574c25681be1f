"""One emulated engine: the engine model on the wall clock, with what it serves (model, adapters) and
its metrics. `EmulatedEngine(spec)` builds the engine model from the catalogs, the driver, the metrics
registry and (optionally) the KV-event publisher; `.app` is its ASGI application (`routes.py`). Start
it with `await engine.start()` inside the event loop that serves `.app`, and stop it with
`await engine.stop()`.

The rooms of the emulator: this wiring; `routes.py` (the OpenAI endpoints and the one error handler);
`compat.py` (what vLLM and SGLang serve besides the OpenAI API); `migration.py` (a request's state out
to another engine and in from one); `generation.py` (an answer's length,
text and stream); `driver.py` (the engine model on the wall clock); `text.py` and `structured.py`
(what the answer says); `metrics.py` and `kv_events.py` (what the engine reports).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fleetserve.config import EngineArgs
from fleetserve.engines.emulator.driver import EngineDriver
from fleetserve.engines.emulator.generation import Generation
from fleetserve.engines.emulator.kv_events import EventFormat, KVEventPublisher
from fleetserve.engines.emulator.metrics import CacheConfig, EmulatorMetrics, EngineState
from fleetserve.engines.emulator.routes import build_app
from fleetserve.engines.emulator.text import Vocabulary
from fleetserve.errors import InputError
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel, SchedulerConfig
from fleetserve.model.types import StepResult
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.tokenizer import load_tokenizer

DEFAULT_NATURAL_OUTPUT_MEDIAN = 128.0


@dataclass(frozen=True)
class KVEventsSpec:
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    event_format: EventFormat = "array"


@dataclass(frozen=True)
class EmulatorSpec:
    """Everything that defines one emulated engine (the CLI flags, or one replica of a fleet file)."""

    gpu: str
    model: str
    tp: int = 1
    engine_id: str | None = None
    served_model_name: str | None = None
    engine_args: EngineArgs = field(default_factory=EngineArgs)
    time_scale: float = 1.0
    stream_interval: int = 1
    max_model_len: int | None = None
    tokenizer_file: str | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    kv_events: KVEventsSpec | None = None
    natural_output_median: float = DEFAULT_NATURAL_OUTPUT_MEDIAN
    catalog_file: str | None = None


class EmulatedEngine:
    def __init__(self, spec: EmulatorSpec, catalog: Catalog | None = None) -> None:
        if spec.stream_interval < 1:
            raise InputError(f"stream_interval must be at least 1, got {spec.stream_interval}")
        catalog = catalog or (Catalog.load(spec.catalog_file) if spec.catalog_file else default_catalog())
        self.spec = spec
        self.model_spec = catalog.model(spec.model)
        self.gpu_spec = catalog.gpu(spec.gpu)
        self.served_model_name = spec.served_model_name or spec.model
        self.engine_id = spec.engine_id or self.served_model_name
        self.max_model_len = min(
            spec.max_model_len or self.model_spec.max_context, self.model_spec.max_context
        )
        self.cost = CostModel(self.gpu_spec, self.model_spec, spec.tp)
        self.engine = EngineModel(self.cost, SchedulerConfig.from_args(spec.engine_args))
        self.tokenizer = load_tokenizer(self.model_spec.vocab_size, spec.tokenizer_file)
        self.vocabulary = Vocabulary.for_tokenizer(self.tokenizer)
        self.driver = EngineDriver(self.engine, spec.time_scale, on_step=self._on_step)
        engine_metrics = self.engine.metrics
        self.metrics = EmulatorMetrics(
            self.served_model_name,
            CacheConfig(
                block_size=engine_metrics.block_size,
                num_gpu_blocks=engine_metrics.num_gpu_blocks,
                gpu_memory_utilization=spec.engine_args.gpu_memory_utilization,
                enable_prefix_caching=spec.engine_args.enable_prefix_caching,
            ),
            max_lora=spec.engine_args.max_loras,
            state=self._engine_state,
        )
        self.adapters: dict[str, str] = {}  # name -> path, in load order
        self.generations: dict[str, Generation] = {}  # requests in the engine, by engine request id
        self.publisher: KVEventPublisher | None = None
        self.created = int(time.time())
        self.app = build_app(self)

    async def start(self) -> None:
        if self.spec.kv_events is not None:
            events = self.spec.kv_events
            self.publisher = KVEventPublisher(
                events.endpoint, events.replay_endpoint, topic=events.topic, event_format=events.event_format
            )
            self.publisher.start()
        self.driver.start()
        for name, path in self.spec.lora_modules:
            self.load_adapter(name, path)

    async def stop(self) -> None:
        await self.driver.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # engine plumbing

    def _on_step(self, result: StepResult) -> None:
        if self.publisher is not None and result.kv_events:
            self.publisher.publish(result.kv_events)

    def _engine_state(self) -> EngineState:
        metrics = self.engine.metrics
        return EngineState(
            num_running=metrics.num_running,
            num_waiting=metrics.num_waiting,
            kv_usage=metrics.kv_usage,
            prefix_cache_queries=metrics.prefix_cache_queries,
            prefix_cache_hits=metrics.prefix_cache_hits,
            num_preemptions=metrics.num_preemptions,
            running_adapters=metrics.running_lora_adapters,
            waiting_adapters=metrics.waiting_lora_adapters,
        )

    def load_adapter(self, name: str, path: str) -> None:
        if name in self.adapters or name == self.served_model_name:
            raise APIError(
                400, f"The lora adapter '{name}' has already been loaded.", error_type="InvalidUserInput"
            )
        try:
            self.driver.apply(lambda now: self.engine.load_adapter(name, now))
        except InputError as error:
            raise APIError(400, str(error), error_type="BadRequestError") from None
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", error_type="NotFoundError")
        try:
            self.driver.apply(lambda now: self.engine.unload_adapter(name))
        except InputError as error:
            raise APIError(400, str(error), error_type="BadRequestError") from None
        del self.adapters[name]

    def reset_prefix_cache(self, require_idle: bool = False) -> bool:
        """Forget every cached prompt block, as vLLM's `reset_prefix_cache()`: False (and nothing changes)
        while a request holds KV blocks, or with `require_idle` (SGLang's rule) while any request is
        running or waiting. The `AllBlocksCleared` event goes out at once, not with the next iteration, so
        a subscribed router drops its view of this engine's cache together with the engine."""

        def reset(now: float) -> bool:
            if require_idle:
                metrics = self.engine.metrics
                if metrics.num_running or metrics.num_waiting:
                    return False
            done = self.engine.reset_prefix_cache()
            kv = self.engine.kv
            if kv.has_events:
                events = kv.take_events()
                if self.publisher is not None:
                    self.publisher.publish(events)
            return done

        return self.driver.apply(reset)

    def resolve_adapter(self, model: str | None) -> str | None:
        """The adapter a request names; None for the base model. Unknown names get vLLM's 404."""
        if model is None or model == self.served_model_name:
            return None
        if model in self.adapters:
            return model
        raise openai.model_not_found(model)
