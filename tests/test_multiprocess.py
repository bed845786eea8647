import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from af2_jax.checkpoint.convert import convert
from af2_jax.distributed import maybe_initialize_distributed
from tests.helpers import FIXTURE_DIRS, REPO


@pytest.mark.multiprocess
def test_two_processes_generate_what_one_does(tmp_path):
    import portpicker

    fixture = FIXTURE_DIRS[0]
    checkpoint = convert(fixture / "model.safetensors", tmp_path / "ckpt", fixture / "config.json", "float32")
    port = portpicker.pick_unused_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_check", str(checkpoint), str(fixture),
                               str(port), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1 and not any(line.startswith("TOKENS") for line in outputs[1][0].splitlines())
    tokens = np.asarray(ast.literal_eval(lines[0][len("TOKENS "):]))
    expected = np.load(fixture / "outputs.npz")["generated_ids"]
    np.testing.assert_array_equal(tokens, expected[:, -tokens.shape[1]:])


def test_single_process_is_left_alone(monkeypatch):
    for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert maybe_initialize_distributed() is False
    with pytest.raises(ValueError, match="go together"):
        maybe_initialize_distributed(coordinator="127.0.0.1:1234")
