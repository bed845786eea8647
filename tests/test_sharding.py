import os
import subprocess
import sys

import pytest
from types import SimpleNamespace

from af2_jax.sharding import MeshError, Placement, make_mesh, parse_mesh_spec
from tests.helpers import FIXTURE_DIRS, REPO


def _sharding_checks(*meshes):
    """tests/sharding_check.py on `meshes`, one command per golden fixture."""
    return [[sys.executable, "-m", "tests.sharding_check", fixture, *meshes] for fixture in FIXTURE_DIRS]


def _assert_equal(runs):
    for run in runs:
        meshes = run.args[4:]
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        assert run.stdout.count("greedy tokens equal") == 2 * len(meshes), run.stdout
        assert run.stdout.count("int8 tokens as on one device") == len(meshes), run.stdout


@pytest.mark.child_processes(*_sharding_checks("data=2,fsdp=2,tensor=2"))
def test_sharded_equals_single_device_on_one_mesh(child_runs):
    """The default suite's mesh: all three axes at once, parameters split over fsdp and tensor (the others, with
    tensor=4 where the 2 KV heads stay replicated, run in the slow test below)."""
    _assert_equal(child_runs)


@pytest.mark.slow
@pytest.mark.child_processes(*_sharding_checks("tensor=8", "fsdp=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"))
def test_sharded_equals_single_device_on_every_mesh(child_runs):
    _assert_equal(child_runs)


def test_mesh_errors_are_one_line():
    with pytest.raises(MeshError, match=r"needs 4 devices but 1 are available; try tensor=1") as err:
        make_mesh("tensor=4")
    assert "\n" not in str(err.value)
    with pytest.raises(MeshError, match="expected comma-separated axis=size"):
        parse_mesh_spec("model=2")
    with pytest.raises(MeshError, match="expected comma-separated axis=size"):
        parse_mesh_spec("tensor=0")
    assert parse_mesh_spec("data=2, tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}


def test_rules_split_by_heads_and_replicate_what_does_not_divide():
    from jax.sharding import PartitionSpec as P

    from af2_jax.config import preset

    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 4})
    placement = Placement(mesh, preset("af2-3b"))
    assert placement.spec(("embed", "q_heads"), (2048, 2048)) == P("fsdp", "tensor")  # 16 heads over 4
    assert placement.spec(("embed", "kv_heads"), (2048, 256)) == P("fsdp", None)  # 2 KV heads stay whole
    assert placement.spec(("vocab", "embed"), (151669, 2048)) == P(None, "fsdp")  # 151669 is odd
    assert placement.spec(("layers", "embed", "mlp"), (36, 2048, 11008)) == P(None, "fsdp", "tensor")
    assert placement.spec(("htsat_embed", "htsat_qkv"), (256, 768)) == P(None, None)
    assert "kv_heads: 2 units do not split over tensor=4, replicated" in placement.report()
    with pytest.raises(KeyError, match="no entry in af2_jax.sharding.RULES"):
        placement.spec(("made_up",), (4,))


def test_infer_cli_on_a_mesh(small_checkpoint, audio_files, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=8",
               AF2_JAX_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-m", "af2_jax.infer", "--checkpoint", str(small_checkpoint), "--mesh",
                          "data=2,tensor=4", "--audio", str(audio_files["speech"]), str(audio_files["stereo"]),
                          "--prompt", "what is this?", "--max-new-tokens", "4", "--dtype", "float32", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mesh: data=2,fsdp=1,tensor=4" in run.stderr and "x8" in run.stderr
    assert len(run.stdout.splitlines()) == 2
