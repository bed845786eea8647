"""The PyTorch reference (tests/reference) against the golden fixtures, and JAX against the reference at the real
af2-3b widths, where no fixture exists."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from af2_jax.checkpoint import SafetensorsCheckpoint
from af2_jax.config import preset
from tests.helpers import assert_log_mel_close, rel_err
from tests.reference import AF2Reference
from tests.reference.af2_torch import AudioTransformer, GatedCrossAttentionBlock, int16_round_trip, log_mel, qwen_config

torch.set_num_threads(2)
T = torch.from_numpy
def _masked(array, attention_mask):
    return np.asarray(array)[..., np.asarray(attention_mask) == 1, :]


def test_fixture_files_are_the_ones_the_original_wrote(golden):
    """config.json records the sha256 of the files the original code wrote; a copy that differs (a Git LFS pointer,
    a partial download, an edited array) would make every parity test compare against something else."""
    for name, digest in golden.raw_config["sha256"].items():
        path = golden.path / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, \
            f"{path} is not the file its config.json names (sha256): restore the fixture folder as shipped"


@torch.no_grad()
def test_reference_audio_stages(golden):
    ref, i, o = golden.reference, golden.inputs, golden.outputs
    b, n, s = i["audio_x"].shape
    mel = log_mel(int16_round_trip(T(i["audio_x"]).reshape(b * n, s))).reshape(o["mel"].shape).numpy()
    assert_log_mel_close(mel, o["mel"])
    htsat = ref.clap.nvclap
    image = htsat.image(T(o["mel"]).reshape(b * n, *o["mel"].shape[2:])).reshape(o["htsat_input"].shape)
    assert rel_err(image, o["htsat_input"]) <= 1e-5
    clap = htsat.encode_image(T(o["htsat_input"]).reshape(b * n, 256, 256)).reshape(o["clap_embeds"].shape)
    assert rel_err(clap, o["clap_embeds"]) <= 1e-4
    assert rel_err(ref.encode_windows(T(i["audio_x"])), o["clap_embeds"]) <= 1e-3
    media, _ = ref.transform_audio(T(o["clap_embeds"]), T(i["audio_x_mask"]))
    assert rel_err(media, o["audio_transformer_out"]) <= 1e-4


@torch.no_grad()
def test_reference_language_model_stages(golden):
    ref, i, o = golden.reference, golden.inputs, golden.outputs
    media_mask = T(i["audio_x_mask"]).repeat_interleave(o["clap_embeds"].shape[2], dim=1)
    logits, xattn, layers = ref(T(i["input_ids"]), T(i["attention_mask"]), T(o["audio_transformer_out"]), media_mask,
                                return_intermediates=True)
    am = i["attention_mask"]
    for n in range(len(xattn)):
        assert rel_err(_masked(xattn[n], am), _masked(o["xattn_out"][n], am)) <= 1e-4
        assert rel_err(_masked(layers[n], am), _masked(o["lm_layer_out"][n], am)) <= 1e-4
    assert rel_err(_masked(logits, am), _masked(o["logits"], am)) <= 1e-4
    media, mm = ref.encode_audio(T(i["audio_x"]), T(i["audio_x_mask"]))
    full = _masked(ref(T(i["input_ids"]), T(i["attention_mask"]), media, mm), am)
    expected = _masked(o["logits"], am)
    assert np.abs(full - expected).max() <= 1e-2
    np.testing.assert_array_equal(full.argmax(-1), expected.argmax(-1))


def test_reference_loads_the_released_layout(golden):
    ref = AF2Reference(golden.raw_config)
    ref.load_original(dict(SafetensorsCheckpoint(golden.release).items()))
    for (name, a), (_, b) in zip(ref.state_dict().items(), golden.reference.state_dict().items()):
        assert torch.equal(a, b), name


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_reference_greedy_decoding(golden, use_cache):
    ref, i, o = golden.reference, golden.inputs, golden.outputs
    gen = golden.raw_config["generation"]
    n = o["generated_tokens"].shape[1]
    ids = ref.generate_greedy(T(i["gen_input_ids"]), T(i["gen_attention_mask"]), T(i["audio_x"]),
                              T(i["audio_x_mask"]), n, gen["eos_token_id"], gen["pad_token_id"], use_cache=use_cache)
    np.testing.assert_array_equal(ids.numpy(), o["generated_ids"])
    for row in range(ids.shape[0]):
        keep = i["gen_attention_mask"][row] == 1
        windows = int(i["audio_x_mask"][row].sum())
        prompt = T(i["gen_input_ids"][row][keep][None])
        alone = ref.generate_greedy(prompt, torch.ones_like(prompt), T(i["audio_x"][row:row + 1, :windows]),
                                    T(i["audio_x_mask"][row:row + 1, :windows]), n, gen["eos_token_id"],
                                    gen["pad_token_id"], use_cache=use_cache)
        np.testing.assert_array_equal(alone[0, prompt.shape[1]:].numpy(), o["generated_tokens"][row])


# --- JAX vs the reference at the released widths (random weights) ----------------------------------------------
CFG = preset("af2-3b")


def _randomise(module: torch.nn.Module, seed: int):
    """Weights of order 1/sqrt(fan-in) and norms/gates away from their identity values, so every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "gate" in name:
                p.copy_(torch.tensor([0.8]))
            else:
                p.copy_(1.0 * ("bias" not in name) + 0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _into(jax_module, assignments):
    for var, value in assignments:
        var.set_value(jnp.asarray(value))
    return jax_module


def _np(t):
    return t.detach().numpy()


def _relative(a, b):
    return rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.fixture(scope="module")
def wide_inputs():
    rng = np.random.default_rng(0)
    return {"media": rng.standard_normal((1, 192, CFG.audio_transformer.d_model)).astype(np.float32),
            "media_mask": np.r_[np.ones(128), np.zeros(64)].astype(np.float32)[None],
            "text": rng.standard_normal((1, 24, CFG.lm.hidden_size)).astype(np.float32)}


def test_audio_transformer_layer_at_3b_width(wide_inputs, capsys):
    from af2_jax.config import AudioTransformerConfig
    from af2_jax.nn.audio_transformer import AudioTransformer as JaxAT

    at = CFG.audio_transformer
    ref = _randomise(AudioTransformer(at.d_model, at.n_heads, 1, at.d_inner), 1)
    cfg1 = AudioTransformerConfig(d_model=at.d_model, n_heads=at.n_heads, n_layers=1, d_inner=at.d_inner)
    ours = JaxAT(cfg1, rngs=nnx.Rngs(0))
    l0, r0 = ours.layers[0], ref.layer_stack[0]
    _into(ours, [
        (ours.input_norm.scale, _np(ref.layer_norm.weight)), (ours.input_norm.bias, _np(ref.layer_norm.bias)),
        (l0.w_qs.kernel, _np(r0.slf_attn.w_qs.weight).T), (l0.w_ks.kernel, _np(r0.slf_attn.w_ks.weight).T),
        (l0.w_vs.kernel, _np(r0.slf_attn.w_vs.weight).T), (l0.fc.kernel, _np(r0.slf_attn.fc.weight).T),
        (l0.attn_norm.scale, _np(r0.slf_attn.layer_norm.weight)), (l0.attn_norm.bias, _np(r0.slf_attn.layer_norm.bias)),
        (l0.w_1.kernel, _np(r0.pos_ffn.w_1.weight).T), (l0.w_1.bias, _np(r0.pos_ffn.w_1.bias)),
        (l0.w_2.kernel, _np(r0.pos_ffn.w_2.weight).T), (l0.w_2.bias, _np(r0.pos_ffn.w_2.bias)),
        (l0.ffn_norm.scale, _np(r0.pos_ffn.layer_norm.weight)), (l0.ffn_norm.bias, _np(r0.pos_ffn.layer_norm.bias))])
    x, mask = wide_inputs["media"], wide_inputs["media_mask"]
    with torch.no_grad():
        expected = _np(ref(T(x), T(mask)))
    got = nnx.jit(lambda m, a, b: m(a, b))(ours, x, mask)
    assert _relative(got, expected) <= 1e-4
    bf16 = nnx.jit(lambda m, a, b: m(a.astype(jnp.bfloat16), b))(_as_bf16(ours), x, mask)
    with capsys.disabled():
        print(f"\n[af2-3b audio transformer layer] float32 {_relative(got, expected):.1e}, "
              f"bfloat16 {_relative(np.asarray(bf16, np.float32), expected):.1e} relative")


def _as_bf16(module):
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v, state)
    return nnx.merge(graphdef, state)


def test_cross_attention_block_at_3b_width(wide_inputs, capsys):
    from af2_jax.nn.xattn import GatedCrossAttention

    xa, dim = CFG.cross_attention, CFG.lm.hidden_size
    ref = _randomise(GatedCrossAttentionBlock(dim, CFG.audio_transformer.d_model, xa.heads, xa.dim_head,
                                              xa.ff_mult), 2)
    ours = GatedCrossAttention(dim, CFG.audio_transformer.d_model, xa, rngs=nnx.Rngs(0))
    _into(ours, [
        (ours.norm.scale, _np(ref.attn.norm.weight)), (ours.norm.bias, _np(ref.attn.norm.bias)),
        (ours.to_q.kernel, _np(ref.attn.to_q.weight).T), (ours.to_kv.kernel, _np(ref.attn.to_kv.weight).T),
        (ours.to_out.kernel, _np(ref.attn.to_out.weight).T), (ours.attn_gate, _np(ref.attn_gate)),
        (ours.ff_norm.scale, _np(ref.ff[0].weight)), (ours.ff_norm.bias, _np(ref.ff[0].bias)),
        (ours.ff_in.kernel, _np(ref.ff[1].weight).T), (ours.ff_out.kernel, _np(ref.ff[3].weight).T),
        (ours.ff_gate, _np(ref.ff_gate))])
    x, media, mask = wide_inputs["text"], wide_inputs["media"], wide_inputs["media_mask"]
    with torch.no_grad():
        expected = _np(ref(T(x), T(media), T(mask)))

    def run(m, x, media, mask):
        k, v = m.media_kv(media)
        return m(x, k, v, mask)

    got = nnx.jit(run)(ours, x, media, mask)
    assert _relative(got, expected) <= 1e-4
    bf16 = nnx.jit(run)(_as_bf16(ours), x.astype(jnp.bfloat16), media.astype(jnp.bfloat16), mask)
    with capsys.disabled():
        print(f"\n[af2-3b cross-attention block] float32 {_relative(got, expected):.1e}, "
              f"bfloat16 {_relative(np.asarray(bf16, np.float32), expected):.1e} relative")


def test_decoder_layer_at_3b_width(wide_inputs, capsys):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from af2_jax.nn.qwen2 import Qwen2DecoderLayer as JaxLayer
    from af2_jax.nn.qwen2 import rope_cos_sin

    lm = CFG.lm
    qcfg = qwen_config({"vocab_size": 16, "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
                        "num_hidden_layers": 1, "num_attention_heads": lm.num_heads,
                        "num_key_value_heads": lm.num_kv_heads, "rope_theta": lm.rope_theta,
                        "rms_norm_eps": lm.rms_norm_eps, "max_position_embeddings": lm.max_position_embeddings})
    ref = _randomise(Qwen2DecoderLayer(qcfg, 0), 3)
    ours = JaxLayer(lm, rngs=nnx.Rngs(0))
    a, ra = ours.self_attn, ref.self_attn
    _into(ours, [
        (a.q_proj.kernel, _np(ra.q_proj.weight).T), (a.q_proj.bias, _np(ra.q_proj.bias)),
        (a.k_proj.kernel, _np(ra.k_proj.weight).T), (a.k_proj.bias, _np(ra.k_proj.bias)),
        (a.v_proj.kernel, _np(ra.v_proj.weight).T), (a.v_proj.bias, _np(ra.v_proj.bias)),
        (a.o_proj.kernel, _np(ra.o_proj.weight).T),
        (ours.mlp.gate_proj.kernel, _np(ref.mlp.gate_proj.weight).T),
        (ours.mlp.up_proj.kernel, _np(ref.mlp.up_proj.weight).T),
        (ours.mlp.down_proj.kernel, _np(ref.mlp.down_proj.weight).T),
        (ours.input_layernorm.weight, _np(ref.input_layernorm.weight)),
        (ours.post_attention_layernorm.weight, _np(ref.post_attention_layernorm.weight))])
    x = wide_inputs["text"]
    t = x.shape[1]
    positions = np.arange(3, 3 + t)[None]  # not starting at 0, so the rotary offsets are exercised
    with torch.no_grad():
        pos = Qwen2RotaryEmbedding(qcfg)(T(x), T(positions))
        causal = torch.zeros(1, 1, t, t).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(),
                                                      torch.finfo(torch.float32).min)
        expected = _np(ref(T(x), attention_mask=causal, position_embeddings=pos))
    cos, sin = rope_cos_sin(jnp.asarray(positions), lm.head_dim, lm.rope_theta)
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    got = nnx.jit(lambda m, x, c, s: m(x, c, s, mask))(ours, x, cos, sin)
    assert _relative(got, expected) <= 1e-4
    bf16 = nnx.jit(lambda m, x, c, s: m(x, c, s, mask))(_as_bf16(ours), x.astype(jnp.bfloat16), cos, sin)
    with capsys.disabled():
        print(f"\n[af2-3b decoder layer] float32 {_relative(got, expected):.1e}, "
              f"bfloat16 {_relative(np.asarray(bf16, np.float32), expected):.1e} relative")


def test_reference_tree_matches_every_release_shape_map(shape_map):
    """Built on the meta device at the release sizes, the reference has exactly the release's state_dict names,
    shapes and dtypes (aliases aside), so it is the original's module tree and can load a real release."""
    from tests.reference import original_schema

    lm = shape_map["config"]["lm"]
    name = next(n for n in ("af2-3b", "af2-1.5b", "af2-0.5b") if preset(n).lm.hidden_size == lm["hidden_size"])
    with torch.device("meta"):
        ref = AF2Reference(original_schema(preset(name)))
    ours = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in ref.state_dict().items()}
    theirs = {k: (v[0], v[1]) for k, v in shape_map["state_dict"].items()}
    assert ours == theirs
