"""KV-cache events over ZMQ, in vLLM's wire format (vllm/distributed/kv_events.py).

Each PUB message has three frames: the topic, an 8-byte big-endian sequence number, and a msgpack
payload `[ts, [event, ...], data_parallel_rank]`. An event is encoded as msgspec encodes vLLM's tagged
structs: `array` (vLLM up to its map-encoding change, the format most routers read) gives
`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]`,
`["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`; `map` (newer vLLM) gives the same
fields by name with the tag under "type".

A ROUTER socket serves replays: a client sends `[b"", start_seq (8 bytes big-endian)]` (a REQ or DEALER
socket adds the identity) and receives `[b"", seq, payload]` for every buffered batch with seq >= start,
then `[b"", -1 (8 bytes, signed), b""]`.

Unlike vLLM, which binds only wildcard endpoints and connects otherwise, the emulator always binds: its
subscribers (the fleetserve gateway, other routers) connect to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgpack
import zmq
import zmq.asyncio

from fleetserve.config import kv_event_ports
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

EventFormat = Literal["array", "map"]
END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_BUFFER_BATCHES = 10_000  # vLLM's buffer_steps default
PUB_HIGH_WATER_MARK = 100_000


def kv_event_endpoints(host: str, http_port: int) -> tuple[str, str]:
    """The PUB and replay endpoints an engine of a fleet file uses when it has `kv_events: true`, on the
    ports every engine kind uses (`config.kv_event_ports`)."""
    publish, replay = kv_event_ports(http_port)
    return f"tcp://{host}:{publish}", f"tcp://{host}:{replay}"


def encode_event(event: KVEvent, event_format: EventFormat = "array") -> list[Any] | dict[str, Any]:
    match event:
        case BlockStored():
            fields: dict[str, Any] = {
                "block_hashes": list(event.block_hashes),
                "parent_block_hash": event.parent_block_hash,
                "token_ids": list(event.token_ids),
                "block_size": event.block_size,
                "lora_id": event.lora_id,
                "medium": event.medium,
                "lora_name": event.lora_name,
            }
            tag = "BlockStored"
        case BlockRemoved():
            fields = {"block_hashes": list(event.block_hashes), "medium": event.medium}
            tag = "BlockRemoved"
        case AllBlocksCleared():
            fields = {}
            tag = "AllBlocksCleared"
    if event_format == "map":
        return {"type": tag, **fields}
    return [tag, *fields.values()]


def encode_batch(
    events: Sequence[KVEvent], ts: float, data_parallel_rank: int = 0, event_format: EventFormat = "array"
) -> bytes:
    return msgpack.packb([ts, [encode_event(event, event_format) for event in events], data_parallel_rank])


class KVEventPublisher:
    """Publishes batches on a PUB socket and answers replay requests on a ROUTER socket.

    `publish` never blocks: ZMQ drops messages for a subscriber past the high-water mark, and the
    sequence numbers let that subscriber notice the gap and ask for a replay.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str = "",
        event_format: EventFormat = "array",
        buffer_batches: int = REPLAY_BUFFER_BATCHES,
    ) -> None:
        # a plain socket for PUB: a non-blocking send is a synchronous call that never waits
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.set_hwm(PUB_HIGH_WATER_MARK)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint.replace("*", "0.0.0.0") if endpoint.startswith("tcp://*") else endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        if replay_endpoint:
            self._replay = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._topic = topic.encode()
        self._format: EventFormat = event_format
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._next_seq = 0
        self._replay_task: asyncio.Task[None] | None = None
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay else None

    def start(self) -> None:
        """Start serving replays; call from the event loop."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replays())

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(events, time.time(), event_format=self._format)
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)

    async def _serve_replays(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue  # not [identity, empty delimiter, start seq]: vLLM ignores these too
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
