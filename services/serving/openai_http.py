"""The OpenAI-compatible HTTP edge over `services.serving.engine.Engine`: `POST /v1/chat/completions`
(whole, or streamed as server-sent events) and `GET /v1/models`.

As thin as the gRPC edge (server.py): `chat_request` turns a request body into `GenerateParams`,
`completion` / `stream_events` turn the engine's pieces into OpenAI `chat.completion(.chunk)` objects,
and `error_response` turns a `services.serving.errors` error into the OpenAI error shape with its HTTP
status. Auth is the gRPC server's (`Tenants`: bearer token -> tenant, or the `kvblend-tenant` header with
auth off). RAG passages come as vLLM takes them, a top-level `documents` list of {"title", "text"};
kvblend's own options are extra fields (`mode`, `ratio`, `chunk_ids`, `top_k`, and `timeout_s`, the
request's deadline as a gRPC call has one), and the request report
comes back in the extra field `kvblend` of the response (of the first chunk when streamed).
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens whose KV came from a cache, as vLLM
reports its prefix-cache hits.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from services.serving import errors
from services.serving.requests import DocumentIn, GenerateParams, Piece
from services.serving.auth import TENANT_HEADER, Tenants
from services.settings import AuthConfig, TlsConfig

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
# (HTTP status, OpenAI error type, the gRPC status name the metrics count it under, as for a gRPC call)
HTTP_STATUS = {  # first match wins: subclasses before their bases
    errors.DeadlineExceeded: (504, "timeout", "DEADLINE_EXCEEDED"),
    errors.InvalidArgument: (400, "invalid_request_error", "INVALID_ARGUMENT"),
    errors.NotFound: (404, "not_found_error", "NOT_FOUND"),
    errors.Overloaded: (429, "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    errors.Unavailable: (503, "service_unavailable", "UNAVAILABLE"),
    errors.Cancelled: (499, "cancelled", "CANCELLED"),
    errors.Unauthenticated: (401, "authentication_error", "UNAUTHENTICATED"),
    errors.PermissionDenied: (403, "permission_error", "PERMISSION_DENIED"),
}
CHAT, MODELS = "POST /v1/chat/completions", "GET /v1/models"  # the metrics' method label
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
ROLES = ("system", "user", "assistant")


class UnknownModel(errors.NotFound):
    pass


@dataclass(frozen=True)
class ChatRequest:
    params: GenerateParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    model: str
    timeout_s: float | None = None  # the extra field timeout_s: the request's deadline, as gRPC's (504 past it)


def error_response(err: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of an engine error; 500 for anything else."""
    for kind, (status, kind_name, _) in HTTP_STATUS.items():
        if isinstance(err, kind):
            code = "model_not_found" if isinstance(err, UnknownModel) else None
            return status, {"error": {"message": str(err), "type": kind_name, "param": None, "code": code}}
    log.exception("internal error in a chat completion", exc_info=err)
    return 500, {"error": {"message": f"internal error: {type(err).__name__}: {str(err)[:200]}",
                           "type": "internal_error", "param": None, "code": None}}


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise errors.InvalidArgument(f"{name} {json.dumps(value)[:80]} is not {what}")
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise errors.InvalidArgument(f"messages[{index}].content is neither text nor a list of text parts")


def chat_request(body: object, model_id: str) -> ChatRequest:
    """A chat completion body as engine parameters; InvalidArgument naming the bad field, UnknownModel."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the body is not a JSON object")
    model = _typed(body, "model", (str,), "a string")
    if model is None:
        raise errors.InvalidArgument("model is required (GET /v1/models lists it)")
    if model != model_id:
        raise UnknownModel(f"the model {model[:200]!r} does not exist; this server serves {model_id!r}")
    messages = _typed(body, "messages", (list,), "a list of messages")
    if not messages:
        raise errors.InvalidArgument("messages is empty: give at least one user message")
    chat = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise errors.InvalidArgument(f"messages[{index}].role {json.dumps(role)[:40]} is not one of "
                                         f"{', '.join(ROLES)}")
        chat.append((role, _content(message, index)))
    if (n := _typed(body, "n", (int,), "an integer")) not in (None, 1):
        raise errors.InvalidArgument(f"n {n} is not supported: one choice per request")
    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise errors.InvalidArgument(f"max_tokens {max_tokens} must be at least 1")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise errors.InvalidArgument("stop is neither a string nor a list of strings")
    documents = _typed(body, "documents", (list,), "a list of {\"title\", \"text\"} objects") or []
    inline = []
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) \
                or not isinstance(doc.get("title", ""), str):
            raise errors.InvalidArgument(f"documents[{index}] is not a {{\"title\", \"text\"}} object of strings")
        inline.append(DocumentIn(doc["text"], doc.get("title", ""), str(doc.get("doc_id", ""))))
    chunk_ids = _typed(body, "chunk_ids", (list,), "a list of chunk ids") or []
    if not all(isinstance(cid, str) for cid in chunk_ids):
        raise errors.InvalidArgument("chunk_ids holds a value that is not a string")
    temperature = _typed(body, "temperature", (int, float), "a number")
    options = body.get("stream_options") or {}
    params = GenerateParams(
        query="", messages=tuple(chat), documents=tuple(inline), chunk_ids=tuple(chunk_ids),
        top_k=_typed(body, "top_k", (int,), "an integer") or 0, mode=_typed(body, "mode", (str,), "a string") or "",
        ratio=_typed(body, "ratio", (int, float), "a number"), max_new_tokens=max_tokens or 0,
        temperature=float(temperature or 0.0), top_p=_typed(body, "top_p", (int, float), "a number"),
        seed=_typed(body, "seed", (int,), "an integer"), stop=tuple(stop or ()))
    stream = _typed(body, "stream", (bool,), "true or false") or False
    timeout_s = _typed(body, "timeout_s", (int, float), "a number of seconds")
    if timeout_s is not None and not timeout_s > 0:
        raise errors.InvalidArgument(f"timeout_s {timeout_s} must be above 0")
    return ChatRequest(params, stream, bool(isinstance(options, dict) and options.get("include_usage")), model,
                       timeout_s)


def _extra(first: Piece) -> dict:
    return {"ttft_s": first.ttft_s, "report": asdict(first.report)}


def _usage(first: Piece, last: Piece) -> dict:
    prompt, completion = first.report.prompt_tokens, last.finish.tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": first.report.cached_tokens}}


def completion(pieces: Iterator[Piece], model: str) -> dict:
    """The whole answer as one `chat.completion`."""
    collected = list(pieces)
    first, last = collected[0], collected[-1]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(p.text for p in collected)},
                     "finish_reason": FINISH_REASONS[last.finish.reason], "logprobs": None}],
        "usage": _usage(first, last), "kvblend": _extra(first),
    }


def stream_events(pieces: Iterator[Piece], model: str, include_usage: bool) -> Iterator[str]:
    """The answer as server-sent events of `chat.completion.chunk`s, then `data: [DONE]`: the first
    chunk has the role and the kvblend report, each later one the text of its tokens, the last the finish
    reason. An error once streaming has begun is sent as an event of the OpenAI error shape."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    first = None
    try:
        for piece in pieces:
            delta = {"content": piece.text}
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            if first is None:
                first = piece
                delta["role"] = "assistant"
                chunk["kvblend"] = _extra(piece)
            if piece.finish is not None:
                chunk["choices"][0]["finish_reason"] = FINISH_REASONS[piece.finish.reason]
            if piece.text or first is piece or piece.finish is not None:
                yield event(chunk)
            if piece.finish is not None and include_usage:
                yield event({**head, "choices": [], "usage": _usage(first, piece)})
    except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield event(error_response(err)[1])
    yield "data: [DONE]\n\n"


class ChatAPI:
    """The HTTP calls as plain methods: headers and a parsed body in, a JSON object or events out."""

    def __init__(self, engine, auth: AuthConfig, model_id: str):
        self.engine = engine
        self.tenants = Tenants(auth)
        self.model_id = model_id

    def tenant(self, headers) -> str:
        return self.tenants.resolve(headers.get("authorization", ""), headers.get(TENANT_HEADER))

    def models(self, headers) -> dict:
        self.tenant(headers)
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "kvblend"}]}

    def start(self, headers, body: object) -> tuple[ChatRequest, Iterator[Piece], Callable[[], None]]:
        """Check and queue the request and wait for its first piece (so that an error the model thread
        finds, such as a prompt over the context, still gets its status); its pieces, the first included,
        and what stops generating them (the client went away)."""
        tenant = self.tenant(headers)
        request = chat_request(body, self.model_id)
        generation = self.engine.generate(tenant, request.params, request.timeout_s)
        pieces = iter(generation)
        try:
            first = next(pieces)
        except BaseException:
            generation.cancel()
            raise

        def all_pieces() -> Iterator[Piece]:
            yield first
            yield from pieces

        return request, all_pieces(), generation.cancel


async def _cancelling(events: Iterator[str], cancel: Callable[[], None]) -> AsyncIterator[str]:
    """The events, read on a worker thread; when the client goes away (the response task is cancelled, or a
    write fails), the generation is cancelled, which also ends the worker thread's wait for the next piece."""
    try:
        async for event in iterate_in_threadpool(events):
            yield event
    finally:
        cancel()


def make_app(api: ChatAPI) -> FastAPI:
    app = FastAPI(title="kvblend", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = api.engine.metrics

    def failed(method: str, err: Exception) -> JSONResponse:
        status, body = error_response(err)
        metrics.rpc(method, next((code for kind, (_, _, code) in HTTP_STATUS.items() if isinstance(err, kind)),
                                 "INTERNAL"))
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            listed = api.models(request.headers)
        except Exception as err:  # noqa: BLE001 - every failure gets the OpenAI error shape
            return failed(MODELS, err)
        metrics.rpc(MODELS, "OK")
        return JSONResponse(listed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        method = CHAT
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise errors.InvalidArgument(f"the body is {len(raw)} bytes, over the limit of {MAX_BODY_BYTES}")
            try:
                body = json.loads(raw)
            except ValueError as err:
                raise errors.InvalidArgument(f"the body is not JSON ({err})") from None
            chat, pieces, cancel = await run_in_threadpool(api.start, request.headers, body)
            if chat.stream:
                metrics.rpc(method, "OK")
                return StreamingResponse(_cancelling(stream_events(pieces, chat.model, chat.include_usage), cancel),
                                         media_type="text/event-stream")
            try:
                result = await run_in_threadpool(completion, pieces, chat.model)
            finally:  # the client went away while the answer was made
                cancel()
        except Exception as err:  # noqa: BLE001
            return failed(method, err)
        metrics.rpc(method, "OK")
        return JSONResponse(result)

    return app


class HTTPServer:
    """uvicorn on a thread of `kvblend serve`, on a socket bound here (so port 0 reports the port it got);
    HTTPS with the gRPC server's certificate and key when `[tls]` gives them (tokens never cross in clear)."""

    def __init__(self, engine, auth: AuthConfig, model_id: str, host: str, port: int, tls: TlsConfig):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host.strip("[]"), port))
        self.port = self.socket.getsockname()[1]
        pair = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls.enabled else {}
        self.scheme = "https" if tls.enabled else "http"
        config = uvicorn.Config(make_app(ChatAPI(engine, auth, model_id)), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30, **pair)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="openai-http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise OSError(f"the OpenAI-compatible HTTP server did not start on port {self.port}")

    def close(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()
