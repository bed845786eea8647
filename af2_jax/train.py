"""`python -m af2_jax.train --config train/configs/X.yaml [section.key=value ...]`: fine-tune AF2.

Rerunning the same command resumes from the newest checkpoint in `run.out_dir`. Multi-host: the same command on
every host (see train/launch_tpu_pod.sh); `--coordinator/--num-processes/--process-id` when not auto-detected.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("af2_jax.train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m af2_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a YAML file, e.g. train/configs/sft.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.learning_rate=2e-5 run.steps=100")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the manifests, a sample of each set's audio files and the mesh, then stop")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host without auto-detection)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no TPU backend" on CPU/GPU hosts
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    from af2_jax.audio.io import AudioError
    from af2_jax.checkpoint.store import CheckpointError
    from af2_jax.distributed import maybe_initialize_distributed
    from af2_jax.sharding import MeshError
    from af2_jax.tokenizer import TokenizerError
    from af2_jax.training.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        from af2_jax.training import loop

        if args.dry_run:
            mesh = loop.training_mesh(config)
            items, valid = loop.training_data(config)
            log.info("config ok: %d training items per pass, %d validation sets, mesh %s", len(items), len(valid),
                     dict(mesh.shape))
            return 0
        final = loop.run(config)
    except (ConfigError, MeshError, CheckpointError, TokenizerError, AudioError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are kept — rerun the same command to resume", file=sys.stderr)
        return 130
    log.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})
    if final.get("preempted"):
        # Checkpoints are written and closed. A data reader thread may hang in a read that never returns (a stuck
        # mount, the reason the wait was cut short); the interpreter would wait for it forever at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
