"""An evaluation run over an OUT folder: the items of every benchmark answered on the engine, one predictions line
each as it finishes (a rerun after a kill answers only what is left), then results, report and chart.

OUT holds:
- `config.yaml`: the config run (checkpoint and data root filled in); a rerun must match it where it shapes the
  predictions (checkpoint, seed, each benchmark's manifest, metric, prompt and decoding), or it is refused;
- `predictions.jsonl`: one line per prediction (`scoring` gives the fields), with its score where the metric has
  one once the run finishes; an item that could not be answered (missing or undecodable audio) has a "missing"
  line instead, retried by the next run;
- `results.json`, `report.md`, `report.png`: `write_results`, which `eval score` runs alone.
On a mesh spanning processes every process feeds the engine the same items in the same order; only process 0 reads
OUT (the others follow its plan) and writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from af2_jax.audio.io import AudioError, load_windows
from af2_jax.distributed import is_main_process, main_process_value
from af2_jax.engine import Request
from af2_jax.evaluation.config import EvalConfig, EvalConfigError, load_eval_config
from af2_jax.evaluation.data import BenchmarkDataError, EvalItem, benchmark_items
from af2_jax.evaluation.scoring import (METRICS, draw_chart, item_scores, report_markdown, score_benchmarks,
                                        skip_reason)
from af2_jax.manifest import lock_output, read_appended, write_lines_atomically
from af2_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)

CONFIG, PREDICTIONS, RESULTS, REPORT, CHART = "config.yaml", "predictions.jsonl", "results.json", "report.md", \
    "report.png"
_LINE_START = b'{"benchmark": '  # how every predictions line starts (json.dumps keeps the record's order)


@dataclasses.dataclass
class Plan:
    """What a run will predict: every benchmark's items, in config then manifest order, and the benchmarks skipped
    (name -> why; `problems` are the ones whose data could not be used, which make the run exit 1)."""

    items: list[EvalItem]
    skipped: dict[str, str]
    problems: list[str]


def plan(config: EvalConfig, data_root, limit: int | None = None) -> Plan:
    items, skipped, problems = [], {}, []
    for b in config.benchmarks:
        reason = skip_reason(b.metric)
        if reason:
            log.warning("benchmark %s skipped: %s", b.name, reason)
            skipped[b.name] = reason
            continue
        try:
            found = benchmark_items(b, data_root, captions=METRICS[b.metric].captions, limit=limit)
        except BenchmarkDataError as err:
            log.error("%s; skipped (the run goes on and exits 1)", err)
            skipped[b.name] = str(err)
            problems.append(b.name)
            continue
        log.info("benchmark %s: %d item(s) (%s)", b.name, len(found), b.metric)
        items += found
    return Plan(items, skipped, problems)


def _prediction_record(line: bytes) -> dict | None:
    """The record of a predictions line this command writes, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("benchmark"), str) and isinstance(record.get("id"), str) \
            and isinstance(record.get("prompt"), str) and "reference" in record \
            and isinstance(record.get("prediction"), str) != isinstance(record.get("missing"), str):
        return record
    return None


def _merged(old: EvalConfig, new: EvalConfig, folder: Path) -> EvalConfig:
    """`new` with the benchmarks an earlier run in `folder` made and this one does not name; refuses a `new` whose
    predictions would differ from the ones already there."""
    fix = f"pass another --output, or delete {folder} to start again"
    if old.run_identity() != new.run_identity():
        shown = "checkpoint {}, seed {}, dtype {}, quantize {}, max_windows {}"
        raise EvalConfigError(f"{folder} holds predictions made with {shown.format(*old.run_identity())}, not "
                              f"{shown.format(*new.run_identity())}; {fix}")
    earlier = {b.name: b for b in old.benchmarks}
    for b in new.benchmarks:
        if b.name in earlier and earlier[b.name].prediction_identity() != b.prediction_identity():
            raise EvalConfigError(f"{folder} holds predictions of benchmark {b.name} made with another manifest, "
                                  f"metric, prompt or decoding ({folder / CONFIG}); {fix}")
    names = {b.name for b in new.benchmarks}
    return dataclasses.replace(new, benchmarks=tuple(b for b in old.benchmarks if b.name not in names)
                               + new.benchmarks)


class EvalOutput:
    """The OUT folder of a run, locked while open (a context manager). `pending(items)` says what is left to
    predict, `write` appends a line, `finish` writes the scored predictions, config, results and report."""

    def __init__(self, folder, config: EvalConfig):
        self.folder, self.main = Path(folder), is_main_process()
        self.config = config
        self.predictions = self.folder / PREDICTIONS
        self.records: dict[tuple[str, str], dict] = {}
        self._lock_file = self._out = None

    def __enter__(self) -> EvalOutput:
        if not self.main:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--output {self.folder} is a file; pass a folder for the evaluation's outputs")
        self._lock_file = lock_output(self.predictions)
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self) -> None:
        if (self.folder / CONFIG).is_file():
            self.config = _merged(load_eval_config(self.folder / CONFIG), self.config, self.folder)
        elif self.predictions.exists():
            raise ValueError(f"{self.folder} has {PREDICTIONS} but no {CONFIG}: it is not an evaluation folder of "
                             f"this command; pass another --output (or score it: eval score {self.folder} --config "
                             "FILE)")
        records, complete = read_appended(self.predictions, _LINE_START, _prediction_record, "a predictions")
        self.records = {(r["benchmark"], r["id"]): r for r in records}
        if self.predictions.exists() and complete < self.predictions.stat().st_size:
            log.warning("%s: dropping an incomplete last line left by an interrupted run", self.predictions)
            with open(self.predictions, "r+b") as f:
                f.truncate(complete)
        write_lines_atomically(self.folder / CONFIG, [self.config.to_yaml()])

    def __exit__(self, *exc) -> bool:
        for f in (self._out, self._lock_file):
            if f is not None:
                f.close()
        self._out = self._lock_file = None
        return False

    def pending(self, items: list[EvalItem]) -> list[EvalItem]:
        """The items without a prediction (missing ones are retried), as process 0 sees them, on every process."""
        left = np.zeros(len(items), bool)
        if self.main:
            for n, it in enumerate(items):
                old = self.records.get((it.benchmark, it.id))
                if old is not None and old.get("prompt") != it.prompt:
                    raise ValueError(f"{self.predictions} answers {it.benchmark} id {it.id} for the prompt "
                                     f"{old['prompt'][:40]!r}, but the manifest now asks {it.prompt[:40]!r}; pass "
                                     f"another --output, or delete {self.folder} to start again")
                left[n] = old is None or "prediction" not in old
        left = main_process_value(left)
        return [it for it, wanted in zip(items, left) if wanted]

    def earlier_facts(self) -> dict:
        """The wall time and items/s results.json recorded for the run that made the predictions, if any."""
        earlier = recorded_results(self.folder)
        return {key: earlier.get(key) for key in ("wall_s", "items_per_s")}

    def write(self, item: EvalItem, **result) -> None:
        record = {**item.record(), **result}
        self.records[(item.benchmark, item.id)] = record
        if self.main:
            if self._out is None:
                self._out = open(self.predictions, "a")
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()
            os.fsync(self._out.fileno())

    def finish(self, items: list[EvalItem], facts: dict, skipped: dict[str, str]) -> dict:
        """Predictions rewritten in plan order (with each item's score), then results and report."""
        if not self.main:
            return {}
        order = {(it.benchmark, it.id): n for n, it in enumerate(items)}
        for it in items:  # what the manifest says now (a corrected reference, a new group_by) wins over old lines
            record = self.records.get((it.benchmark, it.id))
            if record is not None:
                record.pop("score", None)
                record.update(it.record())
        records = sorted(self.records.values(), key=lambda r: order.get((r["benchmark"], r["id"]), len(order)))
        metrics = {b.name: b.metric for b in self.config.benchmarks}
        for name, metric in metrics.items():
            answered = [r for r in records if r["benchmark"] == name and "prediction" in r]
            for record, value in zip(answered, item_scores(metric, answered, name)):
                if value is not None:
                    record["score"] = value
        write_lines_atomically(self.predictions, (json.dumps(r) + "\n" for r in records))
        return write_results(self.folder, self.config, records, facts, skipped)


def write_results(folder: Path, config: EvalConfig, records: list[dict], facts: dict,
                  skipped: dict[str, str] | None = None) -> dict:
    """results.json, report.md and report.png in `folder` from prediction records; `facts`: checkpoint, wall_s,
    items_per_s of the run (None where unknown)."""
    benchmarks = score_benchmarks(config.benchmarks, records)
    for name, why in (skipped or {}).items():
        if name in benchmarks and benchmarks[name]["value"] is None:
            benchmarks[name]["skipped"] = why
    results = {"benchmarks": benchmarks, "checkpoint": facts.get("checkpoint"), "dtype": config.dtype,
               "quantize": config.quantize, "config_hash": config.digest(),
               "prompt_templates": {b.name: b.template for b in config.benchmarks}, "seed": config.seed,
               "wall_s": facts.get("wall_s"), "items_per_s": facts.get("items_per_s")}
    text = json.dumps(results, indent=2) + "\n"
    write_lines_atomically(folder / RESULTS, [text])
    chart = CHART if draw_chart(results, folder / CHART) else None
    write_lines_atomically(folder / REPORT, [report_markdown(results, chart)])
    return results


def predict(engine, output: EvalOutput, items: list[EvalItem], config: EvalConfig) -> tuple[int, float]:
    """Answers `items` on `engine`, a line each as it finishes; returns (predictions made, seconds)."""
    sampling = {b.name: b.decoding.sampling(config.seed) for b in config.benchmarks}
    start, made = time.perf_counter(), [0]
    with tqdm(total=len(items), unit="item", file=sys.stderr, disable=not output.main) as bar:
        def done(item: EvalItem, completion) -> None:
            output.write(item, prediction=completion.text)
            made[0] += 1
            bar.update(1)

        for it in items:
            try:
                audio = it.audio if not it.start else load_windows(
                    it.audio, engine.max_windows, config=engine.config.audio, start_seconds=it.start)
                engine.submit_when_room(Request(it.prompt, audio, sampling[it.benchmark]),
                                        on_done=lambda completion, it=it: done(it, completion))
            except (AudioError, TokenizerError, ValueError) as err:  # not answered: counted, never scored wrong
                log.warning("%s %s: %s (counted as missing)", it.benchmark, it.id, err)
                output.write(it, missing=str(err))
                bar.update(1)
        while not engine.idle:
            engine.step()
    return made[0], time.perf_counter() - start


def read_predictions(path: Path) -> list[dict]:
    """Prediction records from a predictions.jsonl written here or elsewhere (the original's outputs turned into
    lines): each needs "benchmark" and "id", "reference" (a string, or a list of strings) and "prediction" (or
    "missing"). A later line for the same benchmark and id replaces an earlier one (a retried item); a last line
    cut off by a kill is left out."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; `eval score OUT` reads OUT/{PREDICTIONS}")
    text = path.read_text()
    lines = text.split("\n")
    records: dict[tuple[str, str], dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: the line a kill cut off
                log.warning("%s: leaving out an incomplete last line", path)
                continue
            raise ValueError(f"{path}:{number}: not valid JSON; fix or remove the line") from None
        reference = record.get("reference") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("benchmark"), str) or "id" not in record \
                or not (isinstance(reference, str) or isinstance(reference, list) and reference
                        and all(isinstance(r, str) for r in reference)) \
                or not isinstance(record.get("prediction", record.get("missing")), str):
            raise ValueError(f'{path}:{number}: a predictions line needs "benchmark" (a string), "id", "reference" '
                             '(a string or a list of strings) and "prediction" (a string)')
        record = {**record, "id": str(record["id"])}
        records[record["benchmark"], record["id"]] = record
    return list(records.values())


def score_folder(folder, config_path=None) -> dict:
    """`eval score`: results and report of `folder` recomputed from its predictions, with the config of the run
    (or `config_path`, for predictions made elsewhere); the run's facts are kept from its results.json."""
    folder = Path(folder)
    if config_path is not None:
        config = load_eval_config(config_path)
    elif (folder / CONFIG).is_file():
        config = load_eval_config(folder / CONFIG)
    else:
        raise ValueError(f"{folder} has no {CONFIG}; pass --config FILE naming the benchmarks of its predictions")
    return write_results(folder, config, read_predictions(folder / PREDICTIONS), recorded_results(folder))


def recorded_results(folder: Path) -> dict:
    """The results.json an earlier run or scoring wrote in `folder` ({} when there is none; one that is not valid
    JSON is named, and rewritten by the caller)."""
    path = folder / RESULTS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; it is rewritten", path)
        return {}
