"""Starting the engines a fleet file asks fleetserve to launch, and stopping them, for `serve`, `demo`
and the fleet actuator.

Launching (`launch_engines`) starts, before the gateway listens:

- every `kind: emulated` replica, all in ONE child process (`fleetserve engine emulate --fleet F`, one
  event loop for every engine, which is what lets a 2-core machine emulate a fleet), except those of
  autoscaled groups, which get a process each so that scaling in can stop them;
- one llama.cpp server (llama-cpp-python) per `kind: llamacpp` replica;
- one vLLM or SGLang server per replica of those kinds, with the command lines of
  `fleetserve.engines.commands` (they need GPUs: without the package installed this fails up front).

All run under `EngineLauncher`: their own process groups, SIGKILL when fleetserve dies, a watchdog,
SIGTERM then SIGKILL on the way out. Each must answer its ready path before the deadline; the gateway
still routes to an engine only once its own health probe finds it ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleetserve.config import EngineInstance, FleetConfig
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.engines.launcher import EngineLauncher, EngineSpec, EngineStartError, LaunchedEngine
from fleetserve.errors import FleetserveError

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 300.0
EMULATOR_ENGINE_NAME = "emulated"
WATCH_INTERVAL_S = 1.0
# The click group under its real name (`python -c` would otherwise call itself "-c" in its messages).
_FLEETSERVE = "from fleetserve.cli import cli; cli(prog_name='fleetserve')"


class LaunchError(FleetserveError, RuntimeError):
    """The engines of a fleet file cannot be started; the message says why and what to do."""


def launch_plan(config: FleetConfig, work_dir: Path) -> list[EngineSpec]:
    """What to start for `config`: one spec for all emulated engines (their fleet file is written into
    `work_dir`), then one per llama.cpp, vLLM or SGLang replica. External engines need nothing."""
    instances = config.instances()
    specs: list[EngineSpec] = []
    shared = [i for i in instances if i.group.kind == "emulated" and i.group.autoscale is None]
    if shared:
        specs.append(emulator_spec(config, shared, work_dir / "fleet.yaml"))
    for instance in instances:
        kind = ENGINE_KINDS[instance.group.kind]
        if kind.argv is not None or (kind.launched and instance.group.autoscale is not None):
            specs.append(checked_spec(config, instance, work_dir))
    return specs


def replica_spec(config: FleetConfig, instance: EngineInstance, work_dir: Path) -> EngineSpec:
    """How to start this one replica on its own (an emulated one gets a process of its own, with its
    fleet file in `work_dir`). Raises LaunchError for a kind fleetserve does not start."""
    kind = ENGINE_KINDS[instance.group.kind]
    if not kind.launched:
        raise LaunchError(f"engine {instance.engine_id} is {kind.name}: fleetserve does not start it")
    if kind.argv is None:
        return emulator_spec(config, [instance], work_dir / f"{instance.engine_id}.yaml", instance.engine_id)
    host, port = config.emulator.host, instance.port
    try:
        argv = kind.argv(instance, host)
    except (FleetserveError, FileNotFoundError) as exc:  # no model file, no port, no LoRA slots
        raise LaunchError(f"cannot launch engine {instance.engine_id} ({kind.name}): {exc}") from None
    assert port is not None  # argv needs the port, and said so if it had none
    return EngineSpec(instance.engine_id, argv, port, host, kind.ready_path, kind.env(instance.group))


def checked_spec(config: FleetConfig, instance: EngineInstance, work_dir: Path) -> EngineSpec:
    """`replica_spec`, after checking that this machine has the engine's program."""
    spec = replica_spec(config, instance, work_dir)
    kind = ENGINE_KINDS[instance.group.kind]
    missing = _missing_program(spec.argv)
    if missing:
        raise LaunchError(
            f"cannot launch engine {instance.engine_id} ({kind.name}): {missing} is not installed in "
            f"{sys.executable}; {kind.install_hint}, or start the engine yourself and list it with "
            "`url:` (kind external)"
        )
    return spec


def emulator_spec(
    config: FleetConfig,
    emulated: Sequence[EngineInstance],
    fleet_file: Path,
    name: str = EMULATOR_ENGINE_NAME,
) -> EngineSpec:
    """The one process that serves these emulated engines. It gets the validated config (with any
    command-line overrides applied, each replica as a group of one on its port) rather than the user's
    file, so both sides agree on every id and port."""
    groups = []
    for instance in emulated:  # each replica as a group of one, on the port it was given
        groups.append(
            instance.group.model_copy(
                update={"name": instance.engine_id, "replicas": 1, "port": instance.port}
            )
        )
    subset = config.model_copy(update={"engines": groups})
    fleet_file.write_text(yaml.safe_dump(subset.model_dump(mode="json"), sort_keys=False))
    argv = (sys.executable, "-c", _FLEETSERVE, "engine", "emulate", "--fleet", str(fleet_file))
    # One uvicorn server binds every engine's socket before it starts, so the first engine answering
    # means all of them do.
    first_port = emulated[0].port
    assert first_port is not None  # config.instances() gives every launched engine a port
    return EngineSpec(name, argv, first_port, config.emulator.host, ENGINE_KINDS["emulated"].ready_path)


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
        if ENGINE_KINDS[instance.group.kind].launched and instance.port is not None
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


@dataclass
class LaunchedFleet:
    """What `launch_engines` started: the launcher (which can start more engines, see
    `engines/actuator.py`), the processes, and the folder for their files and logs."""

    launcher: EngineLauncher
    engines: list[LaunchedEngine]
    work_dir: Path


@contextlib.asynccontextmanager
async def launch_engines(
    config: FleetConfig, *, ready_timeout: float = DEFAULT_READY_TIMEOUT_S
) -> AsyncIterator[LaunchedFleet]:
    """Start the engines `config` asks fleetserve to launch, wait until each answers (or raise
    LaunchError with the end of its log), yield them, and stop them all (and any started later with the
    same launcher) on exit. An engine that dies while serving is logged; the gateway ejects it through
    its health checks."""
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
        yield LaunchedFleet(launcher, engines, work_dir)
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
        await asyncio.sleep(WATCH_INTERVAL_S)
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


def describe_launch(config: FleetConfig, engine: LaunchedEngine) -> str:
    """One line per launched process; the emulator's line lists the engines it serves."""
    if engine.name == EMULATOR_ENGINE_NAME:
        hosted = [i for i in config.instances() if i.group.kind == "emulated" and i.group.autoscale is None]
        names = ", ".join(f"{i.engine_id}@{i.port}" for i in hosted)
        return f"started {len(hosted)} emulated engine(s) in pid {engine.pid}: {names}"
    return f"started engine {engine.name} at {engine.url} in pid {engine.pid}"
