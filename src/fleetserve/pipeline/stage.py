"""The contract of a pipeline stage: what it may answer when a request arrives, and what it learns when
the request ends.

A stage sits between admission (the gateway has the whole body; the simulator has the trace request)
and the routing policy. It is pure: time comes in as `now`, the fleet as a `FleetView`, and the same
stage object runs under the gateway's wall clock and the simulator's virtual one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fleetserve.routing.base import FleetView, RequestInfo


@dataclass(frozen=True, slots=True)
class Proceed:
    """Let the request go on to the next stage (after the last one, to the routing policy)."""


PROCEED = Proceed()


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the request with an OpenAI-shaped error. `reason` is a short label for metrics and the
    simulator's failure counts; `retry_after_s` becomes a Retry-After header, `headers` more headers
    (the x-ratelimit-* of a quota); `error_type` and `code` fill the error's fields when the status's
    defaults do not say enough."""

    status: int
    message: str
    reason: str
    retry_after_s: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    error_type: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Park the request inside the stage until the stage releases it (see `Stage.release`), or until
    `until` (seconds on the caller's clock), when it is answered with `on_timeout` instead."""

    reason: str
    until: float
    on_timeout: Refuse


@dataclass(frozen=True, slots=True)
class Answer:
    """The stage answers the request itself (a cache hit): `body` is the JSON the client gets."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


Verdict = Proceed | Refuse | Hold | Answer


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the stages it passed see it. `status` is 200 for a served request, the
    error's status otherwise (499 when the client went away); `engine_id` and `gpu` are those of the
    engine that served it last (`tp` its tensor-parallel degree), None when it never reached one."""

    status: int
    prompt_tokens: int
    output_tokens: int = 0
    engine_id: str | None = None
    gpu: str | None = None
    latency_s: float = math.nan
    tp: int = 1

    @property
    def served(self) -> bool:
        return self.status == 200


class Stage(ABC):
    """A step of the request pipeline. Subclasses set `name` and implement `admit`; a stage that holds
    requests also implements `release` and `withdraw`. Constructor parameters are keyword-only and come
    from the fleet file's `pipeline:` entry."""

    name: ClassVar[str]

    @abstractmethod
    def admit(self, request: RequestInfo, view: FleetView, now: float) -> Verdict:
        """What to do with a request that reached this stage."""

    def release(self, view: FleetView, now: float) -> RequestInfo | None:
        """The next held request that may go on now, removed from the stage; None when none may. The
        caller asks again until it gets None (after a request finishes, an engine joins, or a new one
        arrives)."""
        return None

    def withdraw(self, request: RequestInfo) -> None:  # noqa: B027 (only stages that hold need it)
        """A held request leaves without being released (its wait ran out, or its client went away)."""

    def on_finish(self, request: RequestInfo, outcome: Outcome, now: float) -> None:  # noqa: B027
        """A request this stage let through has ended."""
