"""How soon `python -m af2_jax.serve` answers after a cold start, with and without `--background-compile`, side by
side in one run (alternated, each start with an empty compilation cache).

    python bench/serve_start.py                          # the demo model, min warm-up, 2 rounds
    python bench/serve_start.py --checkpoint DIR --dtype float32

Times are seconds from the warm-up's start (the server's "serving ... on http://" line, just before the engine
thread starts) to: `/health` answering 200 (ready), the answer to one 1-window question sent then (first answer), and
the end of the warm-up (without background compilation) or the switch to the serving layout (with it). Then
decode tokens/s of one 64-token answer, to show the serving layout decodes as fast either way.

Target (issue 19): the first answer within 10 s of the warm-up's start on the demo model.
"""

from __future__ import annotations

import argparse
import os
import datetime
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from serve_load import ask, clip  # noqa: E402  (bench/serve_load.py: one streamed question about a clip)

from af2_jax.checkpoint.folder import read_config  # noqa: E402

STARTED = re.compile(r"^(\S+ \S+) serving .* on http://")
WARM = re.compile(r"^(\S+ \S+) (warm-up \(\w+\) done|serving from the serving form's programs now)")


def log_time(line: str, pattern: re.Pattern) -> float | None:
    match = pattern.match(line)
    if match is None:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def one_start(checkpoint: Path, dtype: str, background: bool, port: int, audio: str, folder: Path) -> dict:
    log = folder / f"serve-{port}.log"
    flag = "--background-compile" if background else "--no-background-compile"
    env_cache = folder / f"cache-{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "af2_jax.serve", "--checkpoint", str(checkpoint), "--dtype", dtype, "--port",
         str(port), "--served-model-name", "bench", flag],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=REPO,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(env_cache)})
    try:
        started = ready = None
        deadline = time.monotonic() + 600
        while ready is None and time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()}")
            started = started or next(filter(None, (log_time(x, STARTED) for x in log.read_text().splitlines())),
                                      None)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    ready = time.time()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        with httpx.Client(timeout=600) as client:
            ask(client, f"http://127.0.0.1:{port}", audio, 2)
            answered = time.time()
            while (warm := next(filter(None, (log_time(x, WARM) for x in log.read_text().splitlines())),
                                None)) is None:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"no end of warm-up or switch in the log:\n{log.read_text()}")
                time.sleep(0.2)
            ask(client, f"http://127.0.0.1:{port}", audio, 64)  # compiles nothing more: timed below
            latency, first, tokens = ask(client, f"http://127.0.0.1:{port}", audio, 64)
        return {"ready": ready - started, "first answer": answered - started, "warm": warm - started,
                "decode tok/s": (tokens - 1) / (latency - first)}
    finally:
        server.terminate()
        server.wait(60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "af2_jax" / "demo_model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8431)
    args = p.parse_args()
    config, _ = read_config(args.checkpoint)
    audio = clip(config, 0)
    results: dict[bool, list[dict]] = {False: [], True: []}
    print(f"model {args.checkpoint.name}, {args.dtype}; seconds from the warm-up's start; {args.rounds} rounds, "
          "alternated, each with an empty compilation cache")
    print("| background compile | round | ready s | first answer s | warm s (all warm-up / switched) | "
          "decode tok/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(1, args.rounds + 1):
            for background in (False, True):
                r = one_start(args.checkpoint, args.dtype, background, args.port + len(results[background]) * 2 +
                              background, audio, Path(folder))
                results[background].append(r)
                print(f"| {'on' if background else 'off'} | {round_} | {r['ready']:.1f} | {r['first answer']:.1f} | "
                      f"{r['warm']:.1f} | {r['decode tok/s']:.1f} |", flush=True)
    med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in results.items()}
    for b in (False, True):
        m = med[b]
        print(f"| {'on' if b else 'off'} | median | {m['ready']:.1f} | {m['first answer']:.1f} | {m['warm']:.1f} | "
              f"{m['decode tok/s']:.1f} |")
    print(f"first answer with background compilation: {med[False]['first answer'] / med[True]['first answer']:.2f}x "
          f"sooner; decode after the switch: {med[True]['decode tok/s'] / med[False]['decode tok/s']:.2f}x")


if __name__ == "__main__":
    main()
