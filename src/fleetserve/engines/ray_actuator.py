"""`RayActuator`: the fleet's engines started as processes on the nodes of a Ray cluster, for fleets
that outgrow one machine (`fleetserve serve --ray ADDRESS`).

Each engine is one Ray actor (`EngineHost`, no CPU reserved: the engine process does the work) that
runs on a node of the cluster. The actor picks a free port on its node's address, starts the engine
there with the same launcher and command lines as a local engine (`engines/fleet.py`), and answers
when the engine answers its ready path; the gateway then registers `http://NODE_IP:PORT`. Stopping
the engine stops its process and ends the actor; an actor that dies takes its engine with it (the
launcher's parent-death signal). Every node needs fleetserve installed (the same virtual environment
path, as Ray's workers run the driver's Python) and must be reachable from the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fleetserve.config import EngineGroup, EngineInstance, FleetConfig, GatewayConfig
from fleetserve.control import CannotStart
from fleetserve.engines.actuator import FleetMembership, Launch, ProcessActuator, free_port
from fleetserve.engines.fleet import DEFAULT_READY_TIMEOUT_S, LaunchError, checked_spec
from fleetserve.engines.launcher import EngineLauncher, EngineStartError

log = logging.getLogger(__name__)


class EngineHost:
    """A Ray actor that runs one engine process on its node (see the module docstring)."""

    def __init__(self) -> None:
        self._launcher: EngineLauncher | None = None
        self._work_dir: Path | None = None

    def launch(
        self, config: FleetConfig, group: str, engine_id: str, ready_timeout: float
    ) -> tuple[str, int]:
        """Start the engine on this node; (address, port) once it answers. Raises EngineStartError (with
        the end of its log) or LaunchError (the node lacks the engine's program)."""
        import ray

        host = ray.util.get_node_ip_address()
        on_node = config.model_copy(update={"emulator": config.emulator.model_copy(update={"host": host})})
        spec = next(entry for entry in on_node.engines if entry.name == group)
        port = free_port(host, with_kv_events=spec.kv_events)
        self._work_dir = Path(tempfile.mkdtemp(prefix=f"fleetserve-{engine_id}-"))
        instance = EngineInstance(engine_id, spec, port, f"http://{host}:{port}")
        launcher = EngineLauncher(ready_timeout=ready_timeout, log_dir=self._work_dir / "logs")
        launcher.start([checked_spec(on_node, instance, self._work_dir)])
        self._launcher = launcher
        return host, port

    def stop(self) -> None:
        if self._launcher is not None:
            self._launcher.stop()
            self._launcher = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None


class RayActuator(ProcessActuator[Any]):
    """Starts engines on the Ray cluster this process is connected to (`connect_ray` first)."""

    def __init__(
        self,
        config: FleetConfig,
        membership: FleetMembership,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        import ray

        super().__init__(config, membership)
        self._ready_timeout = ready_timeout
        # what a node needs to start an engine: no tokens, tenants' key digests or Redis address
        self._engines_only = config.model_copy(
            update={"gateway": GatewayConfig(), "tenants": [], "redis": None}
        )
        # num_cpus=0: the actor only waits on its engine; the engine's own CPUs are the node's
        self._host = ray.remote(num_cpus=0, max_restarts=0)(EngineHost)

    def _prepare(self, group: EngineGroup, engine_id: str) -> Launch[Any]:
        async def launch() -> tuple[EngineInstance, Any]:
            import ray

            actor = self._host.remote()
            try:
                host, port = await actor.launch.remote(
                    self._engines_only, group.name, engine_id, self._ready_timeout
                )
            except ray.exceptions.RayTaskError as exc:
                ray.kill(actor)
                cause = exc.cause if isinstance(exc.cause, EngineStartError | LaunchError) else exc
                raise EngineStartError(f"on the Ray cluster: {cause}") from None
            except asyncio.CancelledError:
                await asyncio.to_thread(_end, actor)
                raise
            log.info("engine %s runs on Ray node %s", engine_id, host)
            return EngineInstance(engine_id, group, port, f"http://{host}:{port}"), actor

        return launch

    async def _terminate(self, handle: Any) -> None:
        await asyncio.to_thread(_end, handle)

    async def close(self) -> None:
        """Stop every engine, then leave the cluster."""
        import ray

        await super().close()
        log.info("leaving the Ray cluster")
        ray.shutdown()
        log.info("left the Ray cluster")


def _end(actor: Any) -> None:
    """Stop the actor's engine, then the actor."""
    import ray

    try:
        ray.get(actor.stop.remote(), timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        log.warning("stopping a Ray engine host failed (%r); killing the actor", exc)
    ray.kill(actor)


def connect_ray(address: str) -> None:
    """Join the Ray cluster at `address` (host:port of its head, or `auto`); CannotStart when it is not
    there, or Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise CannotStart("--ray needs Ray: pip install 'fleetserve[ray]'") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ray.exceptions.RaySystemError, ValueError) as exc:
        raise CannotStart(f"cannot join the Ray cluster at {address}: {exc}") from None
