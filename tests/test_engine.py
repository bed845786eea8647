"""The serving engine: continuous batching that gives every request the tokens it gets alone, streaming to the right
caller, cancellation, the queue and cache limits, and a bounded set of compiled programs."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest

from af2_jax.engine import (Engine, EngineFull, EnginePrograms, Request, Sampling, bucket_prompt, bucket_windows,
                            row_buckets, sample_rows)
from af2_jax.generate import engine_for



def _requests(golden, count: int = 11):
    """Mixed prompt lengths (1..12 ordinary tokens between the template's), window counts (1..2) and answer
    lengths."""
    rng = np.random.default_rng(0)
    lo, hi = golden.raw_config["tokenizer"]["regular_token_ids"]
    t = golden.config.tokens
    audio = golden.inputs["audio_x"]
    out = []
    for n in range(count):
        prompt = [t.media, *rng.integers(lo, hi, int(rng.integers(1, 13))).tolist(), t.sep]
        windows = 1 + n % 2
        clip = audio[n % audio.shape[0], :1][np.zeros(windows, int)] * (1 + 0.1 * n)
        out.append(Request(prompt, (clip, np.ones(windows, np.float32)),
                           Sampling(max_new_tokens=int(rng.integers(3, 9)))))
    return out


@pytest.fixture(scope="module")
def engine_model(golden, fixture_model):
    return fixture_model(golden, scan_layers=False)


@pytest.fixture(scope="module")
def engine(engine_model):
    """One engine (8 slots, 768 positions) for these tests, so its programs compile once."""
    return engine_for(engine_model)


def test_staggered_arrivals_get_their_solo_tokens(golden, engine):
    """... while the group's rows follow the requests in flight: after every step, the smallest row bucket holding
    the requests in it and those that can join next."""
    requests = _requests(golden)
    solo = [engine.run([r])[0].tokens for r in requests]
    rows = []

    def step():
        engine.step()
        need = engine.busy + min(engine.waiting, engine.slots - engine.busy)
        assert engine.rows == (min(r for r in engine.row_buckets if r >= need) if need else 0)
        rows.append(engine.rows)

    handles = [engine.submit(r) for r in requests[:2]]  # arrival 1
    step()
    step()
    handles += [engine.submit(r) for r in requests[2:7]]  # arrival 2: the first two are mid-decode
    step()
    handles += [engine.submit(r) for r in requests[7:]]  # arrival 3: more requests than slots, some wait
    assert engine.slots < len(requests)
    while not all(h.done() for h in handles):
        step()
    assert [h.result().tokens for h in handles] == solo
    assert {1, 2, 8} <= set(rows), rows
    assert all(len(t) == r.sampling.max_new_tokens or t[-1] == golden.config.tokens.eos
               for t, r in zip(solo, requests))


def test_a_seeded_sampled_request_ignores_its_batch_mates(golden, engine):
    requests = _requests(golden)
    sampled = Request(requests[0].prompt, requests[0].audio,
                      Sampling(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=11))
    alone = engine.run([sampled])[0].tokens
    busy = engine.run([requests[1], requests[2], sampled, requests[3]])[2].tokens
    late = [engine.submit(r) for r in requests[4:7]]
    engine.step()
    assert engine.run([sampled])[0].tokens == alone == busy
    [h.result() for h in late]
    other_seed = Request(sampled.prompt, sampled.audio, Sampling(max_new_tokens=8, temperature=1.0, seed=12))
    assert engine.run([other_seed])[0].tokens != alone


def test_two_threads_stream_only_their_own_tokens(golden, engine):
    requests = _requests(golden)[:4]
    expected = [engine.run([r])[0].tokens for r in requests]
    streamed = {n: [] for n in range(len(requests))}

    def ask(n):
        handle = engine.submit(requests[n], on_token=streamed[n].extend)
        assert handle.result().tokens == expected[n]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [streamed[n] for n in range(len(requests))] == expected


def test_cancel_frees_the_slot_and_limits_are_one_line(golden, engine):
    requests = _requests(golden)
    long = [Request(r.prompt, r.audio, Sampling(max_new_tokens=30)) for r in requests[:engine.slots]]
    first = [engine.submit(r) for r in long]
    engine.step()  # every slot decodes a long answer
    waiting = [engine.submit(requests[n % len(requests)]) for n in range(engine.max_pending)]
    with pytest.raises(EngineFull, match=f"{engine.max_pending} requests are already waiting"):
        engine.submit(requests[0])
    engine.cancel(first[0])
    for handle in waiting[1:]:
        engine.cancel(handle)
    engine.step()
    assert first[0].done() and first[0].result().finish_reason == "cancelled"
    assert len(first[0].result().tokens) < 30
    assert waiting[0].tokens  # it took the freed slot at once
    assert waiting[0].result().tokens == engine.run([requests[0]])[0].tokens
    assert all(h.result().finish_reason == "cancelled" and not h.tokens for h in waiting[1:])
    [h.result() for h in first[1:]]
    most = engine.max_len - len(requests[0].prompt)
    too_long = Request(requests[0].prompt, requests[0].audio, Sampling(max_new_tokens=most + 1))
    with pytest.raises(ValueError, match=rf"prompt \({len(requests[0].prompt)} tokens\) and max_new_tokens "
                                         rf"\({most + 1}\) need {engine.max_len + 1} cache positions, over the "
                                         rf"engine's max_len {engine.max_len}"):
        engine.submit(too_long)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        Sampling(max_new_tokens=0)


def test_row_buckets():
    assert row_buckets(16) == (1, 2, 4, 8, 16) and row_buckets(12) == (1, 2, 4, 8, 12)
    assert row_buckets(8, data=2) == (2, 4, 8) and row_buckets(6, data=3) == (3, 6)
    assert row_buckets(16, elastic=False) == (16,)


def test_sampling_keeps_the_best_token_whatever_top_p():
    """A top_p that float32 holds as 0 still keeps the most likely token (and only it): never a row with every
    logit masked, which samples garbage."""
    logits = jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 50)), jax.numpy.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    tokens = sample_rows(logits, keys, np.ones(2, np.float32), np.zeros(2, np.int32),
                         np.asarray([1e-45, 0.0], np.float32))
    assert (np.asarray(tokens) == np.asarray(logits).argmax(-1)).all()


def test_the_programs_stay_within_the_bound(engine):
    """Every request above (windows 1..2, prompts of one bucket) ran on at most the stated bound of programs (this
    engine serves test_requests.py later, which adds requests without audio)."""
    assert 0 < engine.programs.count <= EnginePrograms.bound(len({bucket_windows(w) for w in (1, 2)}), 1,
                                                             len(engine.row_buckets))


def test_slots_must_split_over_the_data_axes(engine_model):
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    assert Engine(engine_model, slots=3, mesh=mesh).slots == 3  # one device: anything splits
    fake = type("Mesh", (), {"shape": {"data": 2, "fsdp": 1, "tensor": 1}})()
    with pytest.raises(ValueError, match="slots 3 does not split over data x fsdp = 2 devices; use a multiple of 2"):
        Engine(engine_model, slots=3, mesh=fake)


@pytest.mark.slow
def test_a_manifest_compiles_at_most_the_stated_bound(small_checkpoint, tokenizer, tmp_path):
    """Windows 1..8 and prompts up to 64 tokens: at most `EnginePrograms.bound(groups, prompt buckets)` programs,
    read from the engine's program handle; a 12-item run killed and rerun ends complete, in input order."""
    from af2_jax.checkpoint.native import load
    from af2_jax.generate import engine_for
    from af2_jax.manifest import ManifestJob

    import soundfile

    model = load(small_checkpoint, dtype="float32", scan_layers=False)
    rng = np.random.default_rng(3)
    items = []
    for n in range(12):
        windows = 1 + n % 8
        clip = tmp_path / f"clip{n}.wav"
        seconds = 10 * windows - 5
        soundfile.write(clip, 0.1 * np.sin(np.arange(16000 * seconds) * (0.01 + 0.001 * n)), 16000)
        items.append({"id": f"i{n}", "audio": str(clip), "prompt": " ".join(["what"] * int(rng.integers(1, 60)))})
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(it) + "\n" for it in items))
    output = tmp_path / "out.jsonl"
    engine = engine_for(model, tokenizer, slots=4, max_len=tokenizer.max_prompt_tokens + 4, max_windows=8)
    before = engine.programs.count
    with ManifestJob(manifest, output) as job:
        job.pending = job.pending[:5]  # what a kill after five items leaves
        job.run(engine, Sampling(max_new_tokens=4))
    assert output.read_text().count("\n") == 5
    with ManifestJob(manifest, output) as job:
        assert len(job.pending) == 7
        assert job.run(engine, Sampling(max_new_tokens=4)) == 0
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [it["id"] for it in items]
    windows = {bucket_windows(w) for w in range(1, 9)}
    prompts = {bucket_prompt(n) for n in range(1, 65)}
    assert engine.programs.count - before <= EnginePrograms.bound(len(windows), len(prompts),
                                                                  len(engine.row_buckets))


def test_a_stacked_model_serves_while_the_serving_form_compiles(golden, engine):
    """`compile_serving_form`: the stacked form answers at once, the list form's programs compile on another thread,
    and the engine switches between two decoding calls with requests in flight, each getting the tokens it gets
    alone on the list form; a listed shape then compiles nothing more."""
    from af2_jax.checkpoint import load_original

    # Questions without audio: no audio encoder to compile, twice
    requests = [Request(r.prompt[1:], None, r.sampling) for r in _requests(golden, 3)]
    solo = [engine.run([r])[0].tokens for r in requests]
    with pytest.raises(ValueError, match="list form"):
        engine.compile_serving_form([(0, 16, 1)])
    model = load_original(golden.weights, golden.config)  # stacked, and this test's own: the switch moves its layers
    switching = Engine(model, slots=2, elastic_rows=False)  # as on an accelerator: a group always has 2 rows
    assert switching.run([requests[0]])[0].tokens == solo[0]
    handles = [switching.submit(r) for r in requests[1:]]
    switching.step()  # admitted, and decoding on the stacked form
    switching.compile_serving_form([(0, 16, switching.rows_for(1))]).join()
    assert switching.switch_pending and switching.busy == 2 and model.scan_layers
    compiled = switching._serving_form.count
    with pytest.raises(ValueError, match="once"):
        switching.compile_serving_form([(0, 16, 2)])
    assert [h.result().tokens for h in handles] == solo[1:]
    assert switching.switched.is_set() and not model.scan_layers
    assert switching.run([requests[0]])[0].tokens == solo[0]
    assert switching.programs.count == compiled  # the shape in flight and the listed one: compiled already


def test_the_runner_compiles_in_the_background_only_from_stacked_layers(engine):
    from af2_jax.server.runner import EngineRunner

    with pytest.raises(ValueError, match="background compilation needs a model in the stacked form and a warm-up "
                                         r"\(got list layers, warmup 'min'\)"):
        EngineRunner(lambda: engine, background_compile=True)
