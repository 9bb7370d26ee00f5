"""glm-jax: GLM-4-9B (Chat, Chat-1M, base) in JAX/Flax."""

from .api import Model, load
from .attention import blockwise_attention, exact_attention
from .chat import GenerationDefaults, parse_response
from .config import PRESETS, ConfigError, GLMConfig
from .forward import forward
from .model import GLM
from .ring import context_parallel, ring_attention
from .sharding import Layout, make_mesh
from .tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer

__all__ = [
    "GLM", "GLMConfig", "PRESETS", "ConfigError", "GenerationDefaults", "Layout", "Model", "SPECIAL_TOKENS",
    "StreamDecoder", "Tokenizer", "blockwise_attention", "context_parallel", "exact_attention", "forward",
    "load", "make_mesh", "parse_response", "ring_attention",
]
