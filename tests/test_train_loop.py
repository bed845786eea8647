"""The training loop and CLI: data pipeline, exact resume, config errors, metrics files, the 8-device step and two
processes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from af2_jax.config import SpecialTokens
from af2_jax.cli.train import main
from af2_jax.training.config import ConfigError, TrainConfig, _build, load_config
from af2_jax.training.data import LoadExample, TrainBatches, blend, validation_sets
from af2_jax.training.labels import IGNORE
from af2_jax.training.loop import Preempted, run, validation_loss
from tests.helpers import REPO, read_events, tiny_train_config


def _config(tones, out_dir, **sections) -> TrainConfig:
    return _build(TrainConfig, tiny_train_config(tones, out_dir, **sections), "")


def test_blend_follows_the_weights(tones):
    data = _config(tones, "x").data
    assert len(blend(data)) == 8
    twice = _build(type(data), {**data.__dict__, "dataset_blending_config": {"Tones-PitchQA/train": {"weight": 2.5}}},
                   "data")
    items = blend(twice)
    assert len(items) == 20 and len({i.audio for i in items[:8]}) == 8  # first pass: every item once
    assert blend(twice) == items  # the blend is a function of the config alone


def test_batches_are_static_labelled_and_resume_exactly(tones, tokenizer):
    config = _config(tones, "x")
    load = LoadExample(tokenizer, SpecialTokens(), 16, 1, loss_positions=4)
    items = blend(config.data)
    straight = TrainBatches(items, load, batch_size=4, seed=3)
    expected = [next(straight) for _ in range(5)]  # more than one pass over the 8 items
    first = TrainBatches(items, load, batch_size=4, seed=3)
    got = [next(first) for _ in range(2)]
    state = json.loads(json.dumps(first.state()))  # survives JSON, as in the checkpoint
    resumed = TrainBatches(items, load, batch_size=4, seed=3)
    resumed.restore(state)
    got += [next(resumed) for _ in range(3)]
    for a, b in zip(expected, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    batch = expected[0]
    assert batch["audio_x"].shape == (4, 1, 160000) and batch["input_ids"].shape == (4, 16)
    for row, labels in enumerate(batch["labels"]):
        answer = tokenizer.decode(labels[labels != IGNORE])
        assert answer in ("low<|endofchunk|><|endoftext|>", "high<|endofchunk|><|endoftext|>"), answer


def test_broken_audio_is_skipped_and_counted(tones, tokenizer, tmp_path, caplog):
    config = _config(tones, "x")
    items = blend(config.data)
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all")
    items = items[:3] + [type(items[0])(audio=str(broken), prompt="p", output="o", task="t")]
    batches = TrainBatches(items, LoadExample(tokenizer, SpecialTokens(), 16, 1), batch_size=3, seed=0)
    for _ in range(3):
        assert next(batches)["input_ids"].shape[0] == 3
    assert batches.broken >= 2 and str(broken) in caplog.text


def test_unreadable_items_in_a_row_give_up_naming_the_data_root(tones, tokenizer):
    items = blend(_config(tones, "x", data={"data_root": "/nowhere"}).data)
    batches = TrainBatches(items, LoadExample(tokenizer, SpecialTokens(), 16, 1), batch_size=4, seed=0,
                           data_root="/nowhere")
    with pytest.raises(ConfigError, match=r"^8 training audio files in a row cannot be read .*data.data_root is "
                                          r"'/nowhere'"):
        next(batches)  # a whole pass (8 items) is shorter than the bound of 100
    assert batches.broken == 8


class _InterruptedIterator:
    """grain's iterator, but the call numbered `at` raises Preempted, as the SIGTERM handler does in the waiting
    (main) thread."""

    def __init__(self, iterator, at):
        self.iterator, self.at, self.calls = iterator, at, 0

    def __next__(self):
        self.calls += 1
        if self.calls == self.at:
            raise Preempted
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()


def test_a_batch_interrupted_half_read_leaves_the_resume_state_at_the_last_batch(tones, tokenizer):
    items = blend(_config(tones, "x").data)
    load = LoadExample(tokenizer, SpecialTokens(), 16, 1)
    expected = [next(b) for b in [TrainBatches(items, load, batch_size=4, seed=3)] for _ in range(3)]
    batches = TrainBatches(items, load, batch_size=4, seed=3)
    batches._iterator = _InterruptedIterator(batches._iterator, at=6)
    next(batches)
    with pytest.raises(Preempted):
        next(batches)  # interrupted after 1 of the 4 items of the second batch
    resumed = TrainBatches(items, load, batch_size=4, seed=3)
    resumed.restore(json.loads(json.dumps(batches.state())))
    for want in expected[1:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_a_validation_set_with_no_readable_audio_has_no_loss(tones, tokenizer, caplog):
    config = _config(tones, "x", data={"data_root": "/nowhere"})
    valid = validation_sets(config.data)
    load = LoadExample(tokenizer, SpecialTokens(), 16, 1)
    assert validation_loss(None, None, None, valid, load, 4, None) == {}  # never 0.0, a perfect score
    assert "validation set Tones-PitchQA/test: none of its 8 items could be read" in caplog.text


def test_a_wrong_data_root_ends_the_run_at_once(tones, tmp_path, capsys, cli_logging):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "out", data={"data_root": "/nonexistent"})))
    start = time.monotonic()
    code = main(["--config", str(path)])
    assert time.monotonic() - start < 180
    stderr = capsys.readouterr().err
    assert code == 1, stderr
    error = stderr.splitlines()[-1]  # after the log lines of reading the manifests, one line
    assert error.startswith("error: Tones-PitchQA/train: none of 8 sampled audio files can be read")
    assert "data.data_root is '/nonexistent'" in error and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_while_waiting_for_data_saves_and_exits_promptly(tones, tmp_path):
    """The third batch never arrives (from then on every read hangs: a mount that stopped answering); SIGTERM
    breaks out of the wait, saves step 2 and exits although reader threads still hang.

    The stall starts at the loop's third request for a batch, not at the second pass over the items: grain's
    reader threads read ahead in any order, so a read of the second pass can start before one of the first."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "out", run={"steps": 6, "save_every": 10})))
    driver = f"""
import sys, threading, time
from af2_jax.training import data
load, batch = data.LoadExample.__call__, data.TrainBatches.__next__
stalled = threading.Event()
def hanging(self, item):  # grain's reader threads call this
    if stalled.is_set():
        time.sleep(600)
    return load(self, item)
def announced(self, calls=[]):  # the training loop calls this, in its wait for data
    calls.append(1)
    if len(calls) == 3:
        stalled.set()
        print("waiting for data", flush=True)
        time.sleep(600)  # what was read ahead is not enough: the batch waits on reads that hang
    return batch(self)
data.LoadExample.__call__, data.TrainBatches.__next__ = hanging, announced
from af2_jax.cli.train import main
sys.exit(main(["--config", {str(path)!r}]))
"""
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:  # a file, not a pipe: a pipe nobody reads blocks the run once it is full
        process = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=err, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert process.stdout.readline().strip() == "waiting for data", err_file.read_text()[-3000:]
        time.sleep(1.0)  # in the wait for the third batch
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()
    stderr = err_file.read_text()
    assert time.monotonic() - sent < 30, "the data wait ignored SIGTERM"
    assert process.returncode == 0, stderr
    assert "SIGTERM while waiting for data: stopped at step 2" in stderr
    with ocp.CheckpointManager(tmp_path / "out" / "checkpoints") as manager:
        assert manager.latest_step() == 2


def test_six_steps_equal_three_a_kill_and_three_more(tones, tmp_path):
    straight = run(_config(tones, tmp_path / "straight", run={"steps": 6, "save_every": 6, "eval_accuracy": True,
                                                              "profile_steps": "1:2"}))
    run(_config(tones, tmp_path / "resumed", run={"steps": 3, "save_every": 3}))
    resumed = run(_config(tones, tmp_path / "resumed", run={"steps": 6, "save_every": 3}))
    assert straight["step"] == resumed["step"] == 6
    with ocp.CheckpointManager(tmp_path / "straight" / "checkpoints") as a, \
            ocp.CheckpointManager(tmp_path / "resumed" / "checkpoints") as b:
        assert a.latest_step() == b.latest_step() == 6
        left, right = a.restore(6), b.restore(6)
    for x, y in zip(jax.tree.leaves(left.state), jax.tree.leaves(right.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # parameters, optimizer state, step
    assert left.data == right.data  # the data iterator stands at the same place
    assert straight["loss"] == resumed["loss"]
    # TensorBoard: the scalars (the same for the resumed run), the config, sample answers, the profile
    shown, shown_resumed = read_events(tmp_path / "straight" / "tensorboard"), read_events(tmp_path / "resumed" /
                                                                                             "tensorboard")
    assert [step for step, _ in shown["scalars"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert shown_resumed["scalars"]["loss"] == shown["scalars"]["loss"]
    assert [step for step, _ in shown["scalars"]["valid/Tones-PitchQA/test/exact_match"]] == [6]
    assert shown["hparams"]["run.steps"] == 6 and shown["hparams"]["optim.trainable"] == "full"
    [(step, answers)] = shown["texts"]["valid/Tones-PitchQA/test/answers"]
    rows = answers.splitlines()[2:]
    assert step == 6 and len(rows) == 5 and all(row.startswith("| Is the tone low or high? | ") for row in rows)
    assert list((tmp_path / "straight" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    # the final model loads and answers
    import af2_jax

    from flax import nnx
    import ml_dtypes

    model = af2_jax.load(tmp_path / "straight" / "final", dtype="float32")
    # final/ holds the trained parameters of step 6 (run.final_dtype bfloat16), not, say, the initial ones
    trained = [np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32) for x in jax.tree.leaves(left.state)
               if np.asarray(x).dtype == np.float32]
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(value[...])
        assert any(t.shape == value.shape and np.array_equal(t, value) for t in trained), path
    tokenizer = af2_jax.load_tokenizer(tmp_path / "straight" / "final")
    clip = str(tones / "audio" / "test" / "0.flac")
    text = af2_jax.answer(model, tokenizer, clip, "is the tone low or high?", max_new_tokens=3)
    windows, mask = af2_jax.audio.load_windows(clip, max_windows=1, config=model.config.audio)
    ids = tokenizer.prompt_ids("is the tone low or high?")
    out = af2_jax.generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int32), windows[None], mask[None],
                           max_new_tokens=3)
    assert text == tokenizer.answer(ids, out.tokens[0, : out.lengths[0]])


def _restore_final_step(out_dir):
    with ocp.CheckpointManager(out_dir / "checkpoints") as manager:
        step = manager.latest_step()
        return step, manager.restore(step)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_real_kill_and_a_rerun_equal_a_straight_run(tones, tmp_path, kill):
    """The CLI in a subprocess, killed once step 3 is logged, then rerun: parameters, AdamW state and data position
    at the end equal a straight run's. (Mutation check: resetting the optimizer state after the restore in
    `loop.run`, `state = state._replace(opt_state=tx.init(state.params))`, makes this fail.)"""
    config = tiny_train_config(tones, tmp_path / "killed", optim={"warmup_steps": 0},
                               run={"steps": 6, "save_every": 2})
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(config))
    straight = tmp_path / "straight.yaml"
    straight.write_text(yaml.safe_dump({**config, "run": {**config["run"], "out_dir": str(tmp_path / "straight")}}))
    assert _cli("--config", str(straight)).returncode == 0
    metrics = tmp_path / "killed" / "tensorboard" / "metrics.jsonl"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "af2_jax.train", "--config", str(killed)],
                                   stdout=log, stderr=log, env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            deadline = time.monotonic() + 240
            while not (metrics.is_file() and any(json.loads(line)["step"] >= 3
                                                 for line in metrics.read_text().splitlines())):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
                time.sleep(0.05)
            process.send_signal(kill)
            process.wait(timeout=120)
        finally:
            process.kill()
    with ocp.CheckpointManager(tmp_path / "killed" / "checkpoints") as manager:
        assert manager.latest_step() < 6  # it was stopped before the end
    rerun = _cli("--config", str(killed))
    assert rerun.returncode == 0 and "resumed from" in rerun.stderr, rerun.stderr[-2000:]
    (step_a, a), (step_b, b) = _restore_final_step(tmp_path / "straight"), _restore_final_step(tmp_path / "killed")
    assert step_a == step_b == 6
    left, right = jax.tree.leaves(a.state), jax.tree.leaves(b.state)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # parameters, AdamW moments, step
    assert a.data == b.data


def test_frozen_parameters_stay_bit_identical(tones, tmp_path):
    import af2_jax

    run(_config(tones, tmp_path / "base", run={"steps": 1, "final_dtype": "float32"}))
    run(_config(tones, tmp_path / "tuned", model={"init": str(tmp_path / "base" / "final"), "overrides": {}},
                optim={"trainable": "pretrain"}, run={"steps": 2, "final_dtype": "float32"}))
    from flax import nnx

    base = nnx.to_flat_state(nnx.state(af2_jax.load(tmp_path / "base" / "final", dtype="float32")))
    tuned = dict(nnx.to_flat_state(nnx.state(af2_jax.load(tmp_path / "tuned" / "final", dtype="float32"))))
    changed = {".".join(map(str, p)) for p, v in base if not np.array_equal(np.asarray(v[...]),
                                                                              np.asarray(tuned[p][...]))}
    assert changed and all(p.startswith(("audio_transformer.", "layers.xattn.", "embed_tokens.")) for p in changed)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "af2_jax.train", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)


@pytest.mark.parametrize("override, message", [
    ("optim.learnin_rate=1", "unknown config key 'optim.learnin_rate'; valid keys here: trainable"),
    ("run.mesh=fsdp=3", "needs 3 devices but 1 are available"),
    ("optim.batch_size=3", None),  # fine on one device: checked against the mesh below
    ("data.dataset_file_root=/nowhere", "manifest not found"),
    ("optim.schedule=linear", "optim.schedule 'linear': use constant, cosine"),
    ("data.data_root=/nonexistent", "none of 8 sampled audio files can be read"),  # the audio is checked too
])
def test_bad_configs_fail_before_compiling_with_one_line(tones, tmp_path, capsys, cli_logging, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "out")))
    code = main(["--config", str(path), override, "--dry-run"])
    stderr = capsys.readouterr().err
    if message is None:
        assert code == 0, stderr
        return
    assert code == 1, stderr
    error = stderr.splitlines()[-1]  # log lines may come first; the error is one line
    assert error.startswith("error: ") and message in error and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("override, message", [
    ("run.final_dtype=nonsense", "run.final_dtype 'nonsense': use bfloat16, float32"),
    ("run.log_every=0", "run.log_every 0: must be >= 1"),
    ("run.keep=0", "run.keep 0: must be >= 1"),
    ("run.save_every=0", "run.save_every 0: must be >= 1"),
    ("run.eval_every=-1", "run.eval_every -1: must be >= 0"),
    ("run.profile_steps=5:3", "run.profile_steps '5:3': use START:STOP with 0 <= START < STOP"),
    ("model.compute_dtype=float16", "model.compute_dtype 'float16': use bfloat16, float32"),
    ("optim.learning_rate=.nan", "optim.learning_rate nan: must be > 0"),
    ("optim.b2=1", "optim.b2 1.0: must be >= 0 and < 1"),
    ("optim.attn_dropout=1.5", "optim.attn_dropout 1.5: must be >= 0 and < 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps -1: must be >= 0"),
    ("optim.clip=norm", "optim.clip 'norm': use per_module, global, none"),
    ("data.max_num_window=31", "data.max_num_window 31: must be >= 1 and <= 30"),
    ("data.dataset_blending_config={A/train: {weight: 0}}", "data.dataset_blending_config.A/train.weight 0: must"),
])
def test_every_fixed_set_or_range_is_checked_when_the_config_is_read(tones, tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "out")))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_config_numbers_read_as_people_write_them(tones, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "out")))
    config = load_config(path, ["optim.learning_rate=1e-4", "run.profile_steps=10:15"])
    assert config.optim.learning_rate == 1e-4 and config.run.profile_steps == "10:15"  # not "1e-4" and 615


def test_batch_that_does_not_split_over_the_data_axes(tones, tmp_path):
    from af2_jax.training.loop import training_mesh

    config = _config(tones, tmp_path, optim={"batch_size": 3}, run={"mesh": "fsdp=1"})
    training_mesh(config)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["run.nope=1"])
    multi = tmp_path / "m.yaml"
    multi.write_text(yaml.safe_dump(tiny_train_config(tones, tmp_path / "o", optim={"batch_size": 6},
                                                      run={"mesh": "fsdp=4"})))
    run_ = subprocess.run([sys.executable, "-m", "af2_jax.train", "--config", str(multi), "--dry-run"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO),
                                   XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert run_.returncode == 1
    assert run_.stderr.splitlines()[-1] == ("error: optim.batch_size 6 does not split over data x fsdp = 4 devices; "
                                            "use a multiple of 4 or change run.mesh")


@pytest.mark.child_processes([sys.executable, "-m", "tests.train_check", "mesh"])
def test_sharded_train_steps_equal_one_device(child_runs):
    """fsdp=4,tensor=2 on 8 simulated devices, every parameter trainable: loss, grad norm and every gradient of two
    steps equal one device's; the sharded AdamW step equals one device's on the same gradients."""
    [result] = child_runs
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "sharded steps equal" in result.stdout


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tones, tmp_path):
    """Two processes train 2 steps, stop, and resume to 4; the end equals a straight 4-step two-process run.
    (Mutation check: resetting the optimizer state after the restore in `loop.run` makes this fail.)"""
    import portpicker

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for out, steps in ((tmp_path, 2), (tmp_path, 4), (tmp_path / "straight", 4)):
        port = portpicker.pick_unused_port()
        procs = [subprocess.Popen([sys.executable, "-m", "tests.train_check", "process", str(tones), str(out),
                                   str(port), str(n), str(steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
                 for n in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        for p, (stdout, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-3000:]
        assert f"TRAINED {steps}" in outputs[0][0] and "TRAINED" not in outputs[1][0]
        if out == tmp_path and steps == 4:
            assert "resumed" in outputs[0][1]
    with ocp.CheckpointManager(tmp_path / "two" / "checkpoints") as manager, \
            ocp.CheckpointManager(tmp_path / "straight" / "two" / "checkpoints") as straight:
        assert {2, 4} <= set(manager.all_steps())
        data_only = ocp.args.Composite(data=ocp.args.JsonRestore())
        resumed, expected = manager.restore(4, args=data_only).data, straight.restore(4, args=data_only).data
    assert set(resumed) == {"process_0", "process_1"} and resumed == expected  # each process's iterator state
    import af2_jax
    from flax import nnx

    # The final models (gathered from both processes onto this one device): the parameters after step 4
    final = af2_jax.load(tmp_path / "two" / "final", dtype="float32")
    again = af2_jax.load(tmp_path / "straight" / "two" / "final", dtype="float32")
    left, right = nnx.to_flat_state(nnx.state(final)), nnx.to_flat_state(nnx.state(again))
    assert len(left) == len(right) > 0
    for (path, x), (_, y) in zip(left, right):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))
