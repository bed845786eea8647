"""`python -m af2_jax.infer`: ask Audio Flamingo 2 about audio files.

    python -m af2_jax.infer --audio clip.wav --prompt "What is happening?"
    python -m af2_jax.infer --audio a.wav b.flac --prompt "Describe the sound." --json
    python -m af2_jax.infer --manifest items.jsonl --output answers.jsonl      # resumable

Manifest lines are JSON objects {"audio": PATH, "prompt": TEXT, "id": optional}. Each answered item becomes one
output line {"id", "audio", "prompt", "answer"} (or "error" for an item that cannot be used), written and flushed
batch by batch; rerunning the same command after a kill skips what is already in the output.

Checkpoint: --checkpoint DIR (from `python -m af2_jax.convert`); without it, the converted release in the cache
($AF2_JAX_HOME, default ~/.cache/af2_jax) if there is one, else the embedded demo model, announced as such.
Compiled programs are cached on disk in $AF2_JAX_HOME/xla (or $JAX_COMPILATION_CACHE_DIR), so later runs of the
same shapes start without compiling.
--download fetches the release from the Hugging Face hub (37 GB) and converts it into the cache.

Exit codes: 0 done, 1 an input cannot be used (one-line error), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from af2_jax.config import MAX_WINDOWS_LIMIT

log = logging.getLogger("af2_jax.infer")

RELEASE_REPO = "nvidia/audio-flamingo-2"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_model"


def cache_dir() -> Path:
    return Path(os.environ.get("AF2_JAX_HOME", Path.home() / ".cache" / "af2_jax"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m af2_jax.infer", description=__doc__,
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
    gen.add_argument("--batch-size", type=int, default=8)
    multi = p.add_argument_group("multi-host (auto-detected on TPU pods and under SLURM)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per answer")
    out.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if args.manifest and args.audio:
        p.error("--manifest and --audio are two different modes; pass one")
    if not args.manifest and not args.audio:
        p.error("pass --audio FILE... --prompt TEXT, or --manifest IN.jsonl --output OUT.jsonl")
    if args.audio and args.prompt is None:
        p.error("--audio needs --prompt")
    if args.manifest and not args.output:
        p.error("--manifest needs --output OUT.jsonl")
    if args.output and not args.manifest:
        p.error("--output is for --manifest mode")
    if args.stream and (args.manifest or args.json):
        p.error("--stream prints plain text for --audio mode; it does not combine with --manifest or --json")
    if args.checkpoint and args.download:
        p.error("--checkpoint and --download both choose the checkpoint; pass one")
    if args.max_windows is not None and not 1 <= args.max_windows <= MAX_WINDOWS_LIMIT:
        p.error(f"--max-windows must be in 1..{MAX_WINDOWS_LIMIT}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or \
            (args.top_p is not None and not 0 < args.top_p <= 1):
        p.error("need --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1")


def resolve_checkpoint(args) -> tuple[Path, str]:
    from af2_jax.checkpoint.reader import CheckpointError

    release = cache_dir() / "audio-flamingo-2"
    if args.checkpoint:
        return Path(args.checkpoint), "given"
    if args.download:
        from af2_jax.checkpoint.convert import convert

        if not release.exists():
            log.info("downloading %s and converting it into %s", RELEASE_REPO, release)
            convert(RELEASE_REPO, release, dtype=args.dtype)
        return release, "the converted release in the cache"
    if (release / "config.json").is_file():
        return release, "the converted release in the cache"
    if (DEMO_CHECKPOINT / "config.json").is_file():
        return DEMO_CHECKPOINT, "the embedded DEMO model (small, trained here on toy sounds; not AF2's release)"
    raise CheckpointError(f"no checkpoint: pass --checkpoint DIR (made by `python -m af2_jax.convert`), or "
                          f"--download to fetch and convert {RELEASE_REPO} (37 GB) into {release}")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.simplefilter("default")
    logging.captureWarnings(True)
    from af2_jax.audio.io import AudioError
    from af2_jax.checkpoint.reader import CheckpointError
    from af2_jax.tokenizer import TokenizerError

    try:
        return _run(args)
    except (AudioError, CheckpointError, TokenizerError, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def _load(args, path: Path, why: str, mesh):
    import jax

    import af2_jax
    from af2_jax.sharding import format_mesh

    start = time.perf_counter()
    model = af2_jax.load(path, dtype=args.dtype, mesh=mesh, scan_layers=args.scan_layers)
    device = jax.devices()[0]
    log.info("checkpoint: %s (%s); dtype %s; device %s (%s) x%d; mesh: %s; loaded in %.1f s",
             path, why, args.dtype, device.platform, device.device_kind, jax.device_count(),
             format_mesh(dict(mesh.shape)) if mesh else "none (single device)", time.perf_counter() - start)
    return model


def _sampling(args, mesh) -> dict:
    import jax

    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, key=jax.random.key(args.seed), mesh=mesh)


def _enable_compilation_cache() -> None:
    """Compiled programs are kept on disk ($JAX_COMPILATION_CACHE_DIR, default $AF2_JAX_HOME/xla), so a second run
    of the same shapes skips compilation (over a minute on GPUs for the release size)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def _run(args) -> int:
    import af2_jax
    from af2_jax.distributed import maybe_initialize_distributed

    _enable_compilation_cache()
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from af2_jax.checkpoint.store import read_config
    from af2_jax.pipeline import prepare

    from af2_jax.sharding import make_mesh

    # A mesh that cannot work is refused before anything is loaded or compiled.
    mesh = make_mesh(args.mesh) if args.mesh else None
    path, why = resolve_checkpoint(args)
    config, _ = read_config(path)
    tokenizer = af2_jax.load_tokenizer(path, config.tokens)
    items = None
    if args.audio:  # read every input before the (slow) model load, so a bad file fails at once
        start = time.perf_counter()
        items = [prepare(tokenizer, audio, args.prompt, args.max_windows, config.audio) for audio in args.audio]
        log.info("audio: %d file(s), %d window(s) loaded in %.2f s", len(items),
                 sum(it.windows.shape[0] for it in items), time.perf_counter() - start)
    model = _load(args, path, why, mesh)
    sampling = _sampling(args, mesh)
    if args.manifest:
        return _run_manifest(args, model, tokenizer, sampling)
    return _run_files(args, model, tokenizer, items, sampling)


def _run_files(args, model, tokenizer, items, sampling: dict) -> int:
    from af2_jax.distributed import is_main_process
    from af2_jax.pipeline import answer_items

    main = is_main_process()  # every process decodes; only process 0 prints

    timings: dict = {}
    if args.stream:
        for path, item in zip(args.audio, items):
            streamer = _Streamer(tokenizer, item.prompt_ids) if main else None
            if main:
                print(f"{path}: ", end="", flush=True)
            answer_items(model, tokenizer, [item], on_token=streamer, timings=timings, **sampling)
            if main:
                print(flush=True)
    else:
        for first in range(0, len(items), args.batch_size):
            batch = items[first:first + args.batch_size]
            answers = answer_items(model, tokenizer, batch, timings=timings, **sampling)
            for path, text in zip(args.audio[first:first + args.batch_size], answers if main else []):
                if args.json:
                    print(json.dumps({"audio": path, "prompt": args.prompt, "answer": text}), flush=True)
                else:
                    print(f"{path}: {text}" if len(args.audio) > 1 else text, flush=True)
    _log_timings(timings)
    return 0


def _log_timings(timings: dict) -> None:
    if timings:
        log.info("compile %.2f s; audio encoding %.2f s; decoding %.2f s (%d tokens, %.1f tokens/s)",
                 timings["compile_s"], timings["encode_s"], timings["decode_s"], timings["tokens"],
                 timings["tokens"] / max(timings["decode_s"], 1e-9))


class _Streamer:
    """Prints the answer as tokens arrive (decoding the growing sequence so multi-byte characters come out whole)."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def __call__(self, step: int, tokens):
        if self.stopped:
            return
        token = int(tokens[0])
        self.ids.append(token)
        if token == self.tokenizer.tokens.eos:
            self.stopped = True
        text = self.tokenizer.answer(self.prompt_ids, self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def _read_manifest(path: Path) -> list[dict]:
    items = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not valid JSON; fix the line") from None
            if not isinstance(item, dict) or "audio" not in item or "prompt" not in item:
                raise ValueError(f'{path}:{number}: needs an object with "audio" and "prompt"')
            item["id"] = str(item.get("id", number))
            items.append(item)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids; every line needs a unique \"id\" (or none, to use line numbers)")
    return items


def _done_ids(path: Path, repair: bool) -> set[str]:
    """Ids already in the output. A last line cut off by a kill is ignored, and removed when `repair` (process 0)
    so appending stays valid JSONL."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(good) != len(data) and repair:
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with open(path, "r+b") as f:
            f.truncate(len(good))
    done = set()
    for line in good.decode().splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def _window_count(path: str, max_windows: int, window_seconds: float) -> int:
    """Windows a file will need (from its header; 1 if it cannot be read, the error surfaces when it is loaded)."""
    import math

    try:
        import soundfile

        seconds = soundfile.info(path).duration
    except Exception:
        return 1
    return max(1, min(max_windows, math.ceil(seconds / window_seconds)))


def _run_manifest(args, model, tokenizer, sampling: dict) -> int:
    from tqdm import tqdm

    from af2_jax.audio.io import AudioError
    from af2_jax.generate import bucket_windows
    from af2_jax.pipeline import answer_items, prepare
    from af2_jax.tokenizer import TokenizerError

    from af2_jax.distributed import is_main_process

    main = is_main_process()  # every process decodes every batch; only process 0 writes and shows progress
    items = _read_manifest(Path(args.manifest))
    output = Path(args.output)
    done = _done_ids(output, repair=main)
    pending = [it for it in items if it["id"] not in done]
    log.info("manifest: %d item(s), %d already answered in %s, %d to go", len(items), len(items) - len(pending),
             output, len(pending))
    groups: dict[int, list[dict]] = {}
    audio_config = model.config.audio
    max_windows = args.max_windows or audio_config.max_windows
    for it in pending:  # batch clips of similar length together: one compiled shape per bucket
        count = _window_count(it["audio"], max_windows, audio_config.window_seconds)
        groups.setdefault(bucket_windows(count), []).append(it)
    errors, timings = 0, {}
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output if main else os.devnull, "a") as out, \
            tqdm(total=len(pending), unit="item", file=sys.stderr, disable=not main) as bar:
        for _, group in sorted(groups.items()):
            for first in range(0, len(group), args.batch_size):
                batch, prepared, lines = group[first:first + args.batch_size], [], []
                for it in batch:
                    try:
                        prepared.append((it, prepare(tokenizer, it["audio"], it["prompt"], args.max_windows,
                                                     audio_config)))
                    except (AudioError, TokenizerError) as err:
                        errors += 1
                        lines.append({"id": it["id"], "audio": it["audio"], "prompt": it["prompt"],
                                      "error": str(err)})
                if prepared:
                    answers = answer_items(model, tokenizer, [p for _, p in prepared], timings=timings,
                                           **sampling)
                    lines += [{"id": it["id"], "audio": it["audio"], "prompt": it["prompt"], "answer": text}
                              for (it, _), text in zip(prepared, answers)]
                out.write("".join(json.dumps(line) + "\n" for line in lines))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    log.info("wrote %s (%d answered, %d with errors)", output, len(pending) - errors, errors)
    _log_timings(timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
