"""Weight-only int8 (`af2_jax.nn.quant`, `load(..., quantize="int8")`): one product moves by at most half a step
per weight; a fixture model's logits stay within the bound that step size implies; the demo model answers the
held-out items as in bfloat16; `plan --quantize int8` counts the int8 bytes."""

import json

import numpy as np
import pytest
from flax import nnx

import af2_jax
from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT
from af2_jax.engine import Request
from af2_jax.generate import engine_for
from af2_jax.nn.quant import Int8Embed, Int8Linear, quantize_int8


def _dequantized(module) -> np.ndarray:
    """A quantized module's weights as the float32 `(in, out)` matrix its products use."""
    if isinstance(module, Int8Embed):
        return (np.asarray(module.embedding[...], np.float32) * np.asarray(module.scale[...])[:, None]).T
    return np.asarray(module.kernel[...], np.float32) * np.asarray(module.scale[...])


def test_a_product_moves_by_at_most_half_a_step_per_weight(golden, fixture_model):
    linear = fixture_model(golden, False).layers[0].decoder.mlp.up_proj
    quantized = Int8Linear.from_linear(nnx.clone(linear))
    x = np.random.default_rng(0).standard_normal((4, linear.kernel.shape[0]), np.float32)
    exact = np.asarray(linear(x), np.float64)
    error = np.abs(np.asarray(quantized(x), np.float64) - exact)
    bound = np.asarray(quantized.scale[...])[None, :] / 2 * np.abs(x).sum(axis=1, keepdims=True)
    assert (error <= bound * (1 + 1e-5) + 1e-6).all() and error.max() > 0
    assert quantized.kernel.dtype == np.int8 and np.abs(np.asarray(quantized.kernel[...])).max() == 127


def test_logits_stay_within_the_bound_of_the_step_sizes(golden, fixture_model):
    """First order, a product whose weights carry a relative rounding error r (RMS: the step over sqrt(12),
    relative to the channel's RMS weight) gives outputs with relative error r, and relative errors along the network
    add at most linearly: over the P quantized products a token's logits pass through, the logits' relative RMS
    error stays within P times the mean r. (Measured on af2_tiny: 5.8% against a bound of 15.5%.)"""
    model = fixture_model(golden, False)
    quantized = quantize_int8(nnx.clone(model))
    i, o = golden.inputs, golden.outputs
    media_mask = np.repeat(i["audio_x_mask"], golden.config.htsat.tokens_per_window, axis=1)
    forward = nnx.jit(lambda m, *a: m(*a))
    exact = np.asarray(forward(model, i["input_ids"], i["attention_mask"], o["audio_transformer_out"], media_mask))
    ours = np.asarray(forward(quantized, i["input_ids"], i["attention_mask"], o["audio_transformer_out"], media_mask))
    relative = []
    for _, module in nnx.iter_graph(quantized):
        if isinstance(module, (Int8Linear, Int8Embed)):
            weights = _dequantized(module)
            step_rms = np.asarray(module.scale[...]) / np.sqrt(12)
            relative.append(np.mean(step_rms / np.sqrt((weights ** 2).mean(axis=0))))
    bound = len(relative) * np.mean(relative)
    error = np.sqrt(((ours - exact) ** 2).mean() / (exact ** 2).mean())
    assert 0 < error <= bound, (error, bound)


def test_int8_answers_the_held_out_items_as_bfloat16(demo_held_out, demo_answers_alone):
    """The 48 held-out items of the demo set: int8 answers differ from bfloat16's on at most one."""
    folder, tasks = demo_held_out
    model = af2_jax.load(DEMO_CHECKPOINT, scan_layers=False, quantize="int8")
    tokenizer = af2_jax.load_tokenizer(DEMO_CHECKPOINT)
    keys, requests = [], []
    for task in tasks:
        manifest = json.loads((folder / "manifests" / task / "test.json").read_text())
        for key, item in manifest["data"].items():
            keys.append((task, key))
            requests.append(Request(item["prompt"], str(folder / manifest["split_path"] / item["name"])))
    engine = engine_for(model, tokenizer, slots=8, max_len=tokenizer.max_prompt_tokens + 256)
    answers = dict(zip(keys, (done.text for done in engine.run(requests))))
    differ = [k for k in keys if answers[k] != demo_answers_alone[k]]
    assert len(keys) == 48 and len(differ) <= 1, differ


def test_quantize_with_the_stacked_layers_is_a_usage_error(capsys):
    from af2_jax.cli.infer import main as infer_cli

    with pytest.raises(SystemExit) as done:
        infer_cli(["--prompt", "hi", "--quantize", "int8", "--scan-layers"])
    assert done.value.code == 2 and "does not combine with --scan-layers" in capsys.readouterr().err


@pytest.mark.slow
def test_infer_quantize_int8_answers_the_bundled_example(capsys, cli_logging):
    from af2_jax.cli.infer import main as infer_cli
    from tests.helpers import REPO

    assert infer_cli(["--checkpoint", str(DEMO_CHECKPOINT), "--audio", str(REPO / "infer/examples/three_beeps.flac"),
                      "--prompt", "How many beeps are there?", "--quantize", "int8", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == "three\n" and "weights int8" in err


def test_quantize_needs_the_serving_layout():
    with pytest.raises(ValueError, match="quantize needs scan_layers=False"):
        af2_jax.load(DEMO_CHECKPOINT, quantize="int8")
    with pytest.raises(ValueError, match="supported: int8"):
        af2_jax.load(DEMO_CHECKPOINT, scan_layers=False, quantize="int4")


@pytest.mark.slow
def test_int8_exact_match_on_every_held_out_item(tmp_path, cli_logging):
    """All 360 held-out items through `eval` in bfloat16 and with --quantize int8: int8's exact match is at least
    bfloat16's minus 2 points."""
    from af2_jax.cli.eval import main as eval_cli
    from tests.helpers import REPO, write_demo_held_out

    write_demo_held_out(tmp_path / "data", 60)
    scores = {}
    for name, more in (("bf16", []), ("int8", ["--quantize", "int8"])):
        assert eval_cli(["--config", str(REPO / "eval" / "demo.yaml"), "--data-root", str(tmp_path / "data"),
                         "--checkpoint", str(DEMO_CHECKPOINT), "--output", str(tmp_path / name), *more]) == 0
        results = json.loads((tmp_path / name / "results.json").read_text())["benchmarks"]
        scores[name] = sum(r["value"] * r["n"] for r in results.values()) / sum(r["n"] for r in results.values())
    assert scores["int8"] >= scores["bf16"] - 0.02, scores
