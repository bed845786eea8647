"""The server's reading of OpenAI requests and its answer text, in process (no model, no HTTP): what each field
becomes, what is refused, and how stop strings cut a streamed answer."""

from __future__ import annotations

import base64

import pytest

from af2_jax.server.protocol import APIError, AnswerText, AudioSource, Turn, parse_chat
from af2_jax.server.runner import warmup_programs, warmup_shapes

WAV_B64 = base64.b64encode(b"RIFF....WAVE").decode()


def _audio(fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": fmt}}


def _refused(body) -> APIError:
    with pytest.raises(APIError) as refused:
        parse_chat(body)
    assert refused.value.status == 400
    return refused.value


def test_defaults_greedy_256_tokens_and_openai_fields():
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}]})
    assert chat.sampling.greedy and chat.sampling.max_new_tokens == 256 and chat.sampling.top_p is None
    assert chat.turns == (Turn(({"text": "hi"},)),) and chat.stop == () and not chat.stream
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "top_p": 0.9,
                       "seed": 5, "max_tokens": 9, "max_completion_tokens": 12, "stop": "x", "top_k": 3,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                       "unknown_field": {"is": "ignored"}, "presence_penalty": 0.5})
    s = chat.sampling
    assert (s.temperature, s.top_p, s.seed, s.max_new_tokens, s.top_k, s.ignore_eos) == (0.7, 0.9, 5, 12, 3, True)
    assert chat.stop == ("x",) and chat.stream and chat.include_usage
    assert chat.warnings == ("presence_penalty is not supported and was ignored",)
    unseeded = {parse_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 1}).sampling.seed
                for _ in range(4)}
    assert len(unseeded) > 1  # no seed: sampled answers differ from call to call, as OpenAI's


def test_turns_parts_in_order_history_and_ignored_system_messages():
    chat = parse_chat({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first?"}, _audio("flac")]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
        {"role": "user", "content": [_audio()]},
        {"role": "user", "content": "and now?"},
        {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:audio/mpeg;base64," + WAV_B64}},
                                     {"type": "audio_url", "audio_url": {"url": "file:///data/a%20b.wav"}}]}]})
    earlier, question = chat.turns
    assert earlier.answer == "one" and earlier.parts[0] == {"text": "first?"}
    assert earlier.parts[1] == AudioSource("messages[1].content[1]", b"RIFF....WAVE", "flac")
    assert question.answer is None
    assert [p if isinstance(p, dict) else (p.where, p.format, p.path) for p in question.parts] == [
        ("messages[3].content[0]", "wav", None), {"text": "and now?"}, ("messages[5].content[0]", "mp3", None),
        ("messages[5].content[1]", None, "/data/a b.wav")]
    assert chat.warnings == ("messages[0]: system messages are ignored (AF2 was trained without them)",)


@pytest.mark.parametrize("body, param, code", [
    ([], None, "invalid_json"),
    ({"messages": "hi"}, "messages", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "messages[0]",
     "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "unsupported"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:audio/wav,abc"}}]}]},
     "messages[0].content[0].audio_url.url", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {
        "url": "data:video/mp4;base64," + WAV_B64}}]}]}, "messages[0].content[0].audio_url.url",
     "unsupported_audio_format"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "file://host/a.wav"}}]}]},
     "messages[0].content[0].audio_url.url", "invalid_value"),
    ({"messages": [{"role": "user", "content": [_audio("aac")]}]}, "messages[0].content[0].input_audio.format",
     "unsupported_audio_format"),
    ({"messages": [{"role": "user", "content": "q"}], "logprobs": True}, "logprobs", "unsupported"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}, "tools", "unsupported"),
    ({"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}},
     "response_format", "unsupported"),
    ({"messages": [{"role": "user", "content": "q"}], "n": 0}, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 1.5}, "max_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "seed": -1}, "seed", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": [""]}, "stop", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "stream": "yes"}, "stream", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "ignore_eos": 1}, "ignore_eos", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "n": True}, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "top_k": 2 ** 31}, "top_k", "invalid_value"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": ["\udc00"]}, "stop", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "file:///a%00.wav"}}]}]},
     "messages[0].content[0].audio_url.url", "invalid_value"),
])
def test_refused_fields_name_the_param(body, param, code):
    refused = _refused(body)
    assert (refused.param, refused.code) == (param, code), refused.message


def test_stop_strings_cut_the_answer_and_nothing_after_a_stop_is_sent(tokenizer):
    prompt = tokenizer.prompt_ids("Count.", clips=0)
    answer = tokenizer.encode_plain("one, two, three, four")
    text = AnswerText(tokenizer, prompt, ("three",))
    sent = "".join(text.add([token]) for token in answer if not text.stopped)
    assert text.stopped and text.text == "one, two, " and sent + text.finish() == "one, two, "
    # Without a match everything arrives, none of it twice, and the held-back tail comes with finish().
    text = AnswerText(tokenizer, prompt, ("zebra", "th!"))
    sent = "".join(text.add([token]) for token in answer)
    assert not text.stopped and sent + text.finish() == "one, two, three, four"
    # A character split over two tokens is held until it is whole.
    split = tokenizer.encode_plain("𝄞")
    text = AnswerText(tokenizer, prompt)
    assert len(split) > 1 and text.add(split[:1]) == "" and text.add(split[1:]) + text.finish() == "𝄞"


def test_warmup_shapes():
    assert warmup_shapes("none", 768) == []
    assert warmup_shapes("min", 768) == [(1, 16), (1, 32), (1, 64), (0, 16)]
    assert warmup_shapes("min", 40) == [(1, 16), (1, 32), (0, 16)]
    every = warmup_shapes("all", 768)
    assert (30, 768) in every and (30, 512) in every and (0, 16) in every and len(every) == 11 * 7 + 1


def test_warmup_programs():
    assert warmup_programs("none", 768, (1, 2)) == []
    assert warmup_programs("min", 768, (1, 2, 4)) == [(1, 16, 1), (1, 32, 1), (1, 64, 1), (0, 16, 1), (1, 16, 2),
                                                       (1, 16, 4)]
    assert warmup_programs("min", 768, (8,)) == [(1, 16, 1), (1, 32, 1), (1, 64, 1), (0, 16, 1)]  # rows fixed
