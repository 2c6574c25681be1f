"""`fleetserve serve -c fleet.yaml`: the gateway in front of the fleet a fleet file describes, and the
engines it asks fleetserve to launch.

Launching (`launch_engines`) starts, before the gateway listens:

- every `kind: emulated` replica, all in ONE child process (`fleetserve engine emulate --fleet F`, one
  event loop for every engine, which is what lets a 2-core machine emulate a fleet);
- one llama.cpp server (llama-cpp-python) per `kind: llamacpp` replica;
- one vLLM or SGLang server per replica of those kinds, with the command lines of
  `fleetserve.engines.commands` (they need GPUs: without the package installed this fails up front).

All run under `fleetserve.engines.launcher.EngineLauncher`: their own process groups, SIGKILL when
fleetserve dies, a watchdog, SIGTERM then SIGKILL on the way out. Each must answer its ready path before
the deadline; the gateway still routes to an engine only once its own health probe finds it ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import click
import uvloop
import yaml

from fleetserve.config import ConfigError, EngineInstance, FleetConfig, load_fleet
from fleetserve.engines.commands import LAUNCHED_KINDS, engine_spec
from fleetserve.engines.launcher import EngineLauncher, EngineSpec, EngineStartError, LaunchedEngine
from fleetserve.engines.smollm2 import ModelFileNotFound
from fleetserve.gateway.server import run_gateway
from fleetserve.routing import POLICIES

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 300.0
EMULATOR_ENGINE_NAME = "emulated"
_WATCH_INTERVAL_S = 1.0
# The click group under its real name (`python -c` would otherwise call itself "-c" in its messages).
_FLEETSERVE = "from fleetserve.cli import cli; cli(prog_name='fleetserve')"
_INSTALL_HINTS = {
    "llamacpp": "install the llama.cpp extra: pip install 'fleetserve[llamacpp]'",
    "vllm": "vLLM needs a GPU machine: pip install vllm there",
    "sglang": "SGLang needs a GPU machine: pip install 'sglang[all]' there",
}


class LaunchError(RuntimeError):
    """The engines of a fleet file cannot be started; the message says why and what to do."""


def launch_plan(config: FleetConfig, work_dir: Path) -> list[EngineSpec]:
    """What to start for `config`: one spec for all emulated engines (their fleet file is written into
    `work_dir`), then one per llama.cpp, vLLM or SGLang replica. External engines need nothing."""
    instances = config.instances()
    specs: list[EngineSpec] = []
    emulated = [instance for instance in instances if instance.group.kind == "emulated"]
    if emulated:
        specs.append(emulator_spec(config, emulated, work_dir / "fleet.yaml"))
    for instance in instances:
        if instance.group.kind in LAUNCHED_KINDS:
            specs.append(_launched_spec(config, instance))
    return specs


def emulator_spec(config: FleetConfig, emulated: Sequence[EngineInstance], fleet_file: Path) -> EngineSpec:
    """The one process that serves every emulated engine. It gets the validated config (with any
    command-line overrides applied) rather than the user's file, so both sides agree on every port."""
    fleet_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    argv = (sys.executable, "-c", _FLEETSERVE, "engine", "emulate", "--fleet", str(fleet_file))
    # One uvicorn server binds every engine's socket before it starts, so the first engine answering
    # means all of them do.
    first_port = emulated[0].port
    assert first_port is not None  # config.instances() gives every launched engine a port
    return EngineSpec(EMULATOR_ENGINE_NAME, argv, first_port, config.emulator.host, "/health")


def _launched_spec(config: FleetConfig, instance: EngineInstance) -> EngineSpec:
    kind = instance.group.kind
    try:
        spec = engine_spec(instance, host=config.emulator.host)
    except (ModelFileNotFound, FileNotFoundError, ValueError) as exc:
        raise LaunchError(f"cannot launch engine {instance.engine_id} ({kind}): {exc}") from None
    missing = _missing_program(spec.argv)
    if missing:
        raise LaunchError(
            f"cannot launch engine {instance.engine_id} ({kind}): {missing} is not installed in "
            f"{sys.executable}; {_INSTALL_HINTS[kind]}, or start the engine yourself and list it with "
            "`url:` (kind external)"
        )
    return spec


def _missing_program(argv: Sequence[str]) -> str | None:
    """The program or Python module an engine command needs and this machine lacks, if any."""
    if shutil.which(argv[0]) is None:
        return argv[0]
    if len(argv) > 2 and argv[1] == "-m":
        # Only the top-level package: finding `vllm.entrypoints...` would import vLLM itself.
        package = argv[2].split(".")[0]
        if importlib.util.find_spec(package) is None:
            return f"the Python package `{package}`"
    return None


def engine_ports(config: FleetConfig) -> list[int]:
    """The ports of every engine fleetserve would launch for `config`."""
    return [
        instance.port
        for instance in config.instances()
        if instance.group.kind != "external" and instance.port is not None
    ]


def busy_ports(host: str, ports: Sequence[int]) -> list[int]:
    """Those of `ports` something already listens on at `host`."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers will bind: a port held only by connections in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


@contextlib.asynccontextmanager
async def launch_engines(
    config: FleetConfig, *, ready_timeout: float = DEFAULT_READY_TIMEOUT_S
) -> AsyncIterator[list[LaunchedEngine]]:
    """Start the engines `config` asks fleetserve to launch, wait until each answers (or raise
    LaunchError with the end of its log), yield them, and stop them all on exit. An engine that dies
    while serving is logged; the gateway ejects it through its health checks."""
    busy = busy_ports(config.emulator.host, engine_ports(config))
    if busy:
        raise LaunchError(
            f"engine port(s) {', '.join(map(str, busy))} on {config.emulator.host} are in use; "
            "set emulator.base_port (or the group's port) in the fleet file, or stop what listens there"
        )
    work_dir = Path(tempfile.mkdtemp(prefix="fleetserve-serve-"))
    launcher = EngineLauncher(ready_timeout=ready_timeout, log_dir=work_dir / "logs")
    watching: asyncio.Task[None] | None = None
    try:
        specs = launch_plan(config, work_dir)
        try:
            engines = await launcher.astart(specs) if specs else []
        except EngineStartError as exc:
            raise LaunchError(str(exc)) from None
        watching = asyncio.create_task(_report_exits(launcher))
        yield engines
    finally:
        if watching is not None:
            watching.cancel()
        # Synchronous on purpose: this also runs while the task is being cancelled (Ctrl-C), when
        # awaiting a worker thread could be cut short and leave engines behind.
        launcher.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


async def _report_exits(launcher: EngineLauncher) -> None:
    reported: set[int] = set()
    while True:
        await asyncio.sleep(_WATCH_INTERVAL_S)
        for engine in launcher.exited():
            if engine.pid not in reported:
                reported.add(engine.pid)
                log.error(
                    "engine %s (pid %d) exited with code %s; end of its log:\n%s",
                    engine.name,
                    engine.pid,
                    engine.process.returncode,
                    engine.log_tail(),
                )


def describe(config: FleetConfig, engine: LaunchedEngine) -> str:
    """One line per launched process; the emulator's line lists the engines it serves."""
    if engine.name == EMULATOR_ENGINE_NAME:
        hosted = [i for i in config.instances() if i.group.kind == "emulated"]
        names = ", ".join(f"{i.engine_id}@{i.port}" for i in hosted)
        return f"started {len(hosted)} emulated engine(s) in pid {engine.pid}: {names}"
    return f"started engine {engine.name} at {engine.url} in pid {engine.pid}"


@click.command()
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Fleet file."
)
@click.option("--no-launch", is_flag=True, help="Do not start engines; serve those already running.")
@click.option("--port", type=click.IntRange(0, 65535), help="Gateway port (overrides gateway.port).")
@click.option(
    "--engine-base-port",
    type=click.IntRange(1, 65535),
    help="First port of the engines serve launches (overrides emulator.base_port; a group's own `port:`"
    " stays). KV-event sockets take HTTP port + 1000 and + 2000.",
)
@click.option("--policy", help="Routing policy (overrides router.policy), e.g. least_request.")
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_READY_TIMEOUT_S,
    show_default=True,
    help="Seconds launched engines have to answer before serve gives up.",
)
def serve(
    config_path: str,
    no_launch: bool,
    port: int | None,
    engine_base_port: int | None,
    policy: str | None,
    ready_timeout: float,
) -> None:
    """Start the gateway (and the engines) a fleet file describes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if engine_base_port is not None:
        config = config.with_engine_base_port(engine_base_port)
    if policy is not None and policy not in POLICIES:
        valid = ", ".join(sorted(POLICIES))
        raise click.ClickException(f"unknown policy {policy!r}; valid policies: {valid}")
    gateway_port = config.gateway.port if port is None else port
    if gateway_port and busy_ports(config.gateway.host, [gateway_port]):
        raise click.ClickException(
            f"gateway port {gateway_port} on {config.gateway.host} is in use; pick another with --port"
        )
    # SIGTERM (docker stop, systemd) takes Ctrl-C's path, so the engines are stopped in order and the
    # temporary files removed; by default it would end the process as soon as uvicorn re-raised it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        try:
            uvloop.run(_serve(config, launch=not no_launch, port=port, policy=policy, timeout=ready_timeout))
        except LaunchError as exc:
            raise click.ClickException(str(exc)) from None


async def _serve(
    config: FleetConfig, *, launch: bool, port: int | None, policy: str | None, timeout: float
) -> None:
    if not launch:
        await run_gateway(config, port=port, policy=policy, on_ready=_announce)
        return
    async with launch_engines(config, ready_timeout=timeout) as engines:
        for engine in engines:
            click.echo(describe(config, engine))
        await run_gateway(config, port=port, policy=policy, on_ready=_announce)


def _announce(url: str) -> None:
    click.echo(f"fleetserve gateway listening on {url}")
    sys.stdout.flush()
