"""From a parsed request to an engine: which base model and adapter it names, and the gateway's side of
the request path (the policy a request gets, the live view, decision metrics, held requests)."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from fleetserve.config import RouterConfig, SLOConfig
from fleetserve.errors import InputError, InternalError
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.state import EngineState
from fleetserve.fleet.view import ViewBuilder
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.pipeline import Answer, Hold, Proceed, Refuse, Refused, RequestPath, RequestSession, Stage
from fleetserve.protocol.errors import APIError
from fleetserve.routing import Decision, Policy, make_policy


class ModelIndex:
    """Which names clients may request: every engine's model and adapters, and the models of groups
    that may scale to zero (`standby`: a request for one waits for a replica). Rebuilt when the registry
    changes; `/v1/models` lists what healthy engines serve, and the standby models."""

    def __init__(
        self, registry: EngineRegistry, clock: Callable[[], float], standby: Collection[str] = ()
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._standby = tuple(standby)
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
        for model in self._standby:
            base_of.setdefault(model, (model, None))
            entries.setdefault(model, _model_entry(model, None, created))
        self._base_of = base_of
        self._listing = {"object": "list", "data": list(entries.values())}
        self._version = self._registry.version


def _add_entries(entries: dict[str, dict[str, Any]], engine: EngineState, created: int) -> None:
    for entry in engine.models:
        if entry.id == engine.model or entry.parent == engine.model:
            entries.setdefault(entry.id, entry.raw)
    for name, parent in ((engine.model, None), *((adapter, engine.model) for adapter in engine.adapters)):
        entries.setdefault(name, _model_entry(name, parent, created))


def _model_entry(name: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fleetserve", "parent": parent}


class Dispatcher:
    """The gateway's side of the request path (`fleetserve.pipeline`): which policy a request gets, the
    live view a decision is made on, decision metrics, and waking requests a stage holds."""

    def __init__(
        self,
        router: RouterConfig,
        registry: EngineRegistry,
        views: ViewBuilder,
        metrics: GatewayMetrics,
        seed: int | None = None,
        *,
        stages: Sequence[Stage] = (),
        slo: SLOConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._registry = registry
        self._views = views
        self._metrics = metrics
        self._seed = seed
        self.default_policy = make_policy(router.policy, router.params, seed)
        self._policies: dict[str, Policy] = {router.policy: self.default_policy}
        self.path = RequestPath(
            self.default_policy,
            stages,
            ttft_slo_ms=slo.ttft_ms if slo else None,
            tpot_slo_ms=slo.tpot_ms if slo else None,
        )
        self._request_ids = itertools.count()
        self._wakeups: dict[str, asyncio.Future[None]] = {}  # held request id -> resolved on release
        self._clock = clock
        # called when a request starts waiting for a replica of a group at zero (the autoscaler's)
        self.on_waiting_for_replica: Callable[[], None] | None = None
        if self.path.stages:  # an engine joined or became healthy: held requests may go on
            registry.on_change(lambda: self._release(self._clock()))

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
            except InputError as exc:
                raise APIError(400, str(exc), param="x-fleetserve-policy") from None
            self._policies[name] = policy
        return policy

    async def admit(self, session: RequestSession, now: Callable[[], float]) -> Answer | None:
        """Run the pipeline's stages: None once the request may be routed, the Answer when a stage
        answers it itself; raises APIError when a stage refuses it or its wait runs out. A held request
        waits here until a stage releases it."""
        if not self.path.stages:
            return None
        while True:
            self._release(now())
            verdict = session.admit(self._views.build(), now())
            if isinstance(verdict, Proceed):
                return None
            if isinstance(verdict, Refuse):
                raise self._refused(verdict)
            if isinstance(verdict, Answer):
                return verdict
            assert isinstance(verdict, Hold)
            if verdict.reason == "scale_from_zero" and self.on_waiting_for_replica is not None:
                self.on_waiting_for_replica()
            wakeup = asyncio.get_running_loop().create_future()
            self._wakeups[session.info.request_id] = wakeup
            self._metrics.held.inc()
            try:
                await asyncio.wait_for(wakeup, max(verdict.until - now(), 0.0))
            except TimeoutError:
                raise self._refused(verdict.on_timeout) from None
            finally:
                self._metrics.held.dec()
                self._wakeups.pop(session.info.request_id, None)
                self.path.withdraw(session)  # a no-op once released; frees the place when it was not

    def choose(
        self, session: RequestSession, exclude: Collection[str], now: float
    ) -> tuple[EngineState, Decision]:
        try:
            decision = session.choose(self._views.build(exclude), now)
        except Refused as exc:
            raise self._refused(exc.refusal) from None
        engine = self._registry.get(decision.engine_id)
        if engine is None:
            raise InternalError(f"policy {session.policy.name} chose unknown engine {decision.engine_id!r}")
        self._metrics.decisions.labels(session.policy.name, decision.reason).inc()
        return engine, decision

    def health_changed(self) -> None:
        """An engine's health moved outside the health checker (a request failed): views and the model
        listing must not keep the old state."""
        self._registry.changed()

    def finished(
        self, session: RequestSession, now: float, status: int, latency_s: float, output_tokens: int = 0
    ) -> None:
        """The request has ended; requests its end makes room for go on."""
        session.finished(now, status, output_tokens, latency_s)
        self._release(now)

    def _refused(self, refusal: Refuse) -> APIError:
        self._metrics.refusals.labels(refusal.reason).inc()
        return refusal_error(refusal)

    def _release(self, now: float) -> None:
        if not self.path.held:
            return
        for session in self.path.release(self._views.build(), now):
            wakeup = self._wakeups.get(session.info.request_id)
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)


def refusal_error(refusal: Refuse) -> APIError:
    """The OpenAI-shaped error a stage's refusal reaches the client as."""
    headers = dict(refusal.headers)
    if refusal.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after_s)))
    return APIError(
        refusal.status, refusal.message, headers=headers, error_type=refusal.error_type, code=refusal.code
    )
