import re

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from af2_jax.checkpoint import CheckpointError, SafetensorsCheckpoint, flat_shapes, load_htsat, map_names
from af2_jax.checkpoint.keymap import CLAP_PREFIXES, DEAD_PATTERNS, canonical_name
from af2_jax.config import PRESETS
from af2_jax.nn.buffers import relative_position_index, shifted_window_mask, swin_block_geometry
from af2_jax.nn.htsat import HTSAT, encode_windows
from tests.helpers import FIXTURES, rel_err


def test_image_from_mel(golden, fixture_htsat):
    image = nnx.jit(lambda m, x: m.image(x))(fixture_htsat(golden), golden.outputs["mel"])
    assert rel_err(image, golden.outputs["htsat_input"]) <= 1e-5


def test_encoder_from_fixture_image(golden, fixture_htsat):
    out = nnx.jit(lambda m, x: m.encode_image(x))(fixture_htsat(golden), golden.outputs["htsat_input"])
    expected = golden.outputs["clap_embeds"]
    assert out.shape == expected.shape
    assert out.shape[-2:] == (golden.config.htsat.tokens_per_window, golden.config.htsat.num_features)
    assert rel_err(out, expected) <= 1e-4


def test_encoder_end_to_end_from_waveforms(golden, fixture_htsat):
    out = nnx.jit(lambda m, x: encode_windows(m, x, golden.config.audio))(fixture_htsat(golden),
                                                                          golden.inputs["audio_x"])
    assert rel_err(out, golden.outputs["clap_embeds"]) <= 1e-3


def test_released_layout_loads_the_same_weights(golden, fixture_htsat):
    a = nnx.state(fixture_htsat(golden))
    b = nnx.state(load_htsat(golden.release, golden.config))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


def test_constant_buffers_in_file_equal_recomputed(golden):
    ckpt = SafetensorsCheckpoint(golden.weights)
    cfg = golden.config.htsat
    checked = 0
    for name in ckpt.keys():
        m = re.fullmatch(r"clap\.nvclap\.layers\.(\d+)\.blocks\.(\d+)\.(attn\.relative_position_index|attn_mask)",
                         name)
        if not m:
            continue
        resolution, window, shift = swin_block_geometry(cfg, int(m[1]), int(m[2]))
        if m[3] == "attn_mask":
            expected = shifted_window_mask(resolution, window, shift)
        else:
            expected = relative_position_index(window)
        np.testing.assert_array_equal(ckpt.get(name), expected)
        checked += 1
    assert checked >= sum(cfg.depths)


def _write_variant(golden, tmp_path, edit):
    tensors = dict(SafetensorsCheckpoint(golden.weights).items())
    edit(tensors)
    path = tmp_path / "variant.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    return path


def test_afclap_prefix_is_accepted(golden, tmp_path):
    def rename(t):
        for k in [k for k in t if k.startswith("clap.nvclap.")]:
            t["clap.afclap." + k[len("clap.nvclap."):]] = t.pop(k)
    model = load_htsat(_write_variant(golden, tmp_path, rename), golden.config)
    out = nnx.jit(lambda m, x: m.encode_image(x))(model, golden.outputs["htsat_input"][:1, :1])
    assert rel_err(out, golden.outputs["clap_embeds"][:1, :1]) <= 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("clap.nvclap.layers.1.blocks.0.mlp.fc1.weight"),
     r"1 missing: clap\.nvclap\.layers\.1\.blocks\.0\.mlp\.fc1\.weight"),
    (lambda t: t.__setitem__("clap.nvclap.layers.0.blocks.0.attn.extra.weight", np.zeros((2, 2), np.float32)),
     r"1 unexpected: clap\.nvclap\.layers\.0\.blocks\.0\.attn\.extra\.weight"),
    (lambda t: t.__setitem__("clap.nvclap.norm.weight", np.ones((7,), np.float32)),
     r"wrong shape: clap\.nvclap\.norm\.weight is \(7,\)"),
    (lambda t: t.__setitem__("clap.nvclap.layers.0.blocks.1.attn_mask",
                             np.zeros_like(t["clap.nvclap.layers.0.blocks.1.attn_mask"])),
     r"buffer clap\.nvclap\.layers\.0\.blocks\.1\.attn_mask differs"),
])
def test_bad_checkpoints_name_the_tensor(golden, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message) as err:
        load_htsat(_write_variant(golden, tmp_path, edit), golden.config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", ["af2-3b", "af2-1.5b", "af2-0.5b"])
def test_release_shape_map_fits_preset(size):
    import json

    shapes = json.loads((FIXTURES / f"af2_{size[4:]}_shapes.json").read_text())
    cfg = PRESETS[size]
    abstract = nnx.eval_shape(lambda: HTSAT(cfg.htsat, rngs=nnx.Rngs(0)))
    targets = flat_shapes(abstract, root="audio_encoder")
    source = {k: tuple(v[0]) for k, v in shapes["state_dict"].items()}
    report = map_names(source, targets, cfg, scope=CLAP_PREFIXES)
    assert report.ok, report.error_message(size)
    assert set(report.assignments) == set(targets)  # nothing missing
    clap_keys = [k for k in source if k.startswith("clap.")]
    leftover = set(clap_keys) - {name for name, _ in report.assignments.values()}
    # Everything not loaded is a recomputed constant or on the explicit dead-at-inference list.
    assert leftover == set(report.constants) | set(report.dead)
    assert all(any(p.fullmatch(canonical_name(k)) for p in DEAD_PATTERNS) for k in report.dead)
    n_blocks = sum(cfg.htsat.depths)
    assert len(report.constants) == n_blocks + sum(d // 2 for d in cfg.htsat.depths[:-1])
    # No alias key belongs to the audio encoder.
    assert not [k for k in shapes["aliases"] if k.startswith("clap.")]


def test_encoder_batches_all_windows_in_one_call(golden, fixture_htsat):
    model = fixture_htsat(golden)
    image = golden.outputs["htsat_input"]
    together = nnx.jit(lambda m, x: m.encode_image(x))(model, image)
    alone = nnx.jit(lambda m, x: m.encode_image(x))(model, image[1, :1])
    np.testing.assert_allclose(np.asarray(together[1, 0]), np.asarray(alone[0]), atol=1e-5)


def test_bfloat16_encoder_runs_close_to_float32(golden):
    bf16 = load_htsat(golden.weights, golden.config, dtype=jax.numpy.bfloat16)
    out = nnx.jit(lambda m, x: m.encode_image(x))(bf16, golden.outputs["htsat_input"])
    assert out.dtype == jax.numpy.bfloat16
    assert rel_err(np.asarray(out, np.float32), golden.outputs["clap_embeds"]) < 0.1


def test_missing_conv_kernel_is_named_with_its_pytorch_shape(golden, tmp_path):
    path = _write_variant(golden, tmp_path, lambda t: t.pop("clap.nvclap.patch_embed.proj.weight"))
    embed, patch = golden.config.htsat.embed_dim, golden.config.htsat.patch_size
    with pytest.raises(CheckpointError, match=re.escape(f"missing: clap.nvclap.patch_embed.proj.weight "
                                                        f"({embed}, 1, {patch}, {patch})")):
        load_htsat(path, golden.config)
