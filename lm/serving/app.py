"""The HTTP face of a served model: OpenAI's chat completions and completions (with server-sent
event streams), the model list, a classify route, health and Prometheus metrics, with the limits
that keep one server up under any client.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for what the client can fix: a body that is not JSON or has a wrong type (400, where
FastAPI would say 422), a prompt or ``max_tokens`` over the limits (400), a wrong or missing API
key (401), a model this server does not serve (404), a request that ran past ``timeout_s`` (408),
a body over ``max_body_bytes`` (413), more than ``max_concurrent`` requests at once (429, at once:
the queue behind the running batch is never longer than that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lm.errors import LmforgeError
from lm.serving.engine import Classified, Delta, EngineClosed, Event, Failed, Finished
from lm.serving.metrics import ServingMetrics
from lm.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    ClassifyBody,
    CompletionRequest,
    Limits,
    error_body,
)
from lm.serving.served_model import ModelSlot, ServedModel

HEALTH = "/health"
_UNION_BRANCH = re.compile(r"str|int|float|bool|[a-z-]+\[.*\]")


# ---- middleware (plain ASGI: they answer before FastAPI reads a body) ----------------------------


async def _send_json(send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class _Observe:
    """Counts every response by route and status, and times it to its last byte (a stream's end)."""

    def __init__(self, app, metrics: ServingMetrics, slot: ModelSlot, routes: set[str]):
        self.app, self.metrics, self.slot, self.routes = app, metrics, slot, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        version = self.slot.current.version_label
        t0 = time.perf_counter()
        status = [500]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(route, str(status[0]), version).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


class _Authorize:
    """``Authorization: Bearer KEY`` on every route but /health, compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == HEALTH:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided" if header else "Missing API key: send 'Authorization: Bearer KEY'"
        await _send_json(send, 401, error_body(401, message, code="invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")])


class _LimitBody:
    """Refuses a body over ``limit`` bytes: at once when Content-Length says so, else as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than this server's limit of {self.limit} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, error_body(413, str(self._error().detail), code="request_too_large"))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()  # FastAPI passes an HTTPException from reading the body through
            return message

        await self.app(scope, limited_receive, send)


# ---- from the engine's thread to a request's coroutine ------------------------------------------


class _Mailbox:
    """Events from engine threads to the event loop, delivered in bursts: a decode step publishes to
    every running request at once, and waking the loop once per event (call_soon_threadsafe writes
    to its self-pipe) cost about 7% of the engine thread's time at 8 concurrent streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Event]] = []
        self.scheduled = False

    def post(self, queue: asyncio.Queue, event: Event) -> None:  # called by an engine thread
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (the server is stopping)
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


class _Events:
    """One request's events, put by the engine thread (through the mailbox), read by its coroutine."""

    GONE = Failed("client disconnected")

    def __init__(self, mailbox: _Mailbox) -> None:
        self.mailbox = mailbox
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._held: Event | None = None

    def emit(self, event: Event) -> None:
        self.mailbox.post(self.queue, event)

    async def get(self) -> Event:
        """The next event; new text that has already arrived behind it comes with it. A stream that
        keeps up gets a chunk per token; one that fell behind (many streams, a slow client) catches
        up in fewer, longer chunks instead of paying a write per token."""
        event, self._held = self._held or await self.queue.get(), None
        if not isinstance(event, Delta):
            return event
        text, tokens = event.text, event.completion_tokens
        while not self.queue.empty():
            nxt = self.queue.get_nowait()
            if isinstance(nxt, Delta):
                text, tokens = text + nxt.text, nxt.completion_tokens
            elif isinstance(nxt, Finished):
                return dataclasses.replace(nxt, text=text + nxt.text)
            else:
                self._held = nxt
                break
        return event if tokens == event.completion_tokens else Delta(text, tokens)


async def _watch_disconnect(request: Request, events: _Events) -> None:
    """Once the body is read, the next ASGI message is the client going away (or the response ending)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.queue.put_nowait(_Events.GONE)
            return


class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """Server-sent events until ``deadline``; ``on_close`` runs however the stream ends (finished, client
    gone, error, timeout).

    The deadline covers waiting for the client as well as for tokens: a send waits while the client's
    socket is full, so a client reading too slowly for its stream to leave by the deadline gets
    ``timeout_tail`` in place of the rest (its generation and its place are freed at once), and the
    connection is dropped if it does not read up to there within ``TAIL_GRACE_S``. (A timeout around
    the generator alone fired while it was suspended in a send: the stream was cut mid-chunk, without
    its error event or [DONE], and uvicorn logged "ASGI callable returned without completing response".)
    """

    TAIL_GRACE_S = 10.0

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], deadline: float,
                 timeout_tail: str):
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close, self.deadline, self.timeout_tail = on_close, deadline, timeout_tail

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        tail = b""
        try:
            async with asyncio.timeout_at(self.deadline):
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        except TimeoutError:
            tail = self.timeout_tail.encode()
        finally:
            self.on_close()  # the engine and the place are done with it, though the client may still read
        try:
            async with asyncio.timeout(self.TAIL_GRACE_S):
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except TimeoutError:
            return  # the client has stopped reading: uvicorn closes the connection

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the app -------------------------------------------------------------------------------------


class _Service:
    """What every route shares: the model slot, the limits, the metrics, the places in flight, and
    the submit / watch / cancel loop that generation and classification both run."""

    def __init__(self, slot: ModelSlot, limits: Limits, metrics: ServingMetrics):
        self.slot, self.limits, self.metrics = slot, limits, metrics
        self.in_flight = 0
        self.mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    def new_events(self) -> _Events:
        loop = asyncio.get_running_loop()
        if loop not in self.mailboxes:
            self.mailboxes[loop] = _Mailbox(loop)
        return _Events(self.mailboxes[loop])

    def admit(self) -> Callable[[], None]:
        """A place among the requests in flight (429 when none is free) -> its release."""
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(429, f"this server is at its limit of {self.limits.max_concurrent} concurrent requests; "
                           "retry shortly", code="too_many_requests")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)

        return release

    def current(self, requested: str | None, kind: str) -> ServedModel:
        served = self.slot.current
        if requested and requested not in (served.name, served.served_as):
            raise ApiError(404, f"the model {requested!r} does not exist here: this server serves {served.name!r} "
                           f"(version {served.version or 'local'}; GET /v1/models)", param="model",
                           code="model_not_found")
        if served.kind != kind:
            other = "POST /v1/classify" if served.kind == "classifier" else "/v1/chat/completions or /v1/completions"
            raise ApiError(400, f"{served.name!r} is a {served.kind}: use {other}", param="model",
                           code="wrong_model_kind")
        return served

    def submit(self, start: Callable[[_Events], tuple[ServedModel, Any, Any]]) -> tuple[ServedModel, Any, Any, _Events]:
        """``start(events) -> (served, job, what it prepared)``, tried again when the engine closed under
        it: the model may be swapped between choosing it and submitting (at most three tries)."""
        for _ in range(3):
            events = self.new_events()
            try:
                return (*start(events), events)
            except EngineClosed:
                continue
        raise _unavailable(self.slot)

    async def wait(self, request: Request, served: ServedModel, job: Any, events: _Events, deadline: float,
                   first_token: Callable[[], None] | None):
        """The job's end, or None when the client went away first; the job is cancelled either way."""
        watcher = asyncio.create_task(_watch_disconnect(request, events))
        try:
            return await _until_finished(events, deadline, first_token, self.limits.timeout_s)
        except _ClientGone:
            return None
        finally:
            watcher.cancel()
            served.engine.cancel(job)

    def sampling(self, body, served: ServedModel, prompt: list[int], what: str):
        from lm.generation.sampling import SamplingParams

        limits = self.limits
        n = len(prompt)
        max_prompt = min(limits.max_prompt_tokens or served.seq_len, served.seq_len - 1)
        if n > max_prompt:
            raise ApiError(400, f"the prompt is {n} tokens; this server takes at most {max_prompt} "
                           f"(the model's context is {served.seq_len})", param=what, code="context_length_exceeded")
        cap = limits.max_new_tokens or served.seq_len
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if asked is not None and asked > cap:
            raise ApiError(400, f"{param}={asked} is more than this server's limit of {cap} new tokens",
                           param=param, code="max_tokens_exceeded")
        room = served.seq_len - n
        if asked is not None and asked > room:
            raise ApiError(400, f"the model's context is {served.seq_len} tokens: the prompt ({n}) leaves room for "
                           f"{room} new tokens, not {param}={asked}", param=param, code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=asked or min(cap, room), temperature=body.temperature, top_k=body.top_k or None,
                top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=stop, seed=body.seed,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def prepare(self, body, chat: bool) -> tuple[ServedModel, list[int], Any]:
        refused = body.refused()
        if refused:
            raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
        served = self.current(body.model, "decoder")
        if chat:
            if served.chat is None:
                raise ApiError(400, f"{served.name!r} has no chat template (tokenizer_config.json): use "
                               "/v1/completions", param="messages", code="no_chat_template")
            try:
                prompt = served.chat_prompt(body.conversation())
            except LmforgeError as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            prompt = served.text_prompt(body.text())
        return served, prompt, self.sampling(body, served, prompt, "messages" if chat else "prompt")

    async def generation(self, request: Request, body, chat: bool):
        """A chat or text completion: streamed (the stream releases its place when it ends) or whole."""
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.limits.timeout_s
        release = self.admit()
        try:
            def start(events: _Events):
                served, prompt, params = self.prepare(body, chat)
                return served, served.engine.submit(prompt, params, events.emit), prompt

            served, job, prompt, events = self.submit(start)
            self.metrics.prompt_tokens.labels(served.version_label).inc(len(prompt))
            reply = _Reply(chat, served.served_as, include_usage=bool(body.stream_options and body.stream_options.include_usage))

            def first_token() -> None:
                self.metrics.first_token.observe(time.perf_counter() - t0)

            if body.stream:
                place, release = release, None

                def on_close() -> None:
                    served.engine.cancel(job)
                    place()

                return _EventStream(reply.stream(events, first_token), on_close, deadline,
                                    reply.timeout_tail(self.limits.timeout_s))
            end = await self.wait(request, served, job, events, deadline, first_token)
            if end is None:
                return Response(status_code=499)  # nginx's "client closed request": no one reads it
            return JSONResponse(reply.whole(end))
        finally:
            if release is not None:
                release()

    async def classify(self, request: Request, body: ClassifyBody) -> dict[str, Any] | Response:
        texts = body.texts()
        if not texts:
            raise ApiError(400, "input is empty: give a text or a list of texts", param="input")
        deadline = asyncio.get_running_loop().time() + self.limits.timeout_s
        release = self.admit()
        try:
            def start(events: _Events):
                served = self.current(body.model, "classifier")
                return served, served.engine.submit(texts, events.emit), None

            served, job, _, events = self.submit(start)
            end = await self.wait(request, served, job, events, deadline, None)
        finally:
            release()
        if end is None:
            return Response(status_code=499)
        labels = served.labels
        data = [
            {"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
             "scores": {label: float(p) for label, p in zip(labels, row, strict=True)}}
            for i, row in enumerate(end.probabilities)
        ]
        return {"object": "list", "model": served.served_as, "data": data}


def _add_routes(app: FastAPI, service: _Service) -> None:
    slot = service.slot

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.generation(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.generation(request, body, chat=False)

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request):
        return await service.classify(request, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(slot.current)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        served = slot.current
        if model_id not in (served.name, served.served_as):
            raise ApiError(404, f"the model {model_id!r} does not exist here: this server serves {served.name!r}",
                           param="model", code="model_not_found")
        return _model_card(served)

    @app.get(HEALTH)
    async def health():
        served = slot.current
        if served.engine.exited:
            return JSONResponse({"status": "failed", "model": served.served_as}, status_code=503)
        return {"status": "ok", "model": served.served_as}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body: ours, validation, routing, and the unexpected."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
            return JSONResponse(error_body(400, message, code="invalid_json"), status_code=400)
        # A union's branches add their type to the location ("stop.list[str]"): not a field a client sent.
        loc = [str(p) for p in first["loc"] if p != "body" and not _UNION_BRANCH.fullmatch(str(p))]
        param = ".".join(loc) or None
        why = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        message = f"{param}: {why}" if param else why
        if len(e.errors()) > 1:
            message += f" (and {len(e.errors()) - 1} more problems)"
        return JSONResponse(error_body(400, message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return JSONResponse(error_body(e.status_code, str(e.detail), code=code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)


def create_app(slot: ModelSlot, limits: Limits, metrics: ServingMetrics) -> FastAPI:
    """The FastAPI app serving ``slot``'s model (whichever it holds when a request arrives)."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    _add_routes(app, _Service(slot, limits, metrics))
    _add_error_handlers(app)
    routes = {r.path for r in app.routes if hasattr(r, "path")} | {"/v1/models"}
    metrics.watch_engines(
        lambda: sum(m.engine.queue_depth for m in slot.models()),
        lambda: sum(m.engine.running for m in slot.models()),
    )
    # Outermost last: counted and timed, then the key, then the body's size.
    app.add_middleware(_LimitBody, limit=limits.max_body_bytes)
    if limits.api_key:
        app.add_middleware(_Authorize, api_key=limits.api_key)
    app.add_middleware(_Observe, metrics=metrics, slot=slot, routes=routes)
    return app


def _unavailable(slot: ModelSlot) -> ApiError:
    if slot.current.engine.exited:
        return ApiError(503, "the model's engine has stopped (the server's log says why)", code="engine_stopped")
    return ApiError(503, "the model is being replaced; retry", code="model_swapping")


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {
        "id": served.name,
        "object": "model",
        "created": served.loaded_at,
        "owned_by": "lmforge",
        "version": served.version,  # the registry version served (None: a folder)
        "served_as": served.served_as,  # what responses name as their model
        "source": served.source,
        "kind": served.kind,
        "chat": served.chat is not None,
        "max_model_len": served.seq_len,
    }


async def _until_finished(events: _Events, deadline: float, first_token: Callable[[], None] | None,
                          timeout_s: float) -> Finished | Classified:
    """Wait for the end of a request (non-streaming)."""
    first = True
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                event = await events.get()
                if event is _Events.GONE:
                    raise _ClientGone
                if first and first_token is not None:
                    first_token()
                first = False
                if isinstance(event, Finished | Classified):
                    return event
                if isinstance(event, Failed):
                    raise ApiError(500, event.message, code="engine_error")
    except TimeoutError:
        raise ApiError(408, f"the request took longer than this server's limit of {timeout_s:g} s",
                       code="request_timeout") from None


class _Reply:
    """OpenAI's response bodies for one request: whole, or as chunks of a stream."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    @staticmethod
    def usage(end: Finished) -> dict[str, int]:
        return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    def whole(self, end: Finished) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": end.full_text},
                      "logprobs": None, "finish_reason": end.finish_reason}
        else:
            choice = {"index": 0, "text": end.full_text, "logprobs": None, "finish_reason": end.finish_reason}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.model, "choices": [choice], "usage": self.usage(end)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": self.model, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    async def stream(self, events: _Events, first_token: Callable[[], None]) -> AsyncIterator[str]:
        """The stream's events (its deadline is :class:`_EventStream`'s)."""
        if self.chat:
            yield _sse(self.chunk(None, role=True))
        end, first = None, True
        while end is None:
            event = await events.get()
            if first:
                first_token()
                first = False
            if isinstance(event, Failed):
                yield _sse(error_body(500, event.message, code="engine_error"))
                break
            if event.text:
                yield _sse(self.chunk(event.text))
            if isinstance(event, Finished):
                end = event
                yield _sse(self.chunk(None, end.finish_reason))
        if end is not None and self.include_usage:
            yield _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created, "model": self.model, "choices": [], "usage": self.usage(end)})
        yield _sse("[DONE]")

    @staticmethod
    def timeout_tail(timeout_s: float) -> str:
        """How a stream past its deadline ends."""
        error = error_body(408, f"the request took longer than this server's limit of {timeout_s:g} s",
                           code="request_timeout")
        return _sse(error) + _sse("[DONE]")
