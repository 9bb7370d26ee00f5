"""glm-jax: GLM-4-9B (Chat, Chat-1M, base) in JAX/Flax.

The names below are imported on first use, so that importing a JAX-free module of the package
(`glm_jax.cli` for `glm-jax --help`, `glm_jax.options`, `glm_jax.tokenizer`) starts no JAX.
The cache-free forward pass of a split model is `glm_jax.forward.forward` (a module, not a name here).
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Model": "api", "load": "api",
    "blockwise_attention": "attention", "exact_attention": "attention",
    "parse_response": "chat",
    "PRESETS": "config", "ConfigError": "config", "GLMConfig": "config",
    "GenerationDefaults": "generation",
    "GLM": "model",
    "context_parallel": "ring", "ring_attention": "ring",
    "Layout": "sharding", "make_mesh": "sharding",
    "SPECIAL_TOKENS": "tokenizer", "StreamDecoder": "tokenizer", "Tokenizer": "tokenizer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
