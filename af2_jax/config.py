"""Configuration of every AF2 component as frozen dataclasses, with presets for the released sizes.

Values are the original's (docs/original.md); names follow the original where it has one.
`AF2Config.to_dict` / `AF2Config.from_dict` round-trip through JSON; `AF2Config.from_original_config`
reads the schema of the original YAML / the fixtures' `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

import yaml

# Upper limit on 10 s windows per clip: 5 minutes. The released configs use 12 (120 s).
MAX_WINDOWS_LIMIT = 30


def check_max_windows(count: int, label: str = "max_windows=") -> None:
    """The one check of a clip's window count (1..MAX_WINDOWS_LIMIT); `label` names the setting as the user wrote it
    (`max_windows=`, `--max-windows `)."""
    if not 1 <= count <= MAX_WINDOWS_LIMIT:
        raise ValueError(f"{label}{count} is outside 1..{MAX_WINDOWS_LIMIT} ({MAX_WINDOWS_LIMIT} windows = 5 minutes)")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Waveform -> windows -> log-mel front end (docs/original.md#windows, docs/original.md#log-mel): windows of
    `window_samples` (160000) float32 samples, each giving `n_frames` x `n_mels` (1001 x 64) float32 log-mel."""

    sample_rate: int = 16000
    window_seconds: float = 10.0
    max_windows: int = 12
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 8000.0
    power_floor: float = 1e-10
    resize_frames: int = 1024

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        return 1 + self.window_samples // self.hop_length


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    """HTSAT Swin encoder (docs/original.md#htsat): log-mel `(..., 1001, n_mels)` -> `(..., tokens_per_window,
    num_features)` tokens; `num_features = embed_dim * 2**(stages-1)` is the output width D."""

    spec_size: int = 256
    patch_size: int = 4
    patch_stride: int = 4
    embed_dim: int = 256
    depths: tuple[int, ...] = (2, 2, 12, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    freq_ratio: int = 4
    n_mels: int = 64
    # Stochastic depth rate of the original (active in train mode only).
    drop_path_rate: float = 0.1

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def patch_grid(self) -> int:
        return self.spec_size // self.patch_stride

    @property
    def tokens_per_window(self) -> int:
        final_grid = self.patch_grid // 2 ** (len(self.depths) - 1)
        return final_grid * final_grid


@dataclasses.dataclass(frozen=True)
class AudioTransformerConfig:
    """Post-LN transformer over all audio tokens of a clip (docs/original.md#audio-transformer): `(B, S, d_model)`
    -> `(B, S, d_model)`; `n_heads` heads of `d_head`, rotary on the first `rotary_dim` channels of each."""

    d_model: int = 2048
    n_heads: int = 8
    n_layers: int = 3
    d_inner: int = 2048
    rotary_base: float = 4096.0
    layer_norm_eps: float = 1e-6
    key_mask_fill: float = -1e9
    # Hard-coded attention-probability dropout of the original (docs/original.md#attn-dropout), train mode only.
    attn_dropout: float = 0.1

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return max(self.d_head // 2, 32)


@dataclasses.dataclass(frozen=True)
class CrossAttentionConfig:
    """Gated cross-attention block before decoder layers (docs/original.md#cross-attention): `heads` x `dim_head`
    inner width, feed-forward `ff_mult` x the LM's hidden size."""

    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    every_n_layers: int = 1
    layer_norm_eps: float = 1e-5
    # Initial value of both tanh gates of a freshly initialised block. The original starts at 0, so a new block
    # leaves the pretrained LM unchanged; a model trained from scratch (the demo) starts them open instead, because
    # a closed gate also blocks the gradient to everything behind it.
    gate_init: float = 0.0


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Qwen2.5 decoder (docs/original.md#qwen2-layer); `vocab_size` is the size after AF2's resize
    (docs/original.md#vocab-resize)."""

    vocab_size: int = 151669
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of AF2's special tokens (docs/original.md#tokens). Never hard-code these elsewhere."""

    media: int = 151665  # <audio>
    end_of_chunk: int = 151666  # <|endofchunk|>
    pad: int = 151667  # <|PAD_TOKEN|>
    sep: int = 151668  # <SEP>
    eos: int = 151643  # <|endoftext|>


@dataclasses.dataclass(frozen=True)
class AF2Config:
    """The whole model: one section per component, the special token ids and the prompt length limit. Checked when
    built: HTSAT's output width must equal the audio transformer's, and `audio.max_windows` must be in 1..30."""

    audio: AudioConfig = AudioConfig()
    htsat: HTSATConfig = HTSATConfig()
    audio_transformer: AudioTransformerConfig = AudioTransformerConfig()
    cross_attention: CrossAttentionConfig = CrossAttentionConfig()
    lm: LMConfig = LMConfig()
    tokens: SpecialTokens = SpecialTokens()
    max_prompt_tokens: int = 512

    def __post_init__(self):
        if self.htsat.num_features != self.audio_transformer.d_model:
            raise ValueError(
                f"HTSAT output width {self.htsat.num_features} != audio transformer width "
                f"{self.audio_transformer.d_model}; set embed_dim * 2**(stages-1) equal to d_model")
        check_max_windows(self.audio.max_windows)

    # --- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AF2Config":
        return build_dataclass(cls, data, _JSON_RULES)

    @classmethod
    def from_json(cls, text: str) -> "AF2Config":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "AF2Config":
        return dataclasses.replace(self, **changes)

    # --- original schema -------------------------------------------------------------------
    @classmethod
    def from_original_config(cls, cfg: Mapping[str, Any]) -> "AF2Config":
        """Reads the fixtures' `config.json` schema (original `clap_config` / `model_config` names plus the
        `htsat`, `mel`, `audio_transformer`, `gated_cross_attention`, `qwen2_config` and `special_tokens` sections)."""
        clap = cfg["clap_config"]
        mel = cfg.get("mel", {})
        audio_cfg = cfg["htsat"].get("audio_cfg", {})
        audio = AudioConfig(
            sample_rate=int(mel.get("sample_rate", audio_cfg.get("sample_rate", 16000))),
            window_seconds=float(clap.get("window_length", 10.0)),
            max_windows=int(clap.get("max_num_window", 12)),
            n_fft=int(mel.get("n_fft", audio_cfg.get("window_size", 1024))),
            win_length=int(mel.get("win_length", audio_cfg.get("window_size", 1024))),
            hop_length=int(mel.get("hop_length", audio_cfg.get("hop_size", 160))),
            n_mels=int(mel.get("n_mels", audio_cfg.get("mel_bins", 64))),
            f_min=float(mel.get("f_min", audio_cfg.get("fmin", 50.0))),
            f_max=float(mel.get("f_max", audio_cfg.get("fmax", 8000.0))),
            resize_frames=int(mel.get("resize_to_frames", 1024)),
        )
        if float(clap.get("window_overlap", 0.0)) != 0.0:
            raise ValueError("window_overlap != 0 is not supported (every released config uses 0)")
        h = cfg["htsat"]
        stride = h.get("patch_stride", 4)
        htsat = HTSATConfig(
            spec_size=int(h["spec_size"]),
            patch_size=int(h["patch_size"]),
            patch_stride=int(stride[0] if isinstance(stride, (list, tuple)) else stride),
            embed_dim=int(h["embed_dim"]),
            depths=tuple(int(d) for d in h["depths"]),
            num_heads=tuple(int(n) for n in h["num_heads"]),
            window_size=int(h["window_size"]),
            mlp_ratio=float(h["mlp_ratio"]),
            qkv_bias=bool(h["qkv_bias"]),
            freq_ratio=int(h["freq_ratio"]),
            n_mels=int(audio_cfg.get("mel_bins", 64)),
            drop_path_rate=float(h.get("drop_path_rate", 0.1)),
        )
        at_kwargs = cfg["model_config"]["audio_transformer_kwargs"]
        at = cfg.get("audio_transformer", {})
        audio_transformer = AudioTransformerConfig(
            d_model=int(clap["audio_embed_dim"]),
            n_heads=int(at_kwargs["n_head"]),
            n_layers=int(at_kwargs["n_layers"]),
            d_inner=int(at_kwargs["d_inner"]),
            rotary_base=float(at.get("rotary_base", 4096.0)),
            layer_norm_eps=float(at.get("layer_norm_eps", 1e-6)),
            key_mask_fill=float(at.get("key_mask_fill", -1e9)),
        )
        if "rotary_dim" in at and int(at["rotary_dim"]) != audio_transformer.rotary_dim:
            raise ValueError(f"rotary_dim {at['rotary_dim']} != max(d_head // 2, 32) = {audio_transformer.rotary_dim}")
        xa = cfg.get("gated_cross_attention", {})
        cross_attention = CrossAttentionConfig(
            heads=int(xa.get("heads", 8)),
            dim_head=int(xa.get("dim_head", 64)),
            ff_mult=int(xa.get("ff_mult", 4)),
            every_n_layers=int(cfg["model_config"].get("cross_attn_every_n_layers", 1)),
        )
        q = cfg["qwen2_config"]
        lm = LMConfig(
            vocab_size=int(q["vocab_size"]),
            hidden_size=int(q["hidden_size"]),
            intermediate_size=int(q["intermediate_size"]),
            num_layers=int(q["num_hidden_layers"]),
            num_heads=int(q["num_attention_heads"]),
            num_kv_heads=int(q["num_key_value_heads"]),
            rope_theta=float(q["rope_theta"]),
            rms_norm_eps=float(q["rms_norm_eps"]),
            max_position_embeddings=int(q["max_position_embeddings"]),
            tie_word_embeddings=bool(q.get("tie_word_embeddings", True)),
        )
        st = cfg["special_tokens"]
        tokens = SpecialTokens(
            media=int(st["<audio>"]),
            end_of_chunk=int(st["<|endofchunk|>"]),
            pad=int(st["<|PAD_TOKEN|>"]),
            sep=int(st["<SEP>"]),
            eos=int(st["<|endoftext|>"]),
        )
        return cls(audio=audio, htsat=htsat, audio_transformer=audio_transformer,
                   cross_attention=cross_attention, lm=lm, tokens=tokens)

    @classmethod
    def from_file(cls, path) -> "AF2Config":
        """A JSON file in either our schema (`to_json`) or the original / fixture schema."""
        with open(path) as f:
            data = json.load(f)
        if "clap_config" in data:
            return cls.from_original_config(data)
        return cls.from_dict(data)


@dataclasses.dataclass(frozen=True)
class PlainDataRules:
    """How `build_dataclass` reads one kind of plain data (JSON config, YAML training config, model overrides): its
    exception type and messages, and its check of a leaf value."""

    error: type[Exception]
    # (section class, the section's dotted key or "" at the top, the data) -> message: a section is not a mapping
    not_a_mapping: Callable[[type, str, Any], str]
    # (section class, the section's dotted key, its unknown keys in the data's order) -> message
    unknown_keys: Callable[[type, str, list[str]], str]
    # (dotted key, field, value, the value it replaces) -> the value to store; raises `error` when it does not fit.
    # The replaced value is the field's default, or the base's value when overriding.
    leaf: Callable[[str, dataclasses.Field, Any, Any], Any] = lambda key, field, value, current: value
    # A blank section (`model:` with nothing under it reads as None in YAML) keeps its defaults.
    blank_section_is_default: bool = False


def build_dataclass(cls, data: Mapping[str, Any], rules: PlainDataRules, *, base=None, where: str = ""):
    """A frozen dataclass `cls` from plain nested data, the one place this is done: each key names a field; a field
    holding a dataclass takes a nested mapping, built alike; every other value passes `rules.leaf`, and lists become
    tuples (a frozen dataclass holds immutable values). Fields the data leaves out keep `base`'s values when given
    (an override, through `dataclasses.replace`), else their defaults. Data that is not a mapping and unknown keys
    raise `rules.error`. `where`: the dotted key of `data`, for messages."""
    if not isinstance(data, Mapping):
        raise rules.error(rules.not_a_mapping(cls, where, data))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [name for name in data if name not in fields]
    if unknown:
        raise rules.error(rules.unknown_keys(cls, where, unknown))
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        current = fields[name].default if base is None else getattr(base, name)
        if dataclasses.is_dataclass(current):
            if rules.blank_section_is_default and not value:
                value = {}
            values[name] = build_dataclass(type(current), value, rules, base=None if base is None else current,
                                           where=key)
        else:
            value = rules.leaf(key, fields[name], value, current)
            values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _json_leaf(key: str, field: dataclasses.Field, value, default):
    """A JSON value must have the JSON type of the field's default: a string where a size belongs would otherwise
    fail deep inside model construction."""
    if not _fits(value, default):
        raise ValueError(f"{key} is {value!r:.60}, expected {_json_kind(default)}")
    return value


def _fits(value, default) -> bool:
    if isinstance(default, tuple):
        return isinstance(value, list) and all(_fits(v, default[0]) for v in value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return type(value) is int  # not a bool
    if isinstance(default, float):
        return type(value) in (int, float)
    return True


_JSON_KINDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers")}


def _json_kind(default) -> str:
    if isinstance(default, tuple):
        return f"a list of {_JSON_KINDS[type(default[0])][1]}"
    return _JSON_KINDS[type(default)][0]


# `AF2Config.from_dict`: the JSON written by `to_dict`; every unknown field of a section is named at once.
_JSON_RULES = PlainDataRules(
    error=ValueError,
    not_a_mapping=lambda cls, where, data: f"{where or cls.__name__} is {data!r:.60}, expected an object",
    unknown_keys=lambda cls, where, unknown: f"unknown {cls.__name__} fields: {sorted(unknown)}",
    leaf=_json_leaf)


def _lm(hidden, intermediate, layers, heads, kv_heads, positions=32768) -> LMConfig:
    return LMConfig(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                    num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=positions)


# The released sizes differ only in the Qwen2.5 LM (docs/original.md#sizes); the audio side is identical.
PRESETS: dict[str, AF2Config] = {
    "af2-3b": AF2Config(lm=_lm(2048, 11008, 36, 16, 2)),
    "af2-1.5b": AF2Config(lm=_lm(1536, 8960, 28, 12, 2, positions=131072)),  # Qwen2.5-1.5B's own config
    "af2-0.5b": AF2Config(lm=_lm(896, 4864, 24, 14, 2)),
}


def preset(name: str) -> AF2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def resolve_model_config(model: str) -> AF2Config:
    """What a `--model` argument names: a preset, or a config.json in our schema or the original's."""
    if model in PRESETS:
        return PRESETS[model]
    if Path(model).is_file():
        return AF2Config.from_file(model)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config file")


class _Loader(yaml.SafeLoader):
    """YAML as people write configs: `1e-4` is a float and `10:15` a string. PyYAML follows YAML 1.1, where the
    first is a string and the second the base-60 integer 615."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text as our configs read it (`_Loader`): training configs, overrides and evaluation configs."""
    return yaml.load(text, Loader=_Loader)
