"""LoRA: low-rank adapters on the attention and MLP projections, the base weights frozen.

A weight W keeps torch's [out, in] orientation with its dims split (q_proj [Hq, D, H], o_proj
[H, Hq, D], gate_up_proj [2, F, H], ...). Its adapter is A [r, *in] and B [*out, r]; the weight the
forward uses is W + (alpha / r) * B A. A starts random (std 1 / sqrt(in features)), B at zero, so
training starts from the base model exactly. Training multiplies through the adapter (`attach`
puts a `LowRank` weight in the model's Param, which `model.dense` multiplies as x W + scale (x A) B,
as PEFT does); the output folder gets the merged weights (`merge`). The embedding, the norms and
the output layer are never adapted, whatever the pattern says.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp

from ..attention import precision
from ..model import any_matmul, register_weight
from ..params import ParamSpec, out_dims
from ..quantize import Quantized, as_float

DEFAULT_TARGETS = r"\.(q|k|v|o|gate_up|down)_proj$"


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A weight plus a LoRA adapter, as a Param holds it in training: base [*out, *in], a [r, *in],
    b [*out, r]; it multiplies as base + scale * b a, without forming that sum."""

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    @property
    def dtype(self):
        return self.a.dtype


jax.tree_util.register_dataclass(LowRank, data_fields=["base", "a", "b"], meta_fields=["scale"])


def low_rank_matmul(eq: str, x: jax.Array, w: LowRank) -> jax.Array:
    """einsum(eq, x, base) + scale * (x a) b in float32: x's contracted dims against a (rounded to
    x's dtype), then b's rank dim."""
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    inner, outer = "".join(c for c in ws if c in xs), "".join(c for c in ws if c not in xs)
    kept = "".join(c for c in xs if c not in inner)
    y = any_matmul(eq, x, w.base)                                                         # any kind of base
    xa = jnp.einsum(f"{xs},z{inner}->{kept}z", x, w.a, preferred_element_type=jnp.float32,
                    precision=precision(x, w.a)).astype(x.dtype)                           # [..., r]
    return y + w.scale * jnp.einsum(f"{kept}z,{outer}z->{out}", xa, w.b, preferred_element_type=jnp.float32,
                                    precision=precision(xa, w.b))


register_weight(LowRank, low_rank_matmul)


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


def trainable_and_frozen(c: LoRAConfig | None, weights: Mapping[str, jax.Array], specs: Mapping[str, ParamSpec],
                         key: jax.Array, mesh: jax.sharding.Mesh, *, abstract: bool = False) -> tuple[dict, dict]:
    """(trainable, frozen) weights of a run: every weight trains (nothing frozen), or under LoRA new
    adapters (`init_adapters`, replicated on `mesh`) train on the frozen `weights`. abstract:
    the adapters as ShapeDtypeStructs, nothing computed (the compile report)."""
    if c is None:
        return dict(weights), {}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if abstract:
        adapters = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
                    for n, x in jax.eval_shape(lambda: init_adapters(c, specs, key)).items()}
    else:
        adapters = jax.device_put(init_adapters(c, specs, key), replicated)
    return adapters, dict(weights)


def attach(c: LoRAConfig, base: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array], dtype) -> dict:
    """The weights the training forward uses: every adapted W as a LowRank (W, A, B in `dtype`),
    multiplied without forming W + scale * B A (no full-size merged weight or its gradient)."""
    weights = {k: v if isinstance(v, Quantized) else v.astype(dtype) for k, v in base.items()}
    for key in adapters:
        if key.endswith(".lora_a"):
            name = key[: -len(".lora_a")]
            weights[name] = LowRank(weights[name], adapters[key].astype(dtype),
                                    adapters[f"{name}.lora_b"].astype(dtype), c.scale)
    return weights


def merge(c: LoRAConfig, base: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The weights with W + scale * B A for every adapted W (computed in float32, rounded to W's
    dtype; a quantized W: to the adapters' dtype); the others as they are."""
    merged = dict(base)
    for key in adapters:
        if key.endswith(".lora_a"):
            name = key[: -len(".lora_a")]
            a, b = adapters[key], adapters[f"{name}.lora_b"]
            delta = jnp.tensordot(b, a, axes=([-1], [0]))                     # [*out, *in]
            dtype = a.dtype if isinstance(base[name], Quantized) else base[name].dtype
            merged[name] = (as_float(base[name], jnp.float32) + c.scale * delta).astype(dtype)
    return merged
