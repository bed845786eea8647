"""Hugging Face interop: a checkpoint's `tokenizer/` folder is what `transformers.AutoTokenizer` reads (same ids, AF2's
named tokens, not a word logged), every checkpoint writer writes the same `tokenizer_config.json`, and
`AF2Tokenizer.to_transformers()` builds the same tokenizer in memory."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings

import pytest

import af2_jax
from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
from af2_jax.tokenizer import TokenizerError

QUESTION = "how many beeps are there?"
TEXTS = ["<audio>how many beeps are there?<SEP>", "Ünïcödé  façade\n\n 1234567 🎵 it's",
         "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}</tool_call><|fim_pad|>",
         "<audio>What is it?<SEP>A dog.<|endofchunk|><|endoftext|><|PAD_TOKEN|>"]


def load_auto_tokenizer(checkpoint):
    """`AutoTokenizer.from_pretrained(checkpoint, subfolder="tokenizer")` with what it said: Python warnings and the
    records of transformers' loggers (which do not propagate to the root logger, so caplog would miss them)."""
    from transformers import AutoTokenizer

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), subfolder="tokenizer")
    finally:
        transformers_logger.removeHandler(handler)
    return tokenizer, [str(w.message) for w in caught] + [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def demo_tokenizer():
    return af2_jax.load_tokenizer(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def auto_demo():
    return load_auto_tokenizer(DEMO_CHECKPOINT)


def test_auto_tokenizer_reads_the_demo_checkpoint_silently(auto_demo, demo_tokenizer):
    hf, said = auto_demo
    assert said == []
    assert (hf.eos_token, hf.eos_token_id) == ("<|endoftext|>", 151643)
    assert (hf.pad_token, hf.pad_token_id) == ("<|PAD_TOKEN|>", 151667)
    assert (hf.sep_token, hf.sep_token_id) == ("<SEP>", 151668)
    assert hf.bos_token is None and hf.model_max_length == 32768 and len(hf) == len(demo_tokenizer) == 151669
    # What the model is given: our template (`<audio>` + question + `<SEP>`, no BOS); transformers' default call
    # adds nothing to it, as the original's tokenizer call did not.
    prompt = demo_tokenizer.prompt_ids(QUESTION)
    assert hf(f"<audio>{QUESTION}<SEP>")["input_ids"] == prompt
    assert prompt[0] == demo_tokenizer.tokens.media and prompt[-1] == demo_tokenizer.tokens.sep
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == demo_tokenizer.encode(text), text


def test_without_model_type_transformers_warns_about_mistral(tmp_path):
    """Why config.json carries `model_type`: without it transformers 5 takes any local tokenizer for a Mistral one
    with a broken regex and says so (also proves the capture above hears transformers' warnings)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(DEMO_CHECKPOINT / "tokenizer", folder / "tokenizer")
    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    _, said = load_auto_tokenizer(folder)
    assert len(said) == 1 and "fix_mistral_regex" in said[0], said


def test_every_writer_writes_the_demo_tokenizer_config(small_checkpoint):
    """`af2_jax.save` (training's final checkpoint calls it; convert goes through the same `AF2Tokenizer.save`)
    writes byte for byte the shipped demo checkpoint's file, so the demo is what the code writes today."""
    written = (small_checkpoint / "tokenizer" / "tokenizer_config.json").read_bytes()
    assert written == (DEMO_CHECKPOINT / "tokenizer" / "tokenizer_config.json").read_bytes()
    assert json.loads((small_checkpoint / "config.json").read_text())["model_type"] == "audio_flamingo_2_jax"


def test_to_transformers_equals_auto_tokenizer(auto_demo, demo_tokenizer):
    hf, _ = auto_demo
    built = demo_tokenizer.to_transformers()
    assert (built.eos_token_id, built.pad_token_id, built.sep_token_id) == (151643, 151667, 151668)
    assert built.bos_token is None and built.model_max_length == hf.model_max_length and len(built) == len(hf)
    assert built.extra_special_tokens == hf.extra_special_tokens == ["<audio>", "<|endofchunk|>"]
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert built(text)["input_ids"] == ids, text
        # Which added tokens count as special (Qwen2.5's <tool_call> and FIM tokens do not).
        assert built.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


def test_to_transformers_without_transformers_names_the_extra(demo_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(TokenizerError) as err:
        demo_tokenizer.to_transformers()
    message = str(err.value)
    assert "\n" not in message and "transformers is not installed" in message and "pip install -e '.[hf]'" in message
