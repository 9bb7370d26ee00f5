"""The GLM-4 decoder in Flax NNX, with the original's numerics (see ../shared/glm4/NOTES.md).

Weights keep torch's [out, in] orientation (dims split, never transposed, so conversion is a
byte copy); every Param carries `axes`, its logical axis names,
which the sharding rules map to mesh axes. The forward is pure: `forward(graphdef, state, ...)`
merges the split state inside `jax.jit`, so the hot path is a function of arrays only.

Numerics, as the original PyTorch code does them:
- matmuls accumulate in float32 and round once to the activation dtype (bias added before rounding);
- RMSNorm: variance and `x * rsqrt(var + eps)` in float32, weight multiplied in float32, then cast;
- RoPE: interleaved pairs (2i, 2i+1) on the first `rotary_dim` dims of each head; frequencies
  computed once on the host in numpy, angles `position * freq` in float32, cos/sin rounded to the
  activation dtype, rotation done in the activation dtype;
- attention scores and softmax in float32; logits rounded to the activation dtype (not upcast).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import PAD, AttentionFn, get_attention, precision, segment_index
from .config import GLMConfig
from .ring import context_parallel, token_order
from .sharding import Layout

# attend(layer_index, q [B,T,Hq,D], k [B,T,G,D], v [B,T,G,D]) -> [B,T,Hq,D]
LayerAttend = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A weight plus a LoRA adapter, as a Param may hold it in training: base [*out, *in],
    a [r, *in], b [*out, r]; it multiplies as base + scale * b a, without forming that sum."""

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    def __getitem__(self, index):   # `param[...]` as for an array Param
        return self

    @property
    def dtype(self):
        return self.base.dtype


jax.tree_util.register_dataclass(LowRank, data_fields=["base", "a", "b"], meta_fields=["scale"])


def dense(eq: str, x: jax.Array, w: jax.Array | LowRank, b: jax.Array | None = None) -> jax.Array:
    """einsum with float32 accumulation, optional bias, rounded once to x's dtype. A LowRank
    weight adds scale * (x a) b: x's contracted dims against a, then b's rank dim."""
    if isinstance(w, LowRank):
        (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
        inner, outer = "".join(c for c in ws if c in xs), "".join(c for c in ws if c not in xs)
        kept = "".join(c for c in xs if c not in inner)
        y = jnp.einsum(eq, x, w.base, preferred_element_type=jnp.float32, precision=precision(x, w.base))
        xa = jnp.einsum(f"{xs},z{inner}->{kept}z", x, w.a, preferred_element_type=jnp.float32,
                        precision=precision(x, w.a)).astype(x.dtype)                       # [..., r]
        y = y + w.scale * jnp.einsum(f"{kept}z,{outer}z->{out}", xa, w.b, preferred_element_type=jnp.float32,
                                     precision=precision(xa, w.b))
    else:
        y = _matmul(eq, x, w)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _matmul(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) in float32; a weight whose own dims and contracted dims are each a run
    ("bte,hde->bthd", "bthd,ehd->bte") goes as one [N, K] matrix (reshapes that move no data),
    a plain matmul: as a 3-D dot_general, XLA CPU copied (transposed) those weights at every
    decode step, inside the loop."""
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    inner = "".join(c for c in ws if c in xs)
    outer = "".join(c for c in ws if c not in xs)
    flat = ws == outer + inner and xs.endswith(inner) and out.endswith(outer) and out[:-len(outer)] == xs[:-len(inner)]
    if not flat or len(ws) == 2:
        return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32, precision=precision(x, w))
    n, k = math.prod(w.shape[:len(outer)]), math.prod(w.shape[len(outer):])
    lead = x.shape[:len(xs) - len(inner)]
    y = jnp.einsum("...k,nk->...n", x.reshape(*lead, k), w.reshape(n, k), preferred_element_type=jnp.float32,
                   precision=precision(x, w))
    return y.reshape(*lead, *w.shape[:len(outer)])


@functools.lru_cache(maxsize=None)
def rope_frequencies(theta: float, rotary_dim: int) -> np.ndarray:
    """[rotary_dim // 2] float32: 1 / theta ** (2i / rotary_dim), as torch computes it in float32.

    pow is evaluated in float64 and rounded (torch's float32 pow agrees to the last bit for the
    GLM-4 bases and fixture sizes; XLA's in-jit pow does not, so this stays on the host)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return np.float32(1.0) / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)


def rope_tables(positions: jax.Array, config: GLMConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, rotary_dim // 2] in dtype."""
    freqs = rope_frequencies(config.rope_theta, config.rotary_dim)
    angles = positions.astype(jnp.float32)[..., None] * freqs          # float32, like torch.outer
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; rotates interleaved pairs of the first 2 * cos.shape[-1] dims."""
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)          # [B, T, H, rot/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(*x.shape[:-1], rot)
    return jnp.concatenate([rotated, x[..., rot:]], axis=-1)


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: GLMConfig, dtype, rngs: nnx.Rngs):
        h, d, hq, g = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
        self.q_proj = nnx.Param(_normal(rngs, (hq, d, h), dtype), axes=("q_heads", "head_dim", "embed"))
        self.k_proj = nnx.Param(_normal(rngs, (g, d, h), dtype), axes=("kv_heads", "head_dim", "embed"))
        self.v_proj = nnx.Param(_normal(rngs, (g, d, h), dtype), axes=("kv_heads", "head_dim", "embed"))
        if c.qkv_bias:
            self.q_bias = nnx.Param(_normal(rngs, (hq, d), dtype), axes=("q_heads", "head_dim"))
            self.k_bias = nnx.Param(_normal(rngs, (g, d), dtype), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(_normal(rngs, (g, d), dtype), axes=("kv_heads", "head_dim"))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_proj = nnx.Param(_normal(rngs, (h, hq, d), dtype), axes=("embed", "q_heads", "head_dim"))

    def __call__(self, x, cos, sin, attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 layout: Layout | None = None):
        bias = lambda p: None if p is None else p[...]
        q = dense("bte,hde->bthd", x, self.q_proj[...], bias(self.q_bias))   # [B, T, Hq, D]
        k = dense("bte,gde->btgd", x, self.k_proj[...], bias(self.k_bias))   # [B, T, G, D]
        v = dense("bte,gde->btgd", x, self.v_proj[...], bias(self.v_bias))   # [B, T, G, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layout is not None:
            repeat = layout.kv_repeat(k.shape[2], q.shape[2])   # > 1 only when tensor > KV heads
            k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))
            q = layout.constrain(q, ("batch", "seq", "q_heads", "head_dim"))
            k, v = (layout.constrain(x, ("batch", "seq", "kv_heads", "head_dim")) for x in (k, v))
        out = attend(q, k, v)                                                # [B, T, Hq, D]
        return dense("bthd,ehd->bte", out, self.o_proj[...])


MLP_TOKENS = 4096   # tokens per device the MLP takes at once (see MLP.__call__)


class MLP(nnx.Module):
    def __init__(self, c: GLMConfig, dtype, rngs: nnx.Rngs):
        h, f = c.hidden_size, c.intermediate_size
        # gate and up stacked (HF's fused [gate | up] rows): one [2F, H] matmul, one pass over x
        self.gate_up_proj = nnx.Param(_normal(rngs, (2, f, h), dtype), axes=("gate_up", "mlp", "embed"))
        self.down_proj = nnx.Param(_normal(rngs, (h, f), dtype), axes=("embed", "mlp"))

    def __call__(self, x, layout: Layout | None = None):
        """x [B, T, H] -> [B, T, H]. Past MLP_TOKENS tokens per device, the tokens go through in k
        interleaved groups (token j of every k), one group at a time under `jax.checkpoint`: the
        [T, 2F] float32 intermediates and their gradients exist for T / k tokens at once (a 131K
        train step on v5e-8: 1.67 GiB each for the whole sequence), at the cost of one more
        forward of the MLP in the backward pass."""
        b, t, e = x.shape
        n = layout.size("sequence") if layout is not None else 1
        k = t // (n * MLP_TOKENS)
        if k <= 1 or t % (n * k):
            return self._tokens(x)
        groups = jnp.moveaxis(x.reshape(b, t // k, k, e), 2, 0)                # [k, B, T/k, H]
        if layout is not None:
            groups = layout.constrain(groups, (None, "batch", "seq", "act_embed"))
        out = jax.lax.map(jax.checkpoint(self._tokens), groups)                # [k, B, T/k, H]
        return jnp.moveaxis(out, 0, 2).reshape(b, t, e)

    def _tokens(self, x):
        gate_up = dense("bte,cfe->btcf", x, self.gate_up_proj[...])           # [B, T, 2, F]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        hidden = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up
        return dense("btf,ef->bte", hidden, self.down_proj[...])


class Block(nnx.Module):
    def __init__(self, c: GLMConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attn = Attention(c, dtype, rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c, dtype, rngs)

    def __call__(self, x, cos, sin, attend, layout: Layout | None = None):
        if layout is not None:
            x = layout.constrain(x, ("batch", "seq", "act_embed"))
        x = x + self.attn(self.input_norm(x), cos, sin, attend, layout)
        return x + self.mlp(self.post_attn_norm(x), layout)


class GLM(nnx.Module):
    """GLM-4 decoder: embedding, `num_layers` pre-norm blocks, final RMSNorm, untied output layer."""

    def __init__(self, config: GLMConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        c = self.config = config
        self.embed = nnx.Param(_normal(rngs, (c.vocab_size, c.hidden_size), dtype), axes=("vocab", "embed"))
        self.layers = nnx.List([Block(c, dtype, rngs) for _ in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = nnx.Param(_normal(rngs, (c.vocab_size, c.hidden_size), dtype), axes=("vocab", "embed"))

    @property
    def dtype(self):
        return self.embed.dtype

    def __call__(self, tokens: jax.Array, positions: jax.Array, attend: LayerAttend,
                 *, hidden_states: bool = False, layout: Layout | None = None, last_only: bool = False,
                 head: bool = True, remat: str = "none", fence: bool = True):
        """tokens, positions [B, T] -> logits [B, T, V] in the weights' dtype ([B, 1, V] with
        last_only; without `head`, the final-normed hidden state [B, T, H] instead) and, with
        hidden_states, the embedding and every layer's output [L + 1, B, T, H].
        With a layout, activations are constrained to its logical shardings. `remat` (see REMAT and
        REMATS): what each block keeps for the backward pass; with a policy (training) and `fence`, every
        block's weight gradients are fenced to its input gradient (`fence_gradients`)."""
        x = self.embed[...][tokens]                                         # [B, T, H]
        cos, sin = rope_tables(positions, self.config, x.dtype)
        hidden = [x]
        if remat == "segments":
            if hidden_states:
                raise ValueError("remat 'segments' keeps no per-layer outputs; hidden_states needs another policy")
            layers, step = list(enumerate(self.layers)), segment_length(len(self.layers))
            for start in range(0, len(layers), step):
                x = _segment(layers[start:start + step], x, cos, sin, attend, layout, fence)
        else:
            for i, layer in enumerate(self.layers):
                x = _block(layer, x, cos, sin, functools.partial(attend, i), layout, remat, fence=fence and i > 0)
                if hidden_states:
                    hidden.append(x)
        if last_only:
            x = x[:, -1:]
        out = self.final_norm(x)
        if head:
            out = dense("bte,ve->btv", out, self.lm_head[...])
        return (out, jnp.stack(hidden)) if hidden_states else out


# What a block keeps for its backward pass: "none" everything, "dots" the matmul outputs (the rest
# is recomputed), "full" only its input (the whole block is recomputed). "segments" (`_segment`):
# as "full", but only every `segment_length`-th block input is kept through the forward pass.
REMAT = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         "full": jax.checkpoint_policies.nothing_saveable}
REMATS = (*REMAT, "segments")


def segment_length(layers: int) -> int:
    """Blocks per segment under remat "segments": ceil(sqrt(layers)), which about minimises the
    block inputs alive at once (layers / s kept through the forward pass, s more inside the
    segment being differentiated): 40 layers, segments of 7, 13 inputs instead of 40."""
    return math.ceil(math.sqrt(layers))


def _segment(layers: list[tuple[int, Block]], x, cos, sin, attend: LayerAttend, layout: Layout | None,
             fence: bool):
    """Consecutive blocks (index, block) under one more `jax.checkpoint` that keeps only the
    segment's input: the backward pass runs the segment's forward again (each block remat "full"
    inside it, keeping its own input) just before differentiating its blocks. One more forward of
    every block, for (layers / s + s) block inputs alive instead of all of them."""
    graphdefs, states = zip(*(nnx.split(layer) for _, layer in layers))

    def run(states, x):
        for (i, _), graphdef, state in zip(layers, graphdefs, states):
            x = _block(nnx.merge(graphdef, state), x, cos, sin, functools.partial(attend, i), layout, "full",
                       fence=fence and i > 0)
        return x

    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(list(states), x)


def _block(layer: Block, x, cos, sin, attend, layout: Layout | None, remat: str, fence: bool = False):
    """One block under `remat`. With `fence` (and a remat policy, i.e. training), the block's
    weight gradients are fenced to its input's gradient (`fence_gradients`)."""
    if remat not in REMAT:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(REMATS)}")
    if remat == "none":
        return layer(x, cos, sin, attend, layout)
    graphdef, state = nnx.split(layer)
    if fence:
        x, state = fence_gradients(x, state)
    run = lambda state, x: nnx.merge(graphdef, state)(x, cos, sin, attend, layout)
    return jax.checkpoint(run, policy=REMAT[remat])(state, x)


@jax.custom_vjp
def _fence(x, weights):
    return x, weights


def _fence_fwd(x, weights):
    return (x, weights), None


def _fence_bwd(_, cotangents):
    return jax.lax.optimization_barrier(cotangents)


_fence.defvjp(_fence_fwd, _fence_bwd)


def fence_gradients(x, state):
    """(x, state) unchanged; in the backward pass, the gradients of the block's trained weights
    (a LowRank's a and b if the state has any, else every weight) leave together with x's through
    one optimization barrier. So the previous block's backward cannot start before this block's
    weight gradients are computed: left free, XLA deferred those small [in, r] / [out, r] dots
    (contractions over all tokens) to the end of the step, next to the all-reduce of every
    gradient, and kept their [T, H] operands (the block's output gradient, its attention output,
    its normed input) alive across every later layer's backward: 3 to 4 of them per layer."""
    is_low_rank = lambda v: isinstance(v, LowRank)
    leaves, treedef = jax.tree.flatten(state, is_leaf=is_low_rank)
    lora = any(map(is_low_rank, leaves))
    trained = [(w.a, w.b) if is_low_rank(w) else w for w in leaves if is_low_rank(w) or not lora]
    x, trained = _fence(x, trained)
    it = iter(trained)
    fenced = []
    for w in leaves:
        if is_low_rank(w):
            a, b = next(it)
            fenced.append(dataclasses.replace(w, a=a, b=b))
        else:
            fenced.append(w if lora else next(it))
    return x, jax.tree.unflatten(treedef, fenced)


def self_attend(attention: str | AttentionFn) -> LayerAttend:
    """Plain (cache-free) causal self-attention over the whole input, in token order."""
    fn = get_attention(attention)

    def attend(layer: int, q, k, v):
        b, t = q.shape[:2]
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return fn(q, k, v, index, index)

    return attend


def device_order_call(model: GLM, tokens: jax.Array, positions: jax.Array, layout: Layout, *,
                      strategy: str = "ring", segments: jax.Array | None = None,
                      **kwargs) -> tuple[np.ndarray, jax.Array]:
    """The model on tokens [B, T] laid out zigzag over the `sequence` axis (padded to fit), every
    activation sharded on it, attention context-parallel; with `segments` [B, T] (packed rows)
    a token sees only the earlier tokens of its own segment. Returns `order` [T'] (the token index
    of each laid-out slot; >= T for padding) and the model's outputs in that order (kwargs: GLM's)."""
    b, t = tokens.shape
    order, _ = token_order(t, layout.size("sequence"))
    real = order < t
    take = np.where(real, order, 0)
    index = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (b, len(order)))
    if segments is not None:
        index = segment_index(segments[:, take], index)
    q_index = jnp.where(real, index, -1)
    k_index = jnp.where(real, index, PAD)
    attend_cp = context_parallel(layout, strategy=strategy)
    return order, model(tokens[:, take], positions[:, take], lambda i, q, k, v: attend_cp(q, k, v, q_index, k_index),
                        layout=layout, **kwargs)


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
            *, attention: str | AttentionFn = "auto", hidden_states: bool = False,
            layout: Layout | None = None, strategy: str = "ring"):
    """Pure forward of a split GLM: logits [B, T, V] as float32 (and hidden states if asked).

    Without a layout, plain causal attention (`attention`). With one, the tokens are laid out
    zigzag over the `sequence` axis (padded to fit), every activation stays sharded on it, attention
    is context-parallel (`strategy`: "ring" or "allgather") and the outputs come back in order."""
    model = nnx.merge(graphdef, state)
    if layout is None:
        out = model(tokens, positions, self_attend(attention), hidden_states=hidden_states)
    else:
        order, out = device_order_call(model, tokens, positions, layout, strategy=strategy,
                                       hidden_states=hidden_states)
        inverse = np.argsort(order)[:tokens.shape[1]]
        out = (out[0][:, inverse], out[1][:, :, inverse]) if hidden_states else out[:, inverse]
    if hidden_states:
        return out[0].astype(jnp.float32), out[1].astype(jnp.float32)
    return out.astype(jnp.float32)


def abstract_model(config: GLMConfig, dtype) -> GLM:
    """The model's structure with ShapeDtypeStructs for weights: nothing allocated."""
    return nnx.eval_shape(lambda: GLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
