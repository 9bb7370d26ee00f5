"""glm-jax: GLM-4-9B (Chat, Chat-1M, base) in JAX/Flax."""

from .api import Model, load
from .attention import blockwise_attention, exact_attention
from .chat import GenerationDefaults, parse_response
from .config import PRESETS, ConfigError, GLMConfig
from .model import GLM, forward
from .tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer

__all__ = [
    "GLM", "GLMConfig", "PRESETS", "ConfigError", "GenerationDefaults", "Model", "SPECIAL_TOKENS",
    "StreamDecoder", "Tokenizer", "blockwise_attention", "exact_attention", "forward", "load",
    "parse_response",
]
