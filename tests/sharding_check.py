"""Run in a subprocess with 8 simulated CPU devices (the flag must precede jax's start):
    python -m tests.sharding_check FIXTURE_DIR MESH [MESH ...]
For each mesh: the fixture model sharded by the rules table gives the single-device logits (1e-5 relative) and the
same greedy tokens, with the large parameters really split; its int8 form gives the single-device int8
tokens. Prints one line per mesh; exits non-zero on failure."""

import json
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
from af2_jax.config import (AF2Config, AudioTransformerConfig, HTSATConfig, LMConfig,  # noqa: E402
                            SpecialTokens)
from af2_jax.nn.af2 import AF2Model  # noqa: E402
from af2_jax.generate import generate  # noqa: E402
from af2_jax.sharding import MeshError, Placement, batch_sharding, make_mesh, shard_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# A small random model whose head counts mirror the release: HTSAT 4/8/16/32, audio transformer 8, LM 16 query / 2 KV,
# cross-attention 8.
MIRROR = AF2Config(
    htsat=HTSATConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32)),
    audio_transformer=AudioTransformerConfig(d_model=256, n_heads=8, n_layers=2, d_inner=512),
    lm=LMConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=16,
                num_kv_heads=2),
    tokens=SpecialTokens(media=508, end_of_chunk=509, pad=510, sep=511, eos=500))


def mirror_model():
    model = AF2Model(MIRROR, rngs=nnx.Rngs(0))
    model.layers.xattn.attn_gate.set_value(model.layers.xattn.attn_gate[...] + 0.5)  # let the audio matter
    model.layers.xattn.ff_gate.set_value(model.layers.xattn.ff_gate[...] + 0.5)
    return model


def check_mirror(mesh, spec: str) -> None:
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = max(2, data)
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, (rows, 2, MIRROR.audio.window_samples)).astype(np.float32)
    audio_mask = np.ones((rows, 2), np.float32)
    ids = rng.integers(0, 500, (rows, 12))
    ids[:, 0] = MIRROR.tokens.media
    mask = np.ones_like(ids)
    forward = nnx.jit(lambda m, *a: m.forward_audio_text(*a))
    single_model = mirror_model()
    single = np.asarray(forward(single_model, audio, audio_mask, ids, mask))
    model = shard_model(mirror_model(), mesh)
    args = [jax.device_put(a, batch_sharding(mesh, rows, a.ndim)) for a in (audio, audio_mask, ids, mask)]
    err = np.abs(np.asarray(forward(model, *args)) - single).max() / np.abs(single).max()
    assert err <= 1e-5, (spec, "mirror", err)
    expected = generate(single_model, ids, mask, audio, audio_mask, max_new_tokens=6).tokens
    np.testing.assert_array_equal(generate(model, ids, mask, audio, audio_mask, max_new_tokens=6, mesh=mesh).tokens,
                                  expected)
    print(f"{spec} (release head counts): relative error {err:.1e}, greedy tokens equal", flush=True)


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
        # The same model restored from an Orbax checkpoint straight into its shards, from a checkpoint written
        # unsharded and from one converted already laid out for this mesh.
        laid_out = os.path.join(tempfile.mkdtemp(), "laid-out")
        convert(weights, laid_out, os.path.join(fixture, "config.json"), "float32", mesh=mesh)
        with open(os.path.join(laid_out, "config.json")) as f:
            assert json.load(f)["af2_jax"]["layout_mesh"] == dict(mesh.shape)
        restored_laid_out = af2_jax.load(laid_out, dtype="float32", mesh=mesh)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                                     nnx.to_flat_state(nnx.state(restored_laid_out))):
            assert b[...].sharding.is_equivalent_to(a[...].sharding, a[...].ndim), path
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
        restored = af2_jax.load(checkpoint, dtype="float32", mesh=mesh)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(restored))):
            assert b[...].sharding.is_equivalent_to(a[...].sharding, a[...].ndim), path
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
        # The serving layout: restored, then unstacked one parameter at a time into the same shards.
        unstacked = af2_jax.load(checkpoint, dtype="float32", mesh=mesh, scan_layers=False)
        for path, var in nnx.to_flat_state(nnx.state(unstacked.layers)):
            value = var[...]
            expected = placement.sharding(var.get_metadata()["out_sharding"], value.shape)
            assert value.sharding.is_equivalent_to(expected, value.ndim), (spec, path, value.sharding, expected)
        np.testing.assert_array_equal(np.asarray(unstacked.layers[1].xattn.to_q.kernel[...]),
                                      np.asarray(model.layers.xattn.to_q.kernel[...][1]))
        tokens_unstacked = generate(unstacked, *(batch[n] for n in gen), max_new_tokens=8, mesh=mesh).tokens
        np.testing.assert_array_equal(tokens_unstacked, tokens_single)
        # int8 serving: the int8 values and scales placed by the rules of the weights they replace, and the greedy
        # tokens of the same int8 model on one device.
        int8 = af2_jax.load(checkpoint, dtype="float32", mesh=mesh, scan_layers=False, quantize="int8")
        for path, var in nnx.to_flat_state(nnx.state(int8)):
            if path[-1] in ("kernel", "scale", "embedding") and var.get_metadata().get("out_sharding"):
                value = var[...]
                expected = placement.sharding(var.get_metadata()["out_sharding"], value.shape)
                assert value.sharding.is_equivalent_to(expected, value.ndim), (spec, path, value.sharding, expected)
        assert int8.layers[0].decoder.mlp.up_proj.kernel[...].dtype == np.int8
        int8_single = af2_jax.load(checkpoint, dtype="float32", scan_layers=False, quantize="int8")
        np.testing.assert_array_equal(
            generate(int8, *(batch[n] for n in gen), max_new_tokens=8, mesh=mesh).tokens,
            generate(int8_single, *(batch[n] for n in gen), max_new_tokens=8).tokens)
        if data > 1:  # a batch that does not split over the data axes is refused before anything compiles
            try:
                batch_sharding(mesh, data + 1, 2)
                raise AssertionError("an indivisible batch was accepted")
            except MeshError as refusal:
                assert "does not split over data x fsdp" in str(refusal) and "\n" not in str(refusal)
        print(f"{spec}: relative error {err:.1e}, greedy tokens equal, {split}/4 large parameters split, int8 tokens "
              "as on one device", flush=True)
        check_mirror(mesh, spec)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
