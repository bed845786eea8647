import dataclasses
import json

import pytest

from af2_jax.config import PRESETS, AF2Config, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = preset(name)
    again = AF2Config.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.htsat.depths, tuple)


def test_presets_match_release_shape_maps(shape_map):
    lm = shape_map["config"]["lm"]
    matches = [n for n, c in PRESETS.items() if c.lm.hidden_size == lm["hidden_size"]]
    assert len(matches) == 1, f"no preset with hidden size {lm['hidden_size']}"
    cfg = PRESETS[matches[0]]
    assert cfg.lm.num_layers == lm["num_hidden_layers"]
    assert cfg.lm.num_heads == lm["num_attention_heads"]
    assert cfg.lm.num_kv_heads == lm["num_key_value_heads"]
    assert cfg.lm.intermediate_size == lm["intermediate_size"]
    assert cfg.lm.vocab_size == lm["vocab_size_after_resize"]
    assert cfg.lm.rope_theta == lm["rope_theta"]
    assert cfg.lm.rms_norm_eps == lm["rms_norm_eps"]
    htsat = shape_map["config"]["htsat"]
    assert cfg.htsat.embed_dim == htsat["embed_dim"]
    assert list(cfg.htsat.depths) == list(htsat["depths"])
    assert list(cfg.htsat.num_heads) == list(htsat["num_heads"])
    assert cfg.htsat.window_size == htsat["window_size"]
    assert cfg.htsat.num_features == shape_map["config"]["clap_config_audio_embed_dim"]
    at = shape_map["config"]["audio_transformer_kwargs"]
    assert (cfg.audio_transformer.n_heads, cfg.audio_transformer.n_layers, cfg.audio_transformer.d_inner) == (
        at["n_head"], at["n_layers"], at["d_inner"])
    ids = shape_map["config"]["added_token_ids"]
    assert {cfg.tokens.media, cfg.tokens.end_of_chunk, cfg.tokens.pad, cfg.tokens.sep} == set(ids.values())


def test_reads_fixture_config(golden):
    raw = golden.raw_config
    cfg = golden.config
    assert cfg.htsat.embed_dim == raw["htsat"]["embed_dim"]
    assert cfg.htsat.num_features == raw["htsat"]["num_features"] == raw["clap_config"]["audio_embed_dim"]
    assert cfg.htsat.tokens_per_window == raw["htsat"]["tokens_per_window"]
    assert cfg.audio.n_frames == raw["mel"]["frames_per_window"]
    assert cfg.audio.max_windows == raw["clap_config"]["max_num_window"]
    assert cfg.audio_transformer.d_head == raw["audio_transformer"]["d_head"]
    assert cfg.audio_transformer.rotary_dim == raw["audio_transformer"]["rotary_dim"]
    assert cfg.lm.vocab_size == raw["qwen2_config"]["vocab_size"]
    assert cfg.tokens.eos == raw["special_tokens"]["<|endoftext|>"]
    assert AF2Config.from_json(cfg.to_json()) == cfg


def test_from_file_reads_both_schemas(golden, tmp_path):
    assert AF2Config.from_file(golden.path / "config.json") == golden.config
    ours = tmp_path / "config.json"
    ours.write_text(golden.config.to_json())
    assert AF2Config.from_file(ours) == golden.config


def test_bad_configs_are_rejected():
    data = preset("af2-3b").to_dict()
    data["htsat"]["embed_dim_typo"] = 3
    with pytest.raises(ValueError, match="embed_dim_typo"):
        AF2Config.from_dict(data)
    with pytest.raises(ValueError, match="audio transformer width"):
        dataclasses.replace(preset("af2-3b"), htsat=dataclasses.replace(preset("af2-3b").htsat, embed_dim=128))
    with pytest.raises(ValueError, match="max_windows"):
        AF2Config.from_json(json.dumps({"audio": {"max_windows": 31}}))
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("af2-7b")
