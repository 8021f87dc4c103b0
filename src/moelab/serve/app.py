"""The OpenAI-compatible HTTP surface of `moelab serve` (FastAPI, an ASGI app run by uvicorn).

    POST /v1/completions         prompt → text;  POST /v1/chat/completions   messages → the assistant's reply
    GET  /v1/models              the one model served;  GET /health;  GET /metrics (Prometheus text)

Streaming (`"stream": true`) sends server-sent events, one `data: {chunk}` per text delta, ending `data: [DONE]`.
Chat messages are rendered with the checkpoint's own chat template (`moelab.data.chat.ChatTemplate`, as
transformers' apply_chat_template renders it); a checkpoint without one answers 400 on that route. Each request
becomes a `moelab.serve.scheduler.Request` that the engine thread decodes in its running batch; its events come
back through an asyncio queue. Errors: 400 bad input (the field named), 401 a wrong API key, 404 an unknown model,
429 a full queue (Retry-After), 500 a failure inside that one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moelab.serve import protocol as api
from moelab.serve.metrics import Metrics
from moelab.serve.scheduler import Engine, Event, QueueFull
from moelab.serve.scheduler import Request as EngineRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the API's default for /v1/completions; chat: as many as the context leaves


@dataclass
class Served:
    """What the app serves: the engine over the model, its name, how to encode text and the chat template."""

    engine: Engine
    model_name: str
    encode_prompt: Any  # str -> list[int]: a completion prompt's ids (the checkpoint's prompt rule)
    encode_chat: Any  # str -> list[int]: a rendered conversation's ids (no special tokens added)
    template: Any = None  # moelab.data.chat.ChatTemplate or None
    metrics: Metrics | None = None
    api_key: str | None = None
    created: int = 0


def create_app(served: Served) -> FastAPI:
    """The FastAPI app over a started engine (`served.engine`); the engine is stopped, draining, at shutdown."""
    metrics = served.metrics or Metrics()
    served.metrics = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(served.engine.stop, True)  # uvicorn has let the open responses finish: drain

    app = FastAPI(title="moelab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return error(api.ApiError(500, f"{type(e).__name__}: {e}", type_="server_error"), request.url.path)

    def error(e: api.ApiError, route: str) -> JSONResponse:
        metrics.request(route, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorized(request: Request) -> None:
        if served.api_key is not None and request.headers.get("authorization") != f"Bearer {served.api_key}":
            raise api.ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                               type_="authentication_error", code="invalid_api_key")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(request: Request):
        try:
            authorized(request)
        except api.ApiError as e:
            return error(e, "/v1/models")
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": served.created,
                                            "owned_by": "moelab"}]}

    @app.get("/metrics")
    def prometheus(request: Request):
        try:
            authorized(request)
        except api.ApiError as e:
            return error(e, "/metrics")
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def complete(request: Request, chat: bool):
        route = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            authorized(request)
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise api.ApiError(400, f"the request body is not valid JSON ({e})") from None
            p = api.parse_completion(body, chat)
            if p.model is not None and p.model != served.model_name:
                raise api.ApiError(404, f"model={p.model!r} does not exist: this server serves "
                                   f"{served.model_name!r}", "model", code="model_not_found")
            prompt = encode(p, chat)
            max_tokens = p.max_tokens
            if max_tokens is None:
                room = served.engine.max_seq_len - len(prompt)
                if served.engine.max_tokens_in_flight is not None:
                    room = min(room, served.engine.max_tokens_in_flight - len(prompt))
                max_tokens = max(1, min(COMPLETION_DEFAULT_MAX_TOKENS, room) if not chat else room)
            try:
                served.engine.check(prompt, max_tokens)
            except ValueError as e:
                field = "max_tokens" if str(e).startswith("max_tokens") else "messages" if chat else "prompt"
                raise api.ApiError(400, str(e), field) from None
        except api.ApiError as e:
            return error(e, route)
        return await run(request, p, prompt, max_tokens, chat, route)

    def encode(p: api.CompletionParams, chat: bool) -> list[int]:
        if not chat:
            try:
                return served.encode_prompt(p.prompt)
            except ValueError as e:
                raise api.ApiError(400, str(e), "prompt") from None
        if served.template is None:
            raise api.ApiError(400, f"{served.model_name} has no chat template (tokenizer_config.json chat_template "
                               "or chat_template.jinja): use /v1/completions", "messages")
        try:
            text = served.template.render(p.messages, add_generation_prompt=True, **p.template_kwargs)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # a variable of the wrong shape
            raise api.ApiError(400, f"{e}" if isinstance(e, ValueError) else f"the chat template failed on this "
                               f"request: {type(e).__name__}: {e}",
                               "chat_template_kwargs" if p.template_kwargs else "messages") from None
        return served.encode_chat(text)

    async def run(request: Request, p: api.CompletionParams, prompt: list[int], max_tokens: int, chat: bool,
                  route: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        clock = {"last": None}

        def emit(ev: Event) -> None:  # on the engine thread
            now = time.perf_counter()
            if ev.tokens or (ev.kind == "done" and clock["last"] is None):
                metrics.latency(ttft=now - req.submitted if clock["last"] is None else None,
                                itl=now - clock["last"] if clock["last"] is not None else None)
                clock["last"] = now
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = EngineRequest(prompt, max_tokens, emit, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                            stop=p.stop)
        try:
            served.engine.submit(req)
        except QueueFull as e:
            return error(api.ApiError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error",
                                      code="queue_full", headers={"Retry-After": "1"}), route)
        except ValueError as e:
            return error(api.ApiError(400, str(e)), route)
        rid = api.new_id(chat)
        if p.stream:
            metrics.request(route, 200)
            return StreamingResponse(stream(req, queue, p, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finish = [], None
        try:
            while finish is None:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        metrics.request(route, 499)
                        return JSONResponse({}, status_code=499)
                    continue
                if ev.kind == "error":
                    return error(api.ApiError(500, f"the request failed: {ev.message}", type_="server_error"), route)
                text.append(ev.delta)
                finish = ev.finish_reason
        finally:
            if not req.done:
                req.cancel()
        metrics.request(route, 200)
        n = len(req.generated)
        metrics.tokens(len(prompt), n)
        return api.response(chat, rid, served.model_name, "".join(text), finish, api.usage(len(prompt), n))

    async def stream(req: EngineRequest, queue: asyncio.Queue, p: api.CompletionParams, rid: str,
                     chat: bool) -> AsyncIterator[str]:
        name = served.model_name
        try:
            if chat:
                yield _sse(api.chunk(True, rid, name, "", None, role=True))
            while True:
                ev = await queue.get()
                if ev.kind == "error":
                    yield _sse(api.ApiError(500, f"the request failed: {ev.message}", type_="server_error").body())
                    break
                if ev.delta:
                    yield _sse(api.chunk(chat, rid, name, ev.delta, None))
                if ev.kind == "done":
                    yield _sse(api.chunk(chat, rid, name, None if chat else "", ev.finish_reason))
                    metrics.tokens(len(req.prompt), len(req.generated))
                    if p.include_usage:
                        yield _sse(api.chunk(chat, rid, name, None, None,
                                             use=api.usage(len(req.prompt), len(req.generated))))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:  # the client went away mid-stream: free its row at the next step
                req.cancel()

    return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
