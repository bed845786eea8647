"""Requests as users send them: several clips in one question, no clip, waveforms; checked against the PyTorch
reference where the model is involved."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from af2_jax.audio.io import load_windows, waveform_windows
from af2_jax.engine import Request, Sampling
from af2_jax.generate import engine_for
from tests.reference.af2_torch import MaskedCrossAttention


def _prompt(golden, clips: int, words: int = 5):
    lo, hi = golden.raw_config["tokenizer"]["regular_token_ids"]
    t = golden.config.tokens
    return [t.media] * clips + np.random.default_rng(clips).integers(lo, hi, words).tolist() + [t.sep]


def test_two_clips_in_one_question_equal_the_reference(golden, fixture_model):
    """Two clips: their windows in order, two `<audio>` tokens, every text token seeing all windows."""
    audio = golden.inputs["audio_x"]
    first, second = audio[0, :1], audio[1, :1]
    ids = _prompt(golden, clips=2)
    engine = engine_for(fixture_model(golden, scan_layers=False))  # the engine of test_engine.py: compiled already
    ours = engine.run([Request(ids, [(first, np.ones(1, np.float32)), (second, np.ones(1, np.float32))],
                               Sampling(max_new_tokens=6, ignore_eos=True))])[0].tokens
    both = np.concatenate([first, second])[None]
    t = torch.from_numpy
    expected = golden.reference.generate_greedy(t(np.asarray([ids])), t(np.ones((1, len(ids)), np.int64)), t(both),
                                                t(np.ones((1, 2), np.float32)), 6, -1, 0)[0, len(ids):]
    assert ours == expected.tolist()


def test_a_question_without_audio_runs_no_encoder_and_equals_the_reference(golden, fixture_model, monkeypatch):
    model = fixture_model(golden, scan_layers=False)
    ids = _prompt(golden, clips=0)
    # The model on all-masked media: finite logits equal to the reference with af2-jax's rule switched on.
    media = np.zeros((1, 64, golden.config.audio_transformer.d_model), np.float32)
    mask = np.zeros((1, 64), np.float32)
    logits = np.asarray(model(np.asarray([ids]), None, media, mask))
    monkeypatch.setattr(MaskedCrossAttention, "zero_without_media", True)
    t = torch.from_numpy
    with torch.no_grad():
        expected = golden.reference(t(np.asarray([ids])), t(np.ones((1, len(ids)), np.int64)), t(media),
                                    t(mask)).numpy()
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=2e-4)
    # Through the engine: no HTSAT pass (the encoder is never called, not even traced) and the reference's tokens.
    calls = []
    encoder = type(model.audio_encoder)
    monkeypatch.setattr(encoder, "__call__", lambda self, *a, **k: calls.append(1))
    engine = engine_for(model)
    encoders = sum(key[0] == "encode" for key in engine.programs.keys())
    ours = engine.run([Request(ids, None, Sampling(max_new_tokens=5, ignore_eos=True))])[0].tokens
    assert calls == [] and sum(key[0] == "encode" for key in engine.programs.keys()) == encoders
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(5):
            out = golden.reference(t(np.asarray([sequence])), t(np.ones((1, len(sequence)), np.int64)), t(media),
                                   t(mask))
            sequence.append(int(out[0, -1].argmax()))
    assert ours == sequence[len(ids):]


def test_a_waveform_gives_the_windows_of_the_same_audio_in_a_file(tmp_path):
    rng = np.random.default_rng(0)
    seconds = 13
    stereo = (0.3 * np.sin(np.arange(44100 * seconds) * 0.02)[None] + 0.05 * rng.standard_normal((2, 44100 * seconds)))
    path = tmp_path / "clip.wav"
    soundfile.write(path, stereo.T, 44100, subtype="DOUBLE")
    from_file = load_windows(path, max_windows=12)
    from_array = waveform_windows({"array": stereo, "sampling_rate": 44100}, max_windows=12)
    assert from_file[0].shape == (2, 160000)
    np.testing.assert_array_equal(from_array[0], from_file[0])
    np.testing.assert_array_equal(from_array[1], from_file[1])
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer"):
        waveform_windows({"array": stereo, "sampling_rate": 44100.5})


def test_more_than_thirty_windows_in_all_is_one_line(golden, fixture_model):
    clip = (golden.inputs["audio_x"][0, :1][np.zeros(12, int)], np.ones(12, np.float32))
    engine = engine_for(fixture_model(golden, scan_layers=False))
    with pytest.raises(ValueError, match="36 windows in all, over the limit of 30"):
        engine.submit(Request(_prompt(golden, clips=3), [clip, clip, clip]))


@pytest.mark.slow
def test_a_manifest_of_one_clip_two_clips_and_none_runs_in_order(tmp_path, cli_logging, capsys):
    """On the demo model: single-clip, two-clip and text-only items, answered and written in input order, each
    line echoing its "audio" as given; a rerun finds every id answered."""
    import json

    from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
    from af2_jax.cli.infer import main as infer_cli
    from tests.helpers import REPO

    beeps = str(REPO / "infer" / "examples" / "three_beeps.flac")
    items = [{"id": "one", "audio": beeps, "prompt": "How many beeps are there?"},
             {"id": "two", "audio": [beeps, beeps], "prompt": "How many beeps are there?"},
             {"id": "none", "prompt": "How many beeps are there?"},
             {"id": "empty", "audio": [], "prompt": "Is it loud?"}]
    manifest, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    manifest.write_text("".join(json.dumps(it) + "\n" for it in items))
    args = ["--checkpoint", str(DEMO_CHECKPOINT), "--manifest", str(manifest), "--output", str(output),
            "--max-new-tokens", "8", "--slots", "2"]
    assert infer_cli(args) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == [it["id"] for it in items]
    for line, it in zip(lines, items):
        assert line.get("audio") == it.get("audio") and isinstance(line["answer"], str) and "error" not in line
    assert lines[0]["answer"] == "three"
    assert infer_cli(args) == 0 and output.read_text().count("\n") == 4
    # --prompt alone: a question without audio, on the command line.
    assert infer_cli(["--checkpoint", str(DEMO_CHECKPOINT), "--prompt", "Is it loud?", "--max-new-tokens", "4",
                      "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "Is it loud?"


def test_parts_in_any_order_give_the_same_prompt(tmp_path):
    """Text-first and audio-first parts give identical ids: the clips' `<audio>` first, then the texts joined with
    one space."""
    import af2_jax
    from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
    from tests.helpers import REPO

    beeps = str(REPO / "infer" / "examples" / "three_beeps.flac")
    model = af2_jax.load(DEMO_CHECKPOINT, dtype="float32")
    tokenizer = af2_jax.load_tokenizer(DEMO_CHECKPOINT)
    engine = af2_jax.Engine(model, tokenizer, slots=1)
    orders = [[{"text": "How many"}, {"audio": beeps}, {"text": "beeps?"}],
              [{"audio": beeps}, {"text": "How many"}, {"text": "beeps?"}]]
    handles = [engine.submit(Request(parts)) for parts in orders]
    t = tokenizer.tokens
    assert handles[0].prompt_ids == handles[1].prompt_ids == tokenizer.prompt_ids("How many beeps?")
    assert handles[0].prompt_ids[0] == t.media and handles[0].prompt_ids.count(t.media) == 1
    for handle in handles:
        engine.cancel(handle)
    engine.step()
    assert all(h.result().finish_reason == "cancelled" for h in handles)
