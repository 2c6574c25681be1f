"""The gateway as one raw ASGI application: the OpenAI endpoints, health, readiness and metrics.

The hot path (the two completion endpoints) is plain ASGI with no framework objects per request;
everything around it is small. The gateway owns the engine registry, the background health checks and
metric scrapes (started by the ASGI lifespan), and the one upstream connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp

from fleetserve.autoscale.activator import ActivatorStage
from fleetserve.autoscale.loop import MetricSource
from fleetserve.autoscale.mix import GpuOption
from fleetserve.config import EngineDescription, FleetConfig
from fleetserve.control import FleetActuator
from fleetserve.control.members import FleetMembers
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.errors import InternalError
from fleetserve.fleet.health import HealthChecker
from fleetserve.fleet.kv_events import KVEventHub
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.scrape import MetricsScraper
from fleetserve.fleet.state import EngineHealth, EngineState
from fleetserve.fleet.view import ViewBuilder
from fleetserve.gateway.asgi import Receive, Scope, Send, send_bytes, send_error, send_json
from fleetserve.gateway.autoscaling import LiveAutoscaling
from fleetserve.gateway.dispatch import Dispatcher, ModelIndex
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.gateway.migration import LiveMigration, MovableStreams
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.tenancy import Tenancy
from fleetserve.gateway.tokens import PromptTokenizer
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.protocol.continuation import ChatRenderer
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.sse import DONE, sse_error

log = logging.getLogger(__name__)

PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class Gateway:
    """`Gateway(config)` is an ASGI app. Engines come from the fleet file and from `add_engine` at run
    time; `policy` overrides the fleet file's routing policy (its params then do not apply)."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        policy: str | None = None,
        catalog: Catalog | None = None,
        seed: int | None = None,
        chat_renderers: Mapping[str, ChatRenderer] | None = None,
        actuator_launches: bool = False,
        planned_options: Mapping[str, GpuOption] | None = None,
    ) -> None:
        """`chat_renderers`: model -> its chat template, for models served by llama.cpp engines (a chat
        stream resumes on one of those through the completions API over the rendered conversation).
        `actuator_launches`: the fleet file's launched engines are started by the fleet actuator (on a
        Ray cluster), which registers each once it runs; only external engines are registered now.
        `planned_options`: each `planned` group's GPU profile (`sim.profiles.planned_options`)."""
        self.config = config
        self._planned_options = planned_options
        router = config.router
        if policy is not None and policy != router.policy:
            router = router.model_copy(update={"policy": policy, "params": {}})
        self.registry = EngineRegistry()
        # every engine's lifecycle (starting, ready, draining) and since when, from the actuator's events
        self.members = FleetMembers()
        self.kv_events: KVEventHub | None = None  # follows the engines that publish KV events, once started
        self.metrics = GatewayMetrics(self.registry, lambda: self.kv_events, self.members)
        self.models = ModelIndex(self.registry, time.time, standby=config.activation_timeouts())
        self.views = ViewBuilder(self.registry, catalog)
        self.dispatcher = Dispatcher(
            router,
            self.registry,
            self.views,
            self.metrics,
            seed,
            stages=config.stages(catalog),
            slo=config.slo,
        )
        self.tenancy = Tenancy(config, self.metrics, self.dispatcher.path.stages)
        movable = None if config.migration.policy == "none" else MovableStreams()
        self.proxy = Proxy(
            config.gateway,
            self.dispatcher,
            self.models,
            self.metrics,
            self.session,
            router.debug_header,
            tenancy=self.tenancy,
            tokenizer=PromptTokenizer(catalog or default_catalog(), config.model_tokenizers()),
            chat_renderers=chat_renderers,
            movable=movable,
        )
        # the migration controller over the live fleet (fleet file's `migration:`), started with the gateway
        self.migration = (
            None
            if movable is None
            else LiveMigration(
                config.migration,
                self.registry,
                self.session,
                catalog or default_catalog(),
                self.metrics,
                movable,
                timeout_s=max(config.gateway.connect_timeout_s, config.migration.interval_s),
            )
        )
        # starts, drains and stops engines for the admin API and the autoscaler; see use_actuator
        self.actuator: FleetActuator | None = None
        self.autoscaling: LiveAutoscaling | None = None
        self._session: aiohttp.ClientSession | None = None
        self._incidents = itertools.count(1)
        self._health: HealthChecker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[object]] = set()  # KV-event subscriptions being set up or closed
        # engines that publish KV events, with their (publish, replay) endpoints; while any is followed the
        # policies read the fleet's precise prefix index instead of learning their own
        self._kv_endpoints: dict[str, tuple[str, str | None]] = {}
        for instance in config.instances():
            if not (actuator_launches and ENGINE_KINDS[instance.group.kind].launched):
                self.add_engine(instance.description())

    # -- engines ---------------------------------------------------------------------------------

    def add_engine(self, description: EngineDescription) -> EngineState:
        """Register an engine; it takes traffic once a health probe finds it ready. An engine that
        publishes KV events is followed for the fleet's precise prefix index. Its `forward_auth` lets
        clients' Authorization headers through to it (off by default: an engine added at run time is a
        URL someone gave the admin API, and client keys are not theirs to see)."""
        settings = self.config.gateway
        engine = EngineState(
            description, EngineHealth(settings.eject_after_failures, settings.eject_duration_s)
        )
        self.registry.add(engine)
        self.members.adopt(description.id, description.group or description.id, time.monotonic())
        self.views.refresh_capacities()
        if description.kv_events_endpoint is not None:
            endpoints = (description.kv_events_endpoint, description.kv_replay_endpoint)
            self._kv_endpoints[description.id] = endpoints
            if self._session is not None:  # started: follow it now, else start() will
                self._background(self._follow(description.id, endpoints))
        if self._health is not None:
            self._health.wake()
        return engine

    def set_draining(self, engine_id: str) -> None:
        """Send the engine no new requests; those on it finish."""
        engine = self.registry.get(engine_id)
        if engine is not None and not engine.draining:
            engine.draining = True
            self.registry.changed()

    def in_flight(self, engine_id: str) -> int | None:
        """Requests on the engine now; None when no such engine is registered."""
        engine = self.registry.get(engine_id)
        return None if engine is None else engine.in_flight

    def engine_ids(self) -> list[str]:
        return [engine.engine_id for engine in self.registry.engines()]

    def group_of(self, engine_id: str) -> str | None:
        """The fleet-file group the engine belongs to; None for one registered without a group."""
        engine = self.registry.get(engine_id)
        return None if engine is None else engine.spec.group

    def remove_engine(self, engine_id: str) -> EngineState:
        """Stop routing to the engine; requests already on it finish."""
        engine = self.registry.remove(engine_id)
        self.members.forget(engine_id)
        self.views.refresh_capacities()
        if self._kv_endpoints.pop(engine_id, None) is not None and self.kv_events is not None:
            self._background(self.kv_events.unsubscribe(engine_id))
        return engine

    def use_actuator(self, actuator: FleetActuator, metric_source: MetricSource | None = None) -> None:
        """Start, drain and stop engines through `actuator` (the admin API's fleet actions), and run the
        fleet file's autoscalers with it. `metric_source` replaces the engines' metrics for them (a
        scripted one)."""
        self.actuator = actuator
        actuator.subscribe(self.members.record)
        if not any(group.autoscale is not None for group in self.config.engines):
            return
        activator = next(
            (stage for stage in self.dispatcher.path.stages if isinstance(stage, ActivatorStage)), None
        )
        self.autoscaling = LiveAutoscaling(
            self.config.autoscaled_groups(self._planned_options, time.monotonic()),
            actuator,
            self.members,
            self.registry,
            self.views,
            self.metrics,
            demand=None if activator is None else activator.waiting,
            source=metric_source,
            path=self.dispatcher.path,
        )
        self.dispatcher.on_waiting_for_replica = self.autoscaling.activate
        if self._session is not None:  # started already
            self._tasks.append(asyncio.create_task(self.autoscaling.run()))

    async def _follow(self, engine_id: str, endpoints: tuple[str, str | None]) -> None:
        if self.kv_events is None:
            self.kv_events = KVEventHub()
            self.views.prefix_index = self.kv_events.index
        await self.kv_events.subscribe(engine_id, *endpoints)

    def _background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise InternalError("the gateway has not started (ASGI lifespan startup has not run)")
        return self._session

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.gateway
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=settings.connect_timeout_s, sock_connect=settings.connect_timeout_s
            ),
            skip_auto_headers=("User-Agent",),
        )
        # probes must not wait behind the slowest engine, and must fail faster than the probe period
        probe_timeout = min(settings.connect_timeout_s, settings.health_interval_s)
        self._health = HealthChecker(
            self.registry, self._session, settings.health_interval_s, probe_timeout, time.monotonic
        )
        scraper = MetricsScraper(
            self.registry,
            self._session,
            settings.scrape_interval_s,
            timeout_s=min(settings.connect_timeout_s, max(settings.scrape_interval_s, 0.5)),
        )
        self._tasks = [asyncio.create_task(self._health.run()), asyncio.create_task(scraper.run())]
        if self.migration is not None:
            self._tasks.append(asyncio.create_task(self.migration.run()))
        if self.autoscaling is not None:
            self._tasks.append(asyncio.create_task(self.autoscaling.run()))
        await self.tenancy.start()
        for engine_id, endpoints in self._kv_endpoints.items():
            await self._follow(engine_id, endpoints)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._health = None
        await self.tenancy.close()
        for pending in list(self._pending):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await pending
        if self.kv_events is not None:
            await self.kv_events.close()
            self.kv_events = None
            self.views.prefix_index = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        return any(engine.health.routable for engine in self.registry.engines())

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                await self._http(scope, receive, send)
            except Exception:
                await self._crashed(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _crashed(self, scope: Scope, send: Send) -> None:
        """The last resort for a bug: log it with an id the client also gets, and answer OpenAI-shaped
        JSON, never the server's text/plain page. A stream already under way ends with an error event."""
        incident = f"fs-err-{next(self._incidents)}"
        log.exception("%s: %s %s failed", incident, scope.get("method"), scope.get("path"))
        error = APIError(500, f"internal error in the gateway (incident {incident}); see the gateway's log")
        try:
            await send_error(send, error)
        except RuntimeError:  # the response has started: finish it the way a failed stream ends
            with contextlib.suppress(Exception):
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse_error(500, error.message, error.error_type) + DONE,
                        "more_body": False,
                    }
                )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path == "/v1/chat/completions":
            await self.proxy.handle(scope, receive, send, "chat")
        elif method == "POST" and path == "/v1/completions":
            await self.proxy.handle(scope, receive, send, "completions")
        elif method == "GET" and path == "/v1/models":
            await send_json(send, 200, self.models.listing())
        elif method == "GET" and path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/ready":
            ready = self.ready
            await send_json(send, 200 if ready else 503, {"ready": ready})
        elif method == "GET" and path == "/metrics":
            await send_bytes(send, 200, self.metrics.exposition(), PROMETHEUS_TEXT)
        elif path in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/health",
            "/ready",
            "/metrics",
        ):
            await send_error(send, APIError(405, f"{method} is not allowed on {path}"))
        else:
            await send_error(send, APIError(404, f"no route {path}"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
