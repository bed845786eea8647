"""Manifests for `infer`: JSON lines in, JSON lines out, resumable.

An input line is {"audio": PATH, "prompt": TEXT, "id": optional string or integer, by default the line number}. A line
that is not such an object stops the run (fix the line); an item whose fields have the wrong type, or whose audio or
prompt cannot be used, gets an "error" line and the others go on. Each item becomes one output line {"id", "audio",
"prompt", "answer"} (or "error"), written and flushed batch by batch; a rerun after a kill skips what the output
already answers. The output must be a new file or one written for the same questions: another file, the manifest
itself, or an output that answered an id for another audio or prompt is refused and left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from af2_jax.audio.io import AudioError, num_windows
from af2_jax.distributed import is_main_process
from af2_jax.generate import bucket_windows
from af2_jax.pipeline import answer_items, prepare
from af2_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)


def _shown(value) -> str:
    """A manifest or output value quoted in a one-line error, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _manifest_item(line: str, number: int, path: Path) -> dict:
    """One manifest line -> {"id", "audio", "prompt", "problem"}. A line that is not a JSON object with "audio" and
    "prompt" stops the run: the file is not a manifest, or the line is damaged. A field of the wrong type is only
    that item's `problem`, which becomes its "error" line, so one bad item does not stop the others (nor every
    rerun)."""
    try:
        fields = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path}:{number}: not valid JSON; fix the line") from None
    if not isinstance(fields, dict) or "audio" not in fields or "prompt" not in fields:
        raise ValueError(f'{path}:{number}: needs an object with "audio" and "prompt"')
    key, problems = fields.get("id", number), []
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        problems.append(f'"id" must be a string or an integer, got {_shown(key)} (this line is kept under its line '
                        f"number, {number})")
        key = number
    if not isinstance(fields["audio"], str):
        problems.append(f'"audio" must be a file path (a string), got {_shown(fields["audio"])}')
    if not isinstance(fields["prompt"], str):
        problems.append(f'"prompt" must be a string, got {_shown(fields["prompt"])}')
    return {"id": str(key), "audio": fields["audio"], "prompt": fields["prompt"],
            "problem": "; ".join(problems) or None}


def _read_manifest(path: Path) -> list[dict]:
    with open(path) as f:
        items = [_manifest_item(line, number, path) for number, line in enumerate(f, 1) if line.strip()]
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids; every line needs a unique \"id\" (or none, to use line numbers)")
    return items


def _output_line(item: dict, **result) -> str:
    """The output line of one manifest item: its "id", "audio" and "prompt" (what was asked, so a rerun can tell
    whether the output belongs to its manifest), then "answer" or "error"."""
    return json.dumps({"id": item["id"], "audio": item["audio"], "prompt": item["prompt"], **result}) + "\n"


# How every _output_line starts, so also the last line of an output cut off by a kill.
_LINE_START = b'{"id": '


def _output_record(line: bytes) -> dict | None:
    """The record of one complete output line, or None where it is not a line this command writes."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not text at all
        return None
    if isinstance(record, dict) and isinstance(record.get("id"), str) and {"audio", "prompt"} <= record.keys() \
            and isinstance(record.get("answer"), str) != isinstance(record.get("error"), str):
        return record
    return None


def _read_output(path: Path) -> tuple[dict[str, dict], int]:
    """What earlier runs wrote to `path` (id -> record) and the length in bytes of its complete lines. Only a last
    line cut off by a kill may be incomplete; anything else that is not an output line means `path` is some other
    file, refused before it is touched (cutting or appending to it would damage it)."""
    if not path.exists():
        return {}, 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    refusal = f"{path} is not an answer file of this command (%s); pass another --output: a new file, or one " \
              "written by this command"
    if not (tail.startswith(_LINE_START) or _LINE_START.startswith(tail)):
        raise ValueError(refusal % "its last line is not an answer line")
    records = {}
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if line.strip():
            record = _output_record(line)
            if record is None:
                raise ValueError(refusal % f"line {number} is not an answer line")
            records[record["id"]] = record
    return records, complete


def pending_items(manifest, output) -> list[dict]:
    """The manifest items --output does not answer yet, once every check that needs no model has passed: the
    output is not the manifest, is an answer file, and answers none of these ids for another audio or prompt (as
    with another manifest's output; ids default to line numbers, so they collide). Only then is a last line cut
    off by a kill removed, by process 0, so appending stays valid JSONL."""
    manifest, output = Path(manifest), Path(output)
    if manifest.exists() and output.exists() and os.path.samefile(manifest, output):
        raise ValueError(f"--output {output} is the manifest {manifest}; pass another --output for the answers")
    items = _read_manifest(manifest)
    records, complete = _read_output(output)
    for it in items:
        old = records.get(it["id"])
        if old is not None and (old["audio"], old["prompt"]) != (it["audio"], it["prompt"]):
            raise ValueError(f"{output} answers id {it['id']} for audio {_shown(old['audio'])}, prompt "
                             f"{_shown(old['prompt'])}, but {manifest} asks about audio {_shown(it['audio'])}, "
                             f"prompt {_shown(it['prompt'])}; use another --output, or delete {output} to answer "
                             "again")
    if output.exists() and complete < output.stat().st_size and is_main_process():
        log.warning("%s: dropping an incomplete last line left by an interrupted run", output)
        with open(output, "r+b") as f:
            f.truncate(complete)
    pending = [it for it in items if it["id"] not in records]
    log.info("manifest: %d item(s), %d already answered in %s, %d to go", len(items), len(items) - len(pending),
             output, len(pending))
    return pending


def _window_count(path: str, max_windows: int, audio_config) -> int:
    """Windows a file will need (from its header; 1 if it cannot be read, the error surfaces when it is loaded)."""
    import soundfile  # only here: the package imports without the audio libraries

    try:
        seconds = soundfile.info(path).duration
    except Exception:
        return 1
    return num_windows(round(seconds * audio_config.sample_rate), audio_config.window_samples, max_windows)


def answer_manifest(model, tokenizer, pending: list[dict], output, *, batch_size: int, max_windows: int | None,
                    sampling: dict) -> dict:
    """Answers the `pending` items into `output` (appended, flushed and synced batch by batch): clips of similar
    length are batched together (one compiled shape per window bucket), an item that cannot be used gets an "error"
    line. `max_windows` caps each clip (None: the model's); `sampling` goes to `answer_items`. Returns the timings of
    `generate`, summed."""
    main = is_main_process()  # every process decodes every batch; only process 0 writes and shows progress
    output = Path(output)
    groups: dict[int, list[dict]] = {}
    audio_config = model.config.audio
    cap = max_windows or audio_config.max_windows
    for it in pending:  # batch clips of similar length together: one compiled shape per bucket
        if it["problem"]:  # group 0: nothing to load, only "error" lines to write
            groups.setdefault(0, []).append(it)
            continue
        count = _window_count(it["audio"], cap, audio_config)
        groups.setdefault(bucket_windows(count), []).append(it)
    errors, timings = 0, {}
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output if main else os.devnull, "a") as out, \
            tqdm(total=len(pending), unit="item", file=sys.stderr, disable=not main) as bar:
        for _, group in sorted(groups.items()):
            for first in range(0, len(group), batch_size):
                batch, prepared, lines = group[first:first + batch_size], [], []
                for it in batch:
                    problem = it["problem"]
                    if problem is None:
                        try:
                            prepared.append((it, prepare(tokenizer, it["audio"], it["prompt"], max_windows,
                                                         audio_config)))
                            continue
                        except (AudioError, TokenizerError) as err:
                            problem = str(err)
                    errors += 1
                    lines.append(_output_line(it, error=problem))
                if prepared:
                    answers = answer_items(model, tokenizer, [p for _, p in prepared], timings=timings,
                                           **sampling)
                    lines += [_output_line(it, answer=text) for (it, _), text in zip(prepared, answers)]
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    log.info("wrote %s (%d answered, %d with errors)", output, len(pending) - errors, errors)
    return timings
