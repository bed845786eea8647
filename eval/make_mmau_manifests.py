"""Writes MMAU's question file as manifests in the original format, for `eval/af2.yaml`'s mmau_* benchmarks.

    python eval/make_mmau_manifests.py DATA/MMAU/mmau-test-mini.json --data-root DATA

reads MMAU's list of {"id", "audio_id": "./test-mini-audios/X.wav", "question", "choices", "answer", "task":
sound|music|speech, "category", "sub-category", "difficulty", ...} and writes DATA/MMAU-Sound/test.json,
DATA/MMAU-Music/test.json and DATA/MMAU-Speech/test.json: each item keeps its fields, with "name" (the audio file,
under split_path: the question file's folder relative to DATA), "output" (the answer) and "prompt" (the MMAU
prompt; eval/af2.yaml builds the same one from "question" and "choices"). The audio must already be under DATA.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SETS = {"sound": "MMAU-Sound", "music": "MMAU-Music", "speech": "MMAU-Speech"}


def prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(choices))
    return f"{question} Choose the correct option from the following options:\n{options}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", type=Path, help="MMAU's JSON (mmau-test-mini.json or the test set's)")
    p.add_argument("--data-root", type=Path, required=True, help="the --data-root of af2_jax.eval")
    p.add_argument("--split", default="test", help="the manifests' split name (default: test)")
    args = p.parse_args(argv)
    items = json.loads(args.questions.read_text())
    split_path = os.path.relpath(args.questions.resolve().parent, args.data_root.resolve())
    if split_path.startswith(".."):
        p.error(f"{args.questions} is not under --data-root {args.data_root}; put MMAU's folder inside it")
    by_set: dict[str, dict] = {name: {} for name in SETS.values()}
    for item in items:
        entries = by_set[SETS[item["task"]]]
        name = os.path.normpath(item["audio_id"])
        entries[str(len(entries))] = {**item, "name": name, "output": item["answer"],
                                      "prompt": prompt(item["question"], item["choices"])}
    for name, data in by_set.items():
        if not data:
            continue
        out = args.data_root / name / f"{args.split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"split": args.split, "split_path": split_path, "flamingo_task": name,
                                   "total_num": len(data), "data": data}, indent=1))
        print(f"{out}: {len(data)} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
