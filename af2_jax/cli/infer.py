"""`python -m af2_jax.infer`: ask Audio Flamingo 2 about audio files.

    python -m af2_jax.infer --audio clip.wav --prompt "What is happening?"
    python -m af2_jax.infer --audio a.wav b.flac --prompt "Describe the sound." --json
    python -m af2_jax.infer --manifest items.jsonl --output answers.jsonl      # resumable
    python -m af2_jax.infer --prompt "What rhymes with orange?"                # a question without audio

Manifest lines are JSON objects {"audio": PATH or [PATH, ...] (several clips in one question; absent or [] for a
question without audio), "prompt": TEXT, "id": optional string or integer, by default the line number}. A line that is not such an object stops the run (fix the line); an item whose fields have the wrong
type, or whose audio or prompt cannot be used, gets an "error" line and the others go on. Each item becomes one
output line {"id", "audio", "prompt", "answer"} (or "error"), appended as the item finishes; rerunning the same
command after a kill skips what is already answered and retries the items that failed; a finished run rewrites the
output in manifest order. The exit code is 1 when the finished output holds an error line (0 with --keep-going).
--output must be a new file or one written by this command for the same questions: another file, the manifest
itself, or an output that answered an id for another audio or prompt is refused and left as it is; a second run
on the same output while one runs is refused (OUT.jsonl.lock).

Requests decode with continuous batching: --slots of them at once, a finished one making room for the next.

Checkpoint: --checkpoint DIR (from `python -m af2_jax.convert`); without it, the converted release in the cache
($AF2_JAX_HOME, default ~/.cache/af2_jax) if there is one, else the embedded demo model, announced as such.
--download fetches the release from the Hugging Face hub (37 GB) and converts it into the cache.

Audio: whatever libsndfile reads (wav, flac, ogg, opus, mp3, ...); m4a/mp4, aac and webm with PyAV
(pip install -e '.[av]').

Compiled programs are cached on disk in $AF2_JAX_HOME/xla (or the folder JAX_COMPILATION_CACHE_DIR names), so later
runs of the same shapes skip compiling; AF2_JAX_COMPILATION_CACHE=0 turns that off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from af2_jax.checkpoint.resolve import RELEASE_REPO
from af2_jax.cli.common import (EXIT_CODES, EXIT_INPUT, QUANTIZE_HELP, load_model, prog, run_command, setup_logging,
                               warn_if_cpu_only)
from af2_jax.config import MAX_WINDOWS_LIMIT, check_max_windows
from af2_jax.engine import Sampling

log = logging.getLogger("af2_jax.infer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("infer"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to answer")
    src.add_argument("--audio", nargs="+", metavar="FILE", help="audio file(s); each gets --prompt")
    src.add_argument("--prompt", help="the question asked about every --audio file")
    src.add_argument("--manifest", metavar="IN.jsonl", help='one {"audio", "prompt", "id"?} object per line')
    src.add_argument("--output", metavar="OUT.jsonl", help="answers for --manifest (resumable)")
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR", help="af2-jax checkpoint folder")
    model.add_argument("--download", action="store_true",
                       help=f"download {RELEASE_REPO} (37 GB) and convert it into the cache first")
    model.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    model.add_argument("--quantize", choices=["int8"], help=QUANTIZE_HELP)
    model.add_argument("--mesh", metavar="SPEC",
                       help="shard over devices, e.g. 'tensor=4' or 'data=2,tensor=4' (axes data, fsdp, tensor); "
                            "default: one device")
    model.add_argument("--scan-layers", action="store_true",
                       help="keep the LM layers stacked in one lax.scan: faster compilation, slower decoding "
                            "(default: one buffer per layer)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, as the benchmarks)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    gen.add_argument("--max-windows", type=int,
                     help=f"windows per clip (10 s each in AF2), 1..{MAX_WINDOWS_LIMIT}; default: the model's "
                          "(12 = 2 minutes for the release)")
    gen.add_argument("--slots", "--batch-size", dest="slots", type=int, default=8,
                     help="requests decoding at once (continuous batching; --batch-size is its old name)")
    multi = p.add_argument_group("multi-host (auto-detected on TPU pods and under SLURM)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per answer")
    out.add_argument("--keep-going", action="store_true",
                     help="(--manifest) exit 0 even when some items end with an error line")
    out.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if args.manifest and args.audio:
        p.error("--manifest and --audio are two different modes; pass one")
    if not args.manifest and args.prompt is None:
        p.error("pass --audio FILE... --prompt TEXT, --prompt TEXT alone (a question without audio), or --manifest "
                "IN.jsonl --output OUT.jsonl")
    if args.audio and args.prompt is None:
        p.error("--audio needs --prompt")
    if args.manifest and not args.output:
        p.error("--manifest needs --output OUT.jsonl")
    if args.output and not args.manifest:
        p.error("--output is for --manifest mode")
    if args.stream and (args.manifest or args.json):
        p.error("--stream prints plain text for --audio mode; it does not combine with --manifest or --json")
    if args.quantize and args.scan_layers:
        p.error("--quantize keeps one buffer per layer (the serving layout); it does not combine with --scan-layers")
    if args.checkpoint and args.download:
        p.error("--checkpoint and --download both choose the checkpoint; pass one")
    if args.max_windows is not None:
        try:
            check_max_windows(args.max_windows, "--max-windows ")
        except ValueError as err:
            p.error(str(err))
    if args.keep_going and not args.manifest:
        p.error("--keep-going is for --manifest mode")
    if args.slots < 1:
        p.error("--slots must be >= 1")
    try:  # the one place the decoding rule is checked; a value it refuses is a bad argument here
        args.sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as err:
        p.error(str(err))


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    setup_logging()
    return run_command(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    from af2_jax.checkpoint.folder import read_config
    from af2_jax.checkpoint.resolve import resolve_checkpoint
    from af2_jax.distributed import maybe_initialize_distributed
    from af2_jax.generate import engine_for, slots_for
    from af2_jax.manifest import ManifestJob
    from af2_jax.pipeline import Item, prepare
    from af2_jax.sharding import check_batch_splits, make_mesh
    from af2_jax.tokenizer import load_tokenizer

    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    warn_if_cpu_only()

    # A mesh that cannot work is refused before anything is loaded or compiled.
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_batch_splits(mesh, args.slots, "--slots", fix="pass a multiple of {data}")
    with contextlib.ExitStack() as stack:
        job = stack.enter_context(ManifestJob(args.manifest, args.output)) if args.manifest else None
        path, why = resolve_checkpoint(args.checkpoint, download=args.download, dtype=args.dtype)
        config, _ = read_config(path)
        tokenizer = load_tokenizer(path, config.tokens)
        _check_context(args, config, tokenizer, path)
        items = [Item(np.zeros((0, config.audio.window_samples), np.float32), np.zeros((0,), np.float32),
                      tokenizer.prompt_ids(args.prompt, clips=0))] if args.prompt is not None else None
        if args.audio:  # read every input before the (slow) model load, so a bad file fails at once
            start = time.perf_counter()
            items = [prepare(tokenizer, audio, args.prompt, args.max_windows, config.audio) for audio in args.audio]
            log.info("audio: %d file(s), %d window(s) loaded in %.2f s", len(items),
                     sum(it.windows.shape[0] for it in items), time.perf_counter() - start)
        model = load_model(path, why, dtype=args.dtype, mesh=mesh, scan_layers=args.scan_layers,
                           quantize=args.quantize)
        # A few files need no more slots than files (on a CPU a step costs about its slot count).
        slots = args.slots if job is not None else min(args.slots, slots_for(len(items), mesh))
        engine = engine_for(model, tokenizer, slots=slots, mesh=mesh,
                            max_len=tokenizer.max_prompt_tokens + args.max_new_tokens, max_windows=args.max_windows)
        if job is not None:
            errors = job.run(engine, args.sampling)
            _log_timings(engine.timings)
            return EXIT_INPUT if errors and not args.keep_going else 0
        return _run_files(args, engine, tokenizer, items)


def _check_context(args, config, tokenizer, path: Path) -> None:
    """Refuses answers longer than the model's positions can hold after the longest prompt, before anything is
    loaded or compiled (the text cache alone would be sized prompt + --max-new-tokens)."""
    positions = config.lm.max_position_embeddings
    most = positions - tokenizer.max_prompt_tokens
    if args.max_new_tokens > most:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context: a prompt (up to "
                         f"{tokenizer.max_prompt_tokens} tokens) and its answer share {positions} positions "
                         f"(lm.max_position_embeddings in {path / 'config.json'}); pass --max-new-tokens {most} "
                         "or less")


def _run_files(args, engine, tokenizer, items) -> int:
    from af2_jax.distributed import is_main_process
    from af2_jax.engine import Request

    main = is_main_process()  # every process decodes; only process 0 prints
    requests = [Request(it.prompt_ids, (it.windows, it.window_mask) if len(it.windows) else None, args.sampling)
                for it in items]
    if args.stream:
        for path, item, request in zip(args.audio or ["(no audio)"], items, requests):
            if main:
                print(f"{path}: ", end="", flush=True)
            engine.run([request], on_token=_Streamer(tokenizer, item.prompt_ids) if main else None)
            if main:
                print(flush=True)
    else:
        done = engine.run(requests)
        for path, item, completion in zip(args.audio or [None], items, done if main else []):
            text = tokenizer.answer(item.prompt_ids, completion.tokens)
            if args.json:
                print(json.dumps({"audio": path, "prompt": args.prompt, "answer": text}), flush=True)
            else:
                print(f"{path}: {text}" if len(args.audio or []) > 1 else text, flush=True)
    _log_timings(engine.timings)
    return 0


def _log_timings(timings: dict) -> None:
    if timings:
        log.info("compile %.2f s; audio encoding %.2f s; prefill %.2f s; decoding %.2f s (%d tokens, %.1f tokens/s)",
                 timings["compile_s"], timings["encode_s"], timings["prefill_s"], timings["decode_s"],
                 timings["tokens"], timings["tokens"] / max(timings["decode_s"], 1e-9))


class _Streamer:
    """Prints the answer as tokens arrive (decoding the growing sequence so multi-byte characters come out whole)."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, request: int, tokens: list[int]):
        self.ids.extend(tokens)
        text = self.tokenizer.answer(self.prompt_ids, self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


