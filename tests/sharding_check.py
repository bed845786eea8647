"""Run in a subprocess with 8 simulated CPU devices (the flag must precede jax's start):
    python tests/sharding_check.py FIXTURE_DIR MESH [MESH ...]
For each mesh: the fixture model sharded by the rules table gives the single-device logits (1e-5 relative) and the
same greedy tokens, with the large parameters really split. Prints one line per mesh; exits non-zero on failure."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import af2_jax  # noqa: E402
from af2_jax.checkpoint import load_original  # noqa: E402
from af2_jax.checkpoint.convert import convert  # noqa: E402
from af2_jax.config import AF2Config  # noqa: E402
from af2_jax.generate import generate  # noqa: E402
from af2_jax.sharding import MeshError, Placement, batch_sharding, make_mesh, shard_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(fixture: str, meshes: list[str]) -> None:
    assert jax.device_count() == 8, jax.device_count()
    config = AF2Config.from_file(os.path.join(fixture, "config.json"))
    weights = os.path.join(fixture, "model.safetensors")
    i = dict(np.load(os.path.join(fixture, "inputs.npz")))
    forward = nnx.jit(lambda m, *a: m.forward_audio_text(*a))
    single_model = load_original(weights, config)
    checkpoint = os.path.join(tempfile.mkdtemp(), "ckpt")
    convert(weights, checkpoint, os.path.join(fixture, "config.json"), "float32")
    for spec in meshes:
        mesh = make_mesh(spec)
        data = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = i["input_ids"].shape[0]
        reps = -(-data // rows)  # tile the fixture batch to a multiple of the data axes
        batch = {k: np.concatenate([v] * reps) for k, v in i.items()}
        names = ("audio_x", "audio_x_mask", "input_ids", "attention_mask")
        single = np.asarray(forward(single_model, *(batch[n] for n in names)))
        model = shard_model(load_original(weights, config), mesh)
        args = [jax.device_put(batch[n], batch_sharding(mesh, batch[n].shape[0], batch[n].ndim)) for n in names]
        sharded = np.asarray(forward(model, *args))
        err = np.abs(sharded - single).max() / np.abs(single).max()
        assert err <= 1e-5, (spec, err)
        gen = ("gen_input_ids", "gen_attention_mask", "audio_x", "audio_x_mask")
        tokens_single = generate(single_model, *(batch[n] for n in gen), max_new_tokens=8).tokens
        tokens_sharded = generate(model, *(batch[n] for n in gen), max_new_tokens=8).tokens
        np.testing.assert_array_equal(tokens_sharded, tokens_single)
        tokens_split = generate(model, *(batch[n] for n in gen), max_new_tokens=8, mesh=mesh).tokens
        np.testing.assert_array_equal(tokens_split, tokens_single)  # batch split over the data axes
        # Large parameters are split, not replicated, wherever the rules can split them on this mesh.
        placement = Placement(mesh, config)
        split = 0
        for var in (model.embed_tokens.embedding, model.layers.decoder.mlp.up_proj.kernel,
                    model.layers.xattn.ff_in.kernel, model.layers.decoder.self_attn.q_proj.kernel):
            value = var[...]
            expected = placement.sharding(var.get_metadata()["out_sharding"], value.shape)
            assert value.sharding.is_equivalent_to(expected, value.ndim), (spec, value.sharding, expected)
            shard = value.sharding.shard_shape(value.shape)
            split += int(np.prod(shard)) < int(np.prod(value.shape))
        assert split >= 3, (spec, "large parameters were not split")
        # The same model restored from an Orbax checkpoint straight into its shards.
        restored = af2_jax.load(checkpoint, dtype="float32", mesh=mesh)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(restored))):
            assert b[...].sharding.is_equivalent_to(a[...].sharding, a[...].ndim), path
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
        if data > 1:  # a batch that does not split over the data axes is refused before anything compiles
            try:
                batch_sharding(mesh, data + 1, 2)
                raise AssertionError("an indivisible batch was accepted")
            except MeshError as refusal:
                assert "does not split over data x fsdp" in str(refusal) and "\n" not in str(refusal)
        print(f"{spec}: relative error {err:.1e}, greedy tokens equal, {split}/4 large parameters split", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
