"""Every choice and default of glm-jax, declared once.

The CLI, the Python API, the engine, fine-tuning and the evaluations read these names; nothing
else restates a choice list or a default. This module imports nothing heavy (no JAX), so
`glm-jax --help` stays fast.
"""

from __future__ import annotations

import dataclasses

# -- numerics --------------------------------------------------------------------------------------
DTYPES = ("bfloat16", "float32")             # compute / storage dtypes of the weights
KV_CACHE_DTYPES = ("int8",)                  # besides the weights' dtype (the default, None)
# Weight-only quantization of the layers' projections (glm_jax/quantize.py): int8 with one scale per
# output channel, int4 with one scale per INT4_GROUP consecutive input features. "KIND:G" asks for
# groups of G inputs instead (e.g. int4:64 for a model narrower than 128, int8:128).
QUANTIZE = ("int8", "int4")
INT4_GROUP = 128
QUANTIZE_HELP = ("weight-only quantization of the layers' projections: int8 (per output channel) or int4 "
                 f"(groups of {INT4_GROUP} inputs); KIND:G for groups of G inputs (the embedding, output layer, "
                 "norms and biases stay in the float dtype)")

# -- attention -------------------------------------------------------------------------------------
ATTENTIONS = ("auto", "exact", "blockwise")  # single-device attention of `Model.logits`
STRATEGIES = ("ring", "allgather")           # context-parallel attention over the `sequence` axis
# The engine's attention kernels: "auto" picks "gpu" on a GPU, "tpu" on a TPU and "xla" elsewhere;
# "xla" is the portable tile loop; "gpu" is cuDNN flash attention for one request's prefill chunks
# and the Pallas decode kernel for decode steps (a cache held by one device); "tpu" is JAX's
# Pallas paged-attention kernel for decode steps (see engine.paged_attention.local_kernel).
KERNELS = ("auto", "xla", "gpu", "tpu")
DEFAULT_KERNEL = "auto"

# -- the engine ------------------------------------------------------------------------------------
PREFILL_CHUNK = 512            # prompt tokens per prefill step (bounds prefill activations)
PREFILL_BUDGET = 2048          # prompt tokens an engine round prefills (in chunks) before its decode burst
STEPS_PER_CALL = 8             # decode tokens per device call between host round trips (generate, chat)
SERVE_STEPS_PER_CALL = 4       # the server's: a new request waits at most one burst for its prefill
MAX_BATCH = 8                  # requests decoded together by `Model.engine` and `serve` (running requests)
PAGE_SIZE = 128                # KV-cache slots a page (a power of two; see docs/benchmarks.md for the choice)
MAX_QUEUE = 64                 # requests a server lets wait for a row; more get HTTP 429
SERVE_MAX_MODEL_LEN = 8192     # `serve`'s default context per request (at most the model's)
CHAT_MAX_MODEL_LEN = 32768     # `chat`'s default context for the whole conversation (at most the model's)
SHUTDOWN_TIMEOUT = 30.0        # seconds a draining engine / server waits for requests in flight

# -- speculative decoding --------------------------------------------------------------------------
SPECULATIVE = ("ngram",)       # draft methods ("ngram": prompt lookup over the request's own tokens); off: None
NUM_SPECULATIVE_TOKENS = 4     # drafts verified per step (a verification step runs k+1 queries a row)
NGRAM_MAX = 4                  # the longest n-gram looked up first
NGRAM_MIN = 2                  # the shortest one tried

# -- evaluations -----------------------------------------------------------------------------------
RULER_SAMPLES = 25             # samples per task and length (RULER's own runs use 500)
RULER_BATCH = 8                # rows per engine call in `ruler` (lower it for long lengths: the KV cache per row)

# -- training --------------------------------------------------------------------------------------
# What a block keeps for its backward pass: "none" everything, "dots" its matmul outputs, "full"
# only its input, "segments" as full with only every ceil(sqrt(layers))-th block input kept.
REMATS = ("none", "dots", "full", "segments")
DEFAULT_REMAT = "full"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
LOSS_CHUNK = 1024              # tokens per cross-entropy chunk (no [T, vocab] logits)

# -- files -----------------------------------------------------------------------------------------
HF_LAYOUTS = ("chatglm", "glm")    # the original remote-code layout, transformers' native one
COMPILE_CACHE_ENV = "GLM_JAX_COMPILE_CACHE"

REMAT_HELP = ("what a block keeps for the backward pass: only its input (full), its matmul outputs (dots), "
              "everything (none), or full with only every ceil(sqrt(layers))-th block input kept through the "
              "forward pass (segments: one more forward, a fraction of the block inputs)")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A weight quantization: kind (QUANTIZE) and group (inputs per scale; None: one scale per
    output channel). str() gives back the form `parse` reads."""
    kind: str
    group: int | None = None

    @classmethod
    def parse(cls, value: "str | Quantization | None") -> "Quantization | None":
        """None, "int8", "int4" (groups of INT4_GROUP), "KIND:G"; a bad one is a ValueError."""
        if value is None or isinstance(value, Quantization):
            return value
        kind, sep, group = str(value).partition(":")
        check_choice("--quantize", kind, QUANTIZE)
        if not sep:
            return cls(kind, INT4_GROUP if kind == "int4" else None)
        if not group.isdigit():
            raise ValueError(f"--quantize {value!r}: the group after ':' must be a whole number (0: per channel)")
        return cls(kind, int(group) or None)

    def __str__(self) -> str:
        default = INT4_GROUP if self.kind == "int4" else None
        return self.kind if self.group == default else f"{self.kind}:{self.group or 0}"


def check_choice(name: str, value: str, choices) -> str:
    """`value` if it is one of `choices`, else ValueError naming the option and the choices."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    return value
