"""From a parsed request to an engine: which base model and adapter it names, which policy decides, and
the bookkeeping around a decision (in-flight counts, policy hooks, decision metrics)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from typing import Any

from fleetserve.config import RouterConfig
from fleetserve.fleet.registry import EngineRegistry, EngineState
from fleetserve.fleet.view import ViewBuilder
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.protocol.errors import APIError
from fleetserve.routing import Decision, NoEngineAvailable, Policy, RejectRequest, RequestInfo, make_policy


class ModelIndex:
    """Which names clients may request: every engine's model and adapters. Rebuilt when the registry
    changes; `/v1/models` lists only what healthy engines serve."""

    def __init__(self, registry: EngineRegistry, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock
        self._version = -1
        self._base_of: dict[str, tuple[str, str | None]] = {}
        self._listing: dict[str, Any] = {}

    def resolve(self, name: str) -> tuple[str, str | None]:
        """(base model, adapter or None) for a requested model name; 404 when no engine serves it."""
        self._refresh()
        found = self._base_of.get(name)
        if found is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")
        return found

    def listing(self) -> dict[str, Any]:
        self._refresh()
        return self._listing

    def _refresh(self) -> None:
        if self._version == self._registry.version:
            return
        base_of: dict[str, tuple[str, str | None]] = {}
        entries: dict[str, dict[str, Any]] = {}
        created = int(self._clock())
        for engine in self._registry.engines():
            base_of.setdefault(engine.model, (engine.model, None))
            for adapter in engine.adapters:
                base_of.setdefault(adapter, (engine.model, adapter))
            if engine.health.routable:
                _add_entries(entries, engine, created)
        self._base_of = base_of
        self._listing = {"object": "list", "data": list(entries.values())}
        self._version = self._registry.version


def _add_entries(entries: dict[str, dict[str, Any]], engine: EngineState, created: int) -> None:
    for entry in engine.models:
        if entry.id == engine.model or entry.parent == engine.model:
            entries.setdefault(entry.id, entry.raw)
    for name, parent in ((engine.model, None), *((adapter, engine.model) for adapter in engine.adapters)):
        entries.setdefault(
            name,
            {"id": name, "object": "model", "created": created, "owned_by": "fleetserve", "parent": parent},
        )


class Dispatcher:
    def __init__(
        self,
        router: RouterConfig,
        registry: EngineRegistry,
        views: ViewBuilder,
        metrics: GatewayMetrics,
        seed: int | None = None,
    ) -> None:
        self._router = router
        self._registry = registry
        self._views = views
        self._metrics = metrics
        self._seed = seed
        self.default_policy = make_policy(router.policy, router.params, seed)
        self._policies: dict[str, Policy] = {router.policy: self.default_policy}
        self._request_ids = itertools.count()

    def next_request_id(self) -> str:
        return f"fs-{next(self._request_ids)}"

    def policy_for(self, header_value: bytes | None) -> Policy:
        """The default policy, or the one the x-fleetserve-policy header names when that is allowed."""
        if header_value is None or not self._router.allow_policy_header:
            return self.default_policy
        name = header_value.decode("latin-1").strip()
        policy = self._policies.get(name)
        if policy is None:
            try:
                policy = make_policy(name, {}, self._seed)
            except ValueError as exc:
                raise APIError(400, str(exc), param="x-fleetserve-policy") from None
            self._policies[name] = policy
        return policy

    def choose(
        self, policy: Policy, request: RequestInfo, exclude: Collection[str], now: float
    ) -> tuple[EngineState, Decision]:
        try:
            decision = policy.choose(request, self._views.build(exclude), now)
        except NoEngineAvailable as exc:
            raise APIError(503, str(exc)) from None
        except RejectRequest as exc:
            raise APIError(exc.status, exc.message) from None
        engine = self._registry.get(decision.engine_id)
        if engine is None:
            raise RuntimeError(f"policy {policy.name} chose unknown engine {decision.engine_id!r}")
        self._metrics.decisions.labels(policy.name, decision.reason).inc()
        return engine, decision

    def health_changed(self) -> None:
        """An engine's health moved outside the health checker (a request failed): views and the model
        listing must not keep the old state."""
        self._registry.changed()

    def dispatched(self, policy: Policy, request: RequestInfo, engine: EngineState, now: float) -> None:
        EngineRegistry.dispatched(engine)
        policy.on_dispatch(request, engine.engine_id, now)

    def finished(self, policy: Policy, request: RequestInfo, engine: EngineState, now: float) -> None:
        EngineRegistry.finished(engine)
        policy.on_finish(request, engine.engine_id, now)
