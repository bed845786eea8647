"""Opt-in: the real release. Set AF2_RELEASE=/path/to/audio-flamingo-2 (the downloaded repository, with safe_ckpt/).
Needs about 40 GB of memory in float32 (the JAX model and the PyTorch reference side by side)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import af2_jax
from af2_jax.checkpoint import SafetensorsCheckpoint
from af2_jax.checkpoint.convert import convert, inspect
from af2_jax.generate import generate
from tests.reference import AF2Reference, original_schema

RELEASE = os.environ.get("AF2_RELEASE")
pytestmark = pytest.mark.skipif(not RELEASE, reason="AF2_RELEASE is not set: point it at a download of "
                                                    "nvidia/audio-flamingo-2 to check the real release")


def test_real_release_converts_and_matches_the_reference(tmp_path):
    result = inspect(RELEASE)
    print(result.summary("float32"))
    dst = convert(RELEASE, tmp_path / "af2", dtype="float32")
    model = af2_jax.load(dst, dtype="float32")
    tok = af2_jax.load_tokenizer(dst)
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "A dog barks twice and then a man says hello."], check=True)
    windows, mask = af2_jax.audio.load_windows(speech)
    ids = np.asarray([tok.prompt_ids("Describe the audio in detail.")])
    ours = generate(model, ids, np.ones_like(ids), windows[None], mask[None], max_new_tokens=32)
    del model
    ref = AF2Reference(original_schema(result.config))
    ref.load_original(dict(SafetensorsCheckpoint(Path(RELEASE)).items()))
    t = torch.from_numpy
    theirs = ref.generate_greedy(t(ids), t(np.ones_like(ids)), t(windows[None]), t(mask[None]), 32,
                                 result.config.tokens.eos, result.config.tokens.pad)
    n = int(ours.lengths[0])
    np.testing.assert_array_equal(ours.tokens[0, :n], theirs[0, ids.shape[1]:ids.shape[1] + n].numpy())
    print("answer:", tok.answer(ids[0], ours.tokens[0, :n]))
