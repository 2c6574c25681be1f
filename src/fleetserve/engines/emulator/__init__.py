"""The emulated engine: the engine model on the wall clock, behind vLLM's OpenAI-compatible HTTP API.

`EmulatedEngine(EmulatorSpec(...))` is one engine with an ASGI `.app`; `serve_engines` runs many in one
event loop; `fleetserve engine emulate` is the command line.
"""

from fleetserve.engines.emulator.engine import EmulatedEngine, EmulatorSpec, KVEventsSpec
from fleetserve.engines.emulator.kv_events import kv_event_endpoints
from fleetserve.engines.emulator.server import RunningEngine, serve_engines, specs_from_fleet

__all__ = [
    "EmulatedEngine",
    "EmulatorSpec",
    "KVEventsSpec",
    "RunningEngine",
    "kv_event_endpoints",
    "serve_engines",
    "specs_from_fleet",
]
