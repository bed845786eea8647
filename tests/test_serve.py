"""`python -m af2_jax.serve` from the outside: the server in a subprocess on 127.0.0.1 (a free port), the demo model,
the official `openai` client (no retries, so none hides a failure) and plain HTTP for what a client should not send.

Two server processes for the whole module, started together and sharing the session's compile cache: `server`
(8 slots, a folder for file:// URLs) and `limited` (1 slot, a queue of 1, 1 MB bodies, an API key, a 3 s request
timeout, strict model names) for the limit, key, timeout and disconnect cases. The SIGTERM test ends `server`, so it
comes last.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from tests.helpers import REPO

DEMO_CLIP = REPO / "infer" / "examples" / "three_beeps.flac"
DEMO_QUESTION = "How many beeps are there?"  # the README's
KEY = "K"
TIMEOUT_S = 3


class ServerProcess:
    """One `python -m af2_jax.serve` child on a free port; `wait_healthy` blocks until /health says 200."""

    def __init__(self, *flags: str, env: dict | None = None):
        import portpicker

        self.port = portpicker.pick_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ["AF2_JAX_HOME"]).parent / f"serve_{self.port}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "af2_jax.serve", "--port", str(self.port), *flags],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env, cwd=REPO)

    def wait_healthy(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.process.poll() is None, f"the server exited {self.process.returncode}:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not healthy within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0,
                             **options)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A folder for file:// URLs: the demo clip, and a link in it to a file outside."""
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "three_beeps.flac").write_bytes(DEMO_CLIP.read_bytes())
    outside = tmp_path_factory.mktemp("outside") / "secret.flac"
    outside.write_bytes(DEMO_CLIP.read_bytes())
    (folder / "link.flac").symlink_to(outside)
    return folder


@pytest.fixture(scope="module")
def servers(clip_dir):
    """Both servers, started at once (and `infer`'s answer to the demo question beside them)."""
    infer = subprocess.Popen([sys.executable, "-m", "af2_jax.infer", "--audio", str(DEMO_CLIP), "--prompt",
                              DEMO_QUESTION, "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    main = ServerProcess("--dtype", "float32", "--allowed-local-dir", str(clip_dir))
    # Its tests time requests against a 3 s timeout: every warm-up shape compiled before /health turns 200, so no
    # layout switch or first-use compile of the stacked layers stalls them (the main server runs through a switch).
    limited = ServerProcess("--dtype", "float32", "--slots", "1", "--max-queue", "1", "--max-body-mb", "1", "--api-key", KEY,
                            "--max-len", "2304", "--request-timeout", str(TIMEOUT_S), "--strict-model-name",
                            "--no-background-compile")
    try:
        out, err = infer.communicate(timeout=300)
        assert infer.returncode == 0, err
        main.wait_healthy(120)
        limited.wait_healthy(120)
        yield {"server": main, "limited": limited, "infer_answer": out.strip()}
    finally:
        main.stop()
        limited.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["server"]


@pytest.fixture(scope="module")
def limited(servers) -> ServerProcess:
    return servers["limited"]


def _audio_part(data: bytes, fmt: str = "flac") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _question(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _beeps(count: int, freq: float, seconds: float = 3.0, rate: int = 16000) -> bytes:
    """A WAV clip of `count` beeps at `freq` Hz."""
    t = np.arange(int(seconds * rate)) / rate
    on = np.zeros_like(t, bool)
    for k in range(count):
        start = 0.2 + k * (seconds - 0.4) / count
        on |= (t >= start) & (t < start + 0.25)
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.5 * np.sin(2 * np.pi * freq * t) * on, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_demo_question_answers_as_infer_does_plain_and_streamed(servers, server):
    client = server.client()
    messages = _question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION))
    done = client.chat.completions.create(model="whatever", messages=messages)
    assert done.choices[0].message.content == servers["infer_answer"] != ""
    assert done.choices[0].finish_reason == "stop" and done.model == "demo_model" and done.id.startswith("chatcmpl-")
    assert done.usage.completion_tokens >= 1 and done.usage.total_tokens == \
        done.usage.prompt_tokens + done.usage.completion_tokens and done.usage.model_extra["audio_windows"] == 1

    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model="whatever", messages=messages, stream=True,
                                                stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk" and chunk.model == "demo_model" and chunk.created > 0
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == servers["infer_answer"]
    assert reasons[-1] == "stop" and usage.completion_tokens == done.usage.completion_tokens

    text_first = client.chat.completions.create(
        model="demo_model", messages=_question(_text(DEMO_QUESTION), _audio_part(DEMO_CLIP.read_bytes())))
    assert text_first.choices[0].message.content == servers["infer_answer"]
    as_url = client.chat.completions.create(model="demo_model", messages=[
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "audio_url", "audio_url": {
            "url": "data:audio/flac;base64," + base64.b64encode(DEMO_CLIP.read_bytes()).decode()}},
            _text(DEMO_QUESTION)]}])
    assert as_url.choices[0].message.content == servers["infer_answer"]
    assert as_url.model_extra["warnings"] == ["messages[0]: system messages are ignored (AF2 was trained without "
                                              "them)"]


def test_models_health_and_file_urls(server, clip_dir):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == ["demo_model"]
    file_part = lambda name: {"type": "audio_url", "audio_url": {"url": f"file://{clip_dir / name}"}}  # noqa: E731
    inside = server.client().chat.completions.create(model="m", messages=_question(file_part("three_beeps.flac"),
                                                                                  _text(DEMO_QUESTION)))
    plain = server.client().chat.completions.create(
        model="m", messages=_question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION)))
    assert inside.choices[0].message.content == plain.choices[0].message.content
    for url in (f"file://{clip_dir / 'link.flac'}", f"file://{DEMO_CLIP}", f"file://{clip_dir}/../x.flac"):
        reply = _post(server, {"messages": _question({"type": "audio_url", "audio_url": {"url": url}},
                                                     _text("?"))})
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "forbidden_path", url
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.post(f"{server.url}/v1/chat/completions/", json={}).json()["error"]["code"] == "not_found"


def test_earlier_turns_enter_the_prompt_by_the_history_rule(server, tokenizer):
    clip = _audio_part(DEMO_CLIP.read_bytes())
    reply = server.client().chat.completions.create(model="m", messages=[
        {"role": "user", "content": [clip, _text("How many beeps?")]},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": [_text("Are you"), _text("sure?")]}])
    expected = tokenizer.prompt_ids("Are you sure?", clips=0, history=[(1, "How many beeps?", "three")])
    assert reply.usage.prompt_tokens == len(expected) and reply.usage.model_extra["audio_windows"] == 1


@pytest.mark.slow
def test_the_demo_server_is_healthy_within_60_s_with_a_cold_compile_cache(tmp_path):
    cold = ServerProcess(env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")})
    try:
        cold.wait_healthy(60)
        assert "warm-up (min): first answer in" in cold.output()
        cold.process.send_signal(signal.SIGTERM)  # while the serving layout compiles: XLA cannot be interrupted
        assert cold.process.wait(60) == 0, cold.output()
        assert "serving from the serving form's programs now" not in cold.output()
    finally:
        cold.stop()


def test_background_compile_refuses_what_keeps_the_serving_layout(capsys):
    from af2_jax.cli.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--background-compile", "--quantize", "int8", "--warmup", "none"])
    assert exit_.value.code == 2
    assert "--background-compile does not combine with --quantize, --warmup none" in capsys.readouterr().err


def test_sixteen_concurrent_clients_get_their_solo_answers(server):
    clips = [_beeps(1 + k % 4, 300 + 110 * k) for k in range(16)]
    client = server.client()

    def ask(clip: bytes) -> str:
        reply = client.chat.completions.create(model="m", messages=_question(_audio_part(clip, "wav"),
                                                                            _text(DEMO_QUESTION)), max_tokens=16)
        return reply.choices[0].message.content

    solo = [ask(clip) for clip in clips]
    tokens_before = server.metric("af2_generated_tokens_total")
    stops_before = server.metric('af2_requests_total{outcome="stop"}')
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, clips))
    assert together == solo
    assert server.metric('af2_requests_total{outcome="stop"}') - stops_before + \
        server.metric('af2_requests_total{outcome="length"}') >= 16
    assert server.metric("af2_generated_tokens_total") > tokens_before


def _post(server: ServerProcess, body, *, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def _truncated_wav() -> bytes:
    whole = _beeps(2, 440)
    return whole[:len(whole) // 2]


BAD_REQUESTS = [  # (what, body or raw bytes, status, error code, param)
    ("malformed JSON", b'{"messages": [', 400, "invalid_json", None),
    ("no messages", {"model": "m"}, 400, "missing_messages", "messages"),
    ("empty messages", {"messages": []}, 400, "invalid_value", "messages"),
    ("an assistant message last", {"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}, 400, "invalid_value",
     "messages"),
    ("base64 that is not base64", {"messages": _question({"type": "input_audio", "input_audio": {
        "data": "not base64!", "format": "wav"}}, _text("?"))}, 400, "invalid_base64",
     "messages[0].content[0].input_audio.data"),
    ("undecodable audio", {"messages": _question(_audio_part(b"RIFF" + bytes(range(256)) * 40, "wav"),
                                                 _text("?"))}, 400, "invalid_audio", "messages[0].content[0]"),
    ("truncated audio", {"messages": _question(_audio_part(_truncated_wav(), "wav"), _text("?"))}, 400,
     "invalid_audio", "messages[0].content[0]"),
    ("an unknown format", {"messages": _question(_audio_part(b"....", "aiff"), _text("?"))}, 400,
     "unsupported_audio_format", "messages[0].content[0].input_audio.format"),
    ("max_tokens 0", {"messages": _question(_text("hi")), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens past max_len", {"messages": _question(_text("hi")), "max_tokens": 100000}, 400,
     "context_length_exceeded", "max_tokens"),
    ("a remote URL", {"messages": _question({"type": "audio_url", "audio_url": {"url": "https://x.org/a.wav"}},
                                            _text("?"))}, 400, "unsupported_url",
     "messages[0].content[0].audio_url.url"),
    ("n = 2", {"messages": _question(_text("hi")), "n": 2}, 400, "unsupported", "n"),
    ("temperature 5", {"messages": _question(_text("hi")), "temperature": 5}, 400, "invalid_value", "temperature"),
    ("31 windows", {"messages": _question(*[_audio_part(_beeps(1, 500), "wav")] * 31, _text("?"))}, 400,
     "too_much_audio", "messages"),
    ("deeply nested JSON", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "invalid_json", None),
    ("a lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', 400, "invalid_value",
     "messages[0].content"),
    ("a lone surrogate in a path", b'{"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": '
     b'{"url": "file:///tmp/\\udcff.wav"}}]}]}', 400, "invalid_value", "messages[0].content[0].audio_url.url"),
    ("top_k past int32", {"messages": _question(_text("hi")), "temperature": 1, "top_k": 2 ** 31}, 400,
     "invalid_value", "top_k"),
]


@pytest.mark.parametrize("what, body, status, code, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(server, what, body, status, code, param):
    reply = _post(server, None, raw=body) if isinstance(body, bytes) else _post(server, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["param"] == param and error["type"] and error["message"], error
    assert "Traceback" not in reply.text
    good = _post(server, {"messages": _question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION))})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_a_long_question_is_cut_with_a_warning(server):
    reply = _post(server, {"messages": _question(_text("beep " * 600)), "max_tokens": 1}).json()
    assert reply["usage"]["prompt_tokens"] == 512
    assert reply["warnings"] == ["the prompt has 602 tokens, over the 512 allowed; only the first 511 tokens of "
                                 "the question are used (ask a shorter question)"]


def test_a_long_clip_is_cut_with_a_warning_and_stop_strings_cut_the_answer(server):
    long_clip = _beeps(3, 700, seconds=5.0)
    reply = _post(server, {"messages": _question(_audio_part(long_clip, "wav"), _text(DEMO_QUESTION))}).json()
    assert reply["usage"]["audio_windows"] == 1
    assert reply["warnings"] == ["messages[0].content[0]: 5.0 s of audio is longer than max_windows=1 (1 window of "
                                 "3 s); the last 2.0 s were dropped"]
    body = {"messages": _question(_text("Say something.")), "max_tokens": 40, "ignore_eos": True}
    whole = _post(server, body).json()["choices"][0]["message"]["content"]
    assert len(whole) > 4, whole
    stop = whole[2:4]
    cut = _post(server, {**body, "stop": [stop]}).json()
    assert cut["choices"][0]["message"]["content"] == whole[:whole.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in server.client().chat.completions.create(
        model="m", messages=body["messages"], max_tokens=40, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == whole[:whole.find(stop)]


def test_limits_key_and_model_name(limited):
    import openai

    messages = _question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION))
    with pytest.raises(openai.AuthenticationError) as denied:
        limited.client().chat.completions.create(model="demo_model", messages=messages)
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    client = limited.client(api_key=KEY)
    assert client.chat.completions.create(model="demo_model", messages=messages).choices[0].message.content
    with pytest.raises(openai.NotFoundError) as other:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert other.value.code == "model_not_found"
    big = _audio_part(os.urandom(800_000), "wav")  # base64 makes it over 1 MB
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="demo_model", messages=_question(big, _text("?")))
    assert too_large.value.status_code == 413 and too_large.value.code == "request_too_large"


def _long_stream(client: httpx.Client, server: ServerProcess) -> httpx.Response:
    """A streamed 2000-token request, open (the caller reads and closes it)."""
    body = {"model": "demo_model", "messages": _question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION)),
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    request = client.build_request("POST", f"{server.url}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"})
    return client.send(request, stream=True)


def _eventually(check, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _first_content(reply: httpx.Response) -> None:
    for line in reply.iter_lines():
        if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
            return
    raise AssertionError("the stream ended without content")


def test_queue_full_is_429_and_a_disconnect_frees_the_slot(limited):
    with httpx.Client(timeout=30) as one, httpx.Client(timeout=30) as two, httpx.Client(timeout=30) as three:
        first = _long_stream(one, limited)
        assert first.status_code == 200
        _first_content(first)  # it holds the only slot
        second = _long_stream(two, limited)  # waits in the queue of one
        assert _eventually(lambda: limited.metric("af2_queue_depth") == 1, 5)
        third = _long_stream(three, limited)
        assert third.status_code == 429 and third.headers["retry-after"]
        third.read()
        assert third.json()["error"]["code"] == "queue_full"
        second.close()
        first.close()  # the client goes away mid-stream
    assert _eventually(lambda: limited.metric("af2_busy_slots") == 0 == limited.metric("af2_queue_depth"), 2), \
        "the slot was not freed within 2 s"
    assert limited.metric('af2_requests_total{outcome="rejected"}') == 1
    assert limited.metric('af2_requests_total{outcome="cancelled"}') == 2
    start = time.monotonic()
    reply = _post(limited, {"model": "demo_model", "messages": _question(_audio_part(DEMO_CLIP.read_bytes()),
                                                                         _text(DEMO_QUESTION))},
                  headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and time.monotonic() - start < 10


def _partial_upload(server: ServerProcess) -> socket.socket:
    """A connection that sent its headers and part of a 1000-byte body, then stalls."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"messages\": ")
    return sock


def test_a_request_past_the_timeout_is_504_and_frees_its_slot(limited):
    """... and a body that stalls gets 408 in the same time; one whose client leaves is counted, quietly."""
    cancelled = limited.metric('af2_requests_total{outcome="cancelled"}')
    stalled, gone = _partial_upload(limited), _partial_upload(limited)
    gone.close()
    reply = _post(limited, {"model": "demo_model", "messages": _question(_text("Count.")), "max_tokens": 2250,
                            "ignore_eos": True}, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    assert _eventually(lambda: limited.metric("af2_busy_slots") == 0, 2)
    assert limited.metric('af2_requests_total{outcome="timeout"}') == 1
    stalled.settimeout(5)
    assert stalled.recv(1000).startswith(b"HTTP/1.1 408 ")
    stalled.close()
    assert limited.metric('af2_requests_total{outcome="cancelled"}') == cancelled + 1
    assert "Traceback" not in limited.output()


def test_the_server_answers_from_the_stacked_layers_then_switches(server):
    """Serving starts on the stacked layers (quick to compile) and moves to the serving layout once that is compiled
    in the background; every test here gets the same answers whichever it hit (the float32 demo model)."""
    deadline = time.monotonic() + 180
    while "serving from the serving form's programs now" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.5)
    assert re.search(r"serving form compiled in the background: [1-9]\d* programs", server.output())


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(server):
    """Last: it ends `server`."""
    stream = server.client().chat.completions.create(
        model="m", messages=_question(_audio_part(DEMO_CLIP.read_bytes()), _text(DEMO_QUESTION)), max_tokens=300,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    server.process.send_signal(signal.SIGTERM)
    refused = threading.Event()

    def probe():
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except OSError:
                refused.set()
                return
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    usage = [c.usage for c in chunks if c.usage]
    prober.join()
    assert usage and usage[-1].completion_tokens == 300
    assert refused.is_set(), "new connections were still accepted after SIGTERM"
    assert server.process.wait(timeout=30) == 0, server.output()
