"""Errors caused by what the user asked for (as opposed to simulator bugs), reported without a traceback."""


class SimInputError(ValueError):
    """The fleet, trace or parameters cannot be simulated as given; the message says why."""
