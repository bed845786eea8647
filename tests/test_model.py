import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import af2_jax
from af2_jax.cli.convert import main as convert_cli
from af2_jax.nn.af2 import relayout
from tests.helpers import rel_err

def _masked(array, attention_mask):
    """Rows of (…, B, T, X) where attention_mask (B, T) == 1, flattened."""
    keep = np.asarray(attention_mask) == 1
    return np.asarray(array)[..., keep, :]


def test_audio_transformer_from_clap_embeds(golden, fixture_model):
    media, media_mask = nnx.jit(lambda m, c, k: m.transform_audio(c, k))(
        fixture_model(golden, scan_layers=True), golden.outputs["clap_embeds"], golden.inputs["audio_x_mask"])
    assert rel_err(media, golden.outputs["audio_transformer_out"]) <= 1e-4
    tokens = golden.config.htsat.tokens_per_window
    np.testing.assert_array_equal(media_mask, np.repeat(golden.inputs["audio_x_mask"], tokens, axis=1))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked", "unstacked"])
def test_language_model_stage_by_stage(golden, scan_layers, fixture_model):
    i, o = golden.inputs, golden.outputs
    media_mask = np.repeat(i["audio_x_mask"], golden.config.htsat.tokens_per_window, axis=1)
    logits, inter = nnx.jit(lambda m, *a: m(*a, return_intermediates=True))(
        fixture_model(golden, scan_layers), i["input_ids"], i["attention_mask"], o["audio_transformer_out"], media_mask)
    am = i["attention_mask"]
    assert inter.xattn_out.shape == o["xattn_out"].shape
    for layer in range(golden.config.lm.num_layers):
        assert rel_err(_masked(inter.xattn_out[layer], am), _masked(o["xattn_out"][layer], am)) <= 1e-4, layer
        assert rel_err(_masked(inter.lm_layer_out[layer], am), _masked(o["lm_layer_out"][layer], am)) <= 1e-4, layer
    assert rel_err(_masked(logits, am), _masked(o["logits"], am)) <= 1e-4


# --- padded text ----------------------------------------------------------------------------------------------------
# The fixtures' own text is unpadded (attention masks all ones), so these pad it and compare with the PyTorch
# reference (tests/reference) on the fixture's weights. Mutation that the left-padded case catches: in
# af2_jax/nn/af2.py AF2Model.hidden_states, `mask = causal[None] & (attention_mask[:, None, :] != 0)` ->
# `mask = jnp.broadcast_to(causal[None], (b, t, t))` (attention_mask ignored). Right padding cannot catch it in a
# causal forward (valid positions never see the later padding); it pins that right padding changes nothing.
_FORWARD = nnx.jit(lambda m, *a: m(*a))  # one compilation per (model, shapes), shared by the padded tests


def _against_reference(golden, model, ids, mask):
    """`model`'s float32 logits and the reference's for text `ids`/`mask` over the fixture's audio (its stored audio
    transformer output), compared where mask == 1 (the stage-by-stage tolerance). Returns our logits."""
    o = golden.outputs
    media_mask = np.repeat(golden.inputs["audio_x_mask"], golden.config.htsat.tokens_per_window, axis=1)
    ours = np.asarray(_FORWARD(model, ids, mask, o["audio_transformer_out"], media_mask))
    with torch.no_grad():
        expected = golden.reference(torch.from_numpy(ids), torch.from_numpy(mask),
                                      torch.from_numpy(o["audio_transformer_out"]), torch.from_numpy(media_mask))
    err = rel_err(_masked(ours, mask), _masked(expected.numpy(), mask))
    assert err <= 1e-4, f"{golden.name}: logits at valid positions differ from the reference by {err:.2e} relative"
    return ours


def _pad(ids, lengths, pad, side):
    """Row r of `ids` cut to its first lengths[r] tokens and padded back to the full length with `pad` on `side`."""
    out, mask = np.full_like(ids, pad), np.zeros_like(ids)
    for row, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
        out[row, where], mask[row, where] = ids[row, :n], 1
    return out, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_text_matches_the_reference(golden, side, fixture_model):
    ids = golden.inputs["input_ids"]
    b, t = ids.shape
    lengths = [max(2, t - 2 - 3 * row) for row in range(b)]  # every row padded, by different amounts
    padded, mask = _pad(ids, lengths, golden.config.tokens.pad, side)
    ours = _against_reference(golden, fixture_model(golden, scan_layers=True), padded, mask)
    # The valid positions are the fixture's own rows cut short, so they also give the original's stored logits
    # (positions 0..T-1 whatever the padding, as the original's plain forward; rotary attention is
    # shift-invariant, so left padding leaves them unchanged too).
    stored = np.concatenate([golden.outputs["logits"][row, :n] for row, n in enumerate(lengths)])
    err = rel_err(_masked(ours, mask), stored)
    assert err <= 1e-4, f"{golden.name}: logits at valid positions differ from the stored ones by {err:.2e} relative"


def test_the_fixtures_own_padded_text_matches_the_reference(golden, fixture_model):
    i = golden.inputs
    pairs = [(ids, mask) for ids, mask in ((i["input_ids"], i["attention_mask"]),
                                           (i["gen_input_ids"], i["gen_attention_mask"])) if (mask == 0).any()]
    if not pairs:
        pytest.skip(f"{golden.name}: no padding in inputs.npz (padded text is covered by "
                    "test_padded_text_matches_the_reference)")
    for ids, mask in pairs:
        _against_reference(golden, fixture_model(golden, scan_layers=True), ids, mask)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixtures converted by the CLI, from the plain file and from the released layout, in float32."""
    out = {}

    def get(golden, layout):
        key = (golden.name, layout)
        if key not in out:
            src = golden.weights if layout == "plain" else golden.release
            dst = tmp_path_factory.mktemp(golden.name) / layout
            assert convert_cli([str(src), str(dst), "--model", str(golden.path / "config.json"),
                                "--dtype", "float32"]) == 0
            out[key] = dst
        return out[key]
    return get


@pytest.mark.parametrize("layout", ["plain", "hf_repo"])
def test_end_to_end_from_converted_checkpoint(golden, converted, layout):
    model = af2_jax.load(converted(golden, layout), dtype="float32")
    i = golden.inputs
    logits = nnx.jit(lambda m, *a: m.forward_audio_text(*a))(model, i["audio_x"], i["audio_x_mask"], i["input_ids"],
                                                             i["attention_mask"])
    am = i["attention_mask"]
    ours, expected = _masked(logits, am), _masked(golden.outputs["logits"], am)
    assert np.abs(ours - expected).max() <= 1e-2
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_unstacked_layout_loads_and_saves_as_the_stacked(golden, converted, tmp_path):
    """The serving layout holds layer i of every stacked parameter as its own array, and is saved back in the
    stacked checkpoint layout bit for bit."""
    path = converted(golden, "plain")
    stacked = dict(nnx.to_flat_state(nnx.state(af2_jax.load(path, dtype="float32"))))
    unstacked = af2_jax.load(path, dtype="float32", scan_layers=False)
    assert isinstance(unstacked.layers, nnx.List) and len(unstacked.layers) == golden.config.lm.num_layers
    for path_, var in nnx.to_flat_state(nnx.state(unstacked)):
        expected = stacked[("layers", *path_[2:])][...][path_[1]] if path_[0] == "layers" else stacked[path_][...]
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(expected), err_msg=str(path_))
    af2_jax.save(unstacked, tmp_path / "resaved")
    resaved = dict(nnx.to_flat_state(nnx.state(af2_jax.load(tmp_path / "resaved", dtype="float32"))))
    assert resaved.keys() == stacked.keys()
    restacked = dict(nnx.to_flat_state(nnx.state(relayout(unstacked, scan_layers=True))))
    for key, var in stacked.items():
        np.testing.assert_array_equal(np.asarray(resaved[key][...]), np.asarray(var[...]), err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(restacked[key][...]), np.asarray(var[...]), err_msg=str(key))


def test_bfloat16_keeps_confident_argmax(golden, tmp_path, capsys):
    assert convert_cli([str(golden.weights), str(tmp_path / "bf16"), "--model", str(golden.path / "config.json")]) == 0
    model = af2_jax.load(tmp_path / "bf16", dtype="bfloat16")
    i = golden.inputs
    logits = nnx.jit(lambda m, *a: m.forward_audio_text(*a))(model, i["audio_x"], i["audio_x_mask"], i["input_ids"],
                                                             i["attention_mask"])
    am = i["attention_mask"]
    ours, expected = _masked(logits, am), _masked(golden.outputs["logits"], am)
    top2 = np.sort(expected, axis=-1)[..., -2:]
    confident = (top2[..., 1] - top2[..., 0]) > 0.5
    assert confident.sum() > 0
    np.testing.assert_array_equal(ours.argmax(-1)[confident], expected.argmax(-1)[confident])
    with capsys.disabled():
        print(f"\n[{golden.name}] bfloat16 logits: max abs error {np.abs(ours - expected).max():.3f}, "
              f"max |logit| {np.abs(expected).max():.1f}; argmax equal at {confident.sum()} confident positions")


def test_qwen2_decoder_matches_transformers_on_a_random_tiny_config():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from af2_jax.config import LMConfig
    from af2_jax.nn.qwen2 import Qwen2DecoderLayer, RMSNorm, rope_cos_sin

    torch.manual_seed(0)
    hf_cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # give the norms and biases values that matter
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    lm = LMConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=2,
                  rope_theta=1e6, rms_norm_eps=1e-6)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    layers = []
    for n in range(3):
        layer = Qwen2DecoderLayer(lm, rngs=nnx.Rngs(n))
        p = f"model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, proj).kernel.set_value(jnp.asarray(sd[p + f"self_attn.{proj}.weight"].T))
            getattr(layer.self_attn, proj).bias.set_value(jnp.asarray(sd[p + f"self_attn.{proj}.bias"]))
        layer.self_attn.o_proj.kernel.set_value(jnp.asarray(sd[p + "self_attn.o_proj.weight"].T))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, proj).kernel.set_value(jnp.asarray(sd[p + f"mlp.{proj}.weight"].T))
        layer.input_layernorm.weight.set_value(jnp.asarray(sd[p + "input_layernorm.weight"]))
        layer.post_attention_layernorm.weight.set_value(jnp.asarray(sd[p + "post_attention_layernorm.weight"]))
        layers.append(layer)
    norm = RMSNorm(64, 1e-6, rngs=nnx.Rngs(0))
    norm.weight.set_value(jnp.asarray(sd["model.norm.weight"]))
    embed = jnp.asarray(sd["model.embed_tokens.weight"])

    ids = np.random.default_rng(0).integers(0, 97, (2, 11))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    t = ids.shape[1]
    x = embed[ids]
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (2, t)), lm.head_dim, lm.rope_theta)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))
    for layer in layers:
        x = layer(x, cos, sin, mask)
    logits = norm(x) @ embed.T
    assert rel_err(logits, expected) <= 1e-5
