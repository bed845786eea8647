"""The HTTP side of the server: OpenAI's `POST /v1/chat/completions` (streamed or not), `GET /v1/models`,
`GET /health` and `GET /metrics` over the engine runner, as a Starlette application.

Every failure a client can cause is a 4xx with OpenAI's error body, and the server goes on; a failure of ours is a
500 with the same body (the traceback goes to the log only). Each request gets an id, sent back as `x-request-id`,
used as the completion's id and written in its access-log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from af2_jax.audio.io import AudioError
from af2_jax.engine import Completion, DoesNotFit, EngineFull, Request, TooMuchAudio
from af2_jax.server.clips import read_clip
from af2_jax.server.metrics import ServerMetrics
from af2_jax.server.protocol import (APIError, AnswerText, AudioSource, ChatRequest, chunk_body, completion_body,
                                     parse_chat, usage)
from af2_jax.server.runner import EngineFailed, EngineRunner, Stream
from af2_jax.tokenizer import TokenizerError

access_log = logging.getLogger("af2_jax.server.access")

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
BODY_TIMEOUT_S = 60  # a body must arrive within this (or --request-timeout, if shorter): a stalled upload holds a
# connection
CLIENT_GONE = 499  # nginx's status for a request whose client went away: logged and counted, never seen

@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What the server checks around the engine (the `serve` flags of the same names)."""

    served_model_name: str
    max_body_mb: float = 100
    request_timeout: float = 600
    api_key: str | None = None
    allowed_local_dir: str | None = None
    strict_model_name: bool = False


class _Outcome:
    """Counts a request's end once, whichever path ends it."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.counted = metrics, False

    def __call__(self, outcome: str) -> None:
        if not self.counted:
            self.counted = True
            self.metrics.requests.labels(outcome).inc()


def _status_outcome(status: int) -> str:
    return {429: "rejected", 504: "timeout", CLIENT_GONE: "cancelled"}.get(status,
                                                                           "error" if status >= 500 else "invalid")


class _ErrorJSON(JSONResponse):
    """Error bodies as ASCII JSON: a message may quote what the client sent, which need not be encodable text."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_response(err: APIError) -> JSONResponse:
    return _ErrorJSON(err.body(), status_code=err.status, headers=err.headers)


def _usage(stream: Stream, text: AnswerText) -> dict:
    handle = stream.handle
    return usage(len(handle.prompt_ids), len(text.ids), handle.windows.shape[0])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ChatServer:
    """The routes' state: the runner, the tokenizer, the options and the metrics."""

    def __init__(self, runner: EngineRunner, tokenizer, options: ServerOptions):
        self.runner, self.tokenizer, self.options = runner, tokenizer, options
        self.metrics = ServerMetrics(lambda: runner.waiting, lambda: runner.busy)
        self.started = int(time.time())

    # --- routes -------------------------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        if not self.runner.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def models(self, request: HTTPRequest) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.options.served_model_name, "object": "model",
                                                         "created": self.started, "owned_by": "af2-jax"}]})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        return Response(self.metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        arrived = time.monotonic()
        outcome = _Outcome(self.metrics)
        try:
            self._authorize(request)
            chat = parse_chat(await self._json(request))
            if self.options.strict_model_name and chat.model != self.options.served_model_name:
                raise APIError(404, f"model {chat.model!r} is not served here; this server serves "
                                    f"{self.options.served_model_name!r}", param="model", code="model_not_found")
            engine_request, notes = await anyio.to_thread.run_sync(self._engine_request, chat)
            stream = self._submit(engine_request)
        except APIError as err:
            outcome(_status_outcome(err.status))
            return _error_response(err)
        rid = f"chatcmpl-{request.state.request_id}"
        warnings = list(chat.warnings) + notes + stream.handle.notes
        if chat.stream:
            return StreamingResponse(self._stream(stream, chat, rid, arrived, warnings, outcome),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(request, stream, chat, rid, arrived, warnings, outcome)

    # --- checks -------------------------------------------------------------------------------------------------
    def _authorize(self, request: HTTPRequest) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                "server's --api-key", code="invalid_api_key", kind="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _json(self, request: HTTPRequest):
        """The body as JSON: 413 over the size limit, 408 when it does not arrive in time, 400 when it is not
        JSON; a client gone before sending it all ends the request."""
        timeout = min(BODY_TIMEOUT_S, self.options.request_timeout)
        try:
            body = await asyncio.wait_for(self._body(request), timeout)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") \
                from None
        except ClientDisconnect:
            raise APIError(CLIENT_GONE, "the client went away while sending the body", code="client_gone") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            problem = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise APIError(400, f"the request body is not valid JSON ({problem})", code="invalid_json") from None

    async def _body(self, request: HTTPRequest) -> bytes:
        limit = int(self.options.max_body_mb * 2 ** 20)
        too_large = APIError(413, f"the request body is over the server's limit of {self.options.max_body_mb:g} MB "
                                  "(--max-body-mb); send shorter or more compressed audio (flac, mp3, ogg)",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def _engine_request(self, chat: ChatRequest) -> tuple[Request, list[str]]:
        """The engine's request for `chat`, its audio read and windowed (blocking: runs in a worker thread), with
        the notes of clips cut to the per-clip limit."""
        engine = self.runner.engine
        sources = [part for turn in chat.turns for part in turn.parts if isinstance(part, AudioSource)]
        clips = [read_clip(source, max_windows=engine.max_windows, config=engine.config.audio,
                           allowed_dir=self.options.allowed_local_dir) for source in sources]
        loaded = iter(clips)
        turns = [(None, [{"audio": next(loaded)[:2]} if isinstance(part, AudioSource) else part
                         for part in turn.parts], turn.answer) for turn in chat.turns]  # in order: `loaded` is used up
        *earlier, (_, question, _) = turns
        return Request(question, None, chat.sampling, tuple(earlier)), [note for *_, note in clips if note]

    def _submit(self, engine_request: Request) -> Stream:
        try:
            return self.runner.submit(engine_request, asyncio.get_running_loop())
        except EngineFull as err:
            raise APIError(429, f"the server is busy: {err}", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except DoesNotFit as err:
            most = err.max_len - err.prompt_tokens
            fix = f"ask for at most {most}" if most > 0 else "shorten the conversation"
            raise APIError(400, f"max_tokens {err.max_new_tokens} and the prompt's {err.prompt_tokens} tokens need "
                                f"{err.prompt_tokens + err.max_new_tokens} positions, over the server's --max-len "
                                f"{err.max_len}; {fix}", param="max_tokens", code="context_length_exceeded") from None
        except TooMuchAudio as err:
            raise APIError(400, str(err), param="messages", code="too_much_audio") from None
        except (AudioError, TokenizerError, ValueError) as err:
            raise APIError(400, str(err), param="messages") from None

    # --- answers ------------------------------------------------------------------------------------------------
    async def _events(self, stream: Stream, arrived: float):
        """The stream's events until its Completion; TimeoutError past the request timeout."""
        deadline = arrived + self.options.request_timeout
        first = True
        while True:
            event = await stream.next(max(deadline - time.monotonic(), 0.0))
            if first and isinstance(event, list):
                first = False
                self.metrics.first_token.observe(time.monotonic() - arrived)
            yield event
            if isinstance(event, Completion):
                return

    def _timeout(self) -> APIError:
        return APIError(504, f"the answer did not finish within the server's --request-timeout "
                             f"{self.options.request_timeout:g} s; its slot was freed. Ask for fewer max_tokens or "
                             "retry when the server is less busy", code="timeout", kind="timeout_error")

    def _finished(self, text: AnswerText, event, arrived: float, outcome: _Outcome) -> str:
        """The finish reason; counts the request and its tokens."""
        reason = "stop" if text.stopped else event.finish_reason
        outcome(reason)
        self.metrics.tokens.inc(len(text.ids))
        self.metrics.latency.observe(time.monotonic() - arrived)
        return reason

    async def _complete(self, request: HTTPRequest, stream: Stream, chat: ChatRequest, rid: str, arrived: float,
                        warnings: list[str], outcome: _Outcome) -> Response:
        text = AnswerText(self.tokenizer, stream.handle.prompt_ids, chat.stop)
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, stream, outcome))
        try:
            async for event in self._events(stream, arrived):
                if isinstance(event, list):
                    text.add(event)
                    if text.stopped:
                        stream.cancel()
                        break
        except TimeoutError:
            stream.cancel()
            outcome("timeout")
            return _error_response(self._timeout())
        except EngineFailed as err:
            outcome("error")
            return _error_response(APIError(500, str(err), code="engine_failed", kind="server_error"))
        finally:
            watcher.cancel()
        if outcome.counted:  # the client went away
            return Response(status_code=499)
        reason = self._finished(text, event, arrived, outcome)
        text.finish()
        used = _usage(stream, text)
        return JSONResponse(completion_body(rid, int(time.time()), self.options.served_model_name, text.text, reason,
                                            used, warnings))

    @staticmethod
    async def _cancel_on_disconnect(request: HTTPRequest, stream: Stream, outcome: _Outcome) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        outcome("cancelled")
        stream.cancel()

    async def _stream(self, stream: Stream, chat: ChatRequest, rid: str, arrived: float, warnings: list[str],
                      outcome: _Outcome):
        """Server-sent events in OpenAI's chunk format. A client that goes away cancels the request (Starlette
        cancels this generator)."""
        created, model = int(time.time()), self.options.served_model_name
        chunk = lambda delta, reason=None, **extra: _sse(chunk_body(  # noqa: E731
            rid, created, model, delta, reason, include_usage=chat.include_usage, **extra))
        text = AnswerText(self.tokenizer, stream.handle.prompt_ids, chat.stop)
        try:
            yield chunk({"role": "assistant", "content": ""}, warnings=warnings)
            async for event in self._events(stream, arrived):
                if isinstance(event, list):
                    delta = text.add(event)
                    if delta:
                        yield chunk({"content": delta})
                    if text.stopped:
                        stream.cancel()
                        break
            reason = self._finished(text, event, arrived, outcome)
            rest = text.finish()
            if rest:
                yield chunk({"content": rest})
            yield chunk({}, reason)
            if chat.include_usage:
                yield chunk(None, used=_usage(stream, text))
        except TimeoutError:
            outcome("timeout")
            yield _sse(self._timeout().body())
        except EngineFailed as err:
            outcome("error")
            yield _sse(APIError(500, str(err), code="engine_failed", kind="server_error").body())
        except asyncio.CancelledError:
            outcome("cancelled")
            raise
        finally:
            stream.cancel()  # nothing if it finished; frees its slot if the client went away
        yield "data: [DONE]\n\n"


class _RequestIds:
    """ASGI middleware: an id for every request (`request.state.request_id`, the `x-request-id` header) and one
    access-log line per request with it, its status and its time."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        status, start = 0, time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %s %.3f s id=%s', client[0], client[1], scope["method"], scope["path"],
                            status or "-", time.perf_counter() - start, rid)


async def _api_error(request: HTTPRequest, err: APIError) -> Response:
    return _error_response(err)


async def _http_error(request: HTTPRequest, err: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return _error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code))


async def _server_error(request: HTTPRequest, err: Exception) -> Response:
    """A failure of ours (uvicorn logs its traceback; the access line has the request id)."""
    return _error_response(APIError(500, "internal server error; the server log has the details",
                                    code="internal_error", kind="server_error"))


def create_app(runner: EngineRunner, tokenizer, options: ServerOptions) -> Starlette:
    """The ASGI application; its lifespan starts the runner (warm-up first: `/health` is 503 until it is done) and
    stops it."""
    server = ChatServer(runner, tokenizer, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = Starlette(routes=[Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
                            Route("/v1/models", server.models, methods=["GET"]),
                            Route("/health", server.health, methods=["GET"]),
                            Route("/metrics", server.metrics_text, methods=["GET"])],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
                    lifespan=lifespan)
    app.router.redirect_slashes = False  # /v1/chat/completions/ is a 404, not a redirect a client would not follow
    app.state.server = server
    return _RequestIds(app)
