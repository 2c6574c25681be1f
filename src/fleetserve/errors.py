"""The root of fleetserve's exceptions: every error the package raises on purpose derives from
`FleetserveError`, so a caller can catch fleetserve's failures without catching Python's own bugs.

`InputError` is the family of "what you gave fleetserve is wrong" (a fleet file, a trace, a workload
spec, a policy name): it also derives from ValueError, which is what such errors were before.
"""

from __future__ import annotations


class FleetserveError(Exception):
    """Base of every exception fleetserve raises on purpose."""


class InputError(FleetserveError, ValueError):
    """Input from a user or a file is invalid; the message says what and where."""


class InternalError(FleetserveError, RuntimeError):
    """A broken invariant inside fleetserve (a bug), never the user's doing."""
