"""Serving throughput over HTTP: `python -m af2_jax.serve` under 1, 4 and 16 concurrent clients, side by side in one
run with the decode speed-up the generation benchmark measures (batch 16 against batch 1) and with one
`python -m af2_jax.infer` process per request.

    python bench/serve_load.py            # the generation benchmark's small model, random weights, float32, 16 slots

Every request asks about its own 1-window clip and decodes exactly --new tokens (greedy, `ignore_eos`), streamed so
the time to its first token is seen. Clients are threads of this process sending over loopback, each its next
request as soon as its last one ends; the same load runs untimed first, so the timed one finds its programs
compiled (steady-state serving).

Target (the serving issue): requests/s at concurrency 16 over requests/s at concurrency 1 is at least 0.75x the
decode tokens/s ratio (batch 16 / batch 1); both ratios are printed, measured in this run.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import generate as generate_bench  # noqa: E402  (bench/generate.py: the decode measurement)

import af2_jax  # noqa: E402
from af2_jax.nn.af2 import relayout  # noqa: E402
from af2_jax.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers import bench_small_config, random_model_from  # noqa: E402

QUESTION = "What is the sound?"


def clip(config, k: int) -> str:
    """A distinct 1-window WAV clip, base64."""
    import soundfile

    rate = config.audio.sample_rate
    t = np.arange(int(config.audio.window_seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.5 * np.sin(2 * np.pi * (200 + 37 * k) * t), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def ask(client: httpx.Client, url: str, audio: str, new: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request."""
    body = {"model": "bench", "max_tokens": new, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio,
                                                                                           "format": "wav"}},
                                                      {"type": "text", "text": QUESTION}]}]}
    start = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


def load(url: str, clips: list[str], concurrency: int, requests: int, new: int) -> dict:
    """`requests` requests from `concurrency` clients; throughput and latency percentiles."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool, httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        results = list(pool.map(lambda k: ask(client, url, clips[k % len(clips)], new), range(requests)))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    assert tokens == requests * new, f"{tokens} tokens for {requests} x {new}"
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"rps": requests / wall, "tps": tokens / wall, "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
            "ttft50": pct(firsts, 0.5), "ttft99": pct(firsts, 0.99), "requests": requests}


def start_server(checkpoint: Path, slots: int, port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "af2_jax.serve", "--checkpoint", str(checkpoint), "--dtype",
                               "float32", "--slots", str(slots), "--port", str(port), "--served-model-name", "bench"],
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server was not healthy in 600 s:\n{log.read_text()}")


def infer_per_request(checkpoint: Path, folder: Path, clips: list[str], new: int, count: int) -> float:
    """Requests/s of one `python -m af2_jax.infer` process per request (compile cache warm: one run first)."""
    paths = []
    for k in range(count + 1):
        path = folder / f"clip{k}.wav"
        path.write_bytes(base64.b64decode(clips[k]))
        paths.append(path)
    run = lambda path: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "af2_jax.infer", "--checkpoint", str(checkpoint), "--dtype", "float32", "--audio",
         str(path), "--prompt", QUESTION, "--max-new-tokens", str(new)], check=True, capture_output=True, cwd=REPO)
    run(paths[0])
    start = time.perf_counter()
    for path in paths[1:]:
        run(path)
    return count / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--new", type=int, default=32, help="tokens per request")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="timed requests per client (at least 8 in all)")
    p.add_argument("--infer-runs", type=int, default=3)
    p.add_argument("--port", type=int, default=8391)
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    config = bench_small_config()
    levels = [int(c) for c in args.concurrency.split(",")]
    clips = [clip(config, k) for k in range(max(64, args.infer_runs + 1))]

    # The decode speed-up the engine reaches in process: bench/generate.py's measurement, 1 window, batch 1 and 16.
    model = relayout(random_model_from(config, jax.numpy.float32), False)
    tokenizer = load_tokenizer()
    prompt = len(tokenizer.prompt_ids(QUESTION))
    decode, admit = {}, 0.0
    for batch in (1, 16):
        data = generate_bench.inputs(config, batch, 1, prompt)
        measured = generate_bench.bench_jax(model, *data, args.new, repeats=3)
        decode[batch] = measured["decode_tps"]
        if batch == 1:  # a request's own device work before it decodes: its encode and prefill (batch 1)
            admit = measured["encode"] + measured["prefill"]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); the small model, float32, random weights; 1-window "
          f"requests, {prompt}-token prompt, {args.new} new tokens; server --slots {args.slots}")
    print(f"decode tokens/s in process (bench/generate.py): batch 1 {decode[1]:.1f}, batch 16 {decode[16]:.1f}; "
          f"ratio {decode[16] / decode[1]:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bench"
        af2_jax.save(model, checkpoint, tokenizer=tokenizer, dtype="float32")
        del model
        server = start_server(checkpoint, args.slots, args.port, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{args.port}"
        try:
            print("| concurrency | requests | requests/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | "
                  "p99 TTFT s |")
            print("|---|---|---|---|---|---|---|---|")
            results = {}
            for concurrency in levels:
                # Untimed, the same load first: it compiles what this traffic needs (group sizes, regroups).
                count = max(8, concurrency * args.rounds)
                load(url, clips, concurrency, count, args.new)
                r = results[concurrency] = load(url, clips, concurrency, count, args.new)
                print(f"| {concurrency} | {r['requests']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.3f} | "
                      f"{r['p99']:.3f} | {r['ttft50']:.3f} | {r['ttft99']:.3f} |", flush=True)
        finally:
            server.terminate()
            server.wait(60)
        rps = infer_per_request(checkpoint, Path(tmp), clips, args.new, args.infer_runs)
        print(f"| infer, one process per request | {args.infer_runs} | {rps:.2f} | | | | | |")
    low, high = min(levels), max(levels)
    serving, decoding = results[high]["rps"] / results[low]["rps"], decode[16] / decode[1]
    print(f"requests/s at concurrency {high} / at {low}: {serving:.2f}x; decode tokens/s batch 16 / batch 1: "
          f"{decoding:.2f}x; {serving / decoding:.2f} of it (target >= 0.75)")
    # The floor: each request is encoded and prefilled alone (batch 1) and shares the decoding steps of its group,
    # so a request costs at least admit + new / (decode tokens/s at that batch) of device time.
    bound = {c: 1 / (admit + args.new / decode[1 if c == 1 else 16]) for c in (1, 16)}
    print(f"device-time bound (encode + prefill {admit * 1e3:.0f} ms per request, alone; decoding shared): "
          f"{bound[1]:.2f} requests/s at concurrency 1, {bound[16]:.2f} at 16 (measured {results[low]['rps'] / bound[1]:.0%} "
          f"and {results[high]['rps'] / bound[16]:.0%} of it); ratio at most {bound[16] / bound[1]:.2f}x = "
          f"{bound[16] / bound[1] / decoding:.2f} of the decode ratio")
    print(f"server at concurrency {high} vs one infer process per request: {results[high]['rps'] / rps:.1f}x "
          "requests/s")


if __name__ == "__main__":
    main()
