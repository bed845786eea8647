"""The training configuration: one YAML file (`train/configs/*.yaml`) plus `key=value` overrides on the command line.

Sections: `model` (what to start from), `data` (the original's `data_config` keys), `optim`, `run`. Unknown keys are
errors that name the key and the valid ones, so a typo never silently trains with a default. Every value with a fixed
set or range declares it beside its default (`_within`, `_one_of`), and `check` tests them all when the config is
read, so a bad value fails before anything is loaded or compiled, never at the end of a run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

import yaml


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


def _within(default, low=None, high=None, *, low_open=False, high_open=False):
    return dataclasses.field(default=default, metadata={"allowed": _Range(low, high, low_open, high_open)})


def _one_of(default, *values):
    return dataclasses.field(default=default, metadata={"allowed": _Choices(values)})


_DTYPES = ("bfloat16", "float32")


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


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A checkpoint folder written by `python -m af2_jax.convert` / a previous run's `final/`, or "random".
    init: str = "random"
    # For init "random": a preset name and nested `AF2Config` field overrides (e.g. {lm: {num_layers: 2}}).
    preset: str = "af2-3b"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Activations and matmuls run in this dtype; parameters and optimizer state stay float32 (master weights).
    compute_dtype: str = _one_of("bfloat16", *_DTYPES)
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
    dataset_blending_global_weight: float = _within(1.0, 0, low_open=True)
    valid_dataset_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_tokens: int = _within(512, 4)  # room for <audio>, <SEP>, EOC and EOS
    max_num_window: int = _within(12, 1, 30)  # 30 windows = 5 minutes
    num_workers: int = _within(0, 0)
    # Validation reads at most this many items of each set (the original's `val` split reads 64).
    valid_max_items: int = _within(64, 0)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    # "pretrain" | "sft" | "full" | a regex over parameter paths (e.g. "xattn|embed_tokens").
    trainable: str = "pretrain"
    batch_size: int = _within(16, 1)  # global batch per optimizer micro-step (all devices, all processes)
    grad_accum: int = _within(1, 1)
    learning_rate: float = _within(1e-4, 0, low_open=True)
    schedule: str = _one_of("constant", "constant", "cosine")  # "constant" | "cosine", both after a linear warmup from 0
    warmup_steps: int = _within(0, 0)
    end_learning_rate: float = _within(0.0, 0)  # cosine only
    weight_decay: float = _within(0.1, 0)  # uniform on every trainable tensor, as the original (Q28)
    b1: float = _within(0.9, 0, 1, high_open=True)
    b2: float = _within(0.999, 0, 1, high_open=True)
    eps: float = _within(1e-8, 0, low_open=True)
    # "per_module" (the original: audio encoder, audio transformer, each cross-attention block, the embedding,
    # each clipped to max_grad_norm), "global", or "none".
    clip: str = _one_of("per_module", "per_module", "global", "none")
    max_grad_norm: float = _within(1.0, 0, low_open=True)
    # The original clips the accumulated gradient after every micro-step; False clips once per optimizer step.
    clip_every_microstep: bool = True
    # Train-mode attention-probability dropout of the audio transformer (the original's hard-coded 0.1, Q30).
    attn_dropout: float = _within(0.0, 0, 1, high_open=True)
    # Logits only at this many labelled positions per row (0 = every position); saves the vocabulary projection
    # when answers are short. A row with more labelled tokens is an error.
    loss_positions: int = _within(0, 0)


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/af2"
    steps: int = _within(1000, 1)  # optimizer steps
    seed: int = 42
    mesh: str = ""  # e.g. "fsdp=8,tensor=2"; empty = every device on fsdp
    save_every: int = _within(500, 1)
    keep: int = _within(3, 1)  # checkpoints kept; 0 would leave nothing to resume from
    log_every: int = _within(10, 1)
    eval_every: int = _within(0, 0)  # validation loss every N steps (0 = only at the end)
    # After training: greedy exact-match accuracy on the validation sets (per task), written to metrics.
    eval_accuracy: bool = False
    eval_max_new_tokens: int = _within(16, 1)
    save_final: bool = True  # write out_dir/final as a loadable af2-jax checkpoint
    final_dtype: str = _one_of("bfloat16", *_DTYPES)
    profile_steps: str = ""  # "START:STOP": a jax.profiler trace of those steps into out_dir/profile
    # Peak FLOP/s of one device for the MFU figure (0 = a known value for the device kind, else no MFU).
    peak_flops: float = _within(0.0, 0)


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
            raw = _parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.learning_rate=1e-4)")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), _parse_yaml(value))
    config = _build(TrainConfig, raw, "")
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Value checks that need no devices or files: every declared set or range, then the rules across keys."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for field in dataclasses.fields(values):
            allowed = field.metadata.get("allowed")
            value = getattr(values, field.name)
            if allowed is not None and not allowed.allows(value):
                raise ConfigError(f"{section.name}.{field.name} {value!r}: {allowed.describe()}")
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
