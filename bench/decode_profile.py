"""Where a decoding step's time goes, op by op: the engine's decode program under JAX's profiler, its XLA ops grouped
by name (numbered copies together) with milliseconds per step and calls per step.

    python bench/decode_profile.py                 # the generation benchmark's small model, float32, batch 1
    python bench/decode_profile.py --batch 8 --top 20

On a CPU each compiled op is one entry of the trace (XLA_FLAGS gains --xla_cpu_enable_xprof_traceme=true before jax
starts). The step's weight bytes are printed beside it, so the rate an op streams its weights at can be read off:
the output projection is the one `(vocab, hidden)` product per step, the layers' products are the `dot` entries.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generate import decode_weight_bytes, inputs  # noqa: E402  (bench/generate.py: the same model and inputs)

from af2_jax.generate import generate  # noqa: E402
from af2_jax.nn.af2 import relayout  # noqa: E402
from tests.helpers import bench_small_config, random_model_from  # noqa: E402

# Trace entries that are not XLA ops: the runtime's own spans and the Python frames the profiler records.
NOT_OPS = ("ThunkExecutor", "$", "Pjit", "ParseArguments", "SlinkyThreadPool", "end:", "CommonPjRt")


def decode_ops(trace_file: Path) -> tuple[float, collections.Counter, collections.Counter]:
    """(decode seconds, microseconds by op group, calls by op group) of the ops inside the engine's decode calls."""
    events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("$") and
             e["name"].endswith(" _decode")]
    time_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e["name"].startswith(NOT_OPS) or not any(a <= e["ts"] <= b for a, b in spans):
            continue
        group = re.sub(r"\.\d+$", "", e["name"])
        time_us[group] += e["dur"]
        calls[group] += 1
    return sum(b - a for a, b in spans) / 1e6, time_us, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    config = bench_small_config()
    model = relayout(random_model_from(config, jnp.float32), scan_layers=False)
    audio, audio_mask, ids, mask = inputs(config, args.batch, 6, 24)
    run = lambda: generate(model, ids, mask, audio, audio_mask, max_new_tokens=args.new, eos_token_id=-1)  # noqa
    run()  # compiles
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        run()
        jax.profiler.stop_trace()
        trace_file, = Path(folder).rglob("*.trace.json.gz")
        decode_s, time_us, calls = decode_ops(trace_file)
    steps = args.new
    weights = decode_weight_bytes(model)
    print(f"batch {args.batch}: {1e3 * decode_s / steps:.2f} ms per decoding step (traced), ops "
          f"{sum(time_us.values()) / 1e3 / steps:.2f} ms; weights read per step {weights / 1e6:.0f} MB")
    print("| op | ms per step | calls per step | share of the ops |")
    print("|---|---|---|---|")
    total = sum(time_us.values())
    for group, us in time_us.most_common(args.top):
        print(f"| {group} | {us / 1e3 / steps:.2f} | {calls[group] / steps:.1f} | {100 * us / total:.0f}% |")


if __name__ == "__main__":
    main()
