"""Training under several devices or processes, run in a subprocess (device flags must precede jax's start).

    python tests/train_check.py mesh DATA OUT
        8 simulated devices: two optimizer steps on fsdp=4,tensor=2 equal one device's (1e-5); frozen parameters
        bit-identical.
    python tests/train_check.py process DATA OUT PORT PROCESS_ID STEPS
        one of two processes (4 simulated devices each) training the tiny model to STEPS on fsdp=8 (resuming from
        OUT/two if a checkpoint is there).
"""

import os
import sys

COUNT = 8 if sys.argv[1] == "mesh" else 4
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={COUNT}"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import tiny_train_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def mesh_check(data, out):
    from flax import nnx

    from af2_jax.sharding import make_mesh
    from af2_jax.training.config import TrainConfig, _build
    from af2_jax.training.data import LoadExample, TrainBatches, blend
    from af2_jax.training.loop import _global_batch, build_model, load_training_tokenizer
    from af2_jax.training.step import TrainState, make_train_step, optimizer, split_model

    config = _build(TrainConfig, tiny_train_config(Path(data), Path(out), optim={"trainable": "pretrain",
                                                                                   "batch_size": 8}), "")
    tokenizer = load_training_tokenizer(config)
    load = LoadExample(tokenizer, build_model(config, make_mesh("fsdp=1", jax.devices()[:1])).config.tokens, 16, 1,
                       loss_positions=4)
    batches = TrainBatches(blend(config.data), load, batch_size=8, seed=0)
    host = [next(batches) for _ in range(2)]
    results = {}
    for spec in ("fsdp=1", "fsdp=4,tensor=2"):
        devices = jax.devices()[:1] if spec == "fsdp=1" else jax.devices()
        mesh = make_mesh(spec, devices)
        model = build_model(config, mesh)
        graphdef, params, frozen = split_model(model, config.optim.trainable)
        tx = optimizer(config.optim, 2)
        state = TrainState(params, tx.init(params), jax.numpy.int32(0))
        step = jax.jit(make_train_step(graphdef, tx, config.optim))
        for batch in host:
            state, _ = step(state, frozen, _global_batch(batch, mesh))
        if spec != "fsdp=1":
            embedding = state.params["embed_tokens"]["embedding"][...]
            assert embedding.sharding.shard_shape(embedding.shape)[1] < embedding.shape[1], embedding.sharding
        results[spec] = ({".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)},
                         {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(frozen)})
    (single, single_frozen), (split, split_frozen) = results["fsdp=1"], results["fsdp=4,tensor=2"]
    worst = 0.0
    for path, value in single.items():
        err = np.abs(split[path] - value).max() / max(np.abs(value).max(), 1e-30)
        worst = max(worst, err)
        assert err <= 1e-5, (path, err)
    for path, value in single_frozen.items():
        np.testing.assert_array_equal(split_frozen[path], value)
    print(f"sharded steps equal: worst relative difference {worst:.1e} over {len(single)} trainable tensors; "
          f"{len(single_frozen)} frozen tensors bit-identical", flush=True)


def process_check(data, out, port, process_id, steps):
    from af2_jax.distributed import is_main_process, maybe_initialize_distributed
    from af2_jax.training.config import TrainConfig, _build
    from af2_jax.training.loop import run

    assert maybe_initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    raw = tiny_train_config(Path(data), Path(out) / "two", run={"steps": int(steps), "save_every": 2,
                                                                "mesh": "fsdp=8"})
    raw["optim"]["batch_size"] = 8
    final = run(_build(TrainConfig, raw, ""))
    if is_main_process():
        print(f"TRAINED {final['step']}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    mode, *args = sys.argv[1:]
    mesh_check(*args) if mode == "mesh" else process_check(*args)
