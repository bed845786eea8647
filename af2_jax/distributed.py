"""Multi-host start-up: one call that every CLI makes before touching devices."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)

# Environment variables that mean "this process is one of several" (Cloud TPU pods, SLURM, an explicit coordinator).
_POD_SIGNS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def multi_process_launch() -> bool:
    """Whether the environment says this process is one of several (a TPU pod, SLURM, an explicit coordinator)."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return any(os.environ.get(name) for name in _POD_SIGNS[1:])


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when this is one process of several: with the explicit coordinator /
    process count / id when given (all three), else by auto-detection on a TPU pod, under SLURM, or with
    JAX_COORDINATOR_ADDRESS set. Returns whether it initialised. Single-process runs are left alone."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together; pass all three")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif multi_process_launch():
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """Only process 0 writes outputs and logs progress."""
    return jax.process_index() == 0


def main_process_value(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` (a numpy array of the same shape everywhere), on every process: what process 0 read from
    files only it may see (which items an earlier run finished) becomes the plan every process follows in lock-step."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))
