"""`python -m af2_jax.convert SRC DST`: released AF2 weights (PyTorch safetensors) -> af2-jax checkpoint, and back.

SRC is a released repository folder (`safe_ckpt/metadata.json` + chunks), a `.safetensors` file or folder of them,
or a hub id such as `nvidia/audio-flamingo-2` (downloaded through huggingface_hub when online). DST receives an
Orbax checkpoint and `config.json`, loadable with `af2_jax.load(DST, dtype=...)`.

With --export, SRC is an af2-jax checkpoint and DST receives the released layout under the original names, which
the original PyTorch loader accepts.
"""

from __future__ import annotations

import argparse
import logging
import time

from af2_jax.checkpoint.convert import convert, export, inspect
from af2_jax.cli.common import EXIT_CODES, prog, run_command, setup_logging, warn_if_cpu_only
from af2_jax.config import PRESETS

log = logging.getLogger("af2_jax.convert")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("convert"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="released folder, .safetensors file(s), hub id, or (--export) an "
                                              "af2-jax checkpoint")
    p.add_argument("dst", metavar="DST", nargs="?", help="output folder (not needed with --dry-run)")
    p.add_argument("--model", help=f"preset ({', '.join(sorted(PRESETS))}) or config.json; default: the preset "
                                   "matching the checkpoint's shapes")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="storage dtype of the parameters (default bfloat16)")
    p.add_argument("--dry-run", action="store_true",
                   help="check names, shapes, dtypes and byte ranges from the safetensors headers only; "
                        "read no tensor, write nothing")
    p.add_argument("--export", action="store_true", help="af2-jax checkpoint -> released PyTorch layout")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-alias-mismatch", action="store_true",
                   help="if an alias key differs from its twin, use the alias (what the original loader keeps)")
    p.add_argument("--mesh", help="lay the stored chunks out as the shards of this mesh (e.g. tensor=4, on this "
                                  "host's devices), so that loading onto it reads whole chunks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.dry_run and not args.dst:
        parser.error("DST is required (or pass --dry-run)")
    setup_logging()
    return run_command(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    start = time.perf_counter()
    from af2_jax.distributed import is_main_process, maybe_initialize_distributed

    maybe_initialize_distributed()
    if not is_main_process():  # conversion is a single-host job: on a pod, process 0 does it
        return 0
    if args.mesh:  # only a mesh puts arrays on devices; a plain conversion is host work
        warn_if_cpu_only()
    if args.export:
        export(args.src, args.dst, overwrite=args.overwrite)
    elif args.dry_run:
        result = inspect(args.src, args.model, args.dtype)
        print(f"dry run OK: {result.summary(args.dtype)}")
    else:
        convert(args.src, args.dst, args.model, args.dtype, overwrite=args.overwrite,
                allow_alias_mismatch=args.allow_alias_mismatch, mesh=args.mesh)
    log.info("done in %.1f s", time.perf_counter() - start)
    return 0
