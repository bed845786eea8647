"""Train-step speed, side by side on the same weights and batch: the JAX train step (one jitted function: forward,
backward, per-module clipping, AdamW) vs the PyTorch reference (tests/reference) doing the same with
torch.optim.AdamW and clip_grad_norm_ per module, as the original's loop. CPU, float32.

    python bench/train_step.py [--batch 4] [--windows 1] [--tokens 64] [--trainable sft] [--repeats 5]

Model: the generation benchmark's small AF2 (LM hidden 512, 8 layers, vocab 151669; HTSAT embed 64, depths 2-2-6-2;
audio transformer 3 layers). Reports median step time, tokens/s (non-padding tokens) and the ratio, and checks that
both sides computed the same loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers (the generation benchmark's small model and the reference pair)

from af2_jax.training.config import OptimSection  # noqa: E402
from af2_jax.training.labels import IGNORE, make_labels  # noqa: E402
from af2_jax.training.step import TrainState, make_train_step, optimizer, split_model  # noqa: E402
from tests.helpers import bench_small_config, build_pair  # noqa: E402


def make_batch(config, batch, windows, tokens, seed=0):
    rng = np.random.default_rng(seed)
    t = config.tokens
    ids = rng.integers(0, 150000, (batch, tokens)).astype(np.int32)
    ids[:, 0] = t.media
    ids[:, tokens // 2] = t.sep
    ids[:, -2:] = [t.end_of_chunk, t.eos]
    return {"audio_x": rng.uniform(-0.5, 0.5, (batch, windows, config.audio.window_samples)).astype(np.float32),
            "audio_x_mask": np.ones((batch, windows), np.float32), "input_ids": ids,
            "attention_mask": np.ones_like(ids), "labels": make_labels(ids, t).astype(np.int32)}


def torch_step_fn(ref, batch, trainable_prefixes, lr):
    import torch

    params = [(n, p) for n, p in ref.named_parameters()]
    for n, p in params:
        p.requires_grad_(n.startswith(trainable_prefixes))
    train = [p for n, p in params if p.requires_grad]
    groups = {}
    for n, p in params:
        if p.requires_grad:
            parts = n.split(".")
            key = ".".join(parts[:4]) if parts[:3] == ["lang_encoder", "model", "layers"] else parts[0]
            groups.setdefault(key, []).append(p)
    opt = torch.optim.AdamW(train, lr=lr, weight_decay=0.1)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}

    def step():
        opt.zero_grad(set_to_none=True)
        media, media_mask = ref.encode_audio(t["audio_x"], t["audio_x_mask"])
        logits = ref(t["input_ids"].long(), t["attention_mask"].long(), media, media_mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 t["labels"][:, 1:].long().reshape(-1), ignore_index=IGNORE)
        loss.backward()
        for members in groups.values():
            torch.nn.utils.clip_grad_norm_(members, 1.0)
        opt.step()
        return float(loss.detach())

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--trainable", default="sft", choices=["pretrain", "sft"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    import torch

    torch.set_num_threads(2)
    config = bench_small_config()
    model, ref = build_pair(config, True, jnp.float32)
    ref.train()
    ref.clap.nvclap.eval()  # the encoder in its evaluation form on both sides (BatchNorm running statistics)
    batch = make_batch(config, args.batch, args.windows, args.tokens)
    optim = OptimSection(trainable=args.trainable, learning_rate=1e-5, clip="per_module")
    graphdef, params, frozen = split_model(model, args.trainable)
    tx = optimizer(optim, 100)
    step = jax.jit(make_train_step(graphdef, tx, optim), donate_argnums=(0,))
    state = TrainState(params, tx.init(params), jnp.int32(0))
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    first_jax_loss = float(metrics.loss)
    jax_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        jax_times.append(time.perf_counter() - start)
    prefixes = {"pretrain": ("audio_transformer_clap.", "lang_encoder.model.embed_tokens."),
                "sft": ("clap.", "audio_transformer_clap.", "lang_encoder.model.embed_tokens.")}[args.trainable]
    prefixes = prefixes + tuple(f"lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound."
                                for i in range(config.lm.num_layers))
    torch_step = torch_step_fn(ref, batch, prefixes, 1e-5)
    first_torch_loss = torch_step()
    torch_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch_step()
        torch_times.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    trainable = sum(int(x.size) for x in jax.tree.leaves(state.params))
    result = {"batch": args.batch, "windows": args.windows, "tokens": args.tokens, "trainable": args.trainable,
              "trainable_parameters": trainable, "jax_step_s": jax_s, "torch_step_s": torch_s,
              "jax_tokens_per_s": tokens / jax_s, "torch_tokens_per_s": tokens / torch_s, "ratio": torch_s / jax_s,
              "jax_compile_and_first_step_s": compile_and_first, "first_loss_jax": first_jax_loss,
              "first_loss_torch": first_torch_loss, "device": jax.devices()[0].device_kind}
    print("| impl | step s | tokens/s |\n|---|---|---|")
    print(f"| jax | {jax_s:.3f} | {tokens / jax_s:.0f} |\n| reference | {torch_s:.3f} | {tokens / torch_s:.0f} |")
    print(f"| ratio | {torch_s / jax_s:.2f}x | first-step loss jax {first_jax_loss:.5f} vs torch "
          f"{first_torch_loss:.5f} |")
    print(f"JAX compile + first step {compile_and_first:.1f} s; {trainable} trainable parameters ({args.trainable})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
