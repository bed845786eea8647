"""OpenAI's chat-completions protocol, as far as AF2 can answer it: a request body checked and turned into turns,
a decoding rule and stop strings; responses, stream chunks and error bodies in OpenAI's shapes; the answer text as
it grows, cut at a stop string.

Nothing here does I/O: audio parts stay bytes or paths (`AudioSource`) until `af2_jax.server.clips` reads them
outside the event loop. Where we differ from OpenAI (docs/serving.md): an absent `temperature` means greedy, as
`infer` and AF2's benchmarks; `top_k` and `ignore_eos` are extras; `system` messages are ignored with a warning.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
import urllib.parse

from af2_jax.engine import Sampling

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
# MIME types of `data:` URLs, by the file suffix their bytes are read as.
DATA_URL_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
                  "audio/flac": "flac", "audio/x-flac": "flac", "audio/mpeg": "mp3", "audio/mp3": "mp3",
                  "audio/ogg": "ogg", "application/ogg": "ogg"}
IGNORED_ROLES = ("system", "developer")


class APIError(Exception):
    """A request that cannot be answered: an HTTP status and OpenAI's error body (`message` names the problem and
    the fix; `param` the field; `code` a stable word clients can branch on)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported")


@dataclasses.dataclass(frozen=True)
class AudioSource:
    """One audio part, not yet read: `data` (the bytes of an `input_audio` part or a `data:` URL, to be read as a
    `.format` file) or `path` (a `file://` URL's path). `where` names the part in the request for error messages."""

    where: str
    data: bytes | None = None
    format: str | None = None
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn: its parts in order (`{"text": str}` dicts and `AudioSource`s) and, for an earlier turn, the
    assistant's answer (None for the question being asked)."""

    parts: tuple
    answer: str | None = None


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request: its turns, decoding rule, stop strings, streaming options, the model name
    it asked for and what was ignored (`warnings`)."""

    turns: tuple[Turn, ...]  # earlier turns (with answers), then the question
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None
    warnings: tuple[str, ...]


def parse_chat(body) -> ChatRequest:
    """A `/v1/chat/completions` body -> `ChatRequest`, or `APIError` 400 naming the first problem. Unknown fields
    are ignored."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None, "invalid_json")
    warnings: list[str] = []
    _refuse_unsupported(body)
    turns = _turns(body.get("messages"), warnings)
    sampling = _sampling(body)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    include_usage = _boolean(options or {}, "include_usage", "stream_options.include_usage")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model must be a string", "model")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name):
            warnings.append(f"{name} is not supported and was ignored")
    return ChatRequest(tuple(turns), sampling, _stop(body.get("stop")), stream, include_usage, model,
                       tuple(warnings))


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _invalid(f"n must be a positive integer, got {n!r}", "n")
        raise _unsupported(f"n={n}: one answer per request only; send {n} requests (with different seeds)", "n")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise _unsupported("logprobs are not supported", "logprobs")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise _unsupported(f"{name}: AF2 does not call tools", name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _unsupported("response_format: only {\"type\": \"text\"} is supported", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities: AF2 answers in text only", "modalities")


def _turns(messages, warnings: list[str]) -> list[Turn]:
    """Messages -> turns: consecutive user messages join into one turn, each earlier turn ends with the assistant's
    answer, and the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                       "missing_messages" if messages is None else "invalid_value")
    turns: list[Turn] = []
    parts: list = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role in IGNORED_ROLES:
            warnings.append(f"{where}: {role} messages are ignored (AF2 was trained without them)")
            continue
        if role == "user":
            parts += _user_parts(message.get("content"), f"{where}.content")
        elif role == "assistant":
            if not parts:
                raise _invalid(f"{where}: an assistant message must follow a user message", where)
            turns.append(Turn(tuple(parts), _assistant_text(message.get("content"), f"{where}.content")))
            parts = []
        else:
            raise _invalid(f"{where}: role {role!r} is not supported; use user, assistant or system", f"{where}.role")
    if not parts:
        raise _invalid("the last message must be the user's question", "messages")
    return turns + [Turn(tuple(parts))]


def _user_parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"text": _string(content, where)}]
    if not isinstance(content, list) or not content:
        raise _invalid(f"{where} must be a string or a non-empty list of content parts", where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"text": _string(part.get("text"), f"{at}.text")})
        elif kind == "input_audio":
            parts.append(_input_audio(part.get("input_audio"), at))
        elif kind == "audio_url":
            parts.append(_audio_url(part.get("audio_url"), at))
        elif kind == "image_url":
            raise _unsupported(f"{at}: images are not supported; AF2 answers about audio", f"{at}.type")
        else:
            raise _invalid(f"{at}: a content part is {{\"type\": \"text\" | \"input_audio\" | \"audio_url\", ...}}, "
                           f"got type {kind!r}", f"{at}.type")
    return parts


def _input_audio(value, at: str) -> AudioSource:
    if not isinstance(value, dict):
        raise _invalid(f"{at}.input_audio must be {{\"data\": base64, \"format\": \"wav\"}}", f"{at}.input_audio")
    fmt = value.get("format")
    if fmt not in AUDIO_FORMATS:
        raise _invalid(f"{at}.input_audio.format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}",
                       f"{at}.input_audio.format", "unsupported_audio_format")
    return AudioSource(at, data=_base64(value.get("data"), f"{at}.input_audio.data"), format=fmt)


def _base64(data, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise _invalid(f"{param} must be a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{param} is not valid base64 (standard alphabet, padded)", param, "invalid_base64") from None


def _audio_url(value, at: str) -> AudioSource:
    url = value.get("url") if isinstance(value, dict) else value
    param = f"{at}.audio_url.url"
    if not isinstance(url, str):
        raise _invalid(f"{at}.audio_url must be {{\"url\": \"data:audio/wav;base64,...\"}}", param)
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        mime, *options = header.split(";")
        if not comma or "base64" not in options:
            raise _invalid(f"{param}: a data URL is data:audio/<type>;base64,<data>", param)
        fmt = DATA_URL_TYPES.get(mime.strip().lower())
        if fmt is None:
            raise _invalid(f"{param}: media type {mime!r} is not one of {', '.join(sorted(DATA_URL_TYPES))}", param,
                           "unsupported_audio_format")
        return AudioSource(at, data=_base64(payload, param), format=fmt)
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        path = _string(urllib.parse.unquote(parsed.path), param)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/") or "\0" in path:
            raise _invalid(f"{param}: a file URL is file:///absolute/path (no NUL bytes)", param)
        return AudioSource(at, path=path)
    raise APIError(400, f"{param}: only data: and file:// URLs are read (the server fetches nothing remote); send "
                        "the audio as input_audio or a data: URL", param=param, code="unsupported_url")


def _assistant_text(content, where: str) -> str:
    if isinstance(content, str):
        return _string(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return _string(" ".join(p["text"] for p in content), where)
    raise _invalid(f"{where}: an assistant message's content is a string or text parts", where)


def _string(value, param: str) -> str:
    """A string that is text: JSON's escapes can spell half of a UTF-16 pair, which no encoder takes."""
    if not isinstance(value, str):
        raise _invalid(f"{param} must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{param} holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair); send "
                       "valid text", param) from None
    return value


def _number(body: dict, name: str, low: float, high: float, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _invalid(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return value


def _integer(body: dict, name: str, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise _invalid(f"{name} must be an integer {bound}, got {value!r}", name)
    return value


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"{param or name} must be true or false, got {value!r}", param or name)
    return value


def _sampling(body: dict) -> Sampling:
    max_new = _integer(body, "max_completion_tokens", 1)
    if max_new is None:
        max_new = _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0, 2, 0.0)
    top_p = _number(body, "top_p", 0, 1, None)
    if top_p == 0:
        raise _invalid("top_p must be in (0, 1]; use temperature 0 for the single most likely token", "top_p")
    seed = _integer(body, "seed", 0, 2 ** 63 - 1)
    if seed is None:  # OpenAI: without a seed, sampled answers differ from call to call
        seed = secrets.randbits(63)
    return Sampling(max_new_tokens=DEFAULT_MAX_TOKENS if max_new is None else max_new, temperature=float(temperature),
                    top_k=_integer(body, "top_k", 1, 2 ** 31 - 1), top_p=None if top_p is None else float(top_p), seed=seed,
                    ignore_eos=_boolean(body, "ignore_eos"))


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS \
            or not all(isinstance(s, str) and s for s in stops):
        raise _invalid(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(_string(s, "stop") for s in stops)


class AnswerText:
    """The answer text as tokens arrive: what may be sent so far (never text a later token could still change, nor
    the first characters of a possible stop string), and the cut at the first stop string found."""

    def __init__(self, tokenizer, prompt_ids, stops: tuple[str, ...] = ()):
        self.tokenizer, self.prompt_ids, self.stops = tokenizer, list(prompt_ids), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was found: the answer is complete
        self.text = ""

    def add(self, tokens: list[int]) -> str:
        """New tokens in; the text that may be sent now out."""
        self.ids += tokens
        self.text = self.tokenizer.answer(self.prompt_ids, self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._send(self.text)
        if self.text.endswith("\ufffd"):  # half of a multi-byte character
            return ""
        return self._send(self.text[:len(self.text) - self.hold])

    def finish(self) -> str:
        """The rest of the answer once no token follows."""
        return self._send(self.text)

    def _send(self, ready: str) -> str:
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent):], ready
        return delta


def usage(prompt_tokens: int, completion_tokens: int, audio_windows: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "audio_windows": audio_windows}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str, used: dict,
                    warnings: list[str]) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": used, "warnings": warnings}


def chunk_body(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None, *,
               include_usage: bool = False, used: dict | None = None, warnings: list[str] | None = None) -> dict:
    """One stream chunk: a choice's `delta` (None: the usage chunk, which has no choices)."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = used
    if warnings is not None:
        chunk["warnings"] = warnings
    return chunk
