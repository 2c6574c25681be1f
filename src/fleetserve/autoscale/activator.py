"""`activator`: requests for a model that has no ready replica wait here while one starts (Knative's
activator, in front of a revision scaled to zero).

The fleet file adds this stage, first in the pipeline, when an autoscaled group may scale to zero
(`autoscale.min_replicas: 0`). A request for such a model goes straight on while any engine serving
it is ready; otherwise it is held, and the autoscaler, which reads `waiting(model)`, starts a replica
at once rather than at its next round. The request goes on as soon as an engine of its model is ready,
or is refused after the model's `activation_timeout_s` with 503 and a Retry-After. Requests for other
models pass untouched (with no engine at all they get the routing policy's answer, 503 no_engine).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from fleetserve.errors import InputError
from fleetserve.pipeline.stage import PROCEED, Hold, Refuse, Stage, Verdict
from fleetserve.routing.base import FleetView, RequestInfo

RETRY_AFTER_S = 5.0  # what a refused client is told to wait: a replica may be up by then


class ActivatorStage(Stage):
    name = "activator"

    def __init__(self, *, timeouts_s: Mapping[str, float] | None = None) -> None:
        """`timeouts_s`: model -> how long its requests may wait for a replica (the models whose groups
        scale to zero)."""
        self.timeouts_s = dict(timeouts_s or {})
        for model, timeout in self.timeouts_s.items():
            if not timeout > 0:
                raise InputError(f"the activation timeout of {model!r} must be positive, got {timeout}")
        self._held: dict[str, OrderedDict[str, RequestInfo]] = {}  # model -> request id -> request

    def waiting(self, model: str) -> int:
        """Requests of `model` held until a replica is ready."""
        held = self._held.get(model)
        return len(held) if held else 0

    def admit(self, request: RequestInfo, view: FleetView, now: float) -> Verdict:
        model = request.model
        timeout = self.timeouts_s.get(model)
        if timeout is None or (not self._held.get(model) and _has_ready(view, model)):
            return PROCEED
        self._held.setdefault(model, OrderedDict())[request.request_id] = request
        refusal = Refuse(
            503,
            f"no replica of model {model!r} became ready within {timeout:g} s; one is starting",
            "cold_start",
            RETRY_AFTER_S,
        )
        return Hold("scale_from_zero", now + timeout, refusal)

    def release(self, view: FleetView, now: float) -> RequestInfo | None:
        for model, held in self._held.items():
            if held and _has_ready(view, model):
                _, request = held.popitem(last=False)
                return request
        return None

    def withdraw(self, request: RequestInfo) -> None:
        held = self._held.get(request.model)
        if held is not None:
            held.pop(request.request_id, None)


def _has_ready(view: FleetView, model: str) -> bool:
    return any(engine.model == model and engine.ready and engine.healthy for engine in view.engines.values())
