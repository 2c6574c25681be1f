"""`fleetserve serve --ray ADDRESS` against a real local Ray cluster (`ray start --head`, started and
stopped by the test): the fleet file's engine, one the admin API asks for and those the autoscaler
adds all run as processes under Ray actors, serve requests through the gateway, and are gone when
they are stopped or serve exits."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest
from tests.helpers import free_port, stop_process_group, wait_until
from tests.integration.gateway_harness import Serve, answers, get_json, post_json

pytest.importorskip("ray")

pytestmark = pytest.mark.ray

RAY = Path(sys.executable).with_name("ray")


def _head_up(address: str) -> bool:
    done = subprocess.run(
        [str(RAY), "status", "--address", address], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


def _processes(pattern: str) -> list[str]:
    """The pids of processes whose command line holds `pattern`."""
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).stdout.split()


def _engine_processes(temp: Path) -> int:
    """Engine processes started from the cluster (their command line names `engine emulate`)."""
    return len(_processes("engine emulate --fleet " + str(temp)))


def test_serve_runs_and_scales_engines_on_a_ray_cluster(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's session folder holds unix sockets, whose paths must stay short
    ray_temp = Path(tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp"))
    node_tmp = tmp_path / "node"  # the node's temporary files: where its engines' work folders go
    node_tmp.mkdir()
    head_log = tmp_path / "ray-head.log"
    with head_log.open("wb") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={ray_temp}", "--block"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a token in ~/.ray (which a local cluster started earlier may have written) would turn Ray's
            # token authentication on for this head only, and lock out its clients
            env={**os.environ, "TMPDIR": str(node_tmp), "RAY_AUTH_MODE": "disabled"},
        )  # fmt: skip
    serve = None
    try:
        try:
            wait_until(lambda: _head_up(address), timeout=90, interval=0.25)
        except AssertionError:
            raise AssertionError("the Ray head did not come up:\n" + head_log.read_text()) from None
        gateway_port, admin_port = free_port(), free_port()
        autoscaled = {
            "name": "l4",
            "gpu": "l4",
            "model": "llama-3-8b",
            "autoscale": {"max_replicas": 2, "target": 2, "interval_s": 0.5, "stable_window_s": 2,
                          "panic_window_s": 1, "scale_down_cooldown_s": 2},
        }  # fmt: skip
        fixed = {"name": "h100", "gpu": "h100-80g", "model": "qwen2.5-7b", "replicas": 0}
        fleet = {
            "engines": [autoscaled, fixed],
            "gateway": {"port": gateway_port, "admin_port": admin_port, "health_interval_s": 0.2},
        }
        serve = Serve(tmp_path, fleet, "--ray", address)
        url, admin = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{admin_port}"
        wait_until(lambda: answers(url + "/ready"), timeout=90, message="ready:\n" + serve.output())
        assert _engines(admin) == {"l4-0": "ready"}
        assert "engine l4-0 runs on Ray node" in serve.output()
        assert _engine_processes(node_tmp) == 1  # under the Ray worker, not under serve
        assert not any("engine emulate" in _cmdline(pid) for pid in serve.descendants())

        started = post_json(admin + "/engines", {"group": "h100"})
        assert started == {"id": "h100-0", "group": "h100", "state": "starting"}
        wait_until(lambda: _engines(admin).get("h100-0") == "ready", timeout=60, message=serve.output())

        # a burst: 8 requests in flight for a target of 2 a replica, so the autoscaler adds one
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(index: int) -> int:
            answer = client.completions.create(
                model="llama-3-8b", prompt=f"hello {index}", max_tokens=48, extra_body={"ignore_eos": True}
            )
            assert answer.usage is not None
            return answer.usage.completion_tokens

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(24))) == [48] * 24
        events = get_json(admin + "/autoscale")["scale_events"]
        assert [(e["from"], e["to"]) for e in events][:1] == [(1, 2)], serve.output()
        # idle again: the replica it added is drained, stopped, and its actor ended
        wait_until(lambda: "l4-1" not in _engines(admin), timeout=60, message=serve.output())
        wait_until(lambda: _engine_processes(node_tmp) == 2, timeout=30, message="scaled-in engine gone")
    finally:
        if serve is not None:
            serve.popen.send_signal(2)  # Ctrl-C: serve stops its engines on the cluster
            serve.popen.wait(timeout=60)
            assert _engine_processes(node_tmp) == 0
        # Ray's head, asked to stop, waits for its workers for half a minute; nothing is left to save
        stop_process_group(head, timeout=3)
        wait_until(
            lambda: not _processes(str(ray_temp)), timeout=30, message="the Ray cluster's processes end"
        )
        shutil.rmtree(ray_temp, ignore_errors=True)


def _engines(admin: str) -> dict[str, str]:
    return {engine["id"]: engine["state"] for engine in get_json(admin + "/engines")["engines"]}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
