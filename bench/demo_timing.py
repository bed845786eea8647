"""Where the time of a warm `make demo` goes: the demo command timed whole, and the same work split into phases.

    python bench/demo_timing.py [--runs 3] [--repo OTHER_CHECKOUT ...] [--json OUT.json]

"Warm" is the second and later runs: the compiled programs come from the persistent compilation cache, which a
first, untimed run fills. For every checkout (this one, then each --repo), with that checkout on PYTHONPATH and its
own `.venv/bin/python` (this interpreter if it has none), each of `--runs` rounds runs
  - the demo command, `python -m af2_jax.infer --audio infer/examples/three_beeps.flac --prompt "How many beeps are
    there?"` in the checkout (its own clip), timed from outside: the wall time a user waits;
  - a script that does the command's work through the public API and times each phase: imports (`import af2_jax`:
    JAX, Flax, the model code), tokenizer (`load_tokenizer`), load (`af2_jax.load`, serving layout), audio
    (decode, resample, windows), compile (tracing and lowering both programs, then compiling them, here: loading
    them from the cache), encode (the audio program), decode (the text program), and "start and exit" (interpreter
    start-up and teardown: the script's wall time from outside minus its phases).
Medians over the rounds are printed as one markdown table, checkouts side by side, so a before/after comparison
comes from one run on one machine state. Every checkout gets its own fresh AF2_JAX_HOME and compilation cache
(JAX_COMPILATION_CACHE_DIR, so that checkouts whose Python API does not turn the cache on use it too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CLIP = "infer/examples/three_beeps.flac"
PROMPT = "How many beeps are there?"

# The demo's work phase by phase, through API that every checkout since the serving layout has.
PHASES_SCRIPT = """
import json, sys, time
start = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = time.perf_counter()
import af2_jax
from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
from af2_jax.pipeline import answer_items, prepare
mark("imports")
tokenizer = af2_jax.load_tokenizer(DEMO_CHECKPOINT)
mark("tokenizer")
model = af2_jax.load(DEMO_CHECKPOINT, dtype="bfloat16", scan_layers=False)
mark("load")
item = prepare(tokenizer, sys.argv[1], sys.argv[2], None, model.config.audio)
mark("audio")
timings = {}
answer, = answer_items(model, tokenizer, [item], timings=timings)
mark("generate")
seconds, last = {}, start
for name, at in marks.items():
    seconds[name], last = at - last, at
generated = seconds.pop("generate")
seconds.update(compile=timings["compile_s"], encode=timings["encode_s"], prefill=timings["prefill_s"],
               decode=timings["decode_s"])
seconds["generate, other"] = generated - sum(timings[k] for k in ("compile_s", "encode_s", "prefill_s", "decode_s"))
print(json.dumps({"answer": answer, "seconds": seconds, "inside": time.perf_counter() - start}))
"""
PHASES = ["imports", "tokenizer", "load", "audio", "compile", "encode", "decode", "generate, other", "start and exit"]


def _python(repo: Path) -> str:
    venv = repo / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _run(cmd: list[str], repo: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {repo}:\n{done.stderr[-3000:]}")
    return wall, done


def measure(repo: Path, runs: int) -> dict:
    """Median seconds per phase and of the demo command's wall time, over `runs` warm rounds."""
    home = Path(tempfile.mkdtemp(prefix="af2_demo_timing_"))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "AF2_JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=str(repo), AF2_JAX_HOME=str(home), JAX_COMPILATION_CACHE_DIR=str(home / "xla"))
    python = _python(repo)
    demo = [python, "-m", "af2_jax.infer", "--audio", CLIP, "--prompt", PROMPT]
    phases = [python, "-c", PHASES_SCRIPT, CLIP, PROMPT]
    _run(demo, repo, env)  # fills the compilation cache
    _run(phases, repo, env)
    walls, rows, answers = [], [], set()
    for _ in range(runs):
        wall, done = _run(demo, repo, env)
        walls.append(wall)
        answers.add(done.stdout.strip())
        wall, done = _run(phases, repo, env)
        report = json.loads(done.stdout.splitlines()[-1])
        answers.add(report["answer"])
        rows.append({**report["seconds"], "start and exit": wall - report["inside"], "phases total": wall})
    return {"repo": str(repo), "python": python, "runs": runs, "answers": sorted(answers),
            "demo_wall_s": statistics.median(walls), "demo_walls_s": walls,
            "phases_s": {name: statistics.median(row[name] for row in rows) for name in [*PHASES, "phases total"]}}


def table(results: list[dict]) -> str:
    head = "| phase (median of %d warm runs, s) | %s |" % (results[0]["runs"], " | ".join(r["repo"] for r in results))
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for name in [*PHASES, "phases total"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['phases_s'][name]:.2f}" for r in results) + " |")
    lines.append("| **`make demo` command, wall** | " + " | ".join(f"**{r['demo_wall_s']:.2f}**" for r in results)
                 + " |")
    lines.append("| answers | " + " | ".join(", ".join(r["answers"]) for r in results) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="warm rounds per checkout (median reported)")
    p.add_argument("--repo", type=Path, action="append", default=[],
                   help="another checkout to time the same way (repeatable), e.g. a `git worktree` of the base")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    results = [measure(repo.resolve(), args.runs) for repo in [HERE, *args.repo]]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
