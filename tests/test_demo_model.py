"""The embedded demo model (af2_jax/demo_model, trained by train/configs/demo.yaml): it loads, fits the size limit,
and answers held-out items of every task of the demo set correctly; the bundled example clip is answered right."""

import importlib.util
from pathlib import Path

import pytest

import af2_jax
from af2_jax.infer import DEMO_CHECKPOINT
from af2_jax.pipeline import answer_items, prepare
from af2_jax.training.loop import normalise_answer
from conftest import REPO

HELD_OUT_PER_TASK = 8


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "train" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return af2_jax.load(DEMO_CHECKPOINT, dtype="float32"), af2_jax.load_tokenizer(DEMO_CHECKPOINT)


def test_demo_model_is_small_enough():
    size = sum(f.stat().st_size for f in Path(DEMO_CHECKPOINT).rglob("*") if f.is_file())
    assert size <= 40e6, size


def test_demo_model_answers_held_out_items(demo, tmp_path):
    """The first items of each task's held-out split, regenerated with the demo split's own seeds."""
    import json

    generator = _generator()
    model, tokenizer = demo
    results = {}
    for number, task in enumerate(generator.TASKS):
        generator.write_split(tmp_path, task, "test", HELD_OUT_PER_TASK, 500 + number, str(tmp_path))
        manifest = json.loads((tmp_path / "manifests" / task / "test.json").read_text())
        items = list(manifest["data"].values())
        prepared = [prepare(tokenizer, str(tmp_path / manifest["split_path"] / it["name"]), it["prompt"],
                            audio_config=model.config.audio) for it in items]
        answers = answer_items(model, tokenizer, prepared, max_new_tokens=8)
        results[task] = sum(normalise_answer(a) == normalise_answer(it["output"]) for a, it in zip(answers, items))
    total = sum(results.values()) / (HELD_OUT_PER_TASK * len(results))
    assert total >= 0.85, results
    assert all(correct >= HELD_OUT_PER_TASK // 2 for correct in results.values()), results


def test_bundled_example_is_answered_correctly(demo):
    from af2_jax.audio import AudioWarning

    model, tokenizer = demo
    with pytest.warns(AudioWarning, match="longer than max_windows=1"):  # 4 s clip, one 3 s window
        assert af2_jax.answer(model, tokenizer, str(REPO / "infer" / "examples" / "three_beeps.flac"),
                          "How many beeps are there?", max_new_tokens=8) == "three"
