"""Manifests for `infer`: JSON lines in, JSON lines out, resumable.

An input line is {"audio": PATH or [PATH, ...] (optional: without it, or with [], a question without audio), "prompt":
TEXT, "id": optional string or integer, by default the line number}. A line
that is not such an object stops the run (fix the line); an item whose fields have the wrong type, or whose audio or
prompt cannot be used, gets an "error" line and the others go on. Each item becomes one output line {"id", "audio",
"prompt", "answer"} (or "error"), appended and flushed as the item finishes; a rerun after a kill skips what the
output already answers and retries the items that failed; a finished run rewrites the output in manifest order.
The output must be a new file or one written for the same questions: another file, the manifest itself, or an
output that answered an id for another audio or prompt is refused and left as it is. A lock file beside the output
keeps a second run off it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from af2_jax.audio.io import AudioError
from af2_jax.distributed import is_main_process
from af2_jax.engine import Request
from af2_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)


def _shown(value) -> str:
    """A manifest or output value quoted in a one-line error, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _manifest_item(line: str, number: int, path: Path) -> dict:
    """One manifest line -> {"id", "audio" (absent when the line has none), "prompt", "problem"}. A line that is not
    a JSON object with a "prompt" stops the run: the file is not a manifest, or the line is damaged. A field of the wrong type is only
    that item's `problem`, which becomes its "error" line, so one bad item does not stop the others (nor every
    rerun)."""
    try:
        fields = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path}:{number}: not valid JSON; fix the line") from None
    if not isinstance(fields, dict) or "prompt" not in fields:
        raise ValueError(f'{path}:{number}: needs an object with "prompt" (and "audio", unless the question has none)')
    key, problems = fields.get("id", number), []
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        problems.append(f'"id" must be a string or an integer, got {_shown(key)} (this line is kept under its line '
                        f"number, {number})")
        key = number
    audio = fields.get("audio", [])
    if not (isinstance(audio, str) or isinstance(audio, list) and all(isinstance(a, str) for a in audio)):
        problems.append(f'"audio" must be a file path or a list of them, got {_shown(audio)}')
    if not isinstance(fields["prompt"], str):
        problems.append(f'"prompt" must be a string, got {_shown(fields["prompt"])}')
    return {"id": str(key), **({"audio": fields["audio"]} if "audio" in fields else {}), "prompt": fields["prompt"],
            "problem": "; ".join(problems) or None}


def _read_manifest(path: Path) -> list[dict]:
    with open(path) as f:
        items = [_manifest_item(line, number, path) for number, line in enumerate(f, 1) if line.strip()]
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids; every line needs a unique \"id\" (or none, to use line numbers)")
    return items


def _output_line(item: dict, **result) -> str:
    """The output line of one manifest item: its "id", "audio" as given (when given) and "prompt" (what was asked,
    so a rerun can tell whether the output belongs to its manifest), then "answer" or "error"."""
    asked = {key: item[key] for key in ("id", "audio", "prompt") if key in item}
    return json.dumps({**asked, **result}) + "\n"


# How every _output_line starts, so also the last line of an output cut off by a kill.
_LINE_START = b'{"id": '


def _output_record(line: bytes) -> dict | None:
    """The record of one complete output line, or None where it is not a line this command writes."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not text at all
        return None
    if isinstance(record, dict) and isinstance(record.get("id"), str) and "prompt" in record \
            and isinstance(record.get("answer"), str) != isinstance(record.get("error"), str):
        return record
    return None


def read_appended(path: Path, line_start: bytes, parse: Callable[[bytes], dict | None], kind: str
                  ) -> tuple[list[dict], int]:
    """The records of a JSON-lines file a command appends to, one flushed line per finished item (`infer`'s answers,
    `eval`'s predictions), and the length in bytes of its complete lines. `parse` turns a line into its record, or
    None when it is not one of the command's `kind` lines; every line starts with `line_start`. Only a last line cut
    off by a kill may be incomplete; anything else that is not such a line means `path` is some other file, refused
    before it is touched (cutting or appending to it would damage it)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    refusal = f"{path} is not {kind} file of this command (%s); pass another --output: a new one, or one written " \
              "by this command"
    if not (tail.startswith(line_start) or line_start.startswith(tail)):
        raise ValueError(refusal % f"its last line is not {kind} line")
    records = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if line.strip():
            record = parse(line)
            if record is None:
                raise ValueError(refusal % f"line {number} is not {kind} line")
            records.append(record)
    return records, complete


def lock_output(output: Path):
    """An exclusive lock on OUTPUT.lock, held while the returned file is open: a second run on the same output would
    answer the same items and interleave its lines. The lock dies with its process, so a killed run never blocks
    the next."""
    import fcntl

    path = output.with_name(output.name + ".lock")
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_file = open(path, "w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise ValueError(f"another run is writing {output} (it holds {path}); wait for it to finish, or pass another "
                         "--output") from None
    return lock_file


def write_lines_atomically(path: Path, lines) -> None:
    """`path` rewritten with `lines` through a temporary file and a rename, so a kill leaves the old or the new."""
    tmp = path.with_name(f".{path.name}.rewrite")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ManifestJob:
    """One `infer --manifest` run over an output file: `open` checks the manifest and the output and takes the
    output's lock; `run` answers what the output does not (items without an answer, items that failed before are
    retried), appending each line as its item finishes; `finish` rewrites the output in manifest order. Use it as a
    context manager (the lock is released on exit)."""

    def __init__(self, manifest, output):
        self.manifest, self.output = Path(manifest), Path(output)
        self.main = is_main_process()  # every process decodes every item; only process 0 writes
        self._lock_file = None

    def __enter__(self) -> ManifestJob:
        manifest, output = self.manifest, self.output
        if manifest.exists() and output.exists() and os.path.samefile(manifest, output):
            raise ValueError(f"--output {output} is the manifest {manifest}; pass another --output for the answers")
        self.items = _read_manifest(manifest)
        if self.main:
            self._lock_file = lock_output(self.output)
        try:
            return self._check_output()
        except BaseException:
            self.__exit__()  # `with` calls __exit__ only once __enter__ has returned: the lock is let go here
            raise

    def _check_output(self) -> ManifestJob:
        manifest, output = self.manifest, self.output
        records, complete = read_appended(output, _LINE_START, _output_record, "an answer")
        self.records = {r["id"]: r for r in records}
        for it in self.items:
            old = self.records.get(it["id"])
            if old is not None and (old.get("audio"), old["prompt"]) != (it.get("audio"), it["prompt"]):
                raise ValueError(f"{output} answers id {it['id']} for audio {_shown(old.get('audio'))}, prompt "
                                 f"{_shown(old['prompt'])}, but {manifest} asks about audio {_shown(it.get('audio'))}, "
                                 f"prompt {_shown(it['prompt'])}; use another --output, or delete {output} to answer "
                                 "again")
        # Only once every check has passed is a last line cut off by a kill removed, so appending stays valid JSONL.
        if output.exists() and complete < output.stat().st_size and self.main:
            log.warning("%s: dropping an incomplete last line left by an interrupted run", output)
            with open(output, "r+b") as f:
                f.truncate(complete)
        self.pending = [it for it in self.items if "answer" not in self.records.get(it["id"], {})]
        recorded = sum(1 for it in self.items if it["id"] in self.records)
        retried = sum(1 for it in self.pending if it["id"] in self.records)
        log.info("manifest: %d item(s), %d already answered in %s (%d with an error, retried), %d to go",
                 len(self.items), recorded, output, retried, len(self.pending))
        return self

    def __exit__(self, *exc) -> bool:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None
        return False

    def run(self, engine, sampling) -> int:
        """Answers the pending items on `engine` with `sampling` (each clip cut to the engine's `max_windows`), then
        rewrites the output in manifest order. Returns how many of the manifest's items end with an error."""
        with open(self.output if self.main else os.devnull, "a") as out, \
                tqdm(total=len(self.pending), unit="item", file=sys.stderr, disable=not self.main) as bar:
            def write(item: dict, **result) -> None:
                self.records[item["id"]] = json.loads(line := _output_line(item, **result))
                out.write(line)
                out.flush()
                os.fsync(out.fileno())
                bar.update(1)

            for it in self.pending:
                if it["problem"]:
                    write(it, error=it["problem"])
                    continue
                try:
                    engine.submit_when_room(Request(it["prompt"], it.get("audio"), sampling),
                                            on_done=lambda done, it=it: write(it, answer=done.text))
                except (AudioError, TokenizerError, ValueError) as err:  # this item cannot be served
                    write(it, error=str(err))
            while not engine.idle:
                engine.step()
        if self.main:
            self.finish()
        errors = sum(1 for it in self.items if "error" in self.records.get(it["id"], {}))
        log.info("wrote %s (%d answered, %d with errors)", self.output, len(self.items) - errors, errors)
        return errors

    def finish(self) -> None:
        """The output rewritten in manifest order (lines of ids the manifest no longer has last), through a temporary
        file and a rename, so a kill leaves either the old or the new file."""
        order = {it["id"]: n for n, it in enumerate(self.items)}
        records = sorted(self.records.values(), key=lambda r: order.get(r["id"], len(order)))
        write_lines_atomically(self.output, (json.dumps(r) + "\n" for r in records))
