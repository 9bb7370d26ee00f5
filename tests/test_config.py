import json
import warnings

import pytest

from glm_jax.generation import GenerationDefaults
from glm_jax.config import PRESETS, ConfigError, GLMConfig


@pytest.mark.parametrize("name", ["glm-4-9b-chat-1m", "glm-4-9b-chat", "glm-4-9b"])
def test_presets_match_published_configs(reference, name):
    assert GLMConfig.from_hf(reference / "models" / name) == PRESETS[name]


def test_preset_sizes():
    c = PRESETS["glm-4-9b-chat-1m"]
    assert (c.num_kv_heads, c.rope_theta, c.max_seq_len, c.rotary_dim) == (4, 1e8, 1048576, 64)
    assert c.kv_bytes_per_token() == 80 * 1024                    # NOTES.md: 80 KiB/token
    assert abs(c.num_params * 2 - 18.97e9) < 0.01e9                # published 18.97 GB in bf16
    assert PRESETS["glm-4-9b-chat"].kv_bytes_per_token() == 40 * 1024
    with pytest.raises(ConfigError, match="unknown preset"):
        GLMConfig.preset("glm-5")


def test_config_roundtrip(tmp_path):
    c = PRESETS["glm-4-9b-chat"].replace(dtype="float32")
    c.save(tmp_path / "config.json")
    assert GLMConfig.load(tmp_path / "config.json") == c
    assert GLMConfig.from_hf(tmp_path) == c


def _glm_config(**extra):
    base = {"model_type": "glm", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
            "rms_norm_eps": 1.5625e-07, "max_position_embeddings": 8192, "attention_bias": True}
    return {**base, **extra}


def test_glm_config_4x_and_5x_styles(tmp_path, reference):
    fixture = GLMConfig.from_hf(reference / "fixtures" / "glm-hf-f32")   # 4.46 style, top-level rope_theta
    assert fixture.rope_theta == 1e8 and fixture.partial_rotary_factor == 0.5
    assert fixture == GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32").replace(dtype=fixture.dtype)
    (tmp_path / "config.json").write_text(json.dumps(_glm_config(
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.25})))
    c = GLMConfig.from_hf(tmp_path)
    assert (c.rope_theta, c.rotary_dim) == (5e6, 4)


def test_glm_config_warns_about_the_rope_theta_bug(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_glm_config(rope_theta=10000.0, max_position_embeddings=131072)))
    with pytest.warns(UserWarning, match="rope_theta=10000"):
        GLMConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_glm_config(rope_theta=10000.0)))   # 8K: genuine 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GLMConfig.from_hf(tmp_path)


@pytest.mark.parametrize("content, message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    (_glm_config(num_key_value_heads=3), "not a multiple"),
    (_glm_config(hidden_act="gelu"), "hidden_act='gelu'"),
    ({"model_type": "chatglm", "num_attention_heads": 4}, "missing key"),
    ({k: v for k, v in _glm_config().items() if k != "num_attention_heads"}, "missing key 'num_attention_heads'"),
    ({k: v for k, v in PRESETS["glm-4-9b"].to_dict().items() if k != "head_dim"}, r"missing key\(s\) 'head_dim'"),
])
def test_bad_configs(tmp_path, content, message):
    (tmp_path / "config.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        GLMConfig.from_hf(tmp_path)


def test_generation_defaults_fill_what_is_not_given():
    published = GenerationDefaults()
    assert published.sampling() == {"temperature": 0.8, "top_p": 0.8, "top_k": 50, "stop_ids": (151329, 151336, 151338)}
    greedy = GenerationDefaults(do_sample=False, top_k=3, stop_ids=(9,))
    assert greedy.sampling() == {"temperature": 0.0, "top_p": 0.8, "top_k": 3, "stop_ids": (9,)}
    assert greedy.sampling(0.5, 1.0, 0, []) == {"temperature": 0.5, "top_p": 1.0, "top_k": 0, "stop_ids": ()}
