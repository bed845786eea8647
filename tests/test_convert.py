import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import af2_jax
from af2_jax.checkpoint import CheckpointError, SafetensorsCheckpoint
from af2_jax.checkpoint.convert import convert, export, inspect
from af2_jax.convert import main as convert_cli
from conftest import FIXTURES, REPO
from fake_release import full_state_dict, write_sparse_release

SIZES = {"af2-3b": "af2_3b_shapes.json", "af2-1.5b": "af2_1.5b_shapes.json", "af2-0.5b": "af2_0.5b_shapes.json"}


def _shape_map(size):
    return json.loads((FIXTURES / SIZES[size]).read_text())


@pytest.mark.parametrize("size", sorted(SIZES))
def test_dry_run_on_sparse_fake_release(size, tmp_path, capsys):
    release = write_sparse_release(tmp_path / size, full_state_dict(_shape_map(size)))
    result = inspect(release)  # preset inferred from the shapes
    assert result.config == af2_jax.preset(size)
    shape_map = _shape_map(size)
    assert len(result.report.aliases) == len(shape_map["aliases"])
    # Every tensor that is neither dead at inference nor a recomputed buffer lands in the model, and nothing else.
    skipped = set(result.report.dead) | set(result.report.constants)
    loaded = sum(int(np.prod(s)) for n, (s, _) in shape_map["state_dict"].items() if n not in skipped)
    assert result.parameters == loaded
    assert len(result.report.dead) >= 10 and all(n.startswith("clap.") for n in result.report.dead)
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


def test_round_trip_export_is_bit_exact(tmp_path):
    source = FIXTURES / "af2_tiny" / "hf_repo"
    config = FIXTURES / "af2_tiny" / "config.json"
    assert convert_cli([str(source), str(tmp_path / "jax"), "--model", str(config), "--dtype", "float32"]) == 0
    assert convert_cli([str(tmp_path / "jax"), str(tmp_path / "export"), "--export"]) == 0
    original, exported = SafetensorsCheckpoint(source), SafetensorsCheckpoint(tmp_path / "export")
    assert sorted(original.keys()) == sorted(exported.keys())
    expected_names = json.loads(config.read_text())["checkpoint_keys"]["released_style_key_order"]
    assert sorted(exported.keys()) == sorted(expected_names)
    for name in original.keys():
        assert original.info(name).dtype == exported.info(name).dtype, name
        assert original.get(name).tobytes() == exported.get(name).tobytes(), name


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
                                  tensors["lang_encoder.lm_head.weight"])  # the alias wins (AF2_SPEC 4.3)


def _bad_sources(tmp_path, golden):
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated" / "safe_ckpt"
    shutil.copytree(golden.path / "hf_repo" / "safe_ckpt", truncated)
    chunk = truncated / "model_chunk_1.safetensors"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    missing_chunk = tmp_path / "missing_chunk" / "safe_ckpt"
    shutil.copytree(golden.path / "hf_repo" / "safe_ckpt", missing_chunk)
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

    from af2_jax.checkpoint import store

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_config", fail)
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
