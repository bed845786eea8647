"""The one table from original PyTorch state-dict names to NNX parameter paths, with explicit transforms.

Templates use `{s}` (stage), `{b}` (block) placeholders that match decimal indices; every rule works in both directions
(import: original -> NNX; export and error messages: NNX -> original). Original names use the `clap.nvclap.` prefix of
the reference inference code; `clap.afclap.` (training code) is accepted and normalised on the way in.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import numpy as np

from af2_jax.config import AF2Config
from af2_jax.nn.buffers import relative_position_index, rotary_inv_freq, shifted_window_mask, swin_block_geometry

CLAP_PREFIXES = ("clap.nvclap.", "clap.afclap.")
CANONICAL_CLAP_PREFIX = "clap.nvclap."


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a tensor's layout differs between the original and NNX, both ways, for values and for shapes."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_jax_shape: Callable[[tuple], tuple]
    to_torch_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda w: w, lambda w: w, tuple, tuple)
# nn.Linear stores (out, in); nnx.Linear's kernel is (in, out).
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T, lambda s: tuple(s)[::-1], lambda s: tuple(s)[::-1])
# nn.Conv2d stores (out, in, kh, kw); nnx.Conv's kernel is (kh, kw, in, out).
CONV2D = Transform("conv2d", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1),
                   lambda s: (s[2], s[3], s[1], s[0]), lambda s: (s[3], s[2], s[0], s[1]))


@functools.lru_cache(maxsize=None)
def template_regex(template: str) -> re.Pattern:
    """A name template as a regex: `{rest}` matches any dotted tail, every other `{field}` a decimal index."""
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    escaped = escaped.replace("{rest}", "(?P<rest>.+)")
    return re.compile(re.sub(r"{(\w+)}", r"(?P<\1>\\d+)", escaped))


def _rewrite(name: str, pattern: str, replacement: str) -> str | None:
    """`name` matched against template `pattern` and rewritten into template `replacement`, else None."""
    m = template_regex(pattern).fullmatch(name)
    return replacement.format(**m.groupdict()) if m else None


@dataclasses.dataclass(frozen=True)
class Rule:
    """One key-map rule: an original name template, the NNX path template it maps to, and the layout transform."""

    source: str  # original name template
    target: str  # NNX path template (dot-separated)
    transform: Transform = IDENTITY

    def match_source(self, name: str) -> str | None:
        return _rewrite(name, self.source, self.target)

    def match_target(self, path: str) -> str | None:
        return _rewrite(path, self.target, self.source)


_ENC = CANONICAL_CLAP_PREFIX
_BLOCK = _ENC + "layers.{s}.blocks.{b}."
_TBLOCK = "audio_encoder.stages.{s}.blocks.{b}."

HTSAT_RULES: tuple[Rule, ...] = (
    Rule(_ENC + "bn0.weight", "audio_encoder.bn0.scale"),
    Rule(_ENC + "bn0.bias", "audio_encoder.bn0.bias"),
    Rule(_ENC + "bn0.running_mean", "audio_encoder.bn0.mean"),
    Rule(_ENC + "bn0.running_var", "audio_encoder.bn0.var"),
    Rule(_ENC + "patch_embed.proj.weight", "audio_encoder.patch_embed.kernel", CONV2D),
    Rule(_ENC + "patch_embed.proj.bias", "audio_encoder.patch_embed.bias"),
    Rule(_ENC + "patch_embed.norm.weight", "audio_encoder.patch_norm.scale"),
    Rule(_ENC + "patch_embed.norm.bias", "audio_encoder.patch_norm.bias"),
    Rule(_BLOCK + "norm1.weight", _TBLOCK + "norm1.scale"),
    Rule(_BLOCK + "norm1.bias", _TBLOCK + "norm1.bias"),
    Rule(_BLOCK + "attn.qkv.weight", _TBLOCK + "attn.qkv.kernel", LINEAR),
    Rule(_BLOCK + "attn.qkv.bias", _TBLOCK + "attn.qkv.bias"),
    Rule(_BLOCK + "attn.proj.weight", _TBLOCK + "attn.proj.kernel", LINEAR),
    Rule(_BLOCK + "attn.proj.bias", _TBLOCK + "attn.proj.bias"),
    Rule(_BLOCK + "attn.relative_position_bias_table", _TBLOCK + "attn.relative_position_bias_table"),
    Rule(_BLOCK + "norm2.weight", _TBLOCK + "norm2.scale"),
    Rule(_BLOCK + "norm2.bias", _TBLOCK + "norm2.bias"),
    Rule(_BLOCK + "mlp.fc1.weight", _TBLOCK + "fc1.kernel", LINEAR),
    Rule(_BLOCK + "mlp.fc1.bias", _TBLOCK + "fc1.bias"),
    Rule(_BLOCK + "mlp.fc2.weight", _TBLOCK + "fc2.kernel", LINEAR),
    Rule(_BLOCK + "mlp.fc2.bias", _TBLOCK + "fc2.bias"),
    Rule(_ENC + "layers.{s}.downsample.norm.weight", "audio_encoder.stages.{s}.downsample.norm.scale"),
    Rule(_ENC + "layers.{s}.downsample.norm.bias", "audio_encoder.stages.{s}.downsample.norm.bias"),
    Rule(_ENC + "layers.{s}.downsample.reduction.weight", "audio_encoder.stages.{s}.downsample.reduction.kernel",
         LINEAR),
    Rule(_ENC + "norm.weight", "audio_encoder.norm.scale"),
    Rule(_ENC + "norm.bias", "audio_encoder.norm.bias"),
)

_AT = "audio_transformer_clap."
_ATL = _AT + "layer_stack.{l}."
_TATL = "audio_transformer.layers.{l}."

AUDIO_TRANSFORMER_RULES: tuple[Rule, ...] = (
    Rule(_AT + "layer_norm.weight", "audio_transformer.input_norm.scale"),
    Rule(_AT + "layer_norm.bias", "audio_transformer.input_norm.bias"),
    Rule(_ATL + "slf_attn.w_qs.weight", _TATL + "w_qs.kernel", LINEAR),
    Rule(_ATL + "slf_attn.w_ks.weight", _TATL + "w_ks.kernel", LINEAR),
    Rule(_ATL + "slf_attn.w_vs.weight", _TATL + "w_vs.kernel", LINEAR),
    Rule(_ATL + "slf_attn.fc.weight", _TATL + "fc.kernel", LINEAR),
    Rule(_ATL + "slf_attn.layer_norm.weight", _TATL + "attn_norm.scale"),
    Rule(_ATL + "slf_attn.layer_norm.bias", _TATL + "attn_norm.bias"),
    Rule(_ATL + "pos_ffn.w_1.weight", _TATL + "w_1.kernel", LINEAR),
    Rule(_ATL + "pos_ffn.w_1.bias", _TATL + "w_1.bias"),
    Rule(_ATL + "pos_ffn.w_2.weight", _TATL + "w_2.kernel", LINEAR),
    Rule(_ATL + "pos_ffn.w_2.bias", _TATL + "w_2.bias"),
    Rule(_ATL + "pos_ffn.layer_norm.weight", _TATL + "ffn_norm.scale"),
    Rule(_ATL + "pos_ffn.layer_norm.bias", _TATL + "ffn_norm.bias"),
)

# The LM's layers are stacked: `[{i}]` addresses slice i of a parameter with a leading `layers` axis.
_XA = "lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound."
_DL = "lang_encoder.model.layers.{i}.decoder_layer."

LM_RULES: tuple[Rule, ...] = (
    Rule("lang_encoder.model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule("lang_encoder.model.norm.weight", "norm.weight"),
    Rule(_XA + "attn_gate", "layers.xattn.attn_gate[{i}]"),
    Rule(_XA + "ff_gate", "layers.xattn.ff_gate[{i}]"),
    Rule(_XA + "attn.norm.weight", "layers.xattn.norm.scale[{i}]"),
    Rule(_XA + "attn.norm.bias", "layers.xattn.norm.bias[{i}]"),
    Rule(_XA + "attn.to_q.weight", "layers.xattn.to_q.kernel[{i}]", LINEAR),
    Rule(_XA + "attn.to_kv.weight", "layers.xattn.to_kv.kernel[{i}]", LINEAR),
    Rule(_XA + "attn.to_out.weight", "layers.xattn.to_out.kernel[{i}]", LINEAR),
    Rule(_XA + "ff.0.weight", "layers.xattn.ff_norm.scale[{i}]"),
    Rule(_XA + "ff.0.bias", "layers.xattn.ff_norm.bias[{i}]"),
    Rule(_XA + "ff.1.weight", "layers.xattn.ff_in.kernel[{i}]", LINEAR),
    Rule(_XA + "ff.3.weight", "layers.xattn.ff_out.kernel[{i}]", LINEAR),
    Rule(_DL + "self_attn.q_proj.weight", "layers.decoder.self_attn.q_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "self_attn.q_proj.bias", "layers.decoder.self_attn.q_proj.bias[{i}]"),
    Rule(_DL + "self_attn.k_proj.weight", "layers.decoder.self_attn.k_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "self_attn.k_proj.bias", "layers.decoder.self_attn.k_proj.bias[{i}]"),
    Rule(_DL + "self_attn.v_proj.weight", "layers.decoder.self_attn.v_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "self_attn.v_proj.bias", "layers.decoder.self_attn.v_proj.bias[{i}]"),
    Rule(_DL + "self_attn.o_proj.weight", "layers.decoder.self_attn.o_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "mlp.gate_proj.weight", "layers.decoder.mlp.gate_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "mlp.up_proj.weight", "layers.decoder.mlp.up_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "mlp.down_proj.weight", "layers.decoder.mlp.down_proj.kernel[{i}]", LINEAR),
    Rule(_DL + "input_layernorm.weight", "layers.decoder.input_layernorm.weight[{i}]"),
    Rule(_DL + "post_attention_layernorm.weight", "layers.decoder.post_attention_layernorm.weight[{i}]"),
)

RULES = HTSAT_RULES + AUDIO_TRANSFORMER_RULES + LM_RULES

# Second names of the same tensors in a full state_dict (docs/original.md#alias-keys): alias template -> canonical
# template. When the original loads a checkpoint the alias is loaded last, so its value is the one the model ends up
# with.
ALIASES: tuple[tuple[str, str], ...] = (
    ("lang_encoder.lm_head.weight", "lang_encoder.model.embed_tokens.weight"),
    ("lang_encoder.old_decoder_blocks.{i}.{rest}", "lang_encoder.model.layers.{i}.decoder_layer.{rest}"),
    ("lang_encoder.gated_cross_attn_layers_sound.{i}.{rest}",
     "lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound.{rest}"),
)


def alias_twin(name: str) -> str | None:
    """The canonical name an alias key duplicates, or None if `name` is no alias."""
    return next((twin for alias, canonical in ALIASES if (twin := _rewrite(name, alias, canonical))), None)


def aliases_of(canonical: str) -> list[str]:
    """Alias names a full state_dict holds for a canonical name (for export)."""
    return [alias for template, canon in ALIASES if (alias := _rewrite(canonical, canon, template))]


# Buffers that are pure functions of the configuration: recomputed by the model, checked equal to the file.
_CONSTANT_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(re.escape(_ENC) + r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index"),
     "relative_position_index"),
    (re.compile(re.escape(_ENC) + r"layers\.(\d+)\.blocks\.(\d+)\.attn_mask"), "attn_mask"),
    (re.compile(re.escape(_AT) + r"position_enc\.inv_freq"), "inv_freq"),
)

# Tensors in the release that no inference computation reads (docs/original.md#dead-at-inference). They are kept
# aside (never in the model's parameters) so an export can restore them.
DEAD_PATTERNS: tuple[re.Pattern, ...] = tuple(re.compile(re.escape(_ENC) + p) for p in (
    r"spectrogram_extractor\..+",  # torchlibrosa STFT bases
    r"logmel_extractor\..+",  # torchlibrosa Slaney mel matrix
    r"patch_embed\.mel_conv2d\..+",  # AFF fusion branch (only for windows longer than 10 s)
    r"patch_embed\.fusion_model\..+",
    r"tscam_conv\..+",  # classifier head, computed and discarded by the original
    r"head\..+",
    r"(.+\.)?num_batches_tracked",  # BatchNorm step counters
))


def canonical_name(name: str) -> str:
    """`clap.afclap.X` -> `clap.nvclap.X`; other names unchanged."""
    if name.startswith("clap.afclap."):
        return CANONICAL_CLAP_PREFIX + name[len("clap.afclap."):]
    return name


def is_dead(name: str) -> bool:
    return any(p.fullmatch(canonical_name(name)) for p in DEAD_PATTERNS)


def constant_kind(name: str) -> tuple[str, tuple[int, ...]] | None:
    """`(kind, indices)` for a recomputed buffer (`relative_position_index` / `attn_mask` with (stage, block),
    `inv_freq` with ()), else None."""
    for pattern, kind in _CONSTANT_PATTERNS:
        m = pattern.fullmatch(canonical_name(name))
        if m:
            return kind, tuple(int(g) for g in m.groups())
    return None


def expected_constant(config: AF2Config, kind: str, *indices: int) -> np.ndarray | None:
    """The value the original stores for a constant buffer, recomputed from the configuration (None: this
    configuration has no such buffer)."""
    if kind == "inv_freq":
        at = config.audio_transformer
        return rotary_inv_freq(at.rotary_dim, at.rotary_base)
    stage, block = indices
    h = config.htsat
    if stage >= len(h.depths) or block >= h.depths[stage]:
        return None
    resolution, window, shift = swin_block_geometry(h, stage, block)
    if kind == "relative_position_index":
        return relative_position_index(window)
    return shifted_window_mask(resolution, window, shift) if shift else None


def to_target(name: str, rules=RULES) -> tuple[str, Transform] | None:
    name = canonical_name(name)
    for rule in rules:
        target = rule.match_source(name)
        if target is not None:
            return target, rule.transform
    return None


def to_source(path: str, rules=RULES) -> tuple[str, Transform] | None:
    for rule in rules:
        source = rule.match_target(path)
        if source is not None:
            return source, rule.transform
    return None
