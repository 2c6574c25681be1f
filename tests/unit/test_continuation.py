"""Resuming a stream on another engine, the protocol side: what can be resumed, what the client has,
the continuation request, and the spliced events."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetserve.protocol.continuation import (
    Splice,
    continuation,
    read_transcript,
    unresumable_reason,
)
from fleetserve.protocol.sse import sse_event


def chat_chunk(delta: dict, finish: str | None = None, rid: str = "chatcmpl-a", created: int = 5) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return sse_event(
        {"id": rid, "object": "chat.completion.chunk", "created": created, "model": "m", "choices": [choice]}
    )


def usage_chunk(prompt: int, completion: int, rid: str = "chatcmpl-b") -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return sse_event(
        {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": 9,
            "model": "m2",
            "choices": [],
            "usage": usage,
        }
    )


def payloads(events: bytes) -> list[dict]:
    return [orjson.loads(e[6:]) for e in events.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize(
    ("payload", "kind", "reason"),
    [
        ({"n": 2, "messages": []}, "chat", "n > 1"),
        ({"logprobs": True, "messages": []}, "chat", "logprobs"),
        ({"seed": 3, "messages": []}, "chat", "a seed the client set"),
        ({"prompt": [1, 2, 3]}, "completions", "a prompt of token ids"),
        ({"prompt": "x", "echo": True}, "completions", "echo, best_of or suffix"),
        ({"prompt": ["x"]}, "completions", None),
        ({"messages": [], "n": 1, "seed": None}, "chat", None),
    ],
)
def test_what_cannot_be_resumed_faithfully(payload: dict, kind: str, reason: str | None) -> None:
    assert unresumable_reason(payload, kind) == reason  # type: ignore[arg-type]


def test_the_transcript_is_what_the_client_has() -> None:
    events = chat_chunk({"role": "assistant", "content": ""}) + chat_chunk({"content": "Hel"})
    events += chat_chunk({"content": "lo"})
    so_far = read_transcript(events)
    assert (so_far.response_id, so_far.created, so_far.model) == ("chatcmpl-a", 5, "m")
    assert so_far.text == "Hello" and so_far.tokens == 2 and so_far.role_sent
    assert so_far.finish_reason is None and not so_far.tool_calls
    tool = read_transcript(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}))
    assert tool.tool_calls
    # continuous usage, when the stream has it, counts tokens better than events do
    counted = sse_event(
        {"id": "c", "choices": [{"index": 0, "text": "ab"}], "usage": {"completion_tokens": 4}}
    )
    assert read_transcript(counted).tokens == 4


def test_a_chat_continues_its_last_message_with_the_limits_reduced() -> None:
    so_far = read_transcript(
        chat_chunk({"role": "assistant", "content": "Hi"}) + chat_chunk({"content": " there"})
    )
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": "q"}],
        "max_completion_tokens": 10,
        "stream": True,
        "min_tokens": 5,
    }
    plan = continuation(payload, "chat", so_far)
    assert plan.path == "/v1/chat/completions" and not plan.as_completion
    assert plan.body["messages"][-1] == {"role": "assistant", "content": "Hi there"}
    assert plan.body["continue_final_message"] is True and plan.body["add_generation_prompt"] is False
    assert plan.body["max_completion_tokens"] == 8 and plan.body["min_tokens"] == 3
    assert plan.body["stream_options"] == {"include_usage": True}
    assert payload["messages"] == [{"role": "user", "content": "q"}]  # the client's body is untouched
    rendered = continuation(
        payload, "chat", so_far, chat_style="rendered", render=lambda ms: "<" + ms[0]["content"] + ">"
    )
    assert rendered.path == "/v1/completions" and rendered.as_completion
    assert rendered.body["prompt"] == "<q>Hi there" and rendered.body["max_tokens"] == 8
    assert "messages" not in rendered.body


def test_a_completion_continues_its_prompt() -> None:
    so_far = read_transcript(sse_event({"id": "c", "choices": [{"index": 0, "text": " world"}]}))
    plan = continuation({"model": "m", "prompt": ["hello"], "max_tokens": 3}, "completions", so_far)
    assert plan.body["prompt"] == "hello world" and plan.body["max_tokens"] == 2


def test_the_splice_speaks_as_the_first_stream_and_counts_every_token_once() -> None:
    so_far = read_transcript(
        chat_chunk({"role": "assistant", "content": ""})
        + chat_chunk({"content": "a"})
        + chat_chunk({"content": "b"})
    )
    splice = Splice(
        "chat",
        so_far,
        as_completion=False,
        client_usage=True,
        client_continuous_usage=False,
        report_resumes=1,
    )
    continued = chat_chunk({"role": "assistant", "content": ""}, rid="chatcmpl-b", created=9)
    continued += chat_chunk({"content": "c"}, rid="chatcmpl-b") + chat_chunk(
        {"content": "d"}, "stop", rid="x"
    )
    # the destination's prompt holds the original 7 tokens and the 2 already generated
    continued += usage_chunk(prompt=9, completion=2) + b"data: [DONE]\n\n"
    out = splice.feed(continued)
    chunks = payloads(out)
    assert [c["id"] for c in chunks] == ["chatcmpl-a"] * 3 and {c["created"] for c in chunks} == {5}
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"content": "c"}, {"content": "d"}]
    assert chunks[1]["choices"][0]["finish_reason"] == "stop" and "x_fleetserve" not in chunks[1]
    assert chunks[2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert chunks[2]["x_fleetserve"] == {"resumed": 1} and chunks[2]["model"] == "m"
    assert out.endswith(b"data: [DONE]\n\n") and splice.completion_tokens == 4


def test_usage_the_client_did_not_ask_for_is_left_out_and_completions_become_chat_chunks() -> None:
    so_far = read_transcript(chat_chunk({"role": "assistant", "content": "a"}))
    splice = Splice(
        "chat",
        so_far,
        as_completion=True,
        client_usage=False,
        client_continuous_usage=False,
        report_resumes=2,
    )
    text = sse_event(
        {
            "id": "cmpl-x",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "text": "b", "finish_reason": "length", "logprobs": None}],
        }
    )
    chunks = payloads(splice.feed(text + usage_chunk(3, 1)))
    assert len(chunks) == 1
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"content": "b"}, "finish_reason": "length"}]
    assert chunks[0]["x_fleetserve"] == {"resumed": 2}  # no usage chunk: the finishing chunk is the last
    assert splice.completion_tokens == 2


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=30), st.integers(0, 30))
def test_the_text_before_and_after_a_resume_is_contiguous(pieces: list[str], cut_at: int) -> None:
    cut = min(cut_at, len(pieces))
    first = chat_chunk({"role": "assistant", "content": ""}) + b"".join(
        chat_chunk({"content": p}) for p in pieces[:cut]
    )
    so_far = read_transcript(first)
    splice = Splice(
        "chat",
        so_far,
        as_completion=False,
        client_usage=False,
        client_continuous_usage=False,
        report_resumes=None,
    )
    rest = chat_chunk({"role": "assistant", "content": ""}, rid="other")
    rest += b"".join(chat_chunk({"content": p}, rid="other") for p in pieces[cut:])
    whole = read_transcript(first + splice.feed(rest))
    assert whole.text == "".join(pieces) and whole.tokens == len(pieces)
    assert splice.completion_tokens == len(pieces)
