"""Precise prefix mode for the live fleet: follow every engine's KV-cache events over ZMQ.

vLLM (and the emulator, and SGLang with the same config) publishes KV events on a PUB socket, one
message per batch with three frames: the topic, an 8-byte big-endian sequence number, and a msgpack
`[ts, [event, ...], data_parallel_rank?]`. An event is a tagged array, `["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, ...]` (older vLLM stops after
`medium`, newer adds fields after `lora_name`), `["BlockRemoved", block_hashes, medium]` or
`["AllBlocksCleared"]`; newer vLLM can also send the same fields as a map with the tag under "type".

One `KVEventSubscriber` per engine decodes the stream into `KVEventIndexer`, which keeps the shared
`PrefixIndex` that routing policies read through `FleetView.prefix_index`. PUB/SUB drops messages when a
subscriber falls behind (or before it finished connecting), so every batch's sequence number is checked:
on a gap the subscriber asks the engine's ROUTER replay socket for everything since the last batch it
applied (a DEALER sends `[b"", start_seq]` and receives `[b"", (topic,) seq, payload]` per buffered batch,
then an empty payload as the end marker). When the replay fails, times out or no longer reaches back
far enough, it forgets the engine's blocks and starts again from the next batch: a stale index would
route to caches that are gone, an empty one merely routes by load until the engine stores blocks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from fleetserve.errors import InputError
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from fleetserve.routing.kv_event_index import KVEventIndexer
from fleetserve.routing.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

MAX_QUEUED_BATCHES = 10_000  # the SUB socket's high-water mark; beyond it ZMQ drops and we replay
REPLAY_TIMEOUT_S = 2.0


class EventFormatError(InputError):
    """A message or event that is not in vLLM's KV-event format."""


def decode_event(raw: Any) -> KVEvent | None:
    """One event from its msgpack form; None for event kinds this router does not use."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        tag = raw[0]
        names = _FIELDS.get(tag, ())
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise EventFormatError(f"not a KV event: {raw!r:.80}")
    try:
        if tag == "BlockStored":
            return BlockStored(
                block_hashes=tuple(_block_hash(h) for h in fields["block_hashes"]),
                parent_block_hash=_optional_hash(fields.get("parent_block_hash")),
                token_ids=tuple(fields["token_ids"]),
                block_size=int(fields["block_size"]),
                lora_id=fields.get("lora_id"),
                medium=fields.get("medium", "GPU"),
                lora_name=fields.get("lora_name"),
            )
        if tag == "BlockRemoved":
            return BlockRemoved(
                tuple(_block_hash(h) for h in fields["block_hashes"]), fields.get("medium", "GPU")
            )
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError, ValueError) as error:
        raise EventFormatError(f"malformed {tag} event: {error}") from None
    return None


_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
}


def _block_hash(value: Any) -> int:
    # vLLM sends 64-bit ints, or bytes for its sha256 hashes; both only need to be stable keys here
    if isinstance(value, bytes):
        return int.from_bytes(value, "big")
    return int(value)


def _optional_hash(value: Any) -> int | None:
    return None if value is None else _block_hash(value)


def decode_batch(payload: bytes) -> list[KVEvent]:
    """The events of one batch payload, `[ts, events, dp_rank?]` (array form) or a map form."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as error:
        raise EventFormatError(f"undecodable batch: {error}") from None
    if isinstance(batch, dict):
        raw_events = batch.get("events")
    elif isinstance(batch, list) and len(batch) >= 2:
        raw_events = batch[1]
    else:
        raw_events = None
    if not isinstance(raw_events, list):
        raise EventFormatError("a KV event batch must hold a list of events")
    events = []
    for raw in raw_events:
        event = decode_event(raw)
        if event is not None:
            events.append(event)
    return events


@dataclass
class SubscriberStats:
    batches: int = 0  # batches applied, live or replayed
    gaps: int = 0  # sequence gaps seen on the live stream
    replayed: int = 0  # batches applied from replays
    replay_failures: int = 0  # replays that failed, timed out or did not reach back far enough
    resets: int = 0  # times the engine's blocks were forgotten
    decode_errors: int = 0


class KVEventSubscriber:
    """Follows one engine's KV events into `indexer` until closed; call `start` from the event loop."""

    def __init__(
        self,
        engine_id: str,
        endpoint: str,
        indexer: KVEventIndexer,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        replay_timeout_s: float = REPLAY_TIMEOUT_S,
        max_queued_batches: int = MAX_QUEUED_BATCHES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine_id = engine_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.indexer = indexer
        self.replay_timeout_s = replay_timeout_s
        self.max_queued_batches = max_queued_batches
        self.stats = SubscriberStats()
        self._clock = clock
        self._context = zmq.asyncio.Context.instance()
        self._dealer: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_live_seq: int | None = None
        self._skip = 0
        self._synced = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"kv-events-{self.engine_id}"
            )

    async def wait_synced(self) -> None:
        """Returns once the subscriber is connected and has caught up with the engine's replay buffer."""
        await self._synced.wait()

    def skip_batches(self, count: int) -> None:
        """Fault injection for tests: drop the next `count` live batches as if ZMQ had lost them."""
        self._skip += count

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_dealer()

    async def _run(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, self.max_queued_batches)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sub.connect(self.endpoint)
        try:
            # batches published before the SUB connection settled are lost to it: fetch them
            if self.replay_endpoint is not None:
                await self._replay(0)
            self._synced.set()
            while True:
                frames = await sub.recv_multipart()
                try:
                    await self._on_message(frames)
                except EventFormatError as error:
                    self.stats.decode_errors += 1
                    logger.warning("engine %s: %s; forgetting its blocks", self.engine_id, error)
                    self._reset()
        finally:
            sub.close(linger=0)

    async def _on_message(self, frames: Sequence[bytes]) -> None:
        if len(frames) != 3:
            raise EventFormatError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
        _, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        if self._skip:
            self._skip -= 1
            return
        if self._last_live_seq is not None and seq <= self._last_live_seq:
            # the live stream never goes back: the engine restarted and numbers from 0 again
            logger.info("engine %s restarted its KV event sequence; forgetting its blocks", self.engine_id)
            self._reset()
        self._last_live_seq = seq
        events = decode_batch(payload)
        if self.indexer.apply_batch(self.engine_id, seq, events, self._clock()):
            self.stats.batches += 1
            return
        self.stats.gaps += 1
        expected = self.indexer.expected_seq(self.engine_id)
        replayed = self.replay_endpoint is not None and expected is not None and await self._replay(expected)
        # the replay usually covered this batch too, which then counts as a duplicate
        if replayed and self.indexer.apply_batch(self.engine_id, seq, events, self._clock()):
            return
        self._reset()
        self.indexer.apply_batch(self.engine_id, seq, events, self._clock())
        self.stats.batches += 1

    async def _replay(self, start: int) -> bool:
        """Apply every batch the engine still buffers from `start` on. False when the replay failed, timed
        out, or began after `start` (the engine's buffer no longer holds the missing batches)."""
        dealer = self._dealer
        if dealer is None:
            assert self.replay_endpoint is not None
            dealer = self._dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.replay_endpoint)
        deadline = time.monotonic() + self.replay_timeout_s
        try:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                frames = await asyncio.wait_for(dealer.recv_multipart(), remaining)
                if len(frames) < 3 or frames[0] != b"":
                    raise EventFormatError(f"unexpected replay reply of {len(frames)} frames")
                payload = frames[-1]
                if not payload:
                    return True
                seq = int.from_bytes(frames[-2], "big")
                if not self.indexer.apply_batch(self.engine_id, seq, decode_batch(payload), self._clock()):
                    raise EventFormatError(f"replay starts at {seq}, after the missing batches")
                self.stats.replayed += 1
                self.stats.batches += 1
        except (TimeoutError, EventFormatError, zmq.ZMQError) as error:
            self.stats.replay_failures += 1
            logger.warning(
                "engine %s: KV event replay from %d failed: %s", self.engine_id, start, error or "timeout"
            )
            # replies still in flight would be mistaken for the next replay's: start a fresh socket
            self._close_dealer()
            return False

    def _reset(self) -> None:
        self.stats.resets += 1
        self.indexer.reset_engine(self.engine_id)

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None


class KVEventHub:
    """The fleet's precise prefix index and one subscriber per engine that publishes KV events.

    Hand `hub.index` to the fleet view (`FleetView.prefix_index`) and cache-aware policies read it instead
    of learning their own approximate index."""

    def __init__(self, index: PrefixIndex | None = None, **subscriber_options: Any) -> None:
        self.index = index if index is not None else PrefixIndex()
        self.indexer = KVEventIndexer(self.index)
        self._options = subscriber_options
        self.subscribers: dict[str, KVEventSubscriber] = {}

    async def subscribe(
        self, engine_id: str, endpoint: str, replay_endpoint: str | None = None, topic: str = ""
    ) -> KVEventSubscriber:
        """Start following `engine_id`, replacing an earlier subscription (its blocks are kept: the
        sequence check tells whether the new stream continues the old one)."""
        old = self.subscribers.pop(engine_id, None)
        if old is not None:
            await old.close()
        subscriber = KVEventSubscriber(
            engine_id, endpoint, self.indexer, replay_endpoint=replay_endpoint, topic=topic, **self._options
        )
        self.subscribers[engine_id] = subscriber
        subscriber.start()
        return subscriber

    async def unsubscribe(self, engine_id: str) -> None:
        """Stop following `engine_id` and forget its blocks (it left the fleet)."""
        subscriber = self.subscribers.pop(engine_id, None)
        if subscriber is not None:
            await subscriber.close()
        self.indexer.reset_engine(engine_id)

    async def close(self) -> None:
        for engine_id in list(self.subscribers):
            await self.unsubscribe(engine_id)
