"""The training loop: build or load the model, place it on the mesh, stream batches, step, checkpoint, resume,
validate, log, and write the final model as an af2-jax checkpoint.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.config import preset
from af2_jax.sharding import (activation_sharding, batch_sharding, check_batch_splits, format_mesh,
                              make_mesh, shard_model)
from af2_jax.training.config import ConfigError, TrainConfig, profile_range
from af2_jax.training.data import (LoadExample, TrainBatches, blend, check_audio, eval_batches,
                                   validation_sets)
from af2_jax.training.metrics import SAMPLE_ANSWERS, MetricsWriter, Progress
from af2_jax.training.step import (TrainState, make_eval_step, make_train_step, optimizer, schedule, split_model)

log = logging.getLogger(__name__)

# bfloat16 dense peak per chip, for MFU when run.peak_flops is 0.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def _override(config, overrides: dict):
    changes = {}
    for name, value in overrides.items():
        current = getattr(config, name, None)
        if current is None and not hasattr(config, name):
            raise ConfigError(f"model.overrides: {type(config).__name__} has no field {name!r}")
        changes[name] = (_override(current, value) if dataclasses.is_dataclass(current)
                         else tuple(value) if isinstance(value, list) else value)
    return dataclasses.replace(config, **changes)


def build_model(config: TrainConfig, mesh):
    """The model with float32 master weights and the configured compute dtype, placed on the mesh."""
    import af2_jax
    from af2_jax.nn.af2 import AF2Model

    m = config.model
    compute = jnp.dtype(m.compute_dtype)
    if m.init == "random":
        model_config = _override(preset(m.preset), m.overrides)
        model = AF2Model(model_config, dtype=compute, param_dtype=jnp.float32, rngs=nnx.Rngs(config.run.seed))
        return shard_model(model, mesh)
    if m.overrides:
        raise ConfigError("model.overrides only applies to model.init: random; a checkpoint brings its own config")
    if not Path(m.init).is_dir():
        raise ConfigError(f"model.init {m.init!r} is neither 'random' nor a checkpoint folder; convert the release "
                          "with `python -m af2_jax.convert` and pass the folder")
    return af2_jax.load(m.init, dtype=compute, mesh=mesh, param_dtype=jnp.float32)


def load_training_tokenizer(config: TrainConfig):
    from af2_jax.tokenizer import load_tokenizer

    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer)
    if config.model.init != "random" and (Path(config.model.init) / "tokenizer").is_dir():
        return load_tokenizer(config.model.init)
    return load_tokenizer()


def training_mesh(config: TrainConfig):
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


def run(config: TrainConfig) -> dict:
    """Trains as configured; returns the final metrics."""
    import orbax.checkpoint as ocp

    from af2_jax.distributed import is_main_process

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
    del model, params
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
    peak = config.run.peak_flops or PEAK_FLOPS.get(_device_family(), 0.0)
    compiled, flops = None, None
    profile = profile_range(config.run.profile_steps)
    step = int(state.step)
    progress = Progress(main, total, step)
    last_metrics: dict = {}
    try:
        writer.run_config(step, config)
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        while step < total:
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(writer.logdir))  # where TensorBoard finds it, beside the metrics
            try:
                with preemption.interruptible():
                    host_batch = next(batches)
            except Preempted:
                if step != (manager.latest_step() or 0):  # the last completed step is not saved yet
                    _save(manager, step, state, batches, force=True)
                manager.wait_until_finished()
                log.warning("SIGTERM while waiting for data: stopped at step %d; rerun the same command to resume",
                            step)
                return {"step": step, "preempted": True, **last_metrics}
            batch = _global_batch(host_batch, mesh)
            if compiled is None:
                with activation_sharding(mesh, model_config):
                    compiled = step_fn.lower(state, frozen, batch).compile()
                flops = _flops(compiled)
            state, metrics = compiled(state, frozen, batch)
            step += 1
            window_steps += 1
            window_tokens += int(host_batch["attention_mask"].sum()) * jax.process_count()
            if profile and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            save_now = preemption.requested or step == total
            _save(manager, step, state, batches, force=save_now)
            if step % config.run.log_every == 0 or step == total:
                loss, grad_norm, lr = (float(x) for x in (metrics.loss, metrics.grad_norm, metrics.learning_rate))
                elapsed = time.perf_counter() - window_start
                last_metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
                                "step_time": elapsed / window_steps, "tokens_per_s": window_tokens / elapsed,
                                "skipped_files": batches.broken}
                if flops and peak:
                    last_metrics["mfu"] = flops * window_steps / elapsed / (peak * jax.device_count())
                writer.scalars(step, last_metrics)
                progress.update(step, last_metrics)
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            if config.run.eval_every and step % config.run.eval_every == 0 and step < total:
                with activation_sharding(mesh, model_config):
                    values = validation_loss(eval_fn, state, frozen, valid, load, optim.batch_size, mesh)
                writer.scalars(step, values)
                _log_evaluation(step, values)
            if preemption.requested:
                manager.wait_until_finished()
                log.warning("stopped at step %d after SIGTERM; rerun the same command to resume", step)
                return {"step": step, "preempted": True, **last_metrics}
        manager.wait_until_finished()
        final = {"step": step, **last_metrics}
        if valid:
            with activation_sharding(mesh, model_config):
                values = validation_loss(eval_fn, state, frozen, valid, load, optim.batch_size, mesh)
            final.update(values)
            writer.scalars(step, values)
            _log_evaluation(step, values)
        if config.run.eval_accuracy and valid:
            if jax.process_count() > 1:
                log.warning("run.eval_accuracy runs in single-process runs only; evaluate out_dir/final with "
                            "python -m af2_jax.infer --manifest instead")
            else:
                accuracy, samples = exact_match(nnx.merge(graphdef, state.params, frozen), tokenizer, valid, config)
                final.update(accuracy)
                writer.scalars(step, accuracy)
                _log_evaluation(step, accuracy)
                for name, rows in samples.items():
                    writer.answers(step, name, rows)
        if config.run.save_final:
            save_final(nnx.merge(graphdef, state.params, frozen), out_dir / "final", tokenizer, config, step)
        if main:
            (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        return final
    finally:
        progress.close()
        preemption.restore()
        batches.close()
        writer.close()
        manager.close()


def _save(manager, step: int, state, batches, *, force: bool) -> None:
    import orbax.checkpoint as ocp

    if not (force or manager.should_save(step)):
        return
    # Every process stores its own iterator state (each reads its own slice of the data).
    data_state = {f"process_{jax.process_index()}": batches.state()}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.frombuffer(json.dumps(data_state).ljust(4096).encode(),
                                                                   dtype=np.uint8))
        data_state = {}
        for row in np.asarray(gathered).reshape(jax.process_count(), -1):
            data_state.update(json.loads(bytes(row).decode().strip()))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                 force=force)


def save_final(model, path: Path, tokenizer, config: TrainConfig, step: int) -> None:
    """The trained model as an af2-jax checkpoint (every process writes its shards)."""
    import af2_jax

    af2_jax.save(model, path, tokenizer=tokenizer, dtype=config.run.final_dtype, overwrite=True,
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


def normalise_answer(text: str) -> str:
    return " ".join(str(text).lower().strip().split())


def exact_match(model, tokenizer, valid: dict, config: TrainConfig) -> tuple[dict, dict]:
    """Greedy answers to every readable validation item: exact match after lower-casing and whitespace folding, per
    set (`valid/<set>/exact_match`), and each set's first `SAMPLE_ANSWERS` (prompt, reference, answer) rows."""
    from af2_jax.audio.io import AudioError
    from af2_jax.pipeline import answer_items, prepare

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
                                       max_new_tokens=config.run.eval_max_new_tokens)
                correct += sum(normalise_answer(a) == normalise_answer(it.output)
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
