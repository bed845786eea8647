"""`python -m af2_jax.eval`: run Audio Flamingo 2 on benchmarks and score it as the field does.

    python -m af2_jax.eval --config eval/af2.yaml --data-root DATA --checkpoint ckpt/af2 --output runs/eval
    python -m af2_jax.eval --config eval/af2.yaml --data-root DATA --checkpoint ckpt/af2 --output runs/eval \\
        --benchmarks mmau_sound,mmau_music --limit 100
    python -m af2_jax.eval score runs/eval                     # results and report again, from the predictions
    python -m af2_jax.eval score preds/ --config eval/af2.yaml   # predictions made elsewhere (the original's, ...)

The config (YAML; eval/README.md) lists benchmarks: a manifest in the original format under --data-root, a metric
(exact_match, accuracy, mmau_choice, f1_macro, f1_micro, bleu_4, rouge_l, cider_d, meteor, wer; judge, spice and
spider are skipped with the reason), an optional prompt template, decoding, group_by and the reported value.

Items are answered with continuous batching on the engine (--slots at once). OUT gets config.yaml (the config run),
predictions.jsonl (a line per item, appended as it finishes: a rerun of the same command after a kill answers only
what is left), results.json, report.md and report.png. An item whose audio is missing or cannot be decoded is
counted and listed as missing, never scored as wrong, and the exit code stays 0. A benchmark whose data cannot be
used (no folder, a damaged manifest, an item without a reference) is skipped with one line; the others run and
the exit code is 1. Config errors (an unknown key or metric) stop the command at once with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import time

from af2_jax.cli.common import (EXIT_CODES, EXIT_INPUT, QUANTIZE_HELP, load_model, prog, run_command, setup_logging,
                               warn_if_cpu_only)
from af2_jax.config import MAX_WINDOWS_LIMIT, check_max_windows

log = logging.getLogger("af2_jax.eval")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("eval"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--config", metavar="FILE", required=True, help="evaluation config (YAML), e.g. eval/af2.yaml")
    what.add_argument("--data-root", metavar="DIR",
                      help="folder holding the benchmarks' manifests and audio; default: the config's data_root")
    what.add_argument("--output", metavar="OUT", required=True, help="folder for the outputs (resumable)")
    what.add_argument("--benchmarks", metavar="A,B", help="run only these benchmarks of the config")
    what.add_argument("--limit", type=int, metavar="N", help="the first N items of each benchmark")
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="af2-jax checkpoint folder; default: the config's checkpoint, else the converted release "
                            "in the cache, else the demo model (announced)")
    model.add_argument("--dtype", choices=["bfloat16", "float32"],
                       help="compute dtype; default: the config's dtype, else bfloat16")
    model.add_argument("--quantize", choices=["int8"], help=QUANTIZE_HELP)
    model.add_argument("--mesh", metavar="SPEC",
                       help="shard over devices, e.g. 'tensor=4' or 'data=2,tensor=4'; default: one device")
    engine = p.add_argument_group("engine")
    engine.add_argument("--slots", type=int, default=8, help="items decoding at once (continuous batching)")
    engine.add_argument("--max-windows", type=int,
                        help=f"windows per clip (1..{MAX_WINDOWS_LIMIT}; longer clips are cut, with a warning); "
                             "default: the model's")
    engine.add_argument("--judge-url", metavar="URL",
                        help="an OpenAI-compatible server to judge open answers (not implemented yet: judge "
                             "benchmarks are skipped)")
    multi = p.add_argument_group("multi-host (auto-detected on TPU pods and under SLURM)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("eval") + " score", epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Recompute OUT/results.json, report.md and report.png from "
                                            "OUT/predictions.jsonl, without a model.")
    p.add_argument("output", metavar="OUT", help="a folder with predictions.jsonl")
    p.add_argument("--config", metavar="FILE",
                   help="the benchmarks' config; default: OUT/config.yaml (give it for predictions made elsewhere: "
                        "lines with benchmark, id, prediction, reference)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        args = _score_parser().parse_args(argv[1:])
        setup_logging()
        return run_command(lambda: _score(args), debug=args.debug)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.slots < 1:
        parser.error("--slots must be >= 1")
    if args.max_windows is not None:
        try:
            check_max_windows(args.max_windows, "--max-windows ")
        except ValueError as err:
            parser.error(str(err))
    if args.judge_url:
        parser.error("--judge-url: LLM-judge scoring is not implemented yet; leave it out (judge benchmarks are "
                     "skipped, each with one line)")
    setup_logging()
    return run_command(lambda: _run(args), debug=args.debug)


def _score(args) -> int:
    from af2_jax.evaluation import score_folder

    results = score_folder(args.output, args.config)
    _log_results(results, args.output, reasons=True)
    return 0


def _run(args) -> int:
    import dataclasses

    from af2_jax.checkpoint.folder import read_config
    from af2_jax.checkpoint.resolve import resolve_checkpoint
    from af2_jax.distributed import maybe_initialize_distributed
    from af2_jax.evaluation import EvalOutput, load_eval_config, plan, predict
    from af2_jax.generate import engine_for
    from af2_jax.sharding import check_batch_splits, make_mesh
    from af2_jax.tokenizer import load_tokenizer

    start = time.perf_counter()
    config = load_eval_config(args.config)
    if args.benchmarks:
        config = config.select([name.strip() for name in args.benchmarks.split(",") if name.strip()])
    data_root = args.data_root or config.data_root
    if not data_root:
        raise ValueError("no data root: pass --data-root DIR (the folder holding the benchmarks' manifests), or set "
                         "data_root in the config")
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    warn_if_cpu_only()
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_batch_splits(mesh, args.slots, "--slots", fix="pass a multiple of {data}")
    dtype = args.dtype or config.dtype or "bfloat16"
    path, why = resolve_checkpoint(args.checkpoint or config.checkpoint, dtype=dtype)
    # The run's settings, written to OUT/config.yaml: a rerun into OUT must agree with them.
    config = dataclasses.replace(config, checkpoint=str(path.resolve()), data_root=str(data_root), dtype=dtype,
                                 quantize=args.quantize or config.quantize,
                                 max_windows=args.max_windows or config.max_windows)
    work = plan(config, data_root, args.limit)
    with EvalOutput(args.output, config) as output:
        pending = output.pending(work.items)
        log.info("%d prediction(s) planned, %d already in %s, %d to go", len(work.items),
                 len(work.items) - len(pending), args.output, len(pending))
        made, seconds = 0, 0.0
        if pending:
            model_config, _ = read_config(path)
            tokenizer = load_tokenizer(path, model_config.tokens)
            model = load_model(path, why, dtype=dtype, mesh=mesh, quantize=config.quantize)
            longest = max(b.decoding.max_new_tokens for b in config.benchmarks)
            engine = engine_for(model, tokenizer, slots=args.slots, mesh=mesh,
                                max_len=tokenizer.max_prompt_tokens + longest, max_windows=config.max_windows)
            made, seconds = predict(engine, output, pending, config)
        facts = {"checkpoint": config.checkpoint, "wall_s": round(time.perf_counter() - start, 3),
                 "items_per_s": round(made / seconds, 4) if seconds else None}
        if not made:  # nothing left to predict: the run that made the predictions keeps its figures
            facts.update(output.earlier_facts())
        results = output.finish(work.items, facts, work.skipped)
    if results:
        _log_results(results, args.output)
    if work.problems:
        log.error("benchmark(s) skipped because their data could not be used: %s (lines above)",
                  ", ".join(work.problems))
        return EXIT_INPUT
    return 0


def _log_results(results: dict, folder, *, reasons: bool = False) -> None:
    """One line per benchmark; a skipped one's reason only with `reasons` (a run has said it already)."""
    for name, r in results["benchmarks"].items():
        if r["value"] is None:
            log.info("%s: skipped%s", name, f" ({r.get('skipped')})" if reasons else "")
        else:
            reported = "" if r["reported"] is None else f", reported {r['reported']:.4f}"
            log.info("%s: %s %.4f over %d item(s)%s%s", name, r["metric"], r["value"], r["n"], reported,
                     f", {r['missing']} missing" if r["missing"] else "")
    log.info("wrote %s/results.json and report.md", folder)
