"""Generation speed, side by side on the same weights: the JAX sampler vs the PyTorch reference (tests/reference)
decoding the way the original does (transformers' KV cache for the text, cross-attention K/V recomputed every step).

    python bench/generate.py                      # the small model below, float32, this CPU, batch 1 and 8
    python bench/generate.py --compare-layouts    # JAX alone: stacked vs unstacked layers (infer's default)
    python bench/generate.py --compare-dtypes     # JAX alone: float32, bfloat16 and int8 weights, serving layout
    python bench/generate.py --model af2-3b --dtype bfloat16 --windows 12 --batches 1,8 --no-reference   # (GPU)

Small model (the issue's): LM hidden 512, 8 layers, 8 heads / 2 KV, intermediate 1536, vocab 151669, cross-attention
at every layer, HTSAT embed 64 / depths 2-2-6-2, audio transformer 3 layers; 6 windows, 24-token prompt, 32 new
tokens. Greedy, EOS disabled so every run decodes all tokens. Phases: encode = the audio path (HTSAT, audio
transformer, and for JAX also every layer's cross-attention K/V); prefill = the text part of a 1-token run (for
JAX the prompt but its last token, which the first decoding step reads); decode tokens/s = N * B / the engine's
decode seconds of an N-token run for JAX, (N - 1) * B / the time past the 1-token run for the reference. The
reference is timed by
difference (its 1-token run minus its encode). Medians of --repeats runs after a warm-up run (which also compiles).
On the CPU a "memory floor" row bounds what any implementation can decode: the bytes one step must read (weights,
K/V, cache) at the best rate this machine streams a 1 GB matrix through a product with as many rows as the batch
(JAX or PyTorch, whichever is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers (the small model, random weights, the reference pair)

from af2_jax.config import AF2Config, preset  # noqa: E402
from af2_jax.engine import bucket_windows  # noqa: E402
from af2_jax.generate import engine_for, generate, left_pad  # noqa: E402
from af2_jax.nn.af2 import relayout  # noqa: E402
from tests.helpers import bench_small_config, build_pair, random_model_from  # noqa: E402

NO_EOS = -1


def median_time(fn, repeats):
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(config: AF2Config, batch, windows, prompt_len):
    rng = np.random.default_rng(0)
    t = np.arange(config.audio.window_samples) / config.audio.sample_rate
    audio = np.stack([np.stack([0.5 * np.sin(2 * np.pi * (200 + 50 * b + 30 * w) * t) for w in range(windows)])
                      for b in range(batch)]).astype(np.float32)
    audio += 0.05 * rng.standard_normal(audio.shape).astype(np.float32)
    ids = rng.integers(0, config.tokens.eos, (batch, prompt_len))
    ids[:, 0], ids[:, -1] = config.tokens.media, config.tokens.sep
    return audio, np.ones((batch, windows), np.float32), ids, np.ones_like(ids)


def bench_jax(model, audio, audio_mask, ids, mask, new_tokens, repeats):
    """Phases from the engine's own timings (`generate` runs on it): encode (audio + every layer's cross-attention
    K/V), prefill (the prompt but its last token into the cache, slot insertion), decode (all N new tokens)."""
    run = lambda: generate(model, ids, mask, audio, audio_mask, max_new_tokens=new_tokens, eos_token_id=NO_EOS)  # noqa
    compile_s = run().timings["compile_s"]
    outs = [run() for _ in range(repeats)]
    encode, prefill, decode = (statistics.median(o.timings[k] for o in outs) for k in ("encode_s", "prefill_s",
                                                                                      "decode_s"))
    return {"encode": encode, "prefill": prefill, "decode_tps": new_tokens * ids.shape[0] / decode,
            "total": encode + prefill + decode, "compile": compile_s, "tokens": outs[-1].tokens}


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every LM layer (cross-attention without to_kv, whose K/V are
    precomputed), the final norm and the tied embedding (output projection)."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        if name.startswith(("layers.", "norm.", "embed_tokens.")) and ".to_kv." not in name:
            total += int(np.prod(var.shape)) * var.dtype.itemsize
    return total


def step_bytes(model, batch: int, windows: int, total_len: int) -> int:
    """Bytes one decoding step must read: the weights (`decode_weight_bytes`), every layer's cross-attention K/V
    and text KV cache for every row."""
    cfg = model.config
    itemsize = jnp.dtype(model.dtype).itemsize
    media = bucket_windows(windows) * cfg.htsat.tokens_per_window
    per_row = cfg.lm.num_layers * 2 * (cfg.cross_attention.heads * media * cfg.cross_attention.dim_head +
                                       cfg.lm.num_kv_heads * total_len * cfg.lm.head_dim)
    return decode_weight_bytes(model) + batch * per_row * itemsize


def read_rate(rows: int, repeats: int = 5) -> float:
    """Best bytes/s at which this machine streams a 1 GB float32 matrix through a (rows x 1024) @ (1024 x 262144)
    product, in JAX and in PyTorch: the rate a decoding step's weight reads cannot beat."""
    import torch

    weight = np.random.default_rng(0).standard_normal((1024, 1 << 18), dtype=np.float32)
    x = np.ones((rows, 1024), np.float32)
    product = jax.jit(jnp.matmul)
    wj, xj = jnp.asarray(weight), jnp.asarray(x)
    wt, xt = torch.from_numpy(weight), torch.from_numpy(x)
    best = float("inf")
    for run in (lambda: product(xj, wj).block_until_ready(), lambda: xt @ wt):
        run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return weight.nbytes / best


def bench_reference(ref, audio, audio_mask, ids, mask, new_tokens, repeats):
    import torch

    t = torch.from_numpy
    a, am, i, m = t(audio), t(audio_mask), t(ids), t(mask)
    with torch.no_grad():
        t_encode = median_time(lambda: ref.encode_audio(a, am), repeats)
        run = lambda n: ref.generate_greedy(i, m, a, am, n, NO_EOS, 0)  # noqa: E731
        t_one = median_time(lambda: run(1), repeats)
        t_all = median_time(lambda: run(new_tokens), repeats)
        tokens = run(new_tokens)[:, ids.shape[1]:].numpy()
    return {"encode": t_encode, "prefill": t_one - t_encode, "decode_tps": (new_tokens - 1) * ids.shape[0] /
            (t_all - t_one), "total": t_all, "tokens": tokens}


def alternated(models: dict, data, args, show) -> dict:
    """Every model run twice on the same inputs, alternated, so that a noisy machine affects all of them alike;
    `show(name, round, result)` prints a row. Returns each model's greedy tokens."""
    tokens = {}
    for round_ in (1, 2):
        for name, model in models.items():
            result = bench_jax(model, *data, args.new, args.repeats)
            tokens[name] = result["tokens"]
            show(name, round_, result)
    return tokens


def compare_layouts(config, dtype, args):
    """Stacked vs unstacked layers on the same random weights, alternated twice per batch size so that a noisy
    machine affects both alike."""
    models = {"stacked": random_model_from(config, dtype),
              "unstacked": relayout(random_model_from(config, dtype), scan_layers=False)}
    print("| batch | layers | round | encode s | prefill s | decode tok/s | total s | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        def show(name, round_, r):
            print(f"| {batch} | {name} | {round_} | {r['encode']:.3f} | {r['prefill']:.3f} | {r['decode_tps']:.1f} | "
                  f"{r['total']:.3f} | {r['compile']:.1f} |", flush=True)

        tokens = alternated(models, inputs(config, batch, args.windows, args.prompt), args, show)
        print(f"| {batch} | greedy tokens identical across layouts: "
              f"{np.array_equal(tokens['stacked'], tokens['unstacked'])} | | | | | | |")


def compare_dtypes(config, args):
    """float32, bfloat16 and int8 weights (bfloat16 compute, and float32 compute) on the same random weights in the
    serving layout, alternated twice per batch size; and how often int8's greedy tokens equal bfloat16's."""
    from af2_jax.nn.quant import quantize_int8

    models = {"float32": relayout(random_model_from(config, jnp.float32), scan_layers=False),
              "bfloat16": relayout(random_model_from(config, jnp.bfloat16), scan_layers=False)}
    models["int8"] = quantize_int8(relayout(random_model_from(config, jnp.bfloat16), scan_layers=False))
    # int8 values computing in float32: on a CPU, where XLA emulates bfloat16 products, the faster way to use them.
    models["int8, float32 compute"] = quantize_int8(relayout(random_model_from(config, jnp.float32),
                                                             scan_layers=False))
    print("| batch | weights | round | decode tok/s | weight bytes per step |")
    print("|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        def show(name, round_, r):
            print(f"| {batch} | {name} | {round_} | {r['decode_tps']:.1f} | "
                  f"{decode_weight_bytes(models[name]) / 1e6:.0f} MB |", flush=True)

        tokens = alternated(models, inputs(config, batch, args.windows, args.prompt), args, show)
        same = np.mean(tokens["int8"] == tokens["bfloat16"])
        rows = np.mean(np.all(tokens["int8"] == tokens["bfloat16"], axis=-1))
        print(f"| {batch} | int8 greedy tokens equal to bfloat16's: {100 * same:.1f}% of tokens, "
              f"{100 * rows:.0f}% of rows entirely | | | |")


def count_manifest_compilations(model, items=50, batch_size=8, new_tokens=8):
    """Distinct compiled programs for 50 mixed-length items answered in batches of 8 on the model's engine."""
    rng = np.random.default_rng(1)
    durations = rng.uniform(1, 120, items)  # seconds
    prompt_lens = rng.integers(5, 60, items)
    before = engine_for(model).programs.count
    groups = {}
    for d, p in zip(durations, prompt_lens):
        groups.setdefault(bucket_windows(int(np.ceil(d / 10))), []).append(int(p))
    config = model.config
    for windows, prompts in sorted(groups.items()):
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            audio = np.zeros((len(chunk), windows, config.audio.window_samples), np.float32)
            ids, mask = left_pad([[100] * p for p in chunk], config.tokens.pad)
            generate(model, ids, mask, audio, np.ones((len(chunk), windows), np.float32), max_new_tokens=new_tokens)
    return engine_for(model).programs.count - before, len(groups)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="'small' (the issue's benchmark model) or a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--prompt", type=int, default=24)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--manifest", action="store_true", help="also count compilations for a 50-item manifest")
    p.add_argument("--scan-layers", action="store_true",
                   help="decode with the layers stacked in one lax.scan (default: unstacked, as `infer`)")
    p.add_argument("--compare-layouts", action="store_true",
                   help="JAX only: stacked vs unstacked layers, alternated, on the same weights")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="JAX only: float32, bfloat16 and int8 weights, alternated, on the same random weights")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for the roofline (H100 SXM: 3.35)")
    args = p.parse_args()
    config = bench_small_config() if args.model == "small" else preset(args.model)
    dtype = jnp.dtype(args.dtype)
    jax.config.update("jax_default_matmul_precision", "highest" if dtype == jnp.float32 else "default")
    if args.compare_layouts:
        return compare_layouts(config, dtype, args)
    if args.compare_dtypes:
        return compare_dtypes(config, args)
    model, ref = build_pair(config, not args.no_reference, dtype)
    model = relayout(model, args.scan_layers)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); model {args.model}, {args.dtype}, {args.windows} "
          f"windows, {args.prompt}-token prompt, {args.new} new tokens; layers "
          f"{'stacked' if args.scan_layers else 'unstacked'}")
    print("| batch | impl | encode s | prefill s | decode tok/s | total s | compile s |")
    print("|---|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        data = inputs(config, batch, args.windows, args.prompt)
        ours = bench_jax(model, *data, args.new, args.repeats)
        print(f"| {batch} | jax | {ours['encode']:.3f} | {ours['prefill']:.3f} | {ours['decode_tps']:.1f} | "
              f"{ours['total']:.3f} | {ours['compile']:.1f} |", flush=True)
        if device.platform == "gpu":
            weights = decode_weight_bytes(model)
            steps_per_s = ours["decode_tps"] / batch
            print(f"|   | roofline | a step reads {weights / 1e9:.2f} GB of weights: {weights * steps_per_s / 1e12:.2f} "
                  f"TB/s = {100 * weights * steps_per_s / (args.hbm_tbps * 1e12):.0f}% of {args.hbm_tbps} TB/s | | | |",
                  flush=True)
        if ref is not None:
            theirs = bench_reference(ref, *data, args.new, args.repeats)
            if device.platform == "cpu":
                nbytes, rate = step_bytes(model, batch, args.windows, args.prompt + args.new), read_rate(batch)
                floor_tps = batch * rate / nbytes
                print(f"| {batch} | memory floor | a step reads {nbytes / 1e6:.0f} MB; best {batch}-row matmul read "
                      f"rate {rate / 1e9:.1f} GB/s | | {floor_tps:.1f} (at most "
                      f"{floor_tps / theirs['decode_tps']:.2f}x the reference) | | |", flush=True)
            same = np.array_equal(ours["tokens"], theirs["tokens"])
            print(f"| {batch} | reference | {theirs['encode']:.3f} | {theirs['prefill']:.3f} | "
                  f"{theirs['decode_tps']:.1f} | {theirs['total']:.3f} | - |")
            print(f"| {batch} | ratio | {theirs['encode'] / ours['encode']:.2f}x | "
                  f"{theirs['prefill'] / ours['prefill']:.2f}x | {ours['decode_tps'] / theirs['decode_tps']:.2f}x | "
                  f"{theirs['total'] / ours['total']:.2f}x | greedy tokens identical: {same} |", flush=True)
    if args.manifest:
        compiled, buckets = count_manifest_compilations(model)
        print(f"manifest of 50 mixed-length items (batch 8): {compiled} compilation(s) over {buckets} window "
              "bucket(s)")


if __name__ == "__main__":
    main()
