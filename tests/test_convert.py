import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import af2_jax
from af2_jax.checkpoint import CheckpointError, SafetensorsCheckpoint
from af2_jax.checkpoint.convert import convert, export, inspect
from af2_jax.cli.convert import main as convert_cli
from tests.fake_release import full_state_dict, write_sparse_release
from tests.helpers import FIXTURES, REPO

SIZES = {"af2-3b": "af2_3b_shapes.json", "af2-1.5b": "af2_1.5b_shapes.json", "af2-0.5b": "af2_0.5b_shapes.json"}


def _shape_map(size):
    return json.loads((FIXTURES / SIZES[size]).read_text())


# What a dry run of each release must find, hard-coded (the code under test decides what is unused or recomputed):
# tensors unused at inference and kept aside (torchlibrosa STFT/mel bases, AFF fusion branch, classifier head, tscam
# conv, BatchNorm counters) and their elements, recomputed constant buffers (18 relative_position_index, 8 attn_mask,
# inv_freq) and their elements, and the parameters that land in the model. The audio side is the same in every release.
RELEASE_DRY_RUN = {
    "af2-3b": {"dead": (38, 7_919_300), "constants": (27, 499_776), "parameters": 4_791_031_904},
    "af2-1.5b": {"dead": (38, 7_919_300), "constants": (27, 499_776), "parameters": 2_521_109_584},
    "af2-0.5b": {"dead": (38, 7_919_300), "constants": (27, 499_776), "parameters": 1_066_762_568},
}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_dry_run_on_sparse_fake_release(size, tmp_path, capsys):
    # Mutation caught (the former test, which subtracted the report's own dead | constants sets, passed it):
    # af2_jax/checkpoint/keymap.py DEAD_PATTERNS gains r"layers\.\d+\.blocks\.\d+\.attn_mask", so the shifted-window
    # masks are kept aside unchecked instead of being checked against their recomputed values.
    shape_map = _shape_map(size)
    release = write_sparse_release(tmp_path / size, full_state_dict(shape_map))
    result = inspect(release)  # preset inferred from the shapes
    assert result.config == af2_jax.preset(size)
    assert len(result.report.aliases) == len(shape_map["aliases"])
    elements = {name: int(np.prod(shape)) for name, (shape, _) in shape_map["state_dict"].items()}
    expected = RELEASE_DRY_RUN[size]
    assert (len(result.report.dead), sum(elements[n] for n in result.report.dead)) == expected["dead"]
    assert (len(result.report.constants), sum(elements[n] for n in result.report.constants)) == expected["constants"]
    assert result.parameters == expected["parameters"]
    # The same numbers from the shape map's own accounting: the model holds every parameter but the fixed STFT/mel
    # bases, the classifier and the fusion branch, plus the input BatchNorm's statistics; everything else in the file
    # (those parameters and every other buffer) is kept aside or recomputed.
    counts, buffers = shape_map["parameter_counts"], shape_map["state_dict_totals"]["buffer_elements"]
    unused = (counts["audio_encoder_fixed_stft_and_mel_bases"] +
              counts["info_audio_encoder_unused_classifier_tscam_conv_and_head"] +
              counts["info_audio_encoder_unused_fusion_branch"])
    bn0 = buffers["clap.nvclap.bn0.running_mean"] + buffers["clap.nvclap.bn0.running_var"]
    assert expected["parameters"] == counts["total"] - unused + bn0
    assert expected["dead"][1] + expected["constants"][1] == unused + sum(buffers.values()) - bn0
    assert all(n.startswith("clap.") for n in result.report.dead)
    assert convert_cli([str(release), "--dry-run", "--model", size]) == 0
    assert "dry run OK" in capsys.readouterr().out


def _broken(tmp_path, size, edit):
    tensors = full_state_dict(_shape_map(size))
    edit(tensors)
    return write_sparse_release(tmp_path / "broken", tensors)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("lang_encoder.model.layers.3.decoder_layer.mlp.up_proj.weight") and
     t.pop("lang_encoder.old_decoder_blocks.3.mlp.up_proj.weight"),
     r"missing: lang_encoder\.model\.layers\.3\.decoder_layer\.mlp\.up_proj\.weight \(4864, 896\)"),
    (lambda t: t.__setitem__("lang_encoder.model.layers.5.gated_cross_attn_layer_sound.attn.to_q.weight",
                             ((512, 900), "float32")),
     r"lang_encoder\.model\.layers\.5\.gated_cross_attn_layer_sound\.attn\.to_q\.weight is \(512, 900\), "
     r"expected \(512, 896\)"),
    (lambda t: t.__setitem__("lang_encoder.gated_cross_attn_layers_sound.7.ff_gate", ((2,), "float32")),
     r"lang_encoder\.gated_cross_attn_layers_sound\.7\.ff_gate is \(2,\) but its twin"),
    (lambda t: t.__setitem__("lang_encoder.lm_head.weight", ((151669, 896), "bfloat16")),
     r"lang_encoder\.lm_head\.weight is bfloat16 but its twin"),
    (lambda t: t.__setitem__("audio_transformer_clap.layer_stack.3.pos_ffn.w_1.bias", ((2048,), "float32")),
     r"unexpected: audio_transformer_clap\.layer_stack\.3\.pos_ffn\.w_1\.bias"),
])
def test_dry_run_names_the_broken_tensor(tmp_path, capsys, edit, message):
    release = _broken(tmp_path, "af2-0.5b", edit)
    with pytest.raises(CheckpointError, match=message):
        inspect(release, "af2-0.5b")
    assert convert_cli([str(release), "--dry-run", "--model", "af2-0.5b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_round_trip_export_is_bit_exact(golden, tmp_path):
    """Released layout -> float32 af2-jax checkpoint -> released layout gives back every tensor bit for bit."""
    source = golden.release
    config = golden.path / "config.json"
    assert convert_cli([str(source), str(tmp_path / "jax"), "--model", str(config), "--dtype", "float32"]) == 0
    assert convert_cli([str(tmp_path / "jax"), str(tmp_path / "export"), "--export"]) == 0
    original, exported = SafetensorsCheckpoint(source), SafetensorsCheckpoint(tmp_path / "export")
    assert sorted(original.keys()) == sorted(exported.keys())
    expected_names = json.loads(config.read_text())["checkpoint_keys"]["released_style_key_order"]
    assert sorted(exported.keys()) == sorted(expected_names)
    for name in original.keys():
        assert original.info(name).dtype == exported.info(name).dtype, name
        assert original.get(name).tobytes() == exported.get(name).tobytes(), name


def test_round_trip_export_of_bfloat16_rounds_only_the_parameters(golden, tmp_path):
    """Bit-exactness is float32's (convert/README.md): from a bfloat16 conversion every tensor comes back either bit
    for bit (constant buffers, tensors kept aside) or as the bfloat16 rounding of the original, as float32."""
    import ml_dtypes

    source = golden.release
    assert convert_cli([str(source), str(tmp_path / "jax"), "--model", str(golden.path / "config.json")]) == 0
    assert convert_cli([str(tmp_path / "jax"), str(tmp_path / "export"), "--export"]) == 0
    original, exported = SafetensorsCheckpoint(source), SafetensorsCheckpoint(tmp_path / "export")
    assert sorted(original.keys()) == sorted(exported.keys())
    rounded = 0
    for name in original.keys():
        a, b = original.get(name), exported.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.tobytes() != b.tobytes():
            np.testing.assert_array_equal(b, a.astype(ml_dtypes.bfloat16).astype(a.dtype), err_msg=name)
            rounded += 1
    assert exported.get("lang_encoder.model.embed_tokens.weight").tobytes() != \
        original.get("lang_encoder.model.embed_tokens.weight").tobytes() and rounded > len(original.keys()) // 2


def _fixture_tensors(golden):
    return dict(SafetensorsCheckpoint(golden.weights).items())


def test_afclap_prefix_survives_the_round_trip(golden, tmp_path):
    tensors = {("clap.afclap." + k[12:] if k.startswith("clap.nvclap.") else k): v
               for k, v in _fixture_tensors(golden).items()}
    safetensors.numpy.save_file(tensors, str(tmp_path / "afclap.safetensors"))
    convert(tmp_path / "afclap.safetensors", tmp_path / "jax", golden.path / "config.json", "float32")
    export(tmp_path / "jax", tmp_path / "export")
    names = SafetensorsCheckpoint(tmp_path / "export").keys()
    assert any(n.startswith("clap.afclap.") for n in names) and not any(n.startswith("clap.nvclap.") for n in names)


def test_differing_alias_twin_is_an_error_unless_allowed(golden, tmp_path):
    tensors = _fixture_tensors(golden)
    tensors["lang_encoder.lm_head.weight"] = tensors["lang_encoder.model.embed_tokens.weight"] + 1.0
    path = tmp_path / "twins.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"alias lang_encoder\.lm_head\.weight differs"):
        convert(path, tmp_path / "jax", golden.path / "config.json", "float32")
    assert not (tmp_path / "jax").exists()
    convert(path, tmp_path / "jax", golden.path / "config.json", "float32", allow_alias_mismatch=True)
    model = af2_jax.load(tmp_path / "jax", dtype="float32")
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                  tensors["lang_encoder.lm_head.weight"])  # the alias wins (original.md#alias-keys)


def _bad_sources(tmp_path, golden):
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated" / "safe_ckpt"
    shutil.copytree(golden.release / "safe_ckpt", truncated)
    chunk = truncated / "model_chunk_1.safetensors"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    missing_chunk = tmp_path / "missing_chunk" / "safe_ckpt"
    shutil.copytree(golden.release / "safe_ckpt", missing_chunk)
    (missing_chunk / "model_chunk_0.safetensors").unlink()
    return {
        "nonexistent": (tmp_path / "nope", "no such file or folder"),
        "neither layout": (empty, "no safe_ckpt/metadata.json and no .safetensors files"),
        "truncated chunk": (truncated.parent, "truncated"),
        "missing chunk": (missing_chunk.parent, "lists chunks that are missing: .*model_chunk_0"),
    }


@pytest.mark.parametrize("case", ["nonexistent", "neither layout", "truncated chunk", "missing chunk"])
def test_bad_sources_give_one_line(golden, tmp_path, capsys, case):
    src, message = _bad_sources(tmp_path, golden)[case]
    assert convert_cli([str(src), str(tmp_path / "out"), "--model", str(golden.path / "config.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src) in err
    with pytest.raises(CheckpointError, match=message):
        convert(src, tmp_path / "out2", golden.path / "config.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_existing_dst_is_refused_and_never_half_written(golden, tmp_path, monkeypatch):
    dst = tmp_path / "jax"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        convert(golden.weights, dst, golden.path / "config.json")
    assert (dst / "keep.txt").read_text() == "mine"

    from af2_jax.checkpoint import convert as convert_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        convert(golden.weights, dst, golden.path / "config.json", overwrite=True)
    assert (dst / "keep.txt").read_text() == "mine"  # the old DST is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jax"]  # no partial folder left behind
    monkeypatch.undo()
    convert(golden.weights, dst, golden.path / "config.json", overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()


def test_hub_id_offline_says_to_pass_a_local_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert convert_cli(["nvidia/audio-flamingo-2", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "could not download nvidia/audio-flamingo-2" in err and "pass the local folder" in err
    assert err.count("\n") == 1


def test_load_rejects_what_convert_did_not_write(golden, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        af2_jax.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not an af2-jax checkpoint config"):
        af2_jax.load(golden.path)


def test_the_suite_writes_nothing_under_the_users_cache(session_root):
    """conftest points AF2_JAX_HOME and the JAX compilation cache into this session's temporary folder, for this
    process and for every command a test starts, so converted releases and compiled programs never land in
    ~/.cache."""
    from af2_jax.cache import cache_dir

    script = "import jax, af2_jax.cache as cache; print(cache.cache_dir()); print(jax.config.jax_compilation_cache_dir)"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.returncode == 0, child.stderr
    here = [cache_dir(), Path(jax.config.jax_compilation_cache_dir)]
    assert [Path(line) for line in child.stdout.splitlines()] == here
    assert session_root.is_relative_to(tempfile.gettempdir())
    for path in here:
        assert path.is_relative_to(session_root) and not path.is_relative_to(Path.home() / ".cache"), path


def test_cli_subprocess_converts_and_helps(golden, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "af2_jax.convert", str(golden.weights), str(tmp_path / "jax"),
                          "--model", str(golden.path / "config.json")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stderr
    assert json.loads((tmp_path / "jax" / "config.json").read_text())["af2_jax"]["dtype"] == "bfloat16"
    help_run = subprocess.run([sys.executable, "-m", "af2_jax.convert", "--help"], capture_output=True, text=True,
                              env=env)
    assert help_run.returncode == 0 and "--dry-run" in help_run.stdout and "--export" in help_run.stdout
