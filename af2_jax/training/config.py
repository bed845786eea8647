"""The training configuration: one YAML file (`train/configs/*.yaml`) plus `key=value` overrides on the command line.

Sections: `model` (what to start from), `data` (the original's `data_config` keys), `optim`, `run`. Unknown keys are
errors that name the key and the valid ones, so a typo never silently trains with a default. Every value with a fixed
set or range declares it beside its default (`_within`, `_one_of`), and `check` tests them all when the config is
read, so a bad value fails before anything is loaded or compiled, never at the end of a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import yaml

from af2_jax.config import MAX_WINDOWS_LIMIT, PRESETS, AF2Config, PlainDataRules, build_dataclass, parse_yaml


class ConfigError(ValueError):
    """A training config that cannot work; the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class _Range:
    """Allowed values of a number: `low <= v` (or `low < v`), `v <= high` (or `v < high`); NaN never passes."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "must be " + " and ".join(parts) if parts else "must be a number"


@dataclasses.dataclass(frozen=True)
class _Choices:
    values: tuple[str, ...]

    def allows(self, value) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "use " + ", ".join(self.values)


def _key(default, doc: str, *, allowed=None, default_factory=dataclasses.MISSING):
    """A config key: its default and its one-line documentation (what `--print-config` shows; the only place a
    key is described), and optionally its allowed values."""
    metadata = {"doc": doc} if allowed is None else {"doc": doc, "allowed": allowed}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _within(default, doc: str, low=None, high=None, *, low_open=False, high_open=False):
    return _key(default, doc, allowed=_Range(low, high, low_open, high_open))


def _one_of(default, doc: str, *values):
    return _key(default, doc, allowed=_Choices(values))


def _mapping(doc: str):
    return _key(dataclasses.MISSING, doc, default_factory=dict)


_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """What to start from and how the model computes."""

    init: str = _key("random", "a checkpoint folder (python -m af2_jax.convert, or a previous run's final/), or "
                               "random")
    preset: str = _key("af2-3b", f"with init random: the preset to build ({', '.join(PRESETS)})")
    overrides: Mapping[str, Any] = _mapping("with init random: nested AF2Config field overrides, e.g. {lm: "
                                            "{num_layers: 2}}")
    compute_dtype: str = _one_of("bfloat16", "activations and matmuls; parameters and optimizer state stay "
                                             "float32 (master weights)", *_DTYPES)
    remat: bool = _key(False, "recompute each LM layer's activations in the backward pass (jax.checkpoint) to "
                              "save memory")
    tokenizer: str = _key("", "a folder with tokenizer.json; empty: the checkpoint's tokenizer/, else Qwen2.5 "
                              "rebuilt offline")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The training and validation sets; names as the original's `data_config`."""

    dataset_file_root: str = _key("", "the folder holding the manifests, Name-Task/split.json")
    data_root: str = _key("", "audio is read from data_root/split_path/name (split_path from the manifest)")
    dataset_blending_config: Mapping[str, Any] = _mapping(
        "the training sets, {Name-Task/split: {weight: w}}: one pass holds int(total_num * w * global weight) "
        "items of each")
    dataset_blending_global_weight: float = _within(1.0, "multiplies every set's weight", 0, low_open=True)
    valid_dataset_config: Mapping[str, Any] = _mapping("the validation sets, {Name-Task/split: true}")
    max_tokens: int = _within(512, "tokens per example, padded or cut (at least <audio>, <SEP>, EOC and EOS)", 4)
    max_num_window: int = _within(12, "audio windows per example, padded or cut (AF2: 10 s each; 30 = 5 minutes)",
                                  1, MAX_WINDOWS_LIMIT)
    num_workers: int = _within(0, "host processes decoding audio (0: in the main process)", 0)
    valid_max_items: int = _within(64, "validation reads at most this many items of each set (the original's "
                                       "val split reads 64; 0: all)", 0)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """What is trained and how: AdamW, the schedule, clipping, accumulation."""

    trainable: str = _key("pretrain", "pretrain, sft, full, or a regex over parameter paths (e.g. "
                                      "xattn|embed_tokens)")
    batch_size: int = _within(16, "global batch per optimizer micro-step (all devices, all processes)", 1)
    grad_accum: int = _within(1, "micro-steps per optimizer step", 1)
    learning_rate: float = _within(1e-4, "peak learning rate, after the warmup", 0, low_open=True)
    schedule: str = _one_of("constant", "the learning rate after a linear warmup from 0", "constant", "cosine")
    warmup_steps: int = _within(0, "optimizer steps of linear warmup", 0)
    end_learning_rate: float = _within(0.0, "cosine only: the learning rate at run.steps", 0)
    weight_decay: float = _within(0.1, "AdamW decay, uniform on every trainable tensor as the original "
                                       "(docs/original.md#weight-decay)", 0)
    b1: float = _within(0.9, "AdamW beta1", 0, 1, high_open=True)
    b2: float = _within(0.999, "AdamW beta2", 0, 1, high_open=True)
    eps: float = _within(1e-8, "AdamW epsilon", 0, low_open=True)
    clip: str = _one_of("per_module", "per_module: the original (audio encoder, audio transformer, each "
                                      "cross-attention block, the embedding, each clipped to max_grad_norm)",
                        "per_module", "global", "none")
    max_grad_norm: float = _within(1.0, "the norm gradients are clipped to", 0, low_open=True)
    clip_every_microstep: bool = _key(True, "clip the accumulated gradient after every micro-step, as the "
                                            "original; false: once per optimizer step")
    attn_dropout: float = _within(0.0, "train-mode attention-probability dropout of the audio transformer (the "
                                       "original's hard-coded 0.1: docs/original.md#attn-dropout)",
                                  0, 1, high_open=True)
    loss_positions: int = _within(0, "logits only at this many labelled positions per row (0: every position); "
                                     "a row with more is an error", 0)


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where the run writes, how long it runs, what it logs, checks and keeps."""

    out_dir: str = _key("runs/af2", "checkpoints/, tensorboard/, final/; rerunning the command resumes from here")
    steps: int = _within(1000, "optimizer steps", 1)
    seed: int = _key(42, "parameter init (random), data order and dropout")
    mesh: str = _key("", "e.g. fsdp=8,tensor=2 (axes data, fsdp, tensor); empty: every device on fsdp")
    save_every: int = _within(500, "checkpoint every N steps (and at the end, and on SIGTERM)", 1)
    keep: int = _within(3, "checkpoints kept", 1)
    log_every: int = _within(10, "metrics (TensorBoard, metrics.jsonl, the console) every N steps", 1)
    eval_every: int = _within(0, "validation loss every N steps (0: only at the end)", 0)
    eval_accuracy: bool = _key(False, "after training: greedy exact match per validation set, and sample answers "
                                      "in TensorBoard (single-process runs)")
    eval_max_new_tokens: int = _within(16, "the longest answer exact match generates", 1)
    save_final: bool = _key(True, "write out_dir/final, a loadable af2-jax checkpoint")
    final_dtype: str = _one_of("bfloat16", "storage dtype of out_dir/final", *_DTYPES)
    profile_steps: str = _key("", "START:STOP: a jax.profiler trace of those steps into out_dir/tensorboard "
                                  "(TensorBoard's PROFILE tab)")
    wandb_project: str = _key("", "also log to this Weights & Biases project (pip install -e '.[wandb]'; entity "
                                  "from WANDB_ENTITY, offline with WANDB_MODE=offline); empty: off")
    peak_flops: float = _within(0.0, "peak FLOP/s of one device, for MFU (0: the known bfloat16 peak of the device "
                                     "kind where there is one, else no MFU)", 0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run's whole configuration, one section each for `model`, `data`, `optim` and `run` (`--print-config` lists
    every key)."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def keys(config: TrainConfig) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every key of `config` in declaration order: (`section.key`, its field, its value)."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for field in dataclasses.fields(values):
            yield f"{section.name}.{field.name}", field, getattr(values, field.name)


def show_value(value) -> str:
    """A value written so that a `section.key=value` override reads it back (YAML; JSON for mappings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and parse_yaml(value) == value else json.dumps(value)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value)
    return repr(value)


def describe(config: TrainConfig = TrainConfig()) -> str:
    """Every key, one line each, grouped by section: `section.key=value  # what it is [allowed values]`, with
    `config`'s values (the defaults unless given)."""
    lines = []
    for section in dataclasses.fields(config):
        if lines:
            lines.append("")
        lines.append(f"{section.name}: {type(getattr(config, section.name)).__doc__}")
        entries = [(f"{key}={show_value(value)}", field) for key, field, value in keys(config)
                   if key.startswith(f"{section.name}.")]
        width = min(max(len(setting) for setting, _ in entries), 48)
        for setting, field in entries:
            allowed = field.metadata.get("allowed")
            note = f" [{allowed.describe()}]" if allowed is not None else ""
            lines.append(f"  {setting:<{width}}  # {field.metadata.get('doc', '')}{note}")
    return "\n".join(lines)


def _unknown_key(cls, where: str, unknown: list[str]) -> str:
    key = f"{where}.{unknown[0]}" if where else unknown[0]
    return f"unknown config key {key!r}; valid keys here: {', '.join(f.name for f in dataclasses.fields(cls))}"


def _coerce(key: str, field: dataclasses.Field, value):
    """A YAML value as its field's annotation wants it: an int where a float belongs becomes one (`lr: 1`)."""
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


# The YAML config and its `section.key=value` overrides: a typo names the key and the valid ones.
_YAML_RULES = PlainDataRules(
    error=ConfigError,
    not_a_mapping=lambda cls, where, data: f"{where or 'the config'} must be a mapping, got {type(data).__name__}",
    unknown_keys=_unknown_key,
    leaf=lambda key, field, value, default: _coerce(key, field, value),
    blank_section_is_default=True)


def _build(cls, data: Mapping[str, Any], where: str):
    """`cls` (`TrainConfig` or one of its sections, at dotted key `where`) from plain data, as a YAML config reads."""
    return build_dataclass(cls, data, _YAML_RULES, where=where)


# `model.overrides`: values are taken as written (the model's own checks run when it is built).
_OVERRIDE_RULES = PlainDataRules(
    error=ConfigError,
    not_a_mapping=lambda cls, where, data: f"{where}: {cls.__name__} takes a mapping of its fields, got {data!r:.60}",
    unknown_keys=lambda cls, where, unknown: f"model.overrides: {cls.__name__} has no field {unknown[0]!r}")


def apply_overrides(config: AF2Config, overrides: Mapping[str, Any]) -> AF2Config:
    """`config` (a preset) with `model.overrides` applied: nested field changes, e.g. {lm: {num_layers: 2}}."""
    return build_dataclass(AF2Config, overrides, _OVERRIDE_RULES, base=config, where="model.overrides")


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
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.learning_rate=1e-4)")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), parse_yaml(value))
    config = _build(TrainConfig, raw, "")
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Value checks that need no devices or files: every declared set or range, then the rules across keys."""
    for key, field, value in keys(config):
        allowed = field.metadata.get("allowed")
        if allowed is not None and not allowed.allows(value):
            raise ConfigError(f"{key} {value!r}: {allowed.describe()}")
    d, r = config.data, config.run
    if not d.dataset_blending_config:
        raise ConfigError("data.dataset_blending_config is empty; list the training sets as {Name-Task/split: "
                          "{weight: 1.0}}")
    for name, spec in d.dataset_blending_config.items():
        if spec is not None and not isinstance(spec, Mapping):
            raise ConfigError(f"data.dataset_blending_config.{name} {spec!r}: use {{weight: 1.0}}")
        weight = blend_weight(spec)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _Range(0, low_open=True).allows(
                weight):
            raise ConfigError(f"data.dataset_blending_config.{name}.weight {weight!r}: must be a number > 0")
    if not d.dataset_file_root:
        raise ConfigError("data.dataset_file_root is not set; point it at the folder holding Name-Task/split.json")
    profile_range(r.profile_steps)
    if r.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"run.wandb_project is {r.wandb_project!r} but wandb is not installed; pip install -e "
                          "'.[wandb]', or leave run.wandb_project empty")


def blend_weight(spec: Mapping | None) -> float:
    """A training set's weight in `data.dataset_blending_config` (1.0 when not given)."""
    return (spec or {}).get("weight", 1.0)


def profile_range(spec: str) -> tuple[int, int] | None:
    """`run.profile_steps` "START:STOP" -> (START, STOP), or None when empty."""
    if not spec:
        return None
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        first = last = -1
    if not 0 <= first < last:
        raise ConfigError(f"run.profile_steps {spec!r}: use START:STOP with 0 <= START < STOP, e.g. 10:15")
    return first, last
