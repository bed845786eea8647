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
    # Moving the layers while serving needs the largest stacked parameter more: the MLP's (36, 2048, 11008) bf16.
    from af2_jax.config import preset

    lm = preset("af2-3b").lm
    switch = float(re.search(r"serve --background-compile needs ([\d.]+) GB more", run.stdout)[1])
    assert switch == pytest.approx(lm.num_layers * lm.hidden_size * lm.intermediate_size * 2 / 1e9, abs=1e-3)


# Stacked layers: the same weights and caches as the serving layout, compiled in a fifth of the time.
@pytest.mark.child_processes(_plan("--model", "af2-3b", "--mesh", "tensor=4", "--windows", "30", "--prompt", "512",
                                   "--new", "256", "--batch", "8", "--hbm-gb", "16", "--scan-layers"))
def test_3b_on_tensor_4_leaves_room_for_batch_8_on_16_gb(child_runs):
    [run] = child_runs
    gb = _values(run)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kv_heads: 2 units do not split over tensor=4, replicated" in run.stdout
    assert gb["weights"] < 3.5 and "CPU upper bound" in run.stdout and "fits in 16 GB" in run.stdout
    assert "--background-compile" not in run.stdout  # stacked already, and on a mesh


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


def _int8_counts(config) -> tuple[int, int]:
    """(weights, scales) that int8 replaces, counted from the config alone: per layer the LM's seven projections and
    the cross-attention's five linear layers, and the tied embedding; one scale per output channel."""
    lm, xa = config.lm, config.cross_attention
    d, heads, kv, hd, inner = lm.hidden_size, lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim, \
        lm.head_dim, xa.heads * xa.dim_head
    media, ff = config.audio_transformer.d_model, xa.ff_mult * d
    per_layer = [(d, heads), (d, kv), (d, kv), (heads, d), (d, lm.intermediate_size), (d, lm.intermediate_size),
                 (lm.intermediate_size, d), (d, inner), (media, 2 * inner), (inner, d), (d, ff), (ff, d)]
    assert hd > 0
    weights = lm.num_layers * sum(a * b for a, b in per_layer) + lm.vocab_size * d
    scales = lm.num_layers * sum(b for _, b in per_layer) + lm.vocab_size
    return weights, scales


_HALF_B = ("--model", "af2-0.5b", "--windows", "12", "--prompt", "512", "--new", "256", "--batch", "8", "--hbm-gb",
           "16", "--no-compile")


@pytest.mark.child_processes(_plan(*_HALF_B), _plan(*_HALF_B, "--quantize", "int8"))
def test_int8_plan_counts_one_byte_per_weight_and_a_scale_per_channel(child_runs):
    from af2_jax.config import preset

    bf16, int8 = child_runs
    assert bf16.returncode == int8.returncode == 0, bf16.stderr + int8.stderr
    weights, scales = _int8_counts(preset("af2-0.5b"))
    assert _values(int8)["weights"] == pytest.approx(_values(bf16)["weights"] - (weights - 4 * scales) / 1e9,
                                                     abs=1.1e-3)
    assert _values(int8)["KV cache + cross-attention K/V"] == _values(bf16)["KV cache + cross-attention K/V"]
    most = [int(re.search(r"at most (\d+) requests", run.stdout)[1]) for run in (bf16, int8)]
    assert most[1] > most[0] > 8
