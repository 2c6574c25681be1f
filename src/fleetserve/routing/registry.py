"""Policies by name, built from the fleet file's `router.policy` and `router.params`."""

from __future__ import annotations

from typing import Any

from fleetserve.named import build_named
from fleetserve.routing.base import Policy
from fleetserve.routing.cache_aware import KVCostPolicy, PrefixAwarePolicy
from fleetserve.routing.dualmap import DualMapPolicy
from fleetserve.routing.laps import LAPSPolicy
from fleetserve.routing.planned import PlannedPolicy
from fleetserve.routing.scored import ScoredPolicy
from fleetserve.routing.simple import (
    LeastKVPolicy,
    LeastRequestPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
)
from fleetserve.routing.slo import LoraAffinityPolicy, SessionPolicy, SLOAwarePolicy

POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make a policy class available to `make_policy` under its `name` (usable as a decorator)."""
    POLICIES[cls.name] = cls
    return cls


for _cls in (
    RandomPolicy,
    RoundRobinPolicy,
    LeastRequestPolicy,
    LeastKVPolicy,
    PowerOfTwoPolicy,
    PrefixAwarePolicy,
    KVCostPolicy,
    DualMapPolicy,
    LAPSPolicy,
    SLOAwarePolicy,
    SessionPolicy,
    LoraAffinityPolicy,
    ScoredPolicy,
    PlannedPolicy,
):
    register_policy(_cls)


def make_policy(name: str, params: dict[str, Any] | None = None, seed: int | None = None) -> Policy:
    """Build policy `name` with `params`. Policies that draw random numbers take a `seed`: the argument,
    else `params["seed"]`, else fresh entropy. Raises UnknownName or BadParameters."""
    return build_named("routing policy", POLICIES, name, params, seed, plural="policies")
