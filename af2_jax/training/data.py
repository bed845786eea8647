"""Training and validation data over manifests in the original format (docs/original.md#manifests).

A manifest is `dataset_file_root/Name-Task/split.json`:
`{split, split_path, flamingo_task, total_num, data: {"0": {name, prompt, output, duration[, audio_start]}}}`;
audio lives at `data_root/split_path/name`. The training set is the original's blend: from each listed set,
`int(total_num * weight * dataset_blending_global_weight)` items of a fixed shuffle (seeded by the set's name, so
a run can be reproduced from its config alone), wrapping into a reshuffled copy when a weight asks for more than one
pass. grain then shuffles the blend per epoch, slices it by JAX process and decodes audio on host workers; the
main process skips and counts broken files and batches to static shapes (`max_tokens`, `max_num_window`).

A wrong `data_root` is the commonest mistake, so it is caught twice: a sample of every set's files is checked before
anything is compiled (`check_audio`, also in `--dry-run`), and the batch stream gives up after a bounded run of
unreadable items instead of skipping forever.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np

from af2_jax.audio.io import AudioError, check_readable, collate_windows, load_windows
from af2_jax.config import AudioConfig, SpecialTokens
from af2_jax.training.config import ConfigError, DataSection, blend_weight
from af2_jax.training.labels import IGNORE, make_labels, pad_ids, training_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Item:
    """One example as its manifest lists it."""

    audio: str  # absolute or data_root-relative path
    prompt: str
    output: str
    task: str
    start: float = 0.0
    dataset: str = ""  # the manifest it came from, "Name-Task/split"


def read_manifest(path: Path, where: str) -> dict:
    """The manifest at `path` (docs/original.md#manifests), checked: JSON with `data` and a matching `total_num`.
    `where` says which setting names the file, for the message when it is missing."""
    if not path.is_file():
        raise ConfigError(f"{path}: manifest not found; {where} (Name-Task/split.json in the original format)")
    try:
        contents = json.loads(path.read_text())
        data = contents["data"]
        contents["total_num"] = int(contents.get("total_num", len(data)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: not a manifest in the original format ({err}); it needs split, split_path, "
                          "flamingo_task, total_num and data") from None
    if contents["total_num"] != len(data):
        raise ConfigError(f"{path}: total_num is {contents['total_num']} but data has {len(data)} items; fix "
                          "total_num")
    return contents


def _set_manifest(data: DataSection, name: str) -> dict:
    return read_manifest(Path(data.dataset_file_root) / f"{name}.json",
                         f"data.dataset_file_root must hold {name}.json")


def _items(contents: dict, data_root: str, dataset: str) -> list[Item]:
    split_path = contents.get("split_path") or ""
    task = contents.get("flamingo_task", "")
    items = []
    for key in range(contents["total_num"]):
        entry = contents["data"][str(key)]
        items.append(Item(audio=os.path.join(data_root, split_path, entry["name"]), prompt=str(entry["prompt"]),
                          output=str(entry["output"]), task=task, start=float(entry.get("audio_start", 0.0)),
                          dataset=dataset))
    return items


def _name_seed(text: str) -> int:
    return sum(map(ord, text))  # the original's per-set seed


def blend(data: DataSection) -> list[Item]:
    """One pass of the blended training set, in a fixed order."""
    blended: list[Item] = []
    for name, spec in data.dataset_blending_config.items():
        weight = float(blend_weight(spec)) * float(data.dataset_blending_global_weight)
        items = _items(_set_manifest(data, name), data.data_root, name)
        count = int(len(items) * weight)
        order = np.random.default_rng(_name_seed(name)).permutation(len(items))
        for index in range(count):
            wrap, position = divmod(index, len(items))
            if position == 0 and wrap > 0:
                order = np.random.default_rng(_name_seed(f"{name}-epoch-{wrap}")).permutation(len(items))
            blended.append(items[order[position]])
        log.info("blend: %s: %d of %d items (weight %.4g)", name, count, len(items), weight)
    if not blended:
        raise ConfigError("the blended training set is empty; raise the weights or dataset_blending_global_weight")
    return blended


def validation_sets(data: DataSection) -> dict[str, list[Item]]:
    out = {}
    for name, enabled in data.valid_dataset_config.items():
        if enabled:
            items = _items(_set_manifest(data, name), data.data_root, name)
            out[name] = items[: data.valid_max_items] if data.valid_max_items else items
    return out


AUDIO_SAMPLE = 16  # files checked per set before training


def _data_root_hint(data_root: str) -> str:
    """The fix named when audio cannot be read in bulk: a wrong data root is by far the likeliest cause."""
    return f"data.data_root is {data_root!r}: point it at the folder holding the manifests' split_path folders"


def check_audio(items: list[Item], data: DataSection, sample: int = AUDIO_SAMPLE) -> None:
    """Checks the headers of up to `sample` evenly spaced files of each set. A set none of whose sampled files can be
    read is an error naming data.data_root (nothing would train on it); some unreadable files are a warning (they
    are skipped and counted while training)."""
    by_set: dict[str, list[Item]] = {}
    for item in items:
        by_set.setdefault(item.dataset, []).append(item)
    for name, members in by_set.items():
        unique = list(dict.fromkeys(members))  # a weight above 1 repeats items
        picked = [unique[i] for i in np.linspace(0, len(unique) - 1, min(sample, len(unique))).astype(int)]
        errors = []
        for item in picked:
            try:
                check_readable(item.audio)
            except AudioError as err:
                errors.append(str(err))
        if len(errors) == len(picked):
            raise ConfigError(f"{name}: none of {len(picked)} sampled audio files can be read (e.g. {errors[0]}); "
                              f"{_data_root_hint(data.data_root)}")
        if errors:
            log.warning("%s: %d of %d sampled audio files cannot be read (e.g. %s); such items are skipped",
                        name, len(errors), len(picked), errors[0])


class LoadExample:
    """item -> model inputs for one example (runs on grain workers; module level so that it pickles)."""

    def __init__(self, tokenizer, tokens: SpecialTokens, max_tokens: int, max_windows: int,
                 audio: AudioConfig = AudioConfig(), loss_positions: int = 0):
        """`audio`: the model's `config.audio` (window length and front end)."""
        self.tokenizer, self.tokens = tokenizer, tokens
        self.max_tokens, self.max_windows, self.audio = max_tokens, max_windows, audio
        self.loss_positions = loss_positions

    def __call__(self, item: Item) -> dict:
        try:
            windows, mask = load_windows(item.audio, self.max_windows, config=self.audio, start_seconds=item.start)
        except AudioError as err:
            return {"broken": str(err)}
        ids = training_ids(self.tokenizer, item.prompt, item.output, self.max_tokens)
        ids_row, attention = pad_ids([ids], self.max_tokens, self.tokens.pad)
        labels = make_labels(ids_row, self.tokens)[0].astype(np.int32)
        labelled = int(np.sum(labels[1:] != IGNORE))
        if self.loss_positions and labelled > self.loss_positions:
            raise ConfigError(f"{item.audio}: the answer has {labelled} labelled tokens but optim.loss_positions is "
                              f"{self.loss_positions}; raise optim.loss_positions (or set 0 for every position)")
        return {"windows": windows, "window_mask": mask, "input_ids": ids_row[0], "attention_mask": attention[0],
                "labels": labels, "task": item.task}


def collate(examples: list[dict], max_windows: int) -> dict:
    audio_x, audio_mask = collate_windows([(e["windows"], e["window_mask"]) for e in examples], pad_to=max_windows)
    stack = lambda key: np.stack([e[key] for e in examples])  # noqa: E731
    return {"audio_x": audio_x, "audio_x_mask": audio_mask, "input_ids": stack("input_ids"),
            "attention_mask": stack("attention_mask"), "labels": stack("labels")}


# Unreadable items in a row after which training gives up (or one whole pass over this process's items, if shorter).
MAX_UNREADABLE_IN_A_ROW = 100


class TrainBatches:
    """Endless static-shape batches of this process's share of the blend; `state()`/`restore()` resume exactly.
    `state()` is taken at batch boundaries only, so a batch interrupted half-read (SIGTERM) leaves it unchanged."""

    def __init__(self, items: list[Item], load: LoadExample, *, batch_size: int, seed: int, num_workers: int = 0,
                 process_index: int = 0, process_count: int = 1, data_root: str = ""):
        import grain

        if batch_size % process_count:
            raise ConfigError(f"optim.batch_size {batch_size} does not split over {process_count} processes")
        self.local_batch = batch_size // process_count
        self.max_windows = load.max_windows
        dataset = (grain.MapDataset.source(items).shuffle(seed=seed).repeat(None)
                   [process_index::process_count].map(load).to_iter_dataset())
        if num_workers > 0:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._iterator = iter(dataset)
        self.broken = 0
        self._unreadable_in_a_row = 0
        self._give_up_after = min(MAX_UNREADABLE_IN_A_ROW, max(len(items) // process_count, 1))
        self._data_root = data_root
        self._boundary = {"grain": self._iterator.get_state(), "broken": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        examples = []
        while len(examples) < self.local_batch:
            example = next(self._iterator)
            if "broken" in example:
                self.broken += 1
                self._unreadable_in_a_row += 1
                log.warning("skipped (%d so far): %s", self.broken, example["broken"])
                if self._unreadable_in_a_row >= self._give_up_after:
                    raise ConfigError(f"{self._unreadable_in_a_row} training audio files in a row cannot be read "
                                      f"(the last: {example['broken']}); {_data_root_hint(self._data_root)}")
                continue
            self._unreadable_in_a_row = 0
            examples.append(example)
        batch = collate(examples, self.max_windows)
        self._boundary = {"grain": self._iterator.get_state(), "broken": self.broken}
        return batch

    def state(self) -> dict:
        return self._boundary

    def restore(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self.broken = int(state["broken"])
        self._boundary = state

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def eval_batches(items: list[Item], load: LoadExample, batch_size: int):
    """Validation batches in manifest order; the last one is filled with copies whose labels are all ignored."""
    examples = []
    for item in items:
        example = load(item)
        if "broken" in example:
            log.warning("validation item skipped: %s", example["broken"])
            continue
        examples.append(example)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        filler = [dict(chunk[0], labels=np.full_like(chunk[0]["labels"], IGNORE))] * (batch_size - len(chunk))
        yield collate(chunk + filler, load.max_windows), chunk
