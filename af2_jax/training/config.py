"""The training configuration: one YAML file (`train/configs/*.yaml`) plus `key=value` overrides on the command line.

Sections: `model` (what to start from), `data` (the original's `data_config` keys), `optim`, `run`. Unknown keys are
errors that name the key and the valid ones, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A training config that cannot work; the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A checkpoint folder written by `python -m af2_jax.convert` / a previous run's `final/`, or "random".
    init: str = "random"
    # For init "random": a preset name and nested `AF2Config` field overrides (e.g. {lm: {num_layers: 2}}).
    preset: str = "af2-3b"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Activations and matmuls run in this dtype; parameters and optimizer state stay float32 (master weights).
    compute_dtype: str = "bfloat16"
    # Recompute each LM layer's activations in the backward pass (jax.checkpoint) to save memory.
    remat: bool = False
    # The tokenizer: a folder with tokenizer.json; empty = the checkpoint's tokenizer/, else Qwen2.5 rebuilt offline.
    tokenizer: str = ""


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Names as the original's `data_config`."""

    dataset_file_root: str = ""
    data_root: str = ""
    # {"Name-Task/split": {"weight": w}}: one pass holds int(total_num * w * global weight) items of each set.
    dataset_blending_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dataset_blending_global_weight: float = 1.0
    valid_dataset_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_tokens: int = 512
    max_num_window: int = 12
    num_workers: int = 0
    # Validation reads at most this many items of each set (the original's `val` split reads 64).
    valid_max_items: int = 64


@dataclasses.dataclass(frozen=True)
class OptimSection:
    # "pretrain" | "sft" | "full" | a regex over parameter paths (e.g. "xattn|embed_tokens").
    trainable: str = "pretrain"
    batch_size: int = 16  # global batch per optimizer micro-step (all devices, all processes)
    grad_accum: int = 1
    learning_rate: float = 1e-4
    schedule: str = "constant"  # "constant" | "cosine", both after a linear warmup from 0
    warmup_steps: int = 0
    end_learning_rate: float = 0.0  # cosine only
    weight_decay: float = 0.1  # uniform on every trainable tensor, as the original (Q28)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # "per_module" (the original: audio encoder, audio transformer, each cross-attention block, the embedding,
    # each clipped to max_grad_norm), "global", or "none".
    clip: str = "per_module"
    max_grad_norm: float = 1.0
    # The original clips the accumulated gradient after every micro-step; False clips once per optimizer step.
    clip_every_microstep: bool = True
    # Train-mode attention-probability dropout of the audio transformer (the original's hard-coded 0.1, Q30).
    attn_dropout: float = 0.0
    # Logits only at this many labelled positions per row (0 = every position); saves the vocabulary projection
    # when answers are short. A row with more labelled tokens is an error.
    loss_positions: int = 0


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/af2"
    steps: int = 1000  # optimizer steps
    seed: int = 42
    mesh: str = ""  # e.g. "fsdp=8,tensor=2"; empty = every device on fsdp
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0 = only at the end)
    # After training: greedy exact-match accuracy on the validation sets (per task), written to metrics.
    eval_accuracy: bool = False
    eval_max_new_tokens: int = 16
    save_final: bool = True  # write out_dir/final as a loadable af2-jax checkpoint
    final_dtype: str = "bfloat16"
    profile_steps: str = ""  # "START:STOP": a jax.profiler trace of those steps into out_dir/profile
    # Peak FLOP/s of one device for the MFU figure (0 = a known value for the device kind, else no MFU).
    peak_flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(fields)}")
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, key)
        else:
            kwargs[name] = _coerce(key, fields[name], value)
    return cls(**kwargs)


def _coerce(key: str, field: dataclasses.Field, value):
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(kind)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is not None and not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    return value


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path=None, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML config and applies `section.key=value` overrides (values parsed as YAML)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file; pass one of train/configs/*.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.learning_rate=1e-4)")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    config = _build(TrainConfig, raw, "")
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Value checks that need no devices or files."""
    o, r, d = config.optim, config.run, config.data
    if o.batch_size < 1 or o.grad_accum < 1:
        raise ConfigError(f"optim.batch_size ({o.batch_size}) and optim.grad_accum ({o.grad_accum}) must be >= 1")
    if o.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule {o.schedule!r}: use constant or cosine")
    if o.clip not in ("per_module", "global", "none"):
        raise ConfigError(f"optim.clip {o.clip!r}: use per_module, global or none")
    if r.steps < 1:
        raise ConfigError(f"run.steps must be >= 1, got {r.steps}")
    if not 1 <= d.max_num_window <= 30:
        raise ConfigError(f"data.max_num_window {d.max_num_window} is outside 1..30 (30 windows = 5 minutes)")
    if d.max_tokens < 4:
        raise ConfigError(f"data.max_tokens {d.max_tokens} is too small for <audio>, <SEP>, EOC and EOS")
    if not d.dataset_blending_config:
        raise ConfigError("data.dataset_blending_config is empty; list the training sets as {Name-Task/split: "
                          "{weight: 1.0}}")
    if not d.dataset_file_root:
        raise ConfigError("data.dataset_file_root is not set; point it at the folder holding Name-Task/split.json")
