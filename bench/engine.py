"""Continuous batching vs static batches, side by side on the same engine programs and weights.

    python bench/engine.py             # the generation benchmark's small model, float32, this CPU

64 requests are submitted at once, in order: max_new_tokens = round(4 * 32**u), u ~ U(0, 1) (numpy seed 0); windows
uniform on 1..6 (seed 1); a 24-token prompt; greedy; EOS disabled, so every request makes exactly its tokens.
- continuous: one engine with 8 slots serves them all; a finished request's slot goes to the next at once.
- static: batches of 8 in the same order, each waiting for its longest answer, its clips padded to the batch's
  largest window count (what `generate` did before the engine: one static batch per call).
Reported per mode: tokens/s, p50 and p99 request latency (from submission to the last token), the median of 3 runs
alternated between the modes after a warm-up of each (which compiles), and whether every request's greedy tokens are
identical in both. Then 1 slot vs `generate` at batch 1 (8 slots) on the first 8 requests, one at a time.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers (the benchmark's small model with random weights)

from af2_jax.engine import Engine, Request, Sampling  # noqa: E402
from af2_jax.generate import generate  # noqa: E402
from af2_jax.nn.af2 import relayout  # noqa: E402
from tests.helpers import bench_small_config, random_model_from  # noqa: E402

REQUESTS, SLOTS, PROMPT = 64, 8, 24


def workload(config):
    """The 64 requests: prompt ids, windows (W, samples) and their mask, and each one's max_new_tokens."""
    lengths = np.round(4 * 32 ** np.random.default_rng(0).uniform(0, 1, REQUESTS)).astype(int)
    windows = np.random.default_rng(1).integers(1, 7, REQUESTS)
    rng = np.random.default_rng(2)
    t = np.arange(config.audio.window_samples) / config.audio.sample_rate
    out = []
    for n, (new, count) in enumerate(zip(lengths, windows)):
        ids = rng.integers(0, config.tokens.eos, PROMPT)
        ids[0], ids[-1] = config.tokens.media, config.tokens.sep
        clip = np.stack([0.5 * np.sin(2 * np.pi * (200 + 7 * n + 30 * w) * t) for w in range(count)])
        out.append((ids.tolist(), clip.astype(np.float32), int(new)))
    return out


def request(ids, clip, new, pad_to=None):
    windows = clip if pad_to is None else np.concatenate([clip, np.zeros((pad_to - len(clip), clip.shape[1]),
                                                                         np.float32)])
    mask = np.zeros(len(windows), np.float32)
    mask[:len(clip)] = 1
    return Request(ids, (windows, mask), Sampling(max_new_tokens=new, ignore_eos=True))


def continuous(engine, work):
    start, finished = time.perf_counter(), {}
    done = engine.run([request(*w) for w in work],
                      on_done=lambda i, c: finished.setdefault(i, time.perf_counter() - start))
    return time.perf_counter() - start, [finished[i] for i in range(len(work))], [c.tokens for c in done]


def static(engine, work):
    start, latencies, tokens = time.perf_counter(), [], []
    for first in range(0, len(work), SLOTS):
        batch = work[first:first + SLOTS]
        widest = max(len(clip) for _, clip, _ in batch)
        done = engine.run([request(ids, clip, new, widest) for ids, clip, new in batch])
        latencies += [time.perf_counter() - start] * len(batch)  # a static batch returns when its longest is done
        tokens += [c.tokens for c in done]
    return time.perf_counter() - start, latencies, tokens


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    config = bench_small_config()
    model = relayout(random_model_from(config, np.float32), scan_layers=False)
    work = workload(config)
    total_tokens = sum(new for _, _, new in work)
    engine = Engine(model, slots=SLOTS, max_len=256, max_pending=REQUESTS)
    modes = {"continuous": continuous, "static": static}
    runs = {name: [] for name in modes}
    tokens = {}
    for name, run in modes.items():  # warm-up: compiles every program either mode needs
        tokens[name] = run(engine, work)[2]
    for _ in range(3):
        for name, run in modes.items():
            seconds, latencies, _ = run(engine, work)
            runs[name].append((seconds, np.percentile(latencies, 50), np.percentile(latencies, 99)))
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); small model, float32; {REQUESTS} requests, "
          f"{total_tokens} new tokens, windows 1..6, {SLOTS} slots; medians of 3 alternated runs")
    print("| mode | tokens/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|")
    rate = {}
    for name, results in runs.items():
        seconds, p50, p99 = (statistics.median(r[k] for r in results) for k in range(3))
        rate[name] = total_tokens / seconds
        print(f"| {name} | {rate[name]:.1f} | {p50:.2f} | {p99:.2f} |")
    print(f"continuous / static tokens/s: {rate['continuous'] / rate['static']:.2f}x; greedy tokens identical per "
          f"request: {tokens['continuous'] == tokens['static']}")

    one_slot = Engine(model, slots=1, max_len=256)
    first = work[:SLOTS]

    def alone(run):
        start = time.perf_counter()
        for item in first:
            run(item)
        return time.perf_counter() - start

    def by_generate(item):
        ids, clip, new = item
        generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int32), clip[None],
                 np.ones((1, len(clip)), np.float32), max_new_tokens=new, eos_token_id=-1)

    def by_one_slot(item):
        one_slot.run([request(*item)])

    timings = {"1 slot": [], "generate, batch 1": []}
    for fn in (by_one_slot, by_generate):  # warm-up
        alone(fn)
    for _ in range(3):
        timings["1 slot"].append(alone(by_one_slot))
        timings["generate, batch 1"].append(alone(by_generate))
    tokens_first = sum(new for _, _, new in first)
    for name, seconds in timings.items():
        print(f"| {name} | {tokens_first / statistics.median(seconds):.1f} tokens/s, one request at a time |")
    ratio = statistics.median(timings["1 slot"]) / statistics.median(timings["generate, batch 1"])
    print(f"1 slot / generate at batch 1 (time): {ratio:.2f}")


if __name__ == "__main__":
    main()
