"""Evaluation throughput: `python -m af2_jax.eval`'s prediction loop (every item fed to one engine, continuous
batching on --slots slots) against answering the same items one at a time through `af2_jax.answer` (what the
original's evaluation script does), side by side in one run, on the demo model and the demo set's held-out items.

    python bench/eval_throughput.py                   # 60 held-out items per task (360), 8 slots
    python bench/eval_throughput.py --per-task 8 --json bench/results/eval_throughput.json

Both sides load the same checkpoint the same way (bfloat16, the serving layout, `eval`'s default), decode greedily
with eval's default 256 new tokens (answers end at EOS), and run once untimed on a few items first so neither pays
for compiling. Reported: items/s of each and their ratio, and eval's per-task accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import af2_jax  # noqa: E402
from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT  # noqa: E402
from af2_jax.evaluation import EvalOutput, load_eval_config, plan, predict  # noqa: E402
from af2_jax.generate import engine_for  # noqa: E402
from tests.helpers import write_demo_held_out  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-task", type=int, default=60)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    write_demo_held_out(work / "data", args.per_task)
    config = load_eval_config(REPO / "eval" / "demo.yaml")
    items = plan(config, work / "data").items
    model, tokenizer = af2_jax.load(DEMO_CHECKPOINT), af2_jax.load_tokenizer(DEMO_CHECKPOINT)
    longest = max(b.decoding.max_new_tokens for b in config.benchmarks)
    engine = engine_for(model, tokenizer, slots=args.slots, max_len=tokenizer.max_prompt_tokens + longest)

    def batched(out: Path, chosen) -> float:
        with EvalOutput(out, config) as output:
            made, seconds = predict(engine, output, chosen, config)
            output.finish(chosen, {"wall_s": seconds, "items_per_s": made / seconds}, {})
        return seconds

    def one_at_a_time(chosen) -> float:
        start = time.perf_counter()
        for it in chosen:
            af2_jax.answer(model, tokenizer, it.audio, it.prompt)
        return time.perf_counter() - start

    warm = [items[i] for i in range(0, len(items), max(1, len(items) // 8))][:8]
    batched(work / "warm", warm)
    one_at_a_time(warm[:2])
    eval_s = batched(work / "out", items)
    alone_s = one_at_a_time(items)
    results = json.loads((work / "out" / "results.json").read_text())["benchmarks"]
    numbers = {"items": len(items), "slots": args.slots, "eval_items_per_s": len(items) / eval_s,
               "answer_items_per_s": len(items) / alone_s, "ratio": alone_s / eval_s,
               "accuracy": {name: r["value"] for name, r in results.items()}}
    print(f"{len(items)} items: eval {numbers['eval_items_per_s']:.2f} items/s ({eval_s:.1f} s), one at a time "
          f"through af2_jax.answer {numbers['answer_items_per_s']:.2f} items/s ({alone_s:.1f} s): "
          f"{numbers['ratio']:.2f}x")
    for name, value in numbers["accuracy"].items():
        print(f"  {name}: {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
