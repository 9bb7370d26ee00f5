"""Weight-only quantization: the `Quantized` weight kind, quantize / dequantize, and the names and
storage of a quantized model's weights.

A projection weight W [*out, *in] (torch's [out, in] orientation, dims split as the model keeps
them) becomes `values` of W's shape and dtype int8 or int4, plus float32 `scales` [*out, G]: the
K = prod(in) input features of each output channel fall into G groups of K / G consecutive
features, each with the scale absmax / qmax (symmetric, round to nearest; qmax 127 for int8,
7 for int4). int8 uses one group per output channel (G = 1); int4 groups of 128 inputs
(`options.INT4_GROUP`). `values` keep W's logical axes (so its sharding); `scales` take the
output dims' axes and, for the groups, the first input dim's.

`model.dense` multiplies a `Quantized` weight without a full-precision copy of it: one group per
channel multiplies by the values converted to the activations' dtype (exact: |v| <= 127) and
scales the float32 product; grouped weights are dequantized in the activations' dtype inside the
product (XLA fuses either into the dot on TPU; XLA's CPU backend converts the weight to float32
first, see docs/design.md).

What is quantized (`targets`): the attention and MLP projections of every layer. The embedding
(a lookup: decoding reads one row a token), the output layer, the norms and the biases stay in
the model's float dtype (docs/benchmarks.md has the measurement behind the output layer's).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .model import matmul, register_weight
from .options import Quantization
from .params import ParamSpec, out_dims

TARGETS = re.compile(r"^layers\.\d+\.(attn|mlp)\.\w+_proj$")
VALUES, SCALES = "values", "scales"      # the stored names: NAME.values, NAME.scales
BITS = {"int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized weight as a Param holds it: values [*out, *in] int8 / int4, scales [*out, G] float32."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def out_dims(self) -> int:
        return len(self.scales.shape) - 1


jax.tree_util.register_dataclass(Quantized, data_fields=["values", "scales"], meta_fields=[])


def storage_dtype(kind: str):
    return {"int8": jnp.int8, "int4": jnp.int4}[kind]


def groups(shape: tuple[int, ...], k: int, q: Quantization, name: str = "a weight") -> int:
    """G: the scale groups of each output channel of a weight of `shape` with k output dims; a
    width the group does not divide is a ValueError naming the weight."""
    features = math.prod(shape[k:])
    if q.group is None:
        return 1
    if features % q.group:
        raise ValueError(f"--quantize {q}: {name} has {features} input features, not a multiple of the group "
                         f"size {q.group}; choose a group that divides it ({q.kind}:G)")
    return features // q.group


def quantize(w: jax.Array, q: Quantization, k: int, name: str = "a weight") -> Quantized:
    """W [*out, *in] (k output dims) -> Quantized: per group, scale = absmax / qmax and values =
    round(W / scale) (computed in float32)."""
    g = groups(tuple(w.shape), k, q, name)
    return _quantize(jnp.asarray(w), q.kind, g, k)


@jax.jit(static_argnums=(1, 2, 3))
def _quantize(w: jax.Array, kind: str, g: int, k: int) -> Quantized:
    qmax = 2 ** (BITS[kind] - 1) - 1
    out = w.shape[:k]
    w32 = w.astype(jnp.float32).reshape(*out, g, -1)
    scales = jnp.max(jnp.abs(w32), axis=-1) / qmax                                # [*out, G]
    values = jnp.round(w32 / jnp.where(scales > 0, scales, 1.0)[..., None])
    values = jnp.clip(values, -qmax, qmax).astype(storage_dtype(kind)).reshape(w.shape)
    return Quantized(values, scales)


def dequantize(w: Quantized, dtype) -> jax.Array:
    """The weight the quantized one stands for, in `dtype` (the product values x scale rounded once)."""
    shape, g = w.shape, w.scales.shape[-1]
    v = w.values.reshape(*shape[:w.out_dims], g, -1).astype(dtype)
    return (v * w.scales.astype(dtype)[..., None]).reshape(shape)


def quantized_matmul(eq: str, x: jax.Array, w: Quantized) -> jax.Array:
    """einsum(eq, x, dequantize(w)) in float32. One group per output channel (int8), output dims
    first in w and last in the result: the product of x and the values (converted to x's dtype,
    exactly) scaled per output channel in float32. Else the weight is dequantized in x's dtype
    inside the product."""
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    outer = ws[:w.out_dims]
    if w.scales.shape[-1] == 1 and out.endswith(outer) and not any(c in xs for c in outer):
        y = matmul(eq, x, w.values.astype(x.dtype))
        return y * w.scales.reshape(w.shape[:w.out_dims])
    return matmul(eq, x, dequantize(w, x.dtype))


register_weight(Quantized, quantized_matmul)


def as_float(w, dtype) -> jax.Array:
    """A weight of any kind here as a float array in `dtype` (a Quantized one dequantized)."""
    return dequantize(w, dtype) if isinstance(w, Quantized) else w.astype(dtype)


# -- the weights of a model --------------------------------------------------------------------------

def targets(specs: Mapping[str, ParamSpec]) -> list[str]:
    """The weights quantized: every layer's attention and MLP projections."""
    return [n for n in specs if TARGETS.match(n)]


def check(specs: Mapping[str, ParamSpec], q: Quantization) -> None:
    """ValueError (one line) when a target's width is not a multiple of the group."""
    for name in targets(specs):
        groups(specs[name].shape, out_dims(specs[name]), q, name)


def stored_specs(specs: Mapping[str, ParamSpec], q: Quantization | None) -> dict[str, ParamSpec]:
    """The stored arrays of a model quantized with q: each target as NAME.values (the weight's
    shape and axes, int8 / int4) and NAME.scales (float32 [*out, G]); the others as they are."""
    if q is None:
        return dict(specs)
    check(specs, q)
    stored = {}
    for name, spec in specs.items():
        if not TARGETS.match(name):
            stored[name] = spec
            continue
        k = out_dims(spec)
        g = groups(spec.shape, k, q, name)
        stored[f"{name}.{VALUES}"] = ParamSpec(spec.shape, storage_dtype(q.kind), spec.axes)
        stored[f"{name}.{SCALES}"] = ParamSpec((*spec.shape[:k], g), jnp.float32, (*spec.axes[:k + 1],))
    return stored


def quantize_stream(params: Iterable[tuple[str, Any]], specs: Mapping[str, ParamSpec],
                    q: Quantization | None) -> Iterator[tuple[str, Any]]:
    """(name, array) pairs -> the stored pairs of the model quantized with q: each target as its
    NAME.values and NAME.scales (host numpy arrays for host inputs), the others unchanged."""
    if q is not None:
        check(specs, q)
    for name, array in params:
        if q is None or not TARGETS.match(name):
            yield name, array
            continue
        w = quantize(array, q, out_dims(specs[name]), name)
        on_host = isinstance(array, np.ndarray)
        yield f"{name}.{VALUES}", np.asarray(w.values) if on_host else w.values
        yield f"{name}.{SCALES}", np.asarray(w.scales) if on_host else w.scales


def assemble(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Stored arrays by name (NAME.values / NAME.scales pairs) -> weights by name (Quantized)."""
    weights = {}
    for name, array in stored.items():
        base, _, part = name.rpartition(".")
        if part == VALUES:
            weights[base] = Quantized(array, stored[f"{base}.{SCALES}"])
        elif part != SCALES:
            weights[name] = array
    return weights


def stored_quantization(stored: Mapping[str, Any], specs: Mapping[str, ParamSpec]) -> Quantization | None:
    """The quantization of a checkpoint from its arrays' metadata (shape and dtype by name)."""
    name = next((n for n in targets(specs) if f"{n}.{VALUES}" in stored), None)
    if name is None:
        return None
    return _quantization(stored[f"{name}.{VALUES}"], stored[f"{name}.{SCALES}"])


def quantization_of(weights: Mapping[str, Any]) -> Quantization | None:
    """The quantization of a model's weights by name (None: no Quantized weight among them)."""
    w = next((w for w in weights.values() if isinstance(w, Quantized)), None)
    return None if w is None else _quantization(w.values, w.scales)


def _quantization(values, scales) -> Quantization:
    kind = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.int4): "int4"}[jnp.dtype(values.dtype)]
    features, g = math.prod(values.shape[len(scales.shape) - 1:]), scales.shape[-1]
    return Quantization(kind, None if g == 1 else features // g)


def stored_bytes(specs: Mapping[str, ParamSpec]) -> int:
    """Bytes of the arrays `specs` describes (int4: half a byte each)."""
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize // (2 if jnp.dtype(s.dtype) == jnp.int4 else 1)
               for s in specs.values())
