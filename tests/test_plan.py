import os
import re
import subprocess
import sys

from conftest import REPO


def _plan(*args):
    run = subprocess.run([sys.executable, "-m", "af2_jax.plan", *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    values = {m[1]: float(m[2]) for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \|$", run.stdout, re.M)}
    return run, values


def test_3b_on_one_device_fits_the_spec_budget():
    run, gb = _plan("--model", "af2-3b", "--mesh", "tensor=1", "--windows", "30", "--prompt", "512", "--new", "256",
                    "--no-compile")
    assert run.returncode == 0, run.stderr
    assert 9.5 < gb["weights"] < 9.7  # AF2_SPEC 7.2: 9.6 GB of bfloat16 weights
    assert gb["weights + caches"] < 10.5


def test_3b_on_tensor_4_leaves_room_for_batch_8_on_16_gb():
    # Stacked layers: the same weights and caches as the serving layout, compiled in a fifth of the time.
    run, gb = _plan("--model", "af2-3b", "--mesh", "tensor=4", "--windows", "30", "--prompt", "512", "--new", "256",
                    "--batch", "8", "--hbm-gb", "16", "--scan-layers")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kv_heads: 2 units do not split over tensor=4, replicated" in run.stdout
    assert gb["weights"] < 3.5 and "CPU upper bound" in run.stdout and "fits in 16 GB" in run.stdout


def test_a_mesh_that_cannot_work_is_one_line():
    run, _ = _plan("--model", "af2-3b", "--mesh", "data=3", "--batch", "4", "--no-compile")
    assert run.returncode == 1
    assert run.stderr.startswith("error: batch 4 does not split over data x fsdp = 3") and \
        run.stderr.count("\n") == 1


def test_serving_layout_plan_compiles():
    """The default (unstacked layers, as `infer`) compiled for the fixture model: its temporaries are reported."""
    from conftest import FIXTURE_DIRS

    run, gb = _plan("--model", str(FIXTURE_DIRS[0] / "config.json"), "--mesh", "tensor=2", "--windows", "2",
                    "--prompt", "16", "--new", "8", "--batch", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert gb["weights"] > 0 and "compiled temporaries" in run.stdout
