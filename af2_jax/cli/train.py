"""`python -m af2_jax.train --config train/configs/X.yaml [section.key=value ...]`: fine-tune AF2.

Rerunning the same command resumes from the newest checkpoint in `run.out_dir`. Multi-host: the same command on
every host (see train/launch_tpu_pod.sh); `--coordinator/--num-processes/--process-id` when not auto-detected.
`--print-config` lists every config key with its default and what it does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from af2_jax.cli.common import EXIT_CODES, prog, run_command, setup_logging, warn_if_cpu_only

log = logging.getLogger("af2_jax.train")

# Training runs for hours: every log line carries its time.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("train"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file, e.g. train/configs/sft.yaml (required unless --print-config)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.learning_rate=2e-5 run.steps=100")
    p.add_argument("--print-config", action="store_true",
                   help="list every key (section.key=default  # what it does) and stop; with --config and "
                        "overrides, their resolved values instead, after the same checks as a run")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the manifests, a sample of each set's audio files and the mesh, then stop")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host without auto-detection)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not (args.config or args.print_config):
        parser.error("--config is required (or --print-config to list the keys)")
    setup_logging(fmt=LOG_FORMAT)
    return run_command(lambda: _run(args), debug=args.debug, any_value_error=False)


def _run(args) -> int:
    from af2_jax.training.config import describe, load_config

    if args.print_config and not (args.config or args.overrides):
        print(describe())
        return 0
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(describe(config))
        return 0
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    from af2_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    warn_if_cpu_only()
    from af2_jax.training import loop

    if args.dry_run:
        mesh = loop.training_mesh(config)
        items, valid = loop.training_data(config)
        log.info("config ok: %d training items per pass, %d validation sets, mesh %s", len(items), len(valid),
                 dict(mesh.shape))
        return 0
    try:
        final = loop.run(config)
    except KeyboardInterrupt:
        log.warning("checkpoints already written are kept: rerun the same command to resume")
        raise
    log.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})
    if final.get("preempted"):
        # Checkpoints are written and closed. A data reader thread may hang in a read that never returns (a stuck
        # mount, the reason the wait was cut short); the interpreter would wait for it forever at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0

