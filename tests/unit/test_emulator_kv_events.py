"""KV events in vLLM's wire layout, published over ZMQ and replayed from the buffer."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from fleetserve.config import kv_event_ports, parse_fleet
from fleetserve.engines.emulator.kv_events import (
    END_SEQ,
    KVEventPublisher,
    encode_batch,
    encode_event,
    kv_event_endpoints,
)
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored

STORED = BlockStored((11, 12), None, tuple(range(32)), 16, None, "GPU", None)


def test_events_encode_as_msgspec_tagged_arrays() -> None:
    assert encode_event(STORED) == ["BlockStored", [11, 12], None, list(range(32)), 16, None, "GPU", None]
    assert encode_event(BlockRemoved((11,))) == ["BlockRemoved", [11], "GPU"]
    assert encode_event(AllBlocksCleared()) == ["AllBlocksCleared"]


def test_map_format_names_fields_and_tags_with_type() -> None:
    encoded = encode_event(STORED, "map")
    assert isinstance(encoded, dict)
    assert encoded["type"] == "BlockStored" and encoded["block_hashes"] == [11, 12]
    assert encoded["lora_name"] is None


def test_batch_is_ts_events_rank() -> None:
    ts, events, rank = msgpack.unpackb(encode_batch([STORED, AllBlocksCleared()], 12.5))
    assert ts == 12.5 and rank == 0 and [event[0] for event in events] == ["BlockStored", "AllBlocksCleared"]


def test_large_hashes_survive_msgpack() -> None:
    event = BlockStored((2**64 - 1,), 2**63, (1,) * 16, 16)
    assert msgpack.unpackb(encode_batch([event], 0.0))[1][0][1] == [2**64 - 1]


def test_emulated_engines_publish_where_launched_engines_and_the_gateway_expect() -> None:
    instance = parse_fleet(
        "engines: [{name: h, gpu: h100-80g, model: llama-3-8b, replicas: 3, kv_events: true}]"
    ).instances()[2]
    assert instance.port is not None
    publish, replay = kv_event_ports(instance.port)
    expected = (f"tcp://127.0.0.1:{publish}", f"tcp://127.0.0.1:{replay}")
    assert kv_event_endpoints("127.0.0.1", instance.port) == expected == instance.kv_event_endpoints()


def test_publish_then_replay_from_a_sequence_number() -> None:
    async def scenario() -> tuple[list[list[bytes]], list[list[bytes]]]:
        publisher = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv")
        publisher.start()
        context = zmq.asyncio.Context.instance()
        subscriber = context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"kv")
        subscriber.connect(publisher.endpoint)
        received: list[list[bytes]] = []
        # a SUB socket misses what is sent before it has joined: publish until one arrives
        while not received:
            publisher.publish([STORED])
            if await subscriber.poll(50):
                received.append(await subscriber.recv_multipart())
        publisher.publish([BlockRemoved((11,))])
        received.append(await asyncio.wait_for(subscriber.recv_multipart(), timeout=5))

        replay = context.socket(zmq.DEALER)
        replay.connect(publisher.replay_endpoint)
        await replay.send_multipart([b"", (1).to_bytes(8, "big")])
        replayed: list[list[bytes]] = []
        while True:
            frames = await asyncio.wait_for(replay.recv_multipart(), timeout=5)
            replayed.append(frames)
            if frames[1] == END_SEQ:
                break
        for sock in (subscriber, replay):
            sock.close(linger=0)
        await publisher.close()
        return received, replayed

    received, replayed = asyncio.run(scenario())
    topic, seq, payload = received[-1]
    assert topic == b"kv"
    assert msgpack.unpackb(payload)[1] == [["BlockRemoved", [11], "GPU"]]
    last_seq = int.from_bytes(seq, "big")
    assert [int.from_bytes(frames[1], "big") for frames in replayed[:-1]] == list(range(1, last_seq + 1))
    assert replayed[-1] == [b"", END_SEQ, b""]
