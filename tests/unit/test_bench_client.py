"""Reading OpenAI SSE streams into request records, wherever the network splits the bytes."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.bench.client import (
    BAD_PAYLOAD,
    EMPTY_STREAM,
    INCOMPLETE_STREAM,
    STREAM_ERROR,
    BenchRequest,
    RequestRecord,
    StreamingClient,
    read_stream,
    request_body,
)
from fleetserve.protocol.sse import DONE, sse_error, sse_event


def completion_chunk(text: str) -> bytes:
    return sse_event({"object": "text_completion", "choices": [{"index": 0, "text": text}]})


def chat_chunk(delta: dict[str, str]) -> bytes:
    return sse_event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})


def usage_chunk(tokens: int) -> bytes:
    return sse_event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens}})


def read(stream: bytes, cuts: list[int] | None = None) -> RequestRecord:
    """Runs `read_stream` over `stream` split at `cuts` (byte offsets)."""
    bounds = [0, *sorted(set(cuts or [])), len(stream)]

    async def pieces() -> AsyncIterator[bytes]:
        for begin, end in itertools.pairwise(bounds):
            yield stream[begin:end]

    record = RequestRecord(index=0, input_tokens=3, requested_output_tokens=5, scheduled_at=0.0)
    asyncio.run(read_stream(pieces(), record, time.perf_counter()))
    return record


FIVE_TOKENS = b"".join(completion_chunk(f" t{i}") for i in range(5)) + usage_chunk(5) + DONE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(FIVE_TOKENS) - 1), max_size=12))
def test_any_split_of_the_stream_reads_the_same(cuts: list[int]) -> None:
    record = read(FIVE_TOKENS, cuts)
    assert record.ok, record.error
    assert record.output_tokens == 5 and record.usage_reported
    assert record.ttft is not None and record.e2e is not None and record.e2e >= record.ttft
    assert len(record.itls) == 4


def test_crlf_framed_stream_is_read() -> None:
    stream = FIVE_TOKENS.replace(b"\n", b"\r\n")
    record = read(stream, [7, 40])
    assert record.ok and record.output_tokens == 5


def test_without_usage_tokens_are_counted_chunks() -> None:
    record = read(b"".join(completion_chunk("x") for _ in range(3)) + DONE)
    assert record.ok
    assert record.output_tokens == 3 and not record.usage_reported


def test_usage_overrides_chunk_count() -> None:
    # A server may pack several tokens into one chunk; usage is the truth.
    record = read(completion_chunk("two tokens") + usage_chunk(2) + DONE)
    assert record.output_tokens == 2
    assert record.itls == []


def test_chat_role_chunk_does_not_count_as_first_token() -> None:
    stream = chat_chunk({"role": "assistant", "content": ""}) + chat_chunk({"content": "hi"})
    stream += chat_chunk({"content": " there"}) + DONE
    record = read(stream)
    assert record.ok
    assert record.output_tokens == 2
    assert len(record.itls) == 1


def test_error_event_is_a_stream_error() -> None:
    record = read(completion_chunk("a") + sse_error(500, "engine died") + DONE)
    assert record.failure == STREAM_ERROR
    assert "engine died" in (record.error or "")


def test_stream_without_done_is_incomplete() -> None:
    record = read(completion_chunk("a") + completion_chunk("b"))
    assert record.failure == INCOMPLETE_STREAM
    assert record.tpot is None


def test_done_without_text_is_empty() -> None:
    assert read(usage_chunk(0) + DONE).failure == EMPTY_STREAM


def test_garbage_event_is_a_bad_payload() -> None:
    assert read(b"data: {not json\n\n" + DONE).failure == BAD_PAYLOAD


def test_events_after_done_are_ignored() -> None:
    record = read(completion_chunk("a") + DONE + sse_error(500, "late"))
    assert record.ok and record.output_tokens == 1


def test_request_body_asks_for_exact_lengths_and_usage() -> None:
    request = BenchRequest(index=0, prompt="hello world", input_tokens=2, max_tokens=7, model="m")
    completion = request_body(request, "completions")
    assert completion["prompt"] == "hello world"
    assert completion["max_tokens"] == 7 and completion["ignore_eos"] is True
    assert completion["stream"] is True and completion["stream_options"] == {"include_usage": True}
    chat = request_body(request, "chat")
    assert chat["messages"] == [{"role": "user", "content": "hello world"}]
    assert "prompt" not in chat
    assert orjson.loads(orjson.dumps(chat))["model"] == "m"


def test_base_url_with_or_without_v1() -> None:
    assert StreamingClient("http://h:8000").url == "http://h:8000/v1/completions"
    assert StreamingClient("http://h:8000/v1/", "chat").url == "http://h:8000/v1/chat/completions"
