"""`python -m af2_jax.audio FILE...`: load audio the way AF2 does and run the audio encoder on it.

Prints, per file, the windows and mask AF2 would see, the log-mel shape and the HTSAT output shape, with timings.
Weights come from `--weights` (a released checkpoint folder or .safetensors files with the original key names);
without it the encoder has random weights (the shapes and timings are still real), and says so.
"""

from __future__ import annotations

import argparse
import logging
import time

from af2_jax.cli.common import EXIT_CODES, prog, run_command, setup_logging, warn_if_cpu_only
from af2_jax.config import MAX_WINDOWS_LIMIT, PRESETS, check_max_windows, resolve_model_config

log = logging.getLogger("af2_jax.audio")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("audio"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, opus, mp3, ...)")
    p.add_argument("--model", default="af2-3b",
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or a config.json (ours or the original schema)")
    p.add_argument("--weights", help="released checkpoint folder (safe_ckpt/) or .safetensors with original names")
    p.add_argument("--max-windows", type=int, default=12,
                   help=f"10 s windows per clip, 1..{MAX_WINDOWS_LIMIT} (default 12 = 2 minutes, as released)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="encoder compute dtype")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_max_windows(args.max_windows, "--max-windows ")
    except ValueError as err:
        parser.error(str(err))
    setup_logging()
    return run_command(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from af2_jax.audio.io import collate_windows, load_windows
    from af2_jax.checkpoint import load_htsat
    from af2_jax.nn.htsat import HTSAT, encode_windows

    warn_if_cpu_only()
    config = resolve_model_config(args.model)

    clips = []
    for path in args.files:
        start = time.perf_counter()
        windows, mask = load_windows(path, max_windows=args.max_windows, config=config.audio)
        log.info("%s: %d window(s) of %d samples, mask %s (%.2f s to load)", path, windows.shape[0],
                 windows.shape[1], mask.astype(int).tolist(), time.perf_counter() - start)
        clips.append((windows, mask))
    audio_x, audio_x_mask = collate_windows(clips)
    dtype = jnp.dtype(args.dtype)
    if args.weights:
        encoder = load_htsat(args.weights, config, dtype=dtype)
        log.info("audio encoder: weights from %s", args.weights)
    else:
        encoder = HTSAT(config.htsat, dtype=dtype, rngs=nnx.Rngs(0))
        log.info("audio encoder: RANDOM weights (%s size; pass --weights for real ones)", args.model)
    log.info("device: %s, dtype %s", jax.devices()[0].platform, args.dtype)

    graphdef, state = nnx.split(encoder)
    encode = jax.jit(lambda state, x: encode_windows(nnx.merge(graphdef, state), x, config.audio))
    start = time.perf_counter()
    compiled = encode.lower(state, audio_x).compile()
    log.info("compiled in %.2f s", time.perf_counter() - start)
    start = time.perf_counter()
    features = jax.block_until_ready(compiled(state, audio_x))
    elapsed = time.perf_counter() - start
    print(f"audio_x {tuple(audio_x.shape)} mask {audio_x_mask.astype(int).tolist()} -> "
          f"log-mel {(*audio_x.shape[:2], config.audio.n_frames, config.audio.n_mels)} -> "
          f"audio encoder output {tuple(features.shape)} {features.dtype} "
          f"({audio_x.shape[0] * audio_x.shape[1] / elapsed:.1f} windows/s)")
    return 0
