import logging

import jax
import numpy as np
import pytest
from flax import nnx

from af2_jax.engine import bucket_prompt, bucket_windows
from af2_jax.generate import engine_for, generate, left_pad

# Both layer layouts decode: stacked (one lax.scan; checkpoints, training) and unstacked (serving, `infer`).
LAYOUTS = pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked", "unstacked"])


@LAYOUTS
def test_batched_greedy_equals_the_original(golden, scan_layers, fixture_model):
    i, o = golden.inputs, golden.outputs
    n = o["generated_ids"].shape[1] - i["gen_input_ids"].shape[1]
    out = generate(fixture_model(golden, scan_layers), i["gen_input_ids"], i["gen_attention_mask"], i["audio_x"],
                   i["audio_x_mask"], max_new_tokens=n)
    np.testing.assert_array_equal(out.tokens, o["generated_ids"][:, -n:])
    np.testing.assert_array_equal(np.concatenate([i["gen_input_ids"], out.tokens], axis=1), o["generated_ids"])


@LAYOUTS
def test_each_row_alone_equals_the_original(golden, scan_layers, fixture_model):
    i, o = golden.inputs, golden.outputs
    n = o["generated_tokens"].shape[1]
    for row in range(i["gen_input_ids"].shape[0]):
        ids = i["gen_input_ids"][row][i["gen_attention_mask"][row] == 1][None]
        windows = int(i["audio_x_mask"][row].sum())
        out = generate(fixture_model(golden, scan_layers), ids, np.ones_like(ids), i["audio_x"][row:row + 1, :windows],
                       i["audio_x_mask"][row:row + 1, :windows], max_new_tokens=n)
        np.testing.assert_array_equal(out.tokens[0], o["generated_tokens"][row])
        assert out.lengths[0] == n  # no stored decode hits eos


def _mixed_batch(golden):
    """4 rows: prompts of different lengths (ordinary token ids from the fixture's range), 1 or 2 windows."""
    rng = np.random.default_rng(0)
    lo, hi = golden.raw_config["tokenizer"]["regular_token_ids"]
    t = golden.config.tokens
    prompts = [[t.media, *rng.integers(lo, hi, n), t.sep] for n in (3, 9, 1, 6)]
    audio = golden.inputs["audio_x"]
    clips = [audio[0, :2], audio[1, :1], audio[0, 1:2], audio[0, :2][::-1]]
    return prompts, clips


def _batch(prompts, clips, pad):
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad)
    mask = np.zeros((len(prompts), width), np.int64)
    for r, p in enumerate(prompts):  # right padding on purpose: generate re-pads on the left
        ids[r, :len(p)] = p
        mask[r, :len(p)] = 1
    windows = max(len(c) for c in clips)
    audio = np.zeros((len(clips), windows, clips[0].shape[-1]), np.float32)
    audio_mask = np.zeros((len(clips), windows), np.float32)
    for r, c in enumerate(clips):
        audio[r, :len(c)] = c
        audio_mask[r, :len(c)] = 1
    return ids, mask, audio, audio_mask


@LAYOUTS
def test_rows_of_a_mixed_batch_equal_each_row_alone(golden, scan_layers, fixture_model):
    model = fixture_model(golden, scan_layers)
    prompts, clips = _mixed_batch(golden)
    pad = golden.config.tokens.pad
    together = generate(model, *_batch(prompts, clips, pad), max_new_tokens=10)
    three = generate(model, *_batch(prompts[:3], clips[:3], pad), max_new_tokens=10)  # filled up to 4 rows
    assert three.tokens.shape == (3, 10)
    for r in range(4):
        alone = generate(model, *_batch([prompts[r]], [clips[r]], pad), max_new_tokens=10)
        np.testing.assert_array_equal(together.tokens[r], alone.tokens[0])
        if r < 3:
            np.testing.assert_array_equal(three.tokens[r], alone.tokens[0])


def test_cached_decoding_equals_full_recomputation(golden, fixture_model):
    """Cached decoding in the serving layout against the full forward recomputed at every step in the stacked
    layout (one compiled program per length, so the quicker-compiling layout)."""
    prompts, clips = _mixed_batch(golden)
    ids, mask, audio, audio_mask = _batch(prompts[:1], clips[:1], golden.config.tokens.pad)
    steps = 6
    cached = generate(fixture_model(golden, scan_layers=False), ids, mask, audio, audio_mask,
                      max_new_tokens=steps).tokens[0]
    forward = nnx.jit(lambda m, a, am, x: m.forward_audio_text(a, am, x))
    sequence = list(ids[0])
    for _ in range(steps):
        logits = forward(fixture_model(golden, scan_layers=True), audio, audio_mask, np.asarray([sequence]))
        sequence.append(int(np.argmax(logits[0, -1])))
    np.testing.assert_array_equal(cached, sequence[len(ids[0]):])


def _compile_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "af2_jax.engine"]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(golden, caplog, fixture_model):
    model = fixture_model(golden, scan_layers=False)
    i = golden.inputs
    args = (i["gen_input_ids"], i["gen_attention_mask"], i["audio_x"], i["audio_x_mask"])
    programs = engine_for(model).programs
    with caplog.at_level(logging.INFO, logger="af2_jax.engine"):
        before = programs.count
        a = generate(model, *args, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, key=jax.random.key(7))
        # Sampling rules are data, not shapes: the programs are the greedy ones. When this call compiled them, it said
        # so in one line before compiling, however many programs it took.
        rows, windows = args[0].shape[0], bucket_windows(args[2].shape[1])
        expected = [f"compiling for {rows} row(s) x {windows} window(s), prompt {bucket_prompt(args[0].shape[1])} "
                    f"+ 8 new tokens (first run only; cached in {jax.config.jax_compilation_cache_dir})"]
        assert _compile_lines(caplog) == (expected if programs.count > before else [])
        caplog.clear()
        compiled = programs.count
        b = generate(model, *args, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, key=jax.random.key(7))
        c = generate(model, *args, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, key=jax.random.key(8))
        assert not _compile_lines(caplog) and programs.count == compiled  # nothing new to compile or announce
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = generate(model, *args, max_new_tokens=8)
    top1 = generate(model, *args, max_new_tokens=8, temperature=0.7, top_k=1, key=jax.random.key(1))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    with pytest.raises(ValueError, match="needs key"):
        generate(model, *args, max_new_tokens=2, temperature=1.0)


def test_rows_stop_at_their_own_eos(golden, fixture_model):
    model = fixture_model(golden, scan_layers=False)
    i, o = golden.inputs, golden.outputs
    n = o["generated_ids"].shape[1] - i["gen_input_ids"].shape[1]
    expected = o["generated_ids"][:, -n:]
    eos = int(expected[0, 2])  # pretend row 0's third token is the end of sequence
    pad = golden.config.tokens.pad
    out = generate(model, i["gen_input_ids"], i["gen_attention_mask"], i["audio_x"], i["audio_x_mask"],
                   max_new_tokens=n, eos_token_id=eos)
    np.testing.assert_array_equal(out.tokens[0], [*expected[0, :3], *[pad] * (n - 3)])
    assert out.lengths[0] == 3
    hits = np.flatnonzero(expected[1] == eos)
    stop = hits[0] + 1 if len(hits) else n
    np.testing.assert_array_equal(out.tokens[1, :stop], expected[1, :stop])
    assert out.lengths[1] == stop


def test_buckets():
    assert [bucket_prompt(n) for n in (1, 16, 17, 100, 512)] == [16, 16, 32, 128, 512]
    assert [bucket_windows(n) for n in (1, 3, 5, 7, 12, 13, 17, 30)] == [1, 3, 6, 8, 12, 16, 20, 30]
    assert all((bucket_windows(n) - n) / bucket_windows(n) <= 1 / 4 for n in range(1, 31))


def test_left_padded_batch_equals_the_pytorch_reference(golden, fixture_model):
    """The fixture's prompts have equal lengths; mixed lengths, left-padded, against the reference decoding with
    transformers' cache the way the original does."""
    import torch

    prompts, clips = _mixed_batch(golden)
    pad = golden.config.tokens.pad
    _, _, audio, audio_mask = _batch(prompts, clips, pad)
    left_ids, left_mask = left_pad(prompts, pad)
    width = left_ids.shape[1]
    t = torch.from_numpy
    expected = golden.reference.generate_greedy(t(left_ids), t(left_mask), t(audio), t(audio_mask), 10,
                                                golden.config.tokens.eos, pad)[:, width:].numpy()
    ours = generate(fixture_model(golden, scan_layers=False), left_ids, left_mask, audio, audio_mask,
                    max_new_tokens=10)
    np.testing.assert_array_equal(ours.tokens[:, :expected.shape[1]], expected)
