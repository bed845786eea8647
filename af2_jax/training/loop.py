"""The training loop: build or load the model, place it on the mesh, stream batches, step, checkpoint, resume,
validate, log, and write the final model as an af2-jax checkpoint.

`run` goes in four steps: `set_up` builds a `TrainingSetup` (mesh, data, the split model and its state, the jitted
steps, checkpoints, metrics), `train_steps` runs the optimizer steps, `evaluate` scores the validation sets and
`finish` writes the final model and metrics.

Checkpoints (`out_dir/checkpoints/<step>/`, Orbax CheckpointManager, async) hold the trainable parameters, the
optimizer state, the step and the data iterator's state; the dropout key is derived from the seed and the step, so
resuming reproduces the uninterrupted run exactly. SIGTERM (preemption) saves at the next step boundary and exits;
one that arrives while the loop waits for data breaks out of the wait at once (reading a batch can take long, or
never end on a stuck filesystem) and saves the last completed step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from af2_jax.audio.io import AudioError
from af2_jax.checkpoint.native import load as load_checkpoint, save as save_checkpoint
from af2_jax.config import AF2Config, preset
from af2_jax.distributed import is_main_process
from af2_jax.engine import Sampling
from af2_jax.metrics.exact import normalise
from af2_jax.nn.af2 import AF2Model
from af2_jax.pipeline import answer_items, prepare
from af2_jax.sharding import (activation_sharding, batch_sharding, check_batch_splits, format_mesh,
                              make_mesh, shard_model)
from af2_jax.tokenizer import AF2Tokenizer, load_tokenizer
from af2_jax.training.config import ConfigError, TrainConfig, apply_overrides, profile_range
from af2_jax.training.data import (Item, LoadExample, TrainBatches, blend, check_audio, eval_batches,
                                   validation_sets)
from af2_jax.training.metrics import SAMPLE_ANSWERS, MetricsWriter, Progress
from af2_jax.training.step import (TrainState, make_eval_step, make_train_step, optimizer, schedule, split_model)

log = logging.getLogger(__name__)

# bfloat16 dense peak per chip, for MFU when run.peak_flops is 0.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def build_model(config: TrainConfig, mesh):
    """The model with float32 master weights and the configured compute dtype, placed on the mesh."""
    m = config.model
    compute = jnp.dtype(m.compute_dtype)
    if m.init == "random":
        model_config = apply_overrides(preset(m.preset), m.overrides)
        model = AF2Model(model_config, dtype=compute, param_dtype=jnp.float32, rngs=nnx.Rngs(config.run.seed))
        return shard_model(model, mesh)
    if m.overrides:
        raise ConfigError("model.overrides only applies to model.init: random; a checkpoint brings its own config")
    if not Path(m.init).is_dir():
        raise ConfigError(f"model.init {m.init!r} is neither 'random' nor a checkpoint folder; convert the release "
                          "with `python -m af2_jax.convert` and pass the folder")
    return load_checkpoint(m.init, dtype=compute, mesh=mesh, param_dtype=jnp.float32)


def load_training_tokenizer(config: TrainConfig):
    """`model.tokenizer` when set, else the checkpoint's own tokenizer, else Qwen2.5's rebuilt offline."""
    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer)
    if config.model.init != "random" and (Path(config.model.init) / "tokenizer").is_dir():
        return load_tokenizer(config.model.init)
    return load_tokenizer()


def training_mesh(config: TrainConfig):
    """The mesh of `run.mesh` (every device on fsdp when empty), checked to split `optim.batch_size`."""
    spec = config.run.mesh or f"fsdp={jax.device_count()}"
    mesh = make_mesh(spec)
    check_batch_splits(mesh, config.optim.batch_size, "optim.batch_size", "use a multiple of {data} or change run.mesh")
    return mesh


class Preempted(BaseException):
    """SIGTERM while waiting for data. A BaseException, so that no `except Exception` in a data library swallows it."""


class _Preemption:
    def __init__(self):
        self.requested = False
        self._waiting = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if self._waiting:
            raise Preempted
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")

    @contextlib.contextmanager
    def interruptible(self):
        """A SIGTERM inside raises `Preempted` at once (a blocking read returns to Python to run the handler)."""
        if self.requested:
            raise Preempted
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def training_data(config: TrainConfig):
    """The blended training items and the validation sets, with a sample of every set's audio checked readable."""
    items = blend(config.data)
    valid = validation_sets(config.data)
    check_audio(items + [item for members in valid.values() for item in members], config.data)
    return items, valid


def _global_batch(batch: dict, mesh) -> dict:
    """Host batches -> global arrays split over data x fsdp (each process contributes its rows)."""
    out = {}
    for key, value in batch.items():
        rows = value.shape[0] * jax.process_count()
        sharding = batch_sharding(mesh, rows, value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, value, (rows,) + value.shape[1:])
    return out


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass
class TrainingSetup:
    """Everything a run works with, built by `set_up`. `state` is the live train state: the initial or restored
    one, carried on by `train_steps` (each step donates the one before). `close` releases what `set_up` opened."""

    config: TrainConfig
    out_dir: Path
    main: bool  # this process writes the run's files (process 0)
    mesh: Mesh
    tokenizer: AF2Tokenizer
    load: LoadExample
    batches: TrainBatches
    valid: dict[str, list[Item]]
    model_config: AF2Config
    graphdef: nnx.GraphDef
    frozen: nnx.State  # what is not trained, passed to every step as it is
    state: TrainState
    step_fn: Callable  # jitted; `train_steps` compiles it for the first batch
    eval_fn: Callable
    manager: ocp.CheckpointManager
    writer: MetricsWriter
    progress: Progress
    preemption: _Preemption

    def model(self) -> AF2Model:
        """The model with the current parameters."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)

    def close(self) -> None:
        """Ends the console progress, gives SIGTERM its previous handler, stops the data readers, closes the metrics
        files and the checkpoint manager (waiting for a save in flight)."""
        self.progress.close()
        self.preemption.restore()
        self.batches.close()
        self.writer.close()
        self.manager.close()


def set_up(config: TrainConfig) -> TrainingSetup:
    """Everything before the first step: the mesh, the data (checked readable), the tokenizer, the model split into
    trained and frozen parts with its optimizer state, the jitted steps, the checkpoint manager with the newest
    checkpoint restored (state and data position), `out_dir/config.json`, the metrics writer, the console progress
    and the SIGTERM handler."""
    out_dir = Path(config.run.out_dir).absolute()
    main = is_main_process()
    mesh = training_mesh(config)
    items, valid = training_data(config)
    tokenizer = load_training_tokenizer(config)
    model = build_model(config, mesh)
    load = LoadExample(tokenizer, model.config.tokens, config.data.max_tokens, config.data.max_num_window,
                       model.config.audio, loss_positions=config.optim.loss_positions)
    if len(tokenizer) != model.config.lm.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model {model.config.lm.vocab_size}; "
                          "set model.tokenizer to the model's tokenizer")
    optim, total = config.optim, config.run.steps
    graphdef, params, frozen = split_model(model, optim.trainable)
    tx = optimizer(optim, total)
    state = jax.jit(lambda p: TrainState(p, tx.init(p), jnp.int32(0)))(params)
    model_config = model.config
    del model, params  # the state holds a copy of the trained parameters: the originals would take memory twice
    counts = {"trainable": sum(x.size for x in jax.tree.leaves(state.params)),
              "frozen": sum(x.size for x in jax.tree.leaves(frozen))}
    log.info("mesh %s; %d trainable / %d frozen parameters (%s)", format_mesh(dict(mesh.shape)),
             counts["trainable"], counts["frozen"], optim.trainable)

    batches = TrainBatches(items, load, batch_size=optim.batch_size * optim.grad_accum, seed=config.run.seed,
                           num_workers=config.data.num_workers, process_index=jax.process_index(),
                           process_count=jax.process_count(), data_root=config.data.data_root)
    # The state leaves the step laid out as it came in, so the one compiled step serves every call.
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(make_train_step(graphdef, tx, optim, remat=config.model.remat, seed=config.run.seed,
                                      lr_schedule=schedule(optim, total)), donate_argnums=(0,),
                      out_shardings=(state_shardings, None))
    eval_fn = jax.jit(make_eval_step(graphdef, optim))

    manager = ocp.CheckpointManager(
        out_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.run.keep, save_interval_steps=config.run.save_every,
                                             enable_async_checkpointing=True))
    start = manager.latest_step()
    if start is not None:
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
        state = restored.state
        batches.restore(restored.data[f"process_{jax.process_index()}"])
        log.info("resumed from %s at step %d", out_dir / "checkpoints", start)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    writer = MetricsWriter(out_dir, enabled=main, resumed_at=start, wandb_project=config.run.wandb_project)
    preemption = _Preemption()
    progress = Progress(main, total, int(state.step))
    return TrainingSetup(config=config, out_dir=out_dir, main=main, mesh=mesh, tokenizer=tokenizer, load=load,
                         batches=batches, valid=valid, model_config=model_config, graphdef=graphdef, frozen=frozen,
                         state=state, step_fn=step_fn, eval_fn=eval_fn, manager=manager, writer=writer,
                         progress=progress, preemption=preemption)


class _Window:
    """The steps since the last logged one: their time and tokens give the step time, the throughput and MFU."""

    def __init__(self):
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def metrics(self, step_metrics, skipped_files: int, flops: float | None, peak: float) -> dict:
        # float() waits for the last step to finish, so the elapsed time, taken after, includes it.
        loss, grad_norm, lr = (float(x) for x in (step_metrics.loss, step_metrics.grad_norm,
                                                   step_metrics.learning_rate))
        elapsed = time.perf_counter() - self.start
        out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "step_time": elapsed / self.steps,
               "tokens_per_s": self.tokens / elapsed, "skipped_files": skipped_files}
        if flops and peak:
            out["mfu"] = flops * self.steps / elapsed / (peak * jax.device_count())
        return out


def train_steps(setup: TrainingSetup) -> dict:
    """The optimizer steps from the restored step (0 in a new run) to `run.steps`: checkpoints as `run.save_every`
    says and at the end, metrics every `run.log_every` steps, validation every `run.eval_every`, a profile of
    `run.profile_steps`. A SIGTERM saves the step reached and stops. Returns the step reached and the last logged
    metrics, with `preempted: True` when stopped early; every checkpoint is written by then."""
    config, manager, writer = setup.config, setup.manager, setup.writer
    total = config.run.steps
    peak = config.run.peak_flops or PEAK_FLOPS.get(_device_family(), 0.0)
    profile = profile_range(config.run.profile_steps)
    compiled, flops = None, None
    step = int(setup.state.step)
    last_metrics: dict = {}
    writer.run_config(step, config)
    window = _Window()
    while step < total:
        if profile and step == profile[0]:
            jax.profiler.start_trace(str(writer.logdir))  # where TensorBoard finds it, beside the metrics
        try:
            with setup.preemption.interruptible():
                host_batch = next(setup.batches)
        except Preempted:
            if step != (manager.latest_step() or 0):  # the last completed step is not saved yet
                _save(setup, step, force=True)
            manager.wait_until_finished()
            log.warning("SIGTERM while waiting for data: stopped at step %d; rerun the same command to resume", step)
            return {"step": step, "preempted": True, **last_metrics}
        batch = _global_batch(host_batch, setup.mesh)
        if compiled is None:
            with activation_sharding(setup.mesh, setup.model_config):
                compiled = setup.step_fn.lower(setup.state, setup.frozen, batch).compile()
            flops = _flops(compiled)
        setup.state, metrics = compiled(setup.state, setup.frozen, batch)
        step += 1
        window.add(int(host_batch["attention_mask"].sum()) * jax.process_count())
        if profile and step == profile[1]:
            jax.block_until_ready(setup.state)
            jax.profiler.stop_trace()
        _save(setup, step, force=setup.preemption.requested or step == total)
        if step % config.run.log_every == 0 or step == total:
            last_metrics = window.metrics(metrics, setup.batches.broken, flops, peak)
            writer.scalars(step, last_metrics)
            setup.progress.update(step, last_metrics)
            window = _Window()
        if config.run.eval_every and step % config.run.eval_every == 0 and step < total:
            validate(setup, step)
        if setup.preemption.requested:
            manager.wait_until_finished()
            log.warning("stopped at step %d after SIGTERM; rerun the same command to resume", step)
            return {"step": step, "preempted": True, **last_metrics}
    manager.wait_until_finished()
    return {"step": step, **last_metrics}


def validate(setup: TrainingSetup, step: int) -> dict:
    """The validation loss of every set with the current parameters, written to the metrics and logged."""
    with activation_sharding(setup.mesh, setup.model_config):
        values = validation_loss(setup.eval_fn, setup.state, setup.frozen, setup.valid, setup.load,
                                 setup.config.optim.batch_size, setup.mesh)
    setup.writer.scalars(step, values)
    _log_evaluation(step, values)
    return values


def answer_accuracy(setup: TrainingSetup, step: int) -> dict:
    """Exact match of greedy answers per validation set and sample answers, written to the metrics and logged;
    nothing in a multi-process run (generation runs in one process)."""
    if jax.process_count() > 1:
        log.warning("run.eval_accuracy runs in single-process runs only; evaluate out_dir/final with "
                    "python -m af2_jax.infer --manifest instead")
        return {}
    accuracy, samples = exact_match(setup.model(), setup.tokenizer, setup.valid, setup.config)
    setup.writer.scalars(step, accuracy)
    _log_evaluation(step, accuracy)
    for name, rows in samples.items():
        setup.writer.answers(step, name, rows)
    return accuracy


def evaluate(setup: TrainingSetup, step: int) -> dict:
    """The end-of-run evaluation, when there are validation sets: the loss, and with `run.eval_accuracy` exact
    match and sample answers."""
    values = {}
    if setup.valid:
        values.update(validate(setup, step))
        if setup.config.run.eval_accuracy:
            values.update(answer_accuracy(setup, step))
    return values


def finish(setup: TrainingSetup, final: dict) -> None:
    """The run's results: the trained model in `out_dir/final` (with `run.save_final`) and `final_metrics.json`."""
    if setup.config.run.save_final:
        save_final(setup.model(), setup.out_dir / "final", setup.tokenizer, setup.config, final["step"])
    if setup.main:
        (setup.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))


def run(config: TrainConfig) -> dict:
    """Trains as configured; returns the final metrics (with `preempted: True` when a SIGTERM stopped the run)."""
    setup = set_up(config)
    try:
        final = train_steps(setup)
        if final.get("preempted"):
            return final
        final.update(evaluate(setup, final["step"]))
        finish(setup, final)
        return final
    finally:
        setup.close()


def _save(setup: TrainingSetup, step: int, *, force: bool) -> None:
    if not (force or setup.manager.should_save(step)):
        return
    # Every process stores its own iterator state (each reads its own slice of the data).
    data_state = {f"process_{jax.process_index()}": setup.batches.state()}
    if jax.process_count() > 1:
        gathered = multihost_utils.process_allgather(np.frombuffer(json.dumps(data_state).ljust(4096).encode(),
                                                                   dtype=np.uint8))
        data_state = {}
        for row in np.asarray(gathered).reshape(jax.process_count(), -1):
            data_state.update(json.loads(bytes(row).decode().strip()))
    setup.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(setup.state),
                                                     data=ocp.args.JsonSave(data_state)), force=force)


def save_final(model, path: Path, tokenizer, config: TrainConfig, step: int) -> None:
    """The trained model as an af2-jax checkpoint (every process writes its shards)."""
    save_checkpoint(model, path, tokenizer=tokenizer, dtype=config.run.final_dtype, overwrite=True,
                    meta={"trained_steps": step})


def validation_loss(eval_fn, state, frozen, valid: dict, load, batch_size: int, mesh) -> dict:
    """Mean loss per validation set over its labelled tokens. A set with no readable item is left out with a
    warning: a loss over nothing is missing, not zero."""
    out = {}
    for name, items in valid.items():
        total, count = 0.0, 0
        for batch, _ in eval_batches(items, load, batch_size):
            loss_sum, tokens = eval_fn(state.params, frozen, _global_batch(batch, mesh))
            total, count = total + float(loss_sum), count + int(tokens)
        if count:
            out[f"valid/{name}/loss"] = total / count
        else:
            log.warning("validation set %s: none of its %d items could be read; its loss is left out", name,
                        len(items))
    return out


def exact_match(model, tokenizer, valid: dict, config: TrainConfig) -> tuple[dict, dict]:
    """Greedy answers to every readable validation item: exact match (`af2_jax.metrics.exact.normalise`: case,
    whitespace and one trailing period folded), per set (`valid/<set>/exact_match`), and each set's first
    `SAMPLE_ANSWERS` (prompt, reference, answer) rows."""
    out, samples = {}, {}
    for name, items in valid.items():
        correct = readable = 0
        samples[name] = []
        for start in range(0, len(items), config.optim.batch_size):
            chunk = []  # (item, prepared) for the chunk's readable items; windows of one chunk in memory at a time
            for it in items[start: start + config.optim.batch_size]:
                try:
                    chunk.append((it, prepare(tokenizer, it.audio, it.prompt, config.data.max_num_window,
                                              model.config.audio)))
                except AudioError as err:
                    log.warning("validation item skipped: %s", err)
            if chunk:
                answers = answer_items(model, tokenizer, [p for _, p in chunk],
                                       Sampling(max_new_tokens=config.run.eval_max_new_tokens))
                correct += sum(normalise(a) == normalise(it.output)
                               for a, (it, _) in zip(answers, chunk))
                readable += len(chunk)
                samples[name] += [(it.prompt, it.output, a) for a, (it, _) in zip(answers, chunk)][
                    :SAMPLE_ANSWERS - len(samples[name])]
        if readable:
            out[f"valid/{name}/exact_match"] = correct / readable
        else:
            log.warning("validation set %s: none of its %d items could be read; its exact match is left out", name,
                        len(items))
    return out, samples


def _log_evaluation(step: int, values: dict) -> None:
    log.info("step %d: %s", step, ", ".join(f"{tag} {value:.4f}" for tag, value in values.items()))


def _device_family() -> str:
    kind = jax.devices()[0].device_kind
    return next((name for name in PEAK_FLOPS if kind.startswith(name)), kind)


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort: some backends do not provide it
        return None
