"""Building a named, parameterised object (a routing policy, a pipeline stage) from the fleet file.

Each kind keeps a registry of classes by `name`; constructor parameters are keyword-only and checked
against the signature, so a typo in the fleet file names the valid parameters instead of raising a
TypeError from deep inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from fleetserve.errors import InputError

T = TypeVar("T")


class UnknownName(InputError):
    """No class of this kind has that name."""


class BadParameters(InputError):
    """A parameter the class does not take, or a value it refuses."""


def keyword_parameters(cls: type) -> set[str]:
    return {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_named(
    kind: str,
    classes: Mapping[str, type[T]],
    name: str,
    params: Mapping[str, Any] | None = None,
    seed: int | None = None,
    *,
    plural: str,
    provided: Mapping[str, Any] | None = None,
) -> T:
    """`classes[name](**params)`; `seed` is passed when the class takes one, and so is each of
    `provided` (objects the caller owns, such as the fleet's tenants, which `params` may not set). Raises
    UnknownName or BadParameters with a message that lists what is valid (`plural` names the kind in
    that list)."""
    cls = classes.get(name)
    if cls is None:
        raise UnknownName(f"unknown {kind} {name!r}; valid {plural}: {', '.join(sorted(classes))}")
    given = {"seed": seed, **(provided or {})}
    accepted = keyword_parameters(cls) - set(provided or ())
    chosen = dict(params or {})
    unknown = sorted(set(chosen) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise BadParameters(
            f"{kind} {name!r} has no parameter {', '.join(unknown)}; valid parameters: {valid}"
        )
    takes = keyword_parameters(cls)
    chosen.update({key: value for key, value in given.items() if value is not None and key in takes})
    try:
        return cls(**chosen)
    except (TypeError, ValueError) as exc:  # a value of the wrong type, or out of the class's range
        raise BadParameters(f"{kind} {name!r}: {exc}") from None
