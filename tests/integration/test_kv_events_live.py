"""Precise prefix mode end to end: a real `fleetserve engine emulate` process publishes KV events over
ZMQ, `KVEventHub` subscribers mirror them into a prefix index, and the index shows the blocks of prompts
sent with the openai client. Lost messages are recovered by replay, or, when replay is impossible, by
forgetting the engine's blocks."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from queue import Empty, Queue

import openai
import pytest
from tests.helpers import free_port, stop_process_group

from fleetserve.fleet.kv_events import KVEventHub
from fleetserve.model.kvcache import hash_prompt_blocks

READY = re.compile(r"fleetserve emulated engine ready: id=(\S+) .*url=(\S+)")
MODEL = "llama-3-8b"


class Emulator:
    def __init__(self, pub: str, replay: str) -> None:
        self.pub, self.replay = pub, replay
        command = [
            sys.executable, "-c", "from fleetserve.cli import main; main()", "engine", "emulate",
            "--gpu", "h100-80g", "--model", MODEL, "--port", "0", "--time-scale", "0.05",
            "--kv-events-endpoint", pub, "--kv-events-replay-endpoint", replay,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.output: list[str] = []
        lines: Queue[str] = Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        self.url = self._wait_ready(lines)

    def _pump(self, lines: Queue[str]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            lines.put(line)

    def _wait_ready(self, lines: Queue[str], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                match = READY.search(lines.get(timeout=0.5))
            except Empty:
                if self.process.poll() is not None:
                    break
                continue
            if match:
                return match.group(2)
        self.stop()
        raise RuntimeError("emulator did not become ready:\n" + "".join(self.output))

    def stop(self) -> None:
        stop_process_group(self.process)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    engine = Emulator(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    yield engine
    engine.stop()


async def eventually(condition: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30_000 + 1 for i in range(blocks * 16 + 5)]  # a partial last block


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=90))


def test_index_follows_the_engine_and_replays_a_lost_batch(emulator: Emulator) -> None:
    async def scenario() -> None:
        hub = KVEventHub()
        client = openai.AsyncOpenAI(base_url=f"{emulator.url}/v1", api_key="unused", max_retries=0)
        try:
            subscriber = await hub.subscribe("e0", emulator.pub, emulator.replay)
            await asyncio.wait_for(subscriber.wait_synced(), 10)

            async def send(tokens: list[int]) -> None:
                await client.completions.create(model=MODEL, prompt=tokens, max_tokens=2)

            first = prompt(1, 6)
            await send(first)
            first_hashes = hash_prompt_blocks(first, 16)
            await eventually(
                lambda: hub.index.match(first_hashes) == {"e0": 6}, "the first prompt's 6 blocks"
            )

            subscriber.skip_batches(1)  # lose the batch that stores the second prompt
            second, third = prompt(2, 4), prompt(3, 3)
            await send(second)
            await send(third)
            second_hashes, third_hashes = hash_prompt_blocks(second, 16), hash_prompt_blocks(third, 16)
            await eventually(lambda: hub.index.match(third_hashes) == {"e0": 3}, "the third prompt's blocks")
            assert subscriber.stats.gaps >= 1 and subscriber.stats.replayed >= 1
            assert hub.index.match(second_hashes) == {"e0": 4}, "the replay restored the lost batch"
            assert hub.index.match(first_hashes) == {"e0": 6}
            assert subscriber.stats.resets == 0 and subscriber.stats.decode_errors == 0
        finally:
            await hub.close()
            await client.close()
        assert len(hub.index) == 0  # unsubscribing forgot the engine's blocks

    run(scenario)


def test_failed_replay_forgets_the_engine_and_resumes(emulator: Emulator) -> None:
    async def scenario() -> None:
        # nothing answers on this replay endpoint, so recovery can only reset
        hub = KVEventHub(replay_timeout_s=0.3)
        client = openai.AsyncOpenAI(base_url=f"{emulator.url}/v1", api_key="unused", max_retries=0)
        try:
            subscriber = await hub.subscribe("e0", emulator.pub, f"tcp://127.0.0.1:{free_port()}")
            await asyncio.wait_for(subscriber.wait_synced(), 10)
            before = prompt(10, 5)
            await client.completions.create(model=MODEL, prompt=before, max_tokens=2)
            before_hashes = hash_prompt_blocks(before, 16)
            await eventually(lambda: hub.index.match(before_hashes) == {"e0": 5}, "blocks before the gap")

            subscriber.skip_batches(1)
            await client.completions.create(model=MODEL, prompt=prompt(11, 2), max_tokens=2)
            after = prompt(12, 3)
            await client.completions.create(model=MODEL, prompt=after, max_tokens=2)
            after_hashes = hash_prompt_blocks(after, 16)
            await eventually(lambda: hub.index.match(after_hashes) == {"e0": 3}, "blocks after the reset")
            assert subscriber.stats.resets >= 1 and subscriber.stats.replay_failures >= 2
            assert hub.index.match(before_hashes) == {}, "a reset forgets what the engine held"
        finally:
            await hub.close()
            await client.close()

    run(scenario)
