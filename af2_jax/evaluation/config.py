"""The evaluation config: one YAML file naming the benchmarks to run (eval/README.md; eval/af2.yaml holds the model
card's).

    benchmarks:
      - name: mmau_sound
        manifest: MMAU-Sound/test.json   # under the data root; audio at data_root/split_path/name
        metric: mmau_choice
        prompt: "{question} Choose the correct option from the following options:\\n{options}"
        decoding: {max_new_tokens: 256, temperature: 0.0}
        group_by: task
        reported: 0.651
    seed: 0                  # sampling seed, when a benchmark samples
    checkpoint: ...          # optional: used when --checkpoint is not given
    data_root: ...           # optional: used when --data-root is not given

Unknown keys are errors that name the valid ones, and every value is checked here, when the file is read, so a typo
fails before anything is loaded. A run writes the config it ran, checkpoint and data root filled in, to
OUT/config.yaml; `EvalConfig` reads that file back unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Any

import yaml

from af2_jax.config import PlainDataRules, build_dataclass, check_max_windows, parse_yaml
from af2_jax.engine import Sampling
from af2_jax.evaluation.scoring import METRIC_NAMES


class EvalConfigError(ValueError):
    """An evaluation config that cannot be used; the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a benchmark's answers are decoded; the defaults are AF2's evaluation setting (greedy, 256 new tokens)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def sampling(self, seed: int) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its manifest (the original format, relative to the data root), its metric, the prompt
    template over each item's fields (None: the item's own prompt), the decoding, the manifest field that splits
    the results into groups, and the published value (a fraction) to compare with."""

    name: str = ""
    manifest: str = ""
    metric: str = ""
    prompt: str | None = None
    decoding: Decoding = Decoding()
    group_by: str | None = None
    reported: float | None = None

    @property
    def template(self) -> str:
        return self.prompt if self.prompt is not None else "{prompt}"

    def prediction_identity(self) -> tuple:
        """What shapes this benchmark's predictions (reported and group_by only shape their scoring)."""
        return self.manifest, self.metric, self.template, self.decoding


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """A whole evaluation: the benchmarks, the sampling seed, and the run's settings when the file names them
    (checkpoint, data root, dtype, int8 weights, windows per clip; the command's flags win). A run writes all of them
    to OUT/config.yaml."""

    benchmarks: tuple[Benchmark, ...] = ()
    seed: int = 0
    checkpoint: str | None = None
    data_root: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    max_windows: int | None = None

    def run_identity(self) -> tuple:
        """What shapes every prediction besides each benchmark's own settings: two runs into one folder must agree."""
        return self.checkpoint, self.seed, self.dtype, self.quantize, self.max_windows

    def select(self, names: list[str]) -> EvalConfig:
        """The config with only the benchmarks `names` (in the config's order); an unknown name is an error."""
        known = [b.name for b in self.benchmarks]
        if not names:
            raise EvalConfigError(f"--benchmarks names no benchmark; the config has: {', '.join(known)}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise EvalConfigError(f"--benchmarks: {unknown[0]!r} is not a benchmark of the config; it has: "
                                  f"{', '.join(known)}")
        return dataclasses.replace(self, benchmarks=tuple(b for b in self.benchmarks if b.name in names))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists: plain YAML / JSON data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    def digest(self) -> str:
        """sha256 of the config's content (results.json records it)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


_ALLOWED = {"str": str, "int": int, "float": (int, float)}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _leaf(key: str, field: dataclasses.Field, value, default):
    """A YAML value of the type its field declares (`int`, `float`, `str`, each optionally `| None`); the list of
    benchmarks is built entry by entry."""
    if field.name == "benchmarks":
        if not isinstance(value, list) or not value:
            raise EvalConfigError("benchmarks must be a non-empty list of benchmark entries (name, manifest, metric, "
                                  "...)")
        return tuple(build_dataclass(Benchmark, entry, _RULES, where=f"benchmarks[{i}]")
                     for i, entry in enumerate(value))
    kind, _, optional = str(field.type).partition(" | ")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, _ALLOWED[kind]):
        wanted = {"int": "an integer", "float": "a number", "str": "a string"}[kind]
        raise EvalConfigError(f"{key} must be {wanted}{' or null' if optional else ''}, got {value!r:.60}")
    return float(value) if kind == "float" else value


_RULES = PlainDataRules(
    error=EvalConfigError,
    not_a_mapping=lambda cls, where, data: f"{where or 'the config'} must be a mapping, got {data!r:.60}",
    unknown_keys=lambda cls, where, unknown: (
        f"unknown key {(where + '.' if where else '') + unknown[0]!r}; valid keys here: "
        f"{', '.join(f.name for f in dataclasses.fields(cls))}"),
    leaf=_leaf)


def _check_benchmark(b: Benchmark, where: str) -> None:
    if not _NAME.match(b.name):
        raise EvalConfigError(f"{where}.name must be letters, digits, '_', '.' or '-', got {b.name!r}")
    where = f"{where} ({b.name})"
    if not b.manifest:
        raise EvalConfigError(f"{where}: manifest is required (Name-Task/split.json under the data root)")
    if b.metric not in METRIC_NAMES:
        raise EvalConfigError(f"{where}: unknown metric {b.metric!r}; metrics: {', '.join(METRIC_NAMES)}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(b.template) if name is not None]
    except ValueError as err:
        raise EvalConfigError(f"{where}: prompt is not a valid template ({err}); fields are written {{field}}, a "
                              "brace itself {{ or }}") from None
    if any(not name or name[0].isdigit() for name in fields):
        raise EvalConfigError(f"{where}: prompt names fields by position ({{}} or {{0}}); name an item field, e.g. "
                              "{question}")
    try:
        b.decoding.sampling(0)
    except ValueError as err:
        raise EvalConfigError(f"{where}: decoding: {err}") from None
    if b.reported is not None and not math.isfinite(b.reported):
        raise EvalConfigError(f"{where}: reported must be a finite number (a fraction) or null")


def eval_config_from_data(data: Any, source: str = "the config") -> EvalConfig:
    """An `EvalConfig` from plain data (parsed YAML), every value checked."""
    if not data:
        raise EvalConfigError(f"{source} is empty; it needs a list of benchmarks (eval/af2.yaml is an example)")
    config = build_dataclass(EvalConfig, data, _RULES)
    if "benchmarks" not in data:
        raise EvalConfigError(f"{source} has no benchmarks; it needs a list of them (eval/af2.yaml is an example)")
    names = [b.name for b in config.benchmarks]
    for i, b in enumerate(config.benchmarks):
        _check_benchmark(b, f"benchmarks[{i}]")
        if names.index(b.name) != i:
            raise EvalConfigError(f"benchmarks[{i}]: the name {b.name!r} is used twice; names must be unique")
    if config.seed < 0:
        raise EvalConfigError(f"seed must be >= 0, got {config.seed}")
    if config.max_windows is not None:
        try:
            check_max_windows(config.max_windows, "max_windows=")
        except ValueError as err:
            raise EvalConfigError(str(err)) from None
    if config.dtype not in (None, "bfloat16", "float32") or config.quantize not in (None, "int8"):
        raise EvalConfigError(f"dtype is bfloat16 or float32 and quantize is int8 (or leave them out), got "
                              f"{config.dtype!r} and {config.quantize!r}")
    return config


def load_eval_config(path) -> EvalConfig:
    path = Path(path)
    if not path.is_file():
        raise EvalConfigError(f"{path}: no such config file; pass an evaluation config such as eval/af2.yaml")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise EvalConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return eval_config_from_data(data, str(path))
    except EvalConfigError as err:
        raise EvalConfigError(f"{path}: {err}") from None
