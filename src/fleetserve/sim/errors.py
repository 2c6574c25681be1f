"""Errors caused by what the user asked for (as opposed to simulator bugs), reported without a traceback."""

from fleetserve.errors import InputError


class SimInputError(InputError):
    """The fleet, trace or parameters cannot be simulated as given; the message says why."""
