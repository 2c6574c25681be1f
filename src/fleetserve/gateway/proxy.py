"""Forwarding one admitted request to an engine and its answer back to the client.

The request body is parsed once (for routing) and forwarded as the client sent it. An answer is passed
through chunk by chunk: the only look inside a stream is for event boundaries, so that a stream cut by a
failing engine never leaves half an event. Until the client has received a byte, a failed attempt
(refused connection, 5xx, timeout, engine gone) is retried on another engine. After that, a stream whose
engine fails or stalls is resumed on another engine (`protocol/continuation.py`: the text so far goes
into the continuation's prompt and its events are spliced into the client's stream), at most
`gateway.max_resumes` times; a stream that cannot be resumed ends with a whole SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson

from fleetserve.config import GatewayConfig
from fleetserve.fleet.state import EngineState
from fleetserve.gateway.admission import (
    AdmissionGate,
    ClientGone,
    Endpoint,
    ParsedRequest,
    parse_request,
    read_body,
)
from fleetserve.gateway.asgi import Receive, Scope, Send, header_map, send_bytes, send_error
from fleetserve.gateway.dispatch import Dispatcher, ModelIndex
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.gateway.migration import MovableStreams, PendingMove
from fleetserve.gateway.tenancy import Admitted, Tenancy
from fleetserve.gateway.tokens import PromptTokenizer
from fleetserve.pipeline import Answer, RequestSession
from fleetserve.protocol.continuation import (
    MAX_TRANSCRIPT_BYTES,
    ChatRenderer,
    Splice,
    Transcript,
    continuation,
    read_transcript,
    unresumable_reason,
)
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.sse import DONE, sse_error
from fleetserve.routing import Decision

log = logging.getLogger(__name__)

# statuses that blame the engine: the request may succeed elsewhere
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
CLIENT_CLOSED = 499  # nginx's convention for "the client went away", used as a metric label only
EVENT_SEPARATORS = (b"\n\n", b"\r\n\r\n")
UPSTREAM_HEADERS = {"content-type": "application/json"}
DONE_EVENTS = (b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n")
JSON_EVENT = b"data: {"
COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
REPORT_RESUMES_HEADER = b"x-fleetserve-report-resumes"
EMPTY_TRANSCRIPT = Transcript(None, None, None, "", 0, False, None, False)
MIGRATING = (200, "migration", "")  # _pump: the engine handed the stream over to another


@dataclass(slots=True)
class Exchange:
    """One client request in flight through the gateway."""

    parsed: ParsedRequest
    kind: Endpoint
    body: bytes
    path: str
    session: RequestSession
    headers: dict[str, str]  # sent to every engine
    arrival: float
    send: Send
    admitted: Admitted
    headers_with_auth: dict[str, str] | None = None  # plus the client's Authorization, for trusted engines
    engine_id: str = ""  # the engine of the current attempt
    completing: bool = False  # the answer is complete for the client; a disconnect now changes nothing
    status: int = 500  # what the client got, once it has it (500 until then: a bug ends it that way)
    output_tokens: int = 0  # the answer's usage, or the stream's events until a usage chunk says
    tried: list[str] = field(default_factory=list)  # engines that failed this request
    unresumable: str | None = None  # why a stream of it cannot be resumed on another engine
    report_resumes: bool = False  # the client asked for x_fleetserve.resumed in the last chunk

    def headers_for(self, engine: EngineState) -> dict[str, str]:
        if engine.spec.forward_auth and self.headers_with_auth is not None:
            return self.headers_with_auth
        return self.headers


@dataclass(slots=True)
class _Recording:
    """The events a client has received of a resumable stream, bounded by MAX_TRANSCRIPT_BYTES."""

    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, events: bytes) -> _Recording | None:
        """Self with `events` added, or None once the stream is too long to keep (and resume)."""
        self.size += len(events)
        if self.size > MAX_TRANSCRIPT_BYTES:
            return None
        self.parts.append(events)
        return self

    def events(self) -> bytes:
        return b"".join(self.parts)


@dataclass(slots=True)
class _ClientStream:
    """One client's stream across the engines that serve it."""

    inter_token: Any  # the model's inter-token histogram child
    last_sent: float
    counts_output: bool
    recording: _Recording | None  # None: this stream is not resumed
    splice: Splice | None = None  # rewrites a continuation (or adds the resume report)
    resumes: int = 0
    pending: bytes = b""  # the start of an event not yet whole
    events_seen: int = 0
    usage_tokens: int | None = None
    move: PendingMove | None = None  # set by the migration loop: go on on another engine


class Proxy:
    def __init__(
        self,
        config: GatewayConfig,
        dispatcher: Dispatcher,
        models: ModelIndex,
        metrics: GatewayMetrics,
        session: Callable[[], aiohttp.ClientSession],
        debug_header: bool,
        clock: Callable[[], float] = time.monotonic,
        *,
        tenancy: Tenancy,
        tokenizer: PromptTokenizer | None = None,
        chat_renderers: Mapping[str, ChatRenderer] | None = None,
        movable: MovableStreams | None = None,
    ) -> None:
        """`tokenizer` gives policies the prompt's token ids (for prefix hashing) when the model is
        known; `tenancy` says which tenant a request is and checks its quotas; `chat_renderers` (model
        -> its chat template) let a chat stream resume on a llama.cpp engine; `movable` (with
        migration on) lists the streams the migration loop may move, and engines then learn each
        request's id (x-request-id) to name it in their loads."""
        self._chat_renderers = chat_renderers or {}
        self._movable = movable
        self._config = config
        self._tokenizer = tokenizer
        self._dispatcher = dispatcher
        self._models = models
        self._metrics = metrics
        self._session = session
        self._debug_header = debug_header
        self._clock = clock
        self._tenancy = tenancy
        self.gate = AdmissionGate(config.max_queue)

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        arrival = self._clock()
        headers = header_map(scope)
        # a request takes a place in the queue only once its body is complete: a client that stalls
        # mid-body waits out body_timeout_s on its own connection instead of locking others out
        try:
            body = await self._read_body(receive, headers)
            self.gate.enter()
        except ClientGone:
            self._count("", "", CLIENT_CLOSED)
            return
        except APIError as error:
            self._count("", "", error.status)
            await send_error(send, error)
            return
        self._metrics.in_flight.inc()
        try:
            await self._admitted(scope, receive, send, endpoint, arrival, headers, body)
        finally:
            self._metrics.in_flight.dec()
            self.gate.leave()

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        limit = self._config.body_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await read_body(receive, headers.get(b"content-length"), self._config.max_body_bytes)
        except TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {limit:g} s", headers={"Connection": "close"}
            ) from None

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        arrival: float,
        headers: dict[bytes, bytes],
        body: bytes,
    ) -> None:
        model = ""
        tenancy = self._tenancy
        try:
            tenant, keyed = tenancy.identify(
                headers.get(b"authorization"), _text(headers.get(b"x-fleetserve-tenant"))
            )
            parsed = parse_request(body, endpoint)
            model = parsed.model
            tenancy.authorise(tenant, model)  # before the model index: a 403 must not say what exists
            base_model, adapter = self._models.resolve(model)
            policy = self._dispatcher.policy_for(headers.get(b"x-fleetserve-policy"))
            priority = _priority(headers.get(b"x-fleetserve-priority"))
        except APIError as error:
            self._count(model, "", error.status)
            await send_error(send, error)
            return
        token_ids = (
            None
            if self._tokenizer is None
            else self._tokenizer.token_ids(parsed.payload, endpoint, base_model)
        )
        prompt_len = len(token_ids) if token_ids else parsed.prompt_len
        try:
            admitted = await tenancy.admit(tenant, prompt_len)
        except APIError as error:
            self._count(model, "", error.status)
            self._metrics.tenant_requests.labels(tenant.name, str(error.status)).inc()
            await send_error(send, error)
            return
        session = self._dispatcher.path.open(
            self._dispatcher.next_request_id(),
            base_model,
            adapter=adapter,
            prompt_len=prompt_len,
            max_output_tokens=parsed.max_output_tokens,
            prompt_token_ids=token_ids,
            tenant=tenant.name,
            session=_text(headers.get(b"x-session-id") or headers.get(b"x-fleetserve-session"))
            or _user(parsed),
            priority=priority,
            arrival=arrival,
            policy=policy,
        )
        upstream_headers = UPSTREAM_HEADERS
        if self._movable is not None:
            upstream_headers = {**UPSTREAM_HEADERS, "x-request-id": session.info.request_id}
        exchange = Exchange(
            parsed, endpoint, body, scope["path"], session, upstream_headers, arrival, send, admitted
        )
        if parsed.stream:
            exchange.unresumable = unresumable_reason(parsed.payload, endpoint)
            exchange.report_resumes = _flag(headers.get(REPORT_RESUMES_HEADER))
        if b"authorization" in headers and not keyed:
            exchange.headers_with_auth = {
                **upstream_headers,
                "authorization": headers[b"authorization"].decode("latin-1"),
            }
        await self._until_disconnect(exchange, receive)

    async def _until_disconnect(self, exchange: Exchange, receive: Receive) -> None:
        """Forward the request, cancelling it (and so the upstream request) if the client goes away."""
        task = asyncio.current_task()
        assert task is not None
        client_gone = False

        async def watch() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not exchange.completing:
                client_gone = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            answer = await self._dispatcher.admit(exchange.session, self._clock)
            if answer is None:
                await self._forward(exchange)
            else:
                await self._send_answer(exchange, answer)
        except asyncio.CancelledError:
            if not client_gone:
                raise
            task.uncancel()
            self._count(exchange.parsed.model, exchange.engine_id, CLIENT_CLOSED)
            exchange.status = CLIENT_CLOSED
        except APIError as error:
            self._count(exchange.parsed.model, "", error.status)
            exchange.status = error.status
            exchange.completing = True
            await send_error(exchange.send, error)
        finally:
            watcher.cancel()
            now = self._clock()
            self._dispatcher.finished(
                exchange.session, now, exchange.status, now - exchange.arrival, exchange.output_tokens
            )
            await self._settle(exchange)

    async def _settle(self, exchange: Exchange) -> None:
        """The tenant's side of a request that ended: quota counts and per-tenant metrics."""
        admitted = exchange.admitted
        name = admitted.tenant.name
        self._metrics.tenant_requests.labels(name, str(exchange.status)).inc()
        if exchange.status == 200:
            tokens = self._metrics.tenant_tokens
            tokens.labels(name, "prompt").inc(exchange.session.info.prompt_len)
            if self._tenancy.counts_output:  # answers are read for usage only when something charges it
                tokens.labels(name, "output").inc(exchange.output_tokens)
        await self._tenancy.finished(admitted, exchange.output_tokens)

    async def _send_answer(self, exchange: Exchange, answer: Answer) -> None:
        """A stage's own answer: JSON, or one SSE event and [DONE] for a streaming request."""
        exchange.completing = True
        exchange.status = answer.status
        body = orjson.dumps(answer.body)
        if exchange.parsed.stream and answer.status == 200:
            await send_bytes(exchange.send, 200, b"data: " + body + b"\n\n" + DONE, b"text/event-stream")
        else:
            await send_bytes(exchange.send, answer.status, body, b"application/json")
        self._count(exchange.parsed.model, "", answer.status)

    async def _forward(self, exchange: Exchange) -> None:
        tried = exchange.tried
        failure: APIError | None = None
        for attempt in range(self._config.max_retries + 1):
            now = self._clock()
            session = exchange.session
            try:
                engine, decision = self._dispatcher.choose(session, tried, now)
            except APIError:
                if failure is None:
                    raise
                # every candidate failed once: try them again rather than give up (a stale pooled
                # connection to a restarted engine fails once and then works)
                try:
                    engine, decision = self._dispatcher.choose(session, (), now)
                except APIError:
                    raise failure from None
            if attempt:
                self._metrics.retries.labels(exchange.parsed.model).inc()
            session.dispatched(now)
            exchange.engine_id = engine.engine_id
            try:
                failure = await self._attempt(exchange, engine, decision)
            finally:
                session.attempt_ended(self._clock())
            if failure is None:
                return
            tried.append(engine.engine_id)
        assert failure is not None
        raise failure

    async def _attempt(self, exchange: Exchange, engine: EngineState, decision: Decision) -> APIError | None:
        """Returns None once the client has its answer, or the error to retry on another engine."""
        config = self._config
        parsed = exchange.parsed
        started = self._clock()
        remaining = config.total_timeout_s - (started - exchange.arrival)
        first_byte_limit = min(config.first_token_timeout_s, remaining) if parsed.stream else remaining
        response: aiohttp.ClientResponse | None = None
        failure: APIError | None = None
        first = b""
        try:
            async with asyncio.timeout(first_byte_limit):
                response = await self._session().post(
                    engine.url + exchange.path, data=exchange.body, headers=exchange.headers_for(engine)
                )
                if response.status in RETRYABLE_STATUS:
                    message = f"engine {engine.engine_id} answered {response.status}"
                    failure = self._failed(engine, "status", 502, message)
                elif parsed.stream and response.status == 200:
                    first = await response.content.readany()
                else:
                    first = await response.read()
        except TimeoutError:
            what = "first byte" if parsed.stream else "response"
            failure = self._failed(
                engine, "timeout", 504, f"engine {engine.engine_id} sent no {what} in time"
            )
        except aiohttp.ClientError as exc:
            failure = self._failed(
                engine,
                "connect",
                502,
                f"engine {engine.engine_id} failed: {_describe(exc)}",
                # nothing listens: eject now rather than after more requests fail the same way
                unreachable=isinstance(exc, aiohttp.ClientConnectorError),
            )
        if failure is not None:
            if response is not None:
                response.close()
            return failure
        assert response is not None
        try:
            exchange.session.first_token(self._clock())
            if parsed.stream and response.status == 200:
                await self._relay_stream(exchange, engine, decision, response, first)
            else:
                await self._relay_whole(exchange, engine, decision, response, first)
        finally:
            response.close()
        return None

    async def _relay_whole(
        self,
        exchange: Exchange,
        engine: EngineState,
        decision: Decision,
        response: aiohttp.ClientResponse,
        body: bytes,
    ) -> None:
        engine.health.request_succeeded(self._clock())
        exchange.completing = True
        if self._tenancy.counts_output and response.status == 200:
            exchange.output_tokens = _completion_tokens(body)
        await exchange.send(self._start(exchange, response, decision, len(body)))
        await exchange.send({"type": "http.response.body", "body": body})
        elapsed = self._clock() - exchange.arrival
        model = exchange.parsed.model
        self._metrics.ttft.labels(model).observe(elapsed)
        self._metrics.e2e.labels(model).observe(elapsed)
        self._count(model, engine.engine_id, response.status)
        exchange.status = response.status

    async def _relay_stream(
        self,
        exchange: Exchange,
        engine: EngineState,
        decision: Decision,
        response: aiohttp.ClientResponse,
        chunk: bytes,
    ) -> None:
        """Relay the stream; if its engine fails mid-stream, resume it on another engine (up to
        `max_resumes` times) under the same client stream, else end it with an error event."""
        send, model = exchange.send, exchange.parsed.model
        await send(self._start(exchange, response, decision, None))
        now = self._clock()
        self._metrics.ttft.labels(model).observe(now - exchange.arrival)
        stream = _ClientStream(
            self._metrics.inter_token.labels(model),
            now,
            self._tenancy.counts_output,
            _Recording() if exchange.unresumable is None and self._config.max_resumes else None,
        )
        if exchange.report_resumes:
            stream.splice = self._splice(exchange, EMPTY_TRANSCRIPT, as_completion=False, resumes=0)
        request_id = exchange.session.info.request_id
        movable = self._movable if stream.recording is not None else None
        first_response = response
        try:
            while True:
                if movable is not None:
                    movable.add(request_id, engine.engine_id, stream)
                failure = await self._pump(exchange, engine, response, chunk, stream)
                if response is not first_response:
                    response.close()  # a continuation's; the first is closed by the attempt that opened it
                if failure is None:
                    tail = stream.pending
                    break
                status, kind, message = failure
                if failure is MIGRATING:
                    resumed = await self._migrate(exchange, engine, stream)
                    status, message = (
                        502,
                        f"engine {engine.engine_id} handed the stream over; no engine took it",
                    )
                else:
                    resumed = await self._resume(exchange, engine, kind, stream)
                if resumed is None:
                    tail = sse_error(status, message, _error_type(status)) + DONE
                    break
                engine, response, chunk = resumed
        finally:
            if movable is not None:
                movable.remove(request_id)
                if stream.move is not None:
                    stream.move.end("abandoned")
        exchange.completing = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        self._metrics.e2e.labels(model).observe(self._clock() - exchange.arrival)
        exchange.status = 200 if failure is None else status
        self._count(model, engine.engine_id, exchange.status)

    async def _pump(
        self,
        exchange: Exchange,
        engine: EngineState,
        response: aiohttp.ClientResponse,
        chunk: bytes,
        stream: _ClientStream,
    ) -> tuple[int, str, str] | None:
        """Relay one engine's stream to the client, whole events only. None when the engine finished
        it; (status, kind, message) when the engine failed or stalled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.total_timeout_s - (self._clock() - exchange.arrival)
        stall = self._config.stream_stall_timeout_s
        # moving the stall deadline costs a timer per chunk: move it at most every tenth of the stall
        # timeout (a stall is then detected 0.9x to 1x the timeout after the last chunk)
        refresh = stall / 10
        moved = loop.time()
        try:
            async with asyncio.timeout_at(min(deadline, moved + stall)) as timer:
                while chunk:
                    data = stream.pending + chunk if stream.pending else chunk
                    cut = _last_event_end(data)
                    if cut:
                        events = data[:cut] if stream.splice is None else stream.splice.feed(data[:cut])
                        await self._deliver(exchange, stream, events)
                    stream.pending = data[cut:]
                    now = loop.time()
                    if now - moved > refresh:
                        moved = now
                        timer.reschedule(min(deadline, now + stall))
                    chunk = await response.content.readany()
            engine.health.request_succeeded(self._clock())
            # the engine ended the stream without [DONE] because the migration loop exported it
            return MIGRATING if stream.move is not None and not exchange.completing else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            stream.pending = b""  # half an event from a failed engine never reaches the client
            stalled = isinstance(exc, TimeoutError) and loop.time() < deadline
            if isinstance(exc, TimeoutError):
                kind, status = ("stall" if stalled else "timeout"), 504
                what = f"sent nothing for {stall:g} s" if stalled else "ran out of time"
                message = f"engine {engine.engine_id} {what} mid-stream"
            else:
                kind, status = "stream", 502
                message = f"engine {engine.engine_id} failed mid-stream: {_describe(exc)}"
            self._note_failure(engine, kind)
            if not stalled and isinstance(exc, TimeoutError):
                stream.recording = None  # the request's own time is up: there is none left to resume in
            return status, kind, message

    async def _deliver(self, exchange: Exchange, stream: _ClientStream, events: bytes) -> None:
        if not events:
            return
        # a client may close as soon as it has [DONE] (guidellm does): that is a success
        if events.endswith(DONE_EVENTS):
            exchange.completing = True
        if stream.recording is not None:
            stream.recording = stream.recording.add(events)
        if stream.splice is not None:
            exchange.output_tokens = stream.splice.completion_tokens
        elif stream.counts_output:
            stream.events_seen += events.count(JSON_EVENT)
            if b"completion_tokens" in events:
                stream.usage_tokens = _last_completion_tokens(events, stream.usage_tokens)
            exchange.output_tokens = (
                stream.events_seen if stream.usage_tokens is None else stream.usage_tokens
            )
        await exchange.send({"type": "http.response.body", "body": events, "more_body": True})
        now = self._clock()
        stream.inter_token.observe(now - stream.last_sent)
        stream.last_sent = now

    async def _resume(
        self, exchange: Exchange, failed: EngineState, reason: str, stream: _ClientStream
    ) -> tuple[EngineState, aiohttp.ClientResponse, bytes] | None:
        """Continue the answer on another engine: the engine, its open stream and its first bytes, with
        `stream.splice` set to rewrite them; None when the stream cannot or may no longer be resumed."""
        config = self._config
        session = exchange.session
        session.attempt_ended(self._clock())
        exchange.tried.append(failed.engine_id)
        if stream.move is not None:  # a failure before the move began: the move is off
            stream.move.end("abandoned")
            stream.move = None
        if stream.recording is None:
            if exchange.unresumable is not None and config.max_resumes:
                log.info("stream %s not resumed: %s", session.info.request_id, exchange.unresumable)
            return None
        so_far = self._so_far(stream)
        if so_far.tool_calls:
            log.info("stream %s not resumed: a tool call was being streamed", session.info.request_id)
            return None
        while stream.resumes < config.max_resumes:
            stream.resumes += 1
            self._metrics.stream_resumes.labels(reason).inc()
            opened = await self._open_continuation(exchange, so_far, stream)
            if opened is not None:
                engine = opened[0]
                log.info(
                    "stream %s resumed on %s after %s on %s, %d tokens in (resume %d of %d)",
                    session.info.request_id,
                    engine.engine_id,
                    reason,
                    failed.engine_id,
                    so_far.tokens,
                    stream.resumes,
                    config.max_resumes,
                )
                return opened
        log.warning(
            "stream %s ends with an error: %d resumes used (gateway.max_resumes)",
            session.info.request_id,
            stream.resumes,
        )
        return None

    async def _migrate(
        self, exchange: Exchange, source: EngineState, stream: _ClientStream
    ) -> tuple[EngineState, aiohttp.ClientResponse, bytes] | None:
        """Carry the stream its engine just exported to the move's destination: the last stage's
        downtime, then the continuation there with the request's state; if the destination refuses,
        resume it wherever the router says, as after a failure."""
        pending = stream.move
        assert pending is not None
        session = exchange.session
        try:
            exported = await pending.exported
            stream.move = None
            session.attempt_ended(self._clock())
            if exported is None:  # the export answer was lost (a timeout) though the engine ended the stream
                pending.end("abandoned")
                return await self._resume(exchange, source, "migration", stream)
            if pending.downtime_s > 0:
                await asyncio.sleep(pending.downtime_s)  # the last stage of the KV copy
            so_far = self._so_far(stream)
            opened = await self._open_continuation(
                exchange,
                so_far,
                stream,
                engine=pending.destination,
                extra_headers=pending.import_header(exported),
            )
            if opened is None:
                pending.end("failed")
                log.warning(
                    "stream %s: %s refused the move from %s; resuming elsewhere",
                    session.info.request_id,
                    pending.destination.engine_id,
                    source.engine_id,
                )
                self._metrics.stream_resumes.labels("migration").inc()
                return await self._open_continuation(exchange, so_far, stream)
            pending.end("moved")
            move = pending.move
            log.info(
                "stream %s moved from %s to %s (%s, %s), %d tokens in",
                session.info.request_id,
                source.engine_id,
                pending.destination.engine_id,
                move.reason,
                "KV copied" if pending.kv else "recomputed",
                so_far.tokens,
            )
            return opened
        finally:
            pending.end("abandoned")

    def _so_far(self, stream: _ClientStream) -> Transcript:
        """What the client has of the answer, from the recorded events."""
        assert stream.recording is not None
        so_far = read_transcript(stream.recording.events())
        if stream.splice is not None:
            so_far = replace(so_far, tokens=stream.splice.completion_tokens)
        return so_far

    async def _open_continuation(
        self,
        exchange: Exchange,
        so_far: Transcript,
        stream: _ClientStream,
        *,
        engine: EngineState | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[EngineState, aiohttp.ClientResponse, bytes] | None:
        """The continuation opened on `engine` (default: where the router sends it, not an engine
        already tried), with `extra_headers`; None when it does not start."""
        session = exchange.session
        now = self._clock()
        if engine is None:
            try:
                engine, _ = self._dispatcher.choose(session, exchange.tried, now)
            except APIError:
                return None
        else:
            session.engine = engine.view
        # a model served by llama.cpp continues a chat through its own template (see chat_templates)
        renderer = self._chat_renderers.get(engine.model)
        plan = continuation(
            exchange.parsed.payload,
            exchange.kind,
            so_far,
            chat_style="continue_final_message" if renderer is None else "rendered",
            render=renderer,
        )
        session.dispatched(now)
        exchange.engine_id = engine.engine_id
        remaining = self._config.total_timeout_s - (now - exchange.arrival)
        headers = exchange.headers_for(engine)
        if extra_headers:
            headers = {**headers, **extra_headers}
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(min(self._config.first_token_timeout_s, remaining)):
                response = await self._session().post(
                    engine.url + plan.path, data=orjson.dumps(plan.body), headers=headers
                )
                first = await response.content.readany() if response.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._note_failure(engine, "connect", unreachable=isinstance(exc, aiohttp.ClientConnectorError))
            first = b""
        if response is None or response.status != 200 or not first:
            if response is not None:
                if response.status != 200:
                    self._note_failure(engine, "status")
                response.close()
            session.attempt_ended(self._clock())
            exchange.tried.append(engine.engine_id)
            return None
        stream.splice = self._splice(
            exchange, so_far, as_completion=plan.as_completion, resumes=stream.resumes
        )
        return engine, response, first

    def _splice(self, exchange: Exchange, so_far: Transcript, *, as_completion: bool, resumes: int) -> Splice:
        options = exchange.parsed.payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        return Splice(
            exchange.kind,
            so_far,
            as_completion=as_completion,
            client_usage=bool(options.get("include_usage")),
            client_continuous_usage=bool(options.get("continuous_usage_stats")),
            report_resumes=resumes if exchange.report_resumes else None,
        )

    def _start(
        self, exchange: Exchange, response: aiohttp.ClientResponse, decision: Decision, length: int | None
    ) -> dict[str, object]:
        headers = [
            (b"content-type", response.headers.get("content-type", "application/json").encode("latin-1"))
        ]
        headers += [(name.encode(), value.encode()) for name, value in exchange.admitted.headers]
        if length is None:
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"content-length", str(length).encode()))
        if self._debug_header:
            headers.append((b"x-fleetserve-route", f"{decision.engine_id};{decision.reason}".encode()))
        return {"type": "http.response.start", "status": response.status, "headers": headers}

    def _failed(
        self, engine: EngineState, kind: str, status: int, message: str, *, unreachable: bool = False
    ) -> APIError:
        self._note_failure(engine, kind, unreachable=unreachable)
        return APIError(status, message)

    def _note_failure(self, engine: EngineState, kind: str, *, unreachable: bool = False) -> None:
        self._metrics.upstream_errors.labels(engine.engine_id, kind).inc()
        health = engine.health
        was_routable = health.routable
        if unreachable:
            health.unreachable(self._clock())
        else:
            health.request_failed(self._clock())
        if was_routable and not health.routable:
            log.warning(
                "engine %s ejected for %.1f s after a failed request (%s)",
                engine.engine_id,
                health.ejected_until - self._clock(),
                kind,
            )
            self._dispatcher.health_changed()

    def _count(self, model: str, engine_id: str, status: int) -> None:
        self._metrics.requests.labels(model, engine_id, str(status)).inc()


def _last_event_end(data: bytes) -> int:
    """Offset just past the last complete SSE event in `data` (0 when there is none)."""
    end = 0
    for separator in EVENT_SEPARATORS:
        found = data.rfind(separator)
        if found >= 0:
            end = max(end, found + len(separator))
    return end


def _error_type(status: int) -> str:
    return "GatewayTimeoutError" if status == 504 else "BadGatewayError"


def _flag(value: bytes | None) -> bool:
    return value is not None and value.strip().lower() in (b"1", b"true", b"yes")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _priority(value: bytes | None) -> int:
    """The x-fleetserve-priority header: an integer, higher served first by the priority stage."""
    if value is None:
        return 0
    try:
        return int(value.decode("latin-1").strip())
    except ValueError:
        raise APIError(
            400, "the x-fleetserve-priority header must be an integer", param="x-fleetserve-priority"
        ) from None


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None


def _user(parsed: ParsedRequest) -> str | None:
    user = parsed.payload.get("user")
    return user if isinstance(user, str) else None


def _completion_tokens(body: bytes) -> int:
    """`usage.completion_tokens` of a whole answer (0 when it has none)."""
    try:
        usage = orjson.loads(body).get("usage")
        tokens = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return tokens if isinstance(tokens, int) else 0


def _last_completion_tokens(events: bytes, previous: int | None) -> int | None:
    found = COMPLETION_TOKENS.findall(events)
    return int(found[-1]) if found else previous
