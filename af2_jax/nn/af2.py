"""The whole Audio Flamingo 2 model: HTSAT -> audio transformer -> (gated cross-attention + Qwen2 decoder layer) x N.

The N layers come in the two forms of `af2_jax.nn.layer_stack` with the same parameters: stacked (`scan_layers=True`,
the checkpoint and training form) or a list (`scan_layers=False`, the serving form); `relayout` moves a model between
them. Layer i = cross-attention block i, then decoder layer i (`cross_attn_every_n_layers` = 1, as in every released
model). Input and output embeddings are tied.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from af2_jax.config import AF2Config
from af2_jax.nn.audio_transformer import AudioTransformer
from af2_jax.nn.htsat import HTSAT, encode_windows
from af2_jax.nn.layer_stack import LayerList, StackedLayers, slots
from af2_jax.nn.layers import named
from af2_jax.nn.qwen2 import Qwen2DecoderLayer, RMSNorm, rope_cos_sin
from af2_jax.nn.xattn import GatedCrossAttention
from af2_jax.sharding import constrain

# Logical axes of the LM's residual stream (activations are placed by the rules table of af2_jax.sharding).
RESIDUAL = ("batch", "length", "embed")


class FlamingoLayer(nnx.Module):
    """One LM layer of AF2: the gated cross-attention block, then the unchanged Qwen2 decoder layer. `AF2Model` calls
    the two (`xattn`, then `decoder`) itself, so this holder has no `__call__`."""

    def __init__(self, config: AF2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.xattn = GatedCrossAttention(config.lm.hidden_size, config.audio_transformer.d_model,
                                         config.cross_attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Qwen2DecoderLayer(config.lm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class StackedFlamingoLayers(StackedLayers, FlamingoLayer):
    """All N `FlamingoLayer`s as one, every parameter with a leading `layers` axis (`af2_jax.nn.layer_stack`)."""


class Intermediates(NamedTuple):
    """Every layer's residual streams, from `AF2Model(..., return_intermediates=True)`."""

    xattn_out: jax.Array  # (layers, B, T, hidden): residual stream after each cross-attention block
    lm_layer_out: jax.Array  # (layers, B, T, hidden): residual stream after each decoder layer


class AF2Model(nnx.Module):
    """Audio Flamingo 2: HTSAT -> audio transformer -> N x (gated cross-attention + Qwen2 decoder layer) -> RMSNorm
    -> output projection tied to the embedding. D is the audio width (2048), V the vocabulary.

    - `encode_windows(audio_x)`: float32 windows `(B, L, 160000)` -> HTSAT tokens `(B, L, 64, D)`.
    - `encode_audio(audio_x, audio_x_mask)`: windows and their mask `(B, L)` (1 = real window) -> media
      `(B, L*64, D)` in the compute dtype and the media mask `(B, L*64)`.
    - `__call__(input_ids, attention_mask, media, media_mask)`: int ids `(B, T)`, attention mask `(B, T)`
      (1 = token) -> float32 logits `(B, T, V)`.
    - `hidden_states`, `media_kv`, `init_cache`, `cached_step`, `logits`: the pieces generation and training use.

    `dtype` is the compute dtype and `param_dtype` the parameters'; `scan_layers` picks the form of the layers,
    stacked or a list (module docstring); per-layer values (`media_kv`, `init_cache`) are in that form's layout."""

    def __init__(self, config: AF2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = True):
        if config.cross_attention.every_n_layers != 1:
            raise ValueError(f"cross_attn_every_n_layers={config.cross_attention.every_n_layers} is not supported; "
                             "every released AF2 model uses 1")
        self.config = config
        self.dtype = dtype
        self.audio_encoder = HTSAT(config.htsat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.audio_transformer = AudioTransformer(config.audio_transformer, dtype=dtype, param_dtype=param_dtype,
                                                  rngs=rngs)
        lm = config.lm
        layer_kwargs = dict(config=config, dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(
            lm.vocab_size, lm.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=named(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)

        if scan_layers:
            self.layers = StackedFlamingoLayers.build(lm.num_layers, rngs=rngs, **layer_kwargs)
        else:
            self.layers = LayerList.build(FlamingoLayer, lm.num_layers, rngs=rngs, **layer_kwargs)
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    @property
    def scan_layers(self) -> bool:
        """Whether the layers are in the stacked form."""
        return isinstance(self.layers, StackedLayers)

    # --- audio --------------------------------------------------------------------------------------------------
    def encode_windows(self, audio_x, audio_x_mask=None):
        """`(B, L, 160000)` windows -> HTSAT tokens `(B, L, 64, D)` (padding windows are computed too)."""
        del audio_x_mask  # every window is encoded; the mask matters from the audio transformer on
        return encode_windows(self.audio_encoder, audio_x, self.config.audio)

    def transform_audio(self, clap_embeds, audio_x_mask, dropout_key=None):
        """HTSAT tokens `(B, L, 64, D)` -> media `(B, L*64, D)` and its mask `(B, L*64)`."""
        b, windows, tokens, d = clap_embeds.shape
        media_mask = jnp.repeat(audio_x_mask, tokens, axis=1)
        media = self.audio_transformer(clap_embeds.reshape(b, windows * tokens, d).astype(self.dtype), media_mask,
                                       dropout_key)
        return constrain(media, ("batch", "audio_tokens", "audio_embed")), media_mask

    def encode_audio(self, audio_x, audio_x_mask, dropout_key=None):
        return self.transform_audio(self.encode_windows(audio_x, audio_x_mask), audio_x_mask, dropout_key)

    # --- language model -----------------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, media=None, media_mask=None, *, positions=None,
                 return_intermediates: bool = False):
        """Logits `(B, T, vocab)` in float32. Positions default to `0..T-1` whatever the padding (as the original's
        plain forward); `attention_mask` (1 = token) masks padded keys."""
        hidden, per_layer = self.hidden_states(input_ids, attention_mask, media, media_mask, positions=positions,
                                               return_intermediates=return_intermediates)
        logits = self.logits(hidden)
        if return_intermediates:
            return logits, Intermediates(*per_layer)
        return logits

    def hidden_states(self, input_ids, attention_mask=None, media=None, media_mask=None, *, positions=None,
                      return_intermediates: bool = False, remat: bool = False):
        """Final normalised hidden states `(B, T, hidden)` (before the output projection) and, if asked, every
        layer's residual streams. `remat` recomputes each layer in the backward pass instead of storing it."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & (attention_mask[:, None, :] != 0)
        cos, sin = rope_cos_sin(positions, self.config.lm.head_dim, self.config.lm.rope_theta)
        x = constrain(self.embed_tokens(input_ids), RESIDUAL)

        def body(layer, x):
            k, v = layer.xattn.media_kv(media)
            after_xattn = constrain(layer.xattn(x, k, v, media_mask), RESIDUAL)
            after_layer = constrain(layer.decoder(after_xattn, cos, sin, mask), RESIDUAL)
            return after_layer, (after_xattn, after_layer) if return_intermediates else None

        x, per_layer = self.layers.run(body, x, remat=remat)
        return self.norm(x), self.layers.as_stacked(per_layer) if return_intermediates else None

    def media_kv(self, media):
        """Every layer's cross-attention keys and values `(B, heads, S, d)`, computed once per request, as
        per-layer values of the layer form."""
        return self.layers.map(lambda layer: layer.xattn.media_kv(media))

    def init_cache(self, batch: int, length: int):
        """The text KV cache, `(K, V)` of `(B, kv_heads, length, head_dim)` per layer, as per-layer values."""
        lm = self.config.lm
        one = jax.ShapeDtypeStruct((batch, lm.num_kv_heads, length, lm.head_dim), self.dtype)
        return self.layers.zeros((one, one))

    def write_rows(self, per_layer, rows, index):
        """Per-layer values (`media_kv`, `init_cache`) with batch rows from `index` on replaced by `rows`, per-layer
        values of the same layout with fewer rows: how a request enters a serving slot."""
        return self.layers.write_rows(per_layer, rows, index)

    def take_rows(self, per_layer, index):
        """Per-layer values (`media_kv`, `init_cache`) of batch rows `index` (an int array), in its order: how the
        serving group's rows are rearranged."""
        return self.layers.take_rows(per_layer, index)

    def cached_step(self, input_ids, positions, mask, media_kv, media_mask, cache, index):
        """The LM on `input_ids` `(B, T)` written into the KV cache from position `index` on (a scalar, or `(B,)`,
        one per row), attending over the whole cache
        (`mask` `(B, T, S_max)`), with precomputed cross-attention K/V (`media_kv`). Returns final hidden states
        `(B, T, hidden)` (before the output projection) and the updated cache."""
        cos, sin = rope_cos_sin(positions, self.config.lm.head_dim, self.config.lm.rope_theta)

        def body(layer, x, layer_kv, layer_cache):
            (k, v), (cache_k, cache_v) = layer_kv, layer_cache
            x = constrain(layer.xattn(x, k, v, media_mask), RESIDUAL)
            x, cache_k, cache_v = layer.decoder.cached(x, cos, sin, mask, cache_k, cache_v, index)
            return constrain(x, RESIDUAL), (cache_k, cache_v)

        x, cache = self.layers.run(body, constrain(self.embed_tokens(input_ids), RESIDUAL), media_kv, cache)
        return self.norm(x), cache

    def logits(self, hidden):
        return self.embed_tokens.attend(hidden).astype(jnp.float32)

    def forward_audio_text(self, audio_x, audio_x_mask, input_ids, attention_mask=None, **kw):
        media, media_mask = self.encode_audio(audio_x, audio_x_mask)
        return self(input_ids, attention_mask, media, media_mask, **kw)


def relayout(model: AF2Model, scan_layers: bool) -> AF2Model:
    """`model` with its layers moved, in place, into the stacked form (`scan_layers=True`) or a list (False); returns
    it. Parameters move one at a time, each source buffer freed once moved, so memory peaks at the model plus one
    stacked parameter; a graphdef or state split from the model before is stale afterwards. Shardings follow: the
    stacked `layers` axis is never sharded, so each layer keeps the placement of the other axes."""
    if model.scan_layers == scan_layers:
        return model
    target = _abstract_form(model, scan_layers)
    sources = {slot.path: slot for slot in slots(model.layers, "layers.")}
    for slot in slots(target.layers, "layers."):
        slot.assign(sources[slot.path].take())
    model.layers = target.layers
    return model


def abstract_relayout(model: AF2Model, scan_layers: bool) -> AF2Model:
    """What `relayout(model, scan_layers)` will make, as an abstract model (`jax.ShapeDtypeStruct` values placed as
    the moved arrays will be), moving nothing: programs for the other form compile against it while `model` serves."""
    target = _abstract_form(model, scan_layers)
    sources = {slot.path: slot for slot in slots(model)}
    for slot in slots(target):
        source = sources[slot.path]
        held = source.variable[...]
        stored = source.sharding(held.sharding)
        for var in slot.variables:  # the dtype the moved array keeps, which is the source's
            var.set_value(jax.ShapeDtypeStruct(var.shape, held.dtype, sharding=slot.held_sharding(stored)))
    return target


def _abstract_form(model: AF2Model, scan_layers: bool) -> AF2Model:
    return nnx.eval_shape(lambda: AF2Model(model.config, dtype=model.dtype, param_dtype=model.dtype,
                                           rngs=nnx.Rngs(0), scan_layers=scan_layers))
