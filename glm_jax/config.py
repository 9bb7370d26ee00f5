"""GLMConfig: the frozen description of a GLM-4 model, its presets, and readers for HF configs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Any

from .generation import GenerationDefaults


class ConfigError(ValueError):
    """A config that cannot describe a GLM-4 model (or contradicts its weights)."""


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """Architecture of a GLM-4 decoder. Field names follow the transformers-native `glm` port."""

    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 10000.0 * 500  # RoPE base = 10000 * rope_ratio
    partial_rotary_factor: float = 0.5  # only the first half of each head rotates
    rms_norm_eps: float = 1.5625e-07
    max_seq_len: int = 131072
    qkv_bias: bool = True
    # config.json's eos_token_id and pad_token_id, kept so `export` writes them back. Generation
    # reads its stop and pad ids from generation_config.json only (generation.GenerationDefaults).
    eos_token_ids: tuple[int, ...] = GenerationDefaults.stop_ids
    pad_token_id: int | None = GenerationDefaults.pad_id
    dtype: str = "bfloat16"  # the dtype the weights were published in

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives an invalid rotary "
                              f"dim {self.rotary_dim} for head_dim={self.head_dim}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * d + (self.num_heads + 2 * self.num_kv_heads) * d
        per_layer = 2 * h + qkv + self.num_heads * d * h + 3 * h * f
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def replace(self, **changes: Any) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return {"model_type": "glm_jax", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: pathlib.Path | None = None) -> "GLMConfig":
        """The inverse of `to_dict`: every field must be there (`path` names the file in errors)."""
        where = f"{path}: " if path else ""
        d = dict(d)
        if d.pop("model_type", "glm_jax") != "glm_jax":
            raise ConfigError(f"{where}not a glm_jax config (use GLMConfig.from_hf for Hugging Face configs)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown:
            raise ConfigError(f"{where}unknown GLMConfig field(s): {', '.join(unknown)}")
        if missing:
            raise ConfigError(f"{where}missing key(s) {', '.join(map(repr, missing))}")
        return cls(**d)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "GLMConfig":
        return cls.from_dict(_read_json(pathlib.Path(path)), pathlib.Path(path))

    # -- presets and Hugging Face ----------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "GLMConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None

    @classmethod
    def from_hf(cls, path: str | pathlib.Path) -> "GLMConfig":
        """Reads a Hugging Face config.json (a folder or the file): `chatglm` or `glm` model_type."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        hf = _read_json(path)
        model_type = hf.get("model_type")
        if model_type == "chatglm":
            return _from_chatglm(hf, path)
        if model_type == "glm":
            return _from_glm(hf, path)
        if model_type == "glm_jax":
            return cls.from_dict(hf, path)
        raise ConfigError(f"{path}: unknown model_type {model_type!r} (expected 'chatglm' or 'glm')")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return GenerationDefaults.stop_ids
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _pad(hf: dict[str, Any]) -> int | None:
    pad = hf.get("pad_token_id")
    return None if pad is None else int(pad)


def _torch_dtype(hf: dict[str, Any]) -> str:
    return str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").replace("torch.", "")


def _require(hf: dict[str, Any], path: pathlib.Path, expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"{path}: {key}={hf[key]!r} is not supported by GLM-4 (expected {want!r})")


def _from_chatglm(hf: dict[str, Any], path: pathlib.Path) -> GLMConfig:
    _require(hf, path, {"add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
                        "apply_residual_connection_post_layernorm": False, "original_rope": True})
    try:
        heads = hf["num_attention_heads"]
        return GLMConfig(
            vocab_size=hf["padded_vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["ffn_hidden_size"],
            num_layers=hf["num_layers"],
            num_heads=heads,
            num_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads,
            head_dim=hf.get("kv_channels", hf["hidden_size"] // heads),
            rope_theta=10000.0 * float(hf.get("rope_ratio", 1.0)),
            rms_norm_eps=hf.get("layernorm_epsilon", 1e-5),
            max_seq_len=hf.get("seq_length", 8192),
            qkv_bias=bool(hf.get("add_qkv_bias", True)),
            eos_token_ids=_eos(hf),
            pad_token_id=_pad(hf),
            dtype=_torch_dtype(hf),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}") from None


def _from_glm(hf: dict[str, Any], path: pathlib.Path) -> GLMConfig:
    _require(hf, path, {"hidden_act": "silu"})
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    max_pos = hf.get("max_position_embeddings", 131072)
    if float(theta) == 10000.0 and max_pos > 8192:
        warnings.warn(
            f"{path}: rope_theta=10000 with max_position_embeddings={max_pos}. The official GLM-4 "
            "conversion wrote rope_theta=10000 for every model; GLM-4-9B-Chat uses 5e6 and "
            "GLM-4-9B-Chat-1M 1e8. If this is one of those, fix rope_theta in config.json.",
            stacklevel=3)
    try:
        heads = hf["num_attention_heads"]
        return GLMConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            partial_rotary_factor=float(factor),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            max_seq_len=max_pos,
            qkv_bias=bool(hf.get("attention_bias", True)),
            eos_token_ids=_eos(hf),
            pad_token_id=_pad(hf),
            dtype=_torch_dtype(hf),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}") from None


_GLM4_9B = GLMConfig()
PRESETS: dict[str, GLMConfig] = {
    "glm-4-9b-chat-1m": _GLM4_9B.replace(num_kv_heads=4, rope_theta=10000.0 * 10000, max_seq_len=1048576),
    "glm-4-9b-chat": _GLM4_9B.replace(num_kv_heads=2, rope_theta=10000.0 * 500, max_seq_len=131072),
    "glm-4-9b": _GLM4_9B.replace(num_kv_heads=2, rope_theta=10000.0, max_seq_len=8192),
}
