"""Audio-encoder throughput: int16 round trip + log-mel + HTSAT at a release size, random weights, one jitted call.

    python bench/encode_audio.py [--model af2-3b] [--windows 12] [--repeats 5] [--dtypes float32,bfloat16]

Reports windows per second (median of `--repeats` timed calls after one warm-up call) and, separately, the time
to trace and compile. float32 runs use "highest" matmul precision (the parity setting; on GPUs the default would
use TF32); bfloat16 runs keep weights and activations in bfloat16 with float32 normalisation statistics and
softmax. The weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.config import preset
from af2_jax.nn.htsat import HTSAT, encode_windows


def bench(model: str, windows: int, repeats: int, dtype_name: str) -> dict:
    cfg = preset(model)
    dtype = jnp.dtype(dtype_name)
    precision = "highest" if dtype == jnp.float32 else "default"
    encoder = HTSAT(cfg.htsat, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (windows, cfg.audio.window_samples)).astype(np.float32)
    audio = jax.device_put(audio)

    def encode(state, x):
        return encode_windows(nnx.merge(graphdef, state), x, cfg.audio)

    with jax.default_matmul_precision(precision):
        start = time.perf_counter()
        compiled = jax.jit(encode).lower(state, audio).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(state, audio))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, audio))
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"model": model, "dtype": dtype_name, "matmul_precision": precision, "windows": windows,
            "compile_s": round(compile_s, 2), "median_s": round(step, 4), "min_s": round(min(times), 4),
            "windows_per_s": round(windows / step, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="af2-3b")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = jax.devices()[0]
    header = (f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
              f"jax {jax.__version__}; python {platform.python_version()}")
    print(header)
    print("| model | dtype | matmul precision | windows | compile s | median s | windows/s |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for dtype_name in args.dtypes.split(","):
        r = bench(args.model, args.windows, args.repeats, dtype_name)
        results.append(r)
        print(f"| {r['model']} | {r['dtype']} | {r['matmul_precision']} | {r['windows']} | {r['compile_s']} | "
              f"{r['median_s']} | {r['windows_per_s']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
