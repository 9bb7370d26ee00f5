"""LoRA: low-rank adapters on the attention and MLP projections, the base weights frozen.

A weight W keeps torch's [out, in] orientation with its dims split (q_proj [Hq, D, H], o_proj
[H, Hq, D], gate_up_proj [2, F, H], ...). Its adapter is A [r, *in] and B [*out, r]; the weight the
forward uses is W + (alpha / r) * B A. A starts random (std 1 / sqrt(in features)), B at zero, so
training starts from the base model exactly. Training multiplies through the adapter (`attach`:
x W + scale (x A) B, as PEFT does); the output folder gets the merged weights (`merge`). The
embedding, the norms and the output layer are never adapted, whatever the pattern says.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp

from ..model import LowRank
from ..params import ParamSpec

DEFAULT_TARGETS = r"\.(q|k|v|o|gate_up|down)_proj$"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"--lora-rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha:g}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"--lora-targets: not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def out_dims(spec: ParamSpec) -> int:
    """How many leading dims of a projection are its outputs: the heads with their head_dim
    (q/k/v), gate and up with the MLP dim (gate_up), else the first dim."""
    return 2 if len(spec.axes) == 3 and (spec.axes[1] == "head_dim" or spec.axes[0] == "gate_up") else 1


def targets(c: LoRAConfig, specs: Mapping[str, ParamSpec]) -> list[str]:
    """The adapted weights: layer matrices whose name matches the pattern."""
    pattern = re.compile(c.targets)
    names = [n for n, s in specs.items() if n.startswith("layers.") and len(s.shape) >= 2 and pattern.search(n)]
    if not names:
        raise ValueError(f"--lora-targets {c.targets!r} matches no projection weight")
    return names


def init_adapters(c: LoRAConfig, specs: Mapping[str, ParamSpec], key: jax.Array) -> dict[str, jax.Array]:
    """{"NAME.lora_a": [r, *in], "NAME.lora_b": [*out, r]} float32 for every target."""
    adapters = {}
    for i, name in enumerate(targets(c, specs)):
        shape, k = specs[name].shape, out_dims(specs[name])
        fan_in = math.prod(shape[k:])
        adapters[f"{name}.lora_a"] = jax.random.normal(jax.random.fold_in(key, i), (c.rank, *shape[k:]),
                                                       jnp.float32) / math.sqrt(fan_in)
        adapters[f"{name}.lora_b"] = jnp.zeros((*shape[:k], c.rank), jnp.float32)
    return adapters


def attach(c: LoRAConfig, base: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array], dtype) -> dict:
    """The weights the training forward uses: every adapted W as a LowRank (W, A, B in `dtype`),
    multiplied without forming W + scale * B A (no full-size merged weight or its gradient)."""
    weights = {k: v.astype(dtype) for k, v in base.items()}
    for key in adapters:
        if key.endswith(".lora_a"):
            name = key[: -len(".lora_a")]
            weights[name] = LowRank(weights[name], adapters[key].astype(dtype),
                                    adapters[f"{name}.lora_b"].astype(dtype), c.scale)
    return weights


def merge(c: LoRAConfig, base: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The weights with W + scale * B A for every adapted W (computed in float32, rounded to W's
    dtype); the others as they are."""
    merged = dict(base)
    for key in adapters:
        if key.endswith(".lora_a"):
            name = key[: -len(".lora_a")]
            a, b = adapters[key], adapters[f"{name}.lora_b"]
            delta = jnp.tensordot(b, a, axes=([-1], [0]))                     # [*out, *in]
            merged[name] = (base[name].astype(jnp.float32) + c.scale * delta).astype(base[name].dtype)
    return merged
