import re
import sys

import pytest

from tests.helpers import FIXTURE_DIRS


def _plan(*args) -> list[str]:
    """`python -m af2_jax.plan ARGS`: a process of its own, which simulates as many CPU devices as the mesh has."""
    return [sys.executable, "-m", "af2_jax.plan", *args]


def _values(run) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \|$", run.stdout, re.M)}


@pytest.mark.child_processes(_plan("--model", "af2-3b", "--mesh", "tensor=1", "--windows", "30", "--prompt", "512",
                                   "--new", "256", "--no-compile"))
def test_3b_on_one_device_fits_the_spec_budget(child_runs):
    [run] = child_runs
    gb = _values(run)
    assert run.returncode == 0, run.stderr
    assert 9.5 < gb["weights"] < 9.7  # 9.6 GB of bfloat16 weights (docs/original.md#parameter-counts)
    assert gb["weights + caches"] < 10.5


# Stacked layers: the same weights and caches as the serving layout, compiled in a fifth of the time.
@pytest.mark.child_processes(_plan("--model", "af2-3b", "--mesh", "tensor=4", "--windows", "30", "--prompt", "512",
                                   "--new", "256", "--batch", "8", "--hbm-gb", "16", "--scan-layers"))
def test_3b_on_tensor_4_leaves_room_for_batch_8_on_16_gb(child_runs):
    [run] = child_runs
    gb = _values(run)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kv_heads: 2 units do not split over tensor=4, replicated" in run.stdout
    assert gb["weights"] < 3.5 and "CPU upper bound" in run.stdout and "fits in 16 GB" in run.stdout


@pytest.mark.child_processes(_plan("--model", "af2-3b", "--mesh", "data=3", "--batch", "4", "--no-compile"))
def test_a_mesh_that_cannot_work_is_one_line(child_runs):
    [run] = child_runs
    assert run.returncode == 1
    assert run.stderr.startswith("error: batch 4 does not split over data x fsdp = 3") and \
        run.stderr.count("\n") == 1


@pytest.mark.child_processes(_plan("--model", FIXTURE_DIRS[0] / "config.json", "--mesh", "tensor=2", "--windows", "2",
                                   "--prompt", "16", "--new", "8", "--batch", "2"))
def test_serving_layout_plan_compiles(child_runs):
    """The default (unstacked layers, as `infer`) compiled for the fixture model: its temporaries are reported."""
    [run] = child_runs
    gb = _values(run)
    assert run.returncode == 0, run.stdout + run.stderr
    assert gb["weights"] > 0 and "compiled temporaries" in run.stdout
