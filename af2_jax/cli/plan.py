"""`python -m af2_jax.plan`: per-device memory of serving or training AF2 on a mesh, computed without any weights.

    python -m af2_jax.plan --model af2-3b --mesh tensor=4 --windows 30 --prompt 512 --new 256 --batch 8
    python -m af2_jax.plan --model af2-3b --mesh fsdp=4,tensor=2 --train sft --batch 8 --windows 12 --prompt 512

With `--train PRESET` (pretrain, sft, full or a regex) it plans a train step instead: float32 master weights,
AdamW moments and gradients of the trainable set, and the compiled step's temporaries for a global batch of
`--batch` sequences of `--prompt` tokens with `--windows` windows each.

Weights and caches are exact: each array's per-device shard, as the rules table of `af2_jax.sharding` places it, times
its dtype. Temporaries come from XLA's memory analysis of the compiled programs, compiled for abstract inputs. On a
CPU host, XLA computes bfloat16 temporaries in float32, so that figure is an upper bound there; a host without enough
devices for the mesh gets simulated CPU devices.
"""

from __future__ import annotations

import argparse
import os

from af2_jax.cli.common import EXIT_CODES, EXIT_INPUT, prog, run_command, setup_logging, warn_if_cpu_only
from af2_jax.config import PRESETS


def _parser():
    p = argparse.ArgumentParser(prog=prog("plan"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="af2-3b", help=f"preset ({', '.join(sorted(PRESETS))}) or config.json")
    p.add_argument("--mesh", default="tensor=1", help="e.g. 'tensor=4', 'data=2,tensor=4'")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--quantize", choices=["int8"], help="(serving) int8 weights, as `infer --quantize int8`")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--windows", type=int, default=12, help="10 s windows per clip (30 = 5 minutes)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens")
    p.add_argument("--hbm-gb", type=float, help="device memory to check against, in GB (1e9 bytes); serving plans "
                   "also show the largest batch that fits")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled programs' temporaries")
    p.add_argument("--scan-layers", action="store_true",
                   help="(serving) plan the stacked-layer layout, as `infer --scan-layers`")
    p.add_argument("--train", metavar="PRESET", help="plan a train step with this trainable set instead of serving")
    p.add_argument("--remat", action="store_true", help="(--train) recompute LM layers in the backward pass")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quantize and (args.train or args.scan_layers):
        parser.error("--quantize plans int8 serving with one buffer per layer; it does not combine with --train or "
                     "--scan-layers")
    setup_logging()
    return run_command(lambda: _run(args))


def _run(args) -> int:
    from af2_jax.planning import PlanRequest, devices_needed, plan

    needed = devices_needed(args.mesh)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Planning needs devices only to lay out the mesh: on a CPU host, simulate as many as the mesh has. This
        # must happen before JAX starts its backend; when `main` is called from a Python process where JAX already
        # runs, its devices are used as they are.
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", needed)
        except RuntimeError:
            pass
    warn_if_cpu_only()
    report = plan(PlanRequest(model=args.model, mesh=args.mesh, dtype=args.dtype, batch=args.batch,
                              windows=args.windows, prompt=args.prompt, new=args.new, hbm_gb=args.hbm_gb,
                              temporaries=not args.no_compile, scan_layers=args.scan_layers, train=args.train,
                              remat=args.remat, quantize=args.quantize))
    print(report["table"])
    return 0 if report["fits"] in (None, True) else EXIT_INPUT
