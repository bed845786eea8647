"""A benchmark's items, read from its manifest in the original format (docs/original.md#manifests):
`data_root/Name-Task/split.json` = {split_path, data: {"0": {name, prompt, output, ...}, ...}}, audio at
`data_root/split_path/name`. An item may also carry `choices` (a list of option texts), `audio_start` (seconds)
and any field a prompt template or `group_by` names.

The prompt is the benchmark's template filled from the item's fields, plus `{options}`: the choices written
"(A) first\\n(B) second ...". The reference is the item's `output`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from af2_jax.training.data import read_manifest


class BenchmarkDataError(ValueError):
    """A benchmark whose manifest cannot be used (missing, damaged, an item without a reference): the run skips it,
    goes on with the others and exits 1."""


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prediction to make: for captioning metrics, every item of the same audio and prompt merged into one,
    `reference` then holding all their outputs and `id` the first item's key."""

    benchmark: str
    id: str
    audio: str
    start: float
    prompt: str
    reference: str | tuple[str, ...]
    choices: tuple[str, ...] | None = None
    group: str | None = None

    def record(self) -> dict:
        """The fields that open this item's predictions line."""
        reference = list(self.reference) if isinstance(self.reference, tuple) else self.reference
        return {"benchmark": self.benchmark, "id": self.id, "prompt": self.prompt, "reference": reference,
                **({"choices": list(self.choices)} if self.choices is not None else {}),
                **({"group": self.group} if self.group is not None else {})}


def options(choices) -> str:
    """Choices as MMAU's prompt lists them: "(A) first\\n(B) second ..."."""
    return "\n".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(choices))


class _Fields(dict):
    def __missing__(self, field):
        raise BenchmarkDataError(f"the prompt template names {{{field}}}, which item {self['__key']} does not have "
                                 f"(its fields: {', '.join(k for k in self if not k.startswith('__'))})")


def _item(benchmark, key: str, entry, data_root: Path, split_path: str) -> EvalItem:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise BenchmarkDataError(f"item {key} has no \"name\" (its audio file)")
    reference = entry.get("output")
    if not isinstance(reference, str) or not reference.strip():
        raise BenchmarkDataError(f"item {key} has no reference (\"output\"); every item needs one to be scored")
    choices = entry.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise BenchmarkDataError(f"item {key}: \"choices\" must be a list of strings, got {str(choices)[:60]}")
    if choices is None and "{options}" in benchmark.template:
        raise BenchmarkDataError(f"item {key} has no \"choices\", which the prompt template's {{options}} lists")
    fields = _Fields(entry, __key=key, options=options(choices or []))
    group = None
    if benchmark.group_by:
        if benchmark.group_by not in entry:
            raise BenchmarkDataError(f"item {key} has no field {benchmark.group_by!r}, which group_by names")
        group = str(entry[benchmark.group_by])
    return EvalItem(benchmark.name, key, str(data_root / split_path / entry["name"]),
                    float(entry.get("audio_start", 0.0)), benchmark.template.format_map(fields), reference,
                    None if choices is None else tuple(choices), group)


def benchmark_items(benchmark, data_root, *, captions: bool, limit: int | None = None) -> list[EvalItem]:
    """The predictions `benchmark` asks for, in manifest order (the first `limit` of them). With `captions`,
    items of the same audio and prompt are merged (EvalItem). Raises BenchmarkDataError naming the benchmark."""
    data_root = Path(data_root)
    path = data_root / benchmark.manifest
    try:
        if not path.parent.is_dir():
            raise BenchmarkDataError(f"its folder {path.parent} does not exist; --data-root must hold "
                                     f"{Path(benchmark.manifest).parent}/ (see eval/README.md)")
        contents = read_manifest(path, f"--data-root must hold {benchmark.manifest}")
        split_path = contents.get("split_path") or ""
        items: list[EvalItem] = []
        merged: dict[tuple, int] = {}
        for number in range(contents["total_num"]):
            key = str(number)
            if key not in contents["data"]:
                raise BenchmarkDataError(f"{path}: data has no item {key!r}; items are keyed \"0\" to "
                                         "\"total_num - 1\"")
            try:
                item = _item(benchmark, key, contents["data"][key], data_root, split_path)
            except BenchmarkDataError:
                raise
            except (TypeError, KeyError, IndexError, AttributeError, ValueError) as err:  # a malformed field
                raise BenchmarkDataError(f"item {key} cannot be used ({type(err).__name__}: {err})") from None
            same = (item.audio, item.start, item.prompt)
            if captions and same in merged:
                first = items[merged[same]]
                items[merged[same]] = dataclasses.replace(first, reference=(*first.reference, item.reference))
                continue
            if captions:
                merged[same] = len(items)
                item = dataclasses.replace(item, reference=(item.reference,))
            items.append(item)
    except ValueError as err:
        raise BenchmarkDataError(f"benchmark {benchmark.name}: {err}") from None
    return items[:limit] if limit else items
