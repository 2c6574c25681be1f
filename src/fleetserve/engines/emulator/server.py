"""Serve any number of emulated engines from one process and one asyncio loop.

One uvicorn server listens on every engine's socket; each connection is handed to the engine that owns
the local port it arrived on. One loop and one server keep the per-engine cost down to the engine's own
work, which is what lets a few dozen emulated engines share a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import uvicorn
from starlette.types import Receive, Scope, Send

from fleetserve.config import FleetConfig
from fleetserve.engines.emulator.engine import EmulatedEngine, EmulatorSpec, KVEventsSpec
from fleetserve.engines.emulator.kv_events import kv_event_endpoints
from fleetserve.errors import InputError, InternalError

SHUTDOWN_GRACE_S = 2.0


@dataclass(frozen=True)
class RunningEngine:
    engine: EmulatedEngine
    url: str


def specs_from_fleet(fleet: FleetConfig) -> list[tuple[EmulatorSpec, int]]:
    """Every emulated replica of a fleet file with its port. Adapters listed for a group are loaded at
    start under their name (the name doubles as the path); `kv_events: true` publishes on the ports
    given by `kv_event_endpoints`. Engines count tokens with the tokenizer the fleet file names for
    their model (the one the gateway hashes prompts with), else with the built-in one."""
    host = fleet.emulator.host
    tokenizers = fleet.model_tokenizers()
    out: list[tuple[EmulatorSpec, int]] = []
    for instance in fleet.instances():
        group = instance.group
        if group.kind != "emulated" or instance.port is None or group.gpu is None:
            continue
        kv_events = KVEventsSpec(*kv_event_endpoints(host, instance.port)) if group.kv_events else None
        spec = EmulatorSpec(
            gpu=group.gpu,
            model=group.model,
            tp=group.tp,
            engine_id=instance.engine_id,
            served_model_name=group.model,
            engine_args=group.engine_args,
            time_scale=group.time_scale,
            lora_modules=tuple((name, name) for name in group.adapters),
            kv_events=kv_events,
            tokenizer_file=tokenizers.get(group.model),
        )
        out.append((spec, instance.port))
    return out


def ready_line(running: RunningEngine) -> str:
    engine = running.engine
    kv = ""
    if engine.publisher is not None:
        kv = f" kv_events={engine.publisher.endpoint}"
        if engine.publisher.replay_endpoint:
            kv += f" kv_replay={engine.publisher.replay_endpoint}"
    return (
        f"fleetserve emulated engine ready: id={engine.engine_id} model={engine.served_model_name} "
        f"gpu={engine.gpu_spec.name} tp={engine.spec.tp} url={running.url}{kv}"
    )


class _PortDispatcher:
    """ASGI app that forwards each connection to the engine listening on its local port."""

    def __init__(self, apps_by_port: dict[int, EmulatedEngine]) -> None:
        self._apps = {port: engine.app for port, engine in apps_by_port.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        app = self._apps.get(server[1]) if server else None
        if app is None:
            raise InternalError(f"no emulated engine listens on {server}")
        await app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (`serve_engines` owns SIGINT/SIGTERM for all engines),
    plus an event set once every socket accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def serve_engines(
    specs: Sequence[EmulatorSpec],
    host: str,
    ports: Sequence[int],
    *,
    on_ready: Callable[[RunningEngine], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the engines until `stop` is set or the process gets SIGINT/SIGTERM. Port 0 picks a free port;
    `on_ready` is called per engine once its socket accepts connections (default: print a ready line)."""
    if len(specs) != len(ports):
        raise InputError("one port per engine")
    engines = [EmulatedEngine(spec) for spec in specs]
    sockets: list[socket.socket] = []
    try:
        for port in ports:
            sockets.append(bind(host, port))
        by_port = {sock.getsockname()[1]: engine for sock, engine in zip(sockets, engines, strict=True)}
        for engine in engines:
            await engine.start()
        config = uvicorn.Config(
            _PortDispatcher(by_port),
            lifespan="off",
            http="httptools",
            ws="none",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            backlog=4096,
        )
        server = _Server(config)
        stop = stop or asyncio.Event()
        _install_signal_handlers(server, stop)
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
        await _announce_when_started(server, serving, by_port, host, on_ready or _print_ready)
        stopping = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        await serving
    finally:
        for engine in engines:
            await engine.stop()
        for sock in sockets:
            sock.close()


async def _announce_when_started(
    server: _Server,
    serving: asyncio.Task[None],
    by_port: dict[int, EmulatedEngine],
    host: str,
    on_ready: Callable[[RunningEngine], None],
) -> None:
    listening = asyncio.get_running_loop().create_task(server.listening.wait())
    await asyncio.wait({listening, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not listening.done():
        listening.cancel()
        serving.result()  # re-raise why uvicorn did not start
        return
    url_host = f"[{host}]" if ":" in host else host
    for port, engine in by_port.items():
        on_ready(RunningEngine(engine, f"http://{url_host}:{port}"))


def _print_ready(running: RunningEngine) -> None:
    print(ready_line(running), flush=True)


def _install_signal_handlers(server: uvicorn.Server, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C stops waiting for open streams
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or Windows
            loop.add_signal_handler(sig, handle, sig)


def run(specs: Sequence[EmulatorSpec], host: str, ports: Sequence[int]) -> None:
    """Blocking entry point for the CLI: uvloop when available, one loop for every engine."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # uvloop is part of uvicorn[standard], but not of every platform
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(serve_engines(specs, host, ports))
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
