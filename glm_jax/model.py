"""The GLM-4 decoder in Flax NNX, with the original's numerics (see ../shared/glm4/NOTES.md).

Weights keep torch's [out, in] orientation (dims split, never transposed, so conversion is a
byte copy); every Param carries `axes`, its logical axis names, which the sharding rules map to
mesh axes. A projection's Param may hold a plain array or another kind of weight (a LoRA adapter
on a frozen weight in training): `dense` multiplies by any kind registered with `register_weight`.

The model is called with an `attend(layer, q, k, v)` function (cache-free attention in
forward.py, the KV cache in the engine) and, in training, a block runner (train/remat.py) that
adds rematerialisation and gradient fences around the blocks.

Numerics, as the original PyTorch code does them:
- matmuls accumulate in float32 and round once to the activation dtype (bias added before rounding);
- RMSNorm: variance and `x * rsqrt(var + eps)` in float32, weight multiplied in float32, then cast;
- RoPE: interleaved pairs (2i, 2i+1) on the first `rotary_dim` dims of each head; frequencies
  computed once on the host in numpy, angles `position * freq` in float32, cos/sin rounded to the
  activation dtype, rotation done in the activation dtype;
- attention scores and softmax in float32; logits rounded to the activation dtype (not upcast).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import precision
from .config import GLMConfig
from .sharding import Layout

# attend(layer_index, q [B,T,Hq,D], k [B,T,G,D], v [B,T,G,D]) -> [B,T,Hq,D]
LayerAttend = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


# -- dense: one matmul for every kind of weight ---------------------------------------------------

# matmul(eq, x, w) -> einsum(eq, x, w) in float32, for one kind of weight (see `register_weight`).
Matmul = Callable[[str, jax.Array, Any], jax.Array]
_MATMULS: dict[type, Matmul] = {}


def register_weight(kind: type, matmul: Matmul) -> None:
    """Lets `dense` take weights of type `kind` (a LoRA adapter on a frozen weight, a quantized
    weight, ...): `matmul(eq, x, w)` returns einsum(eq, x, w) in float32."""
    _MATMULS[kind] = matmul


def _value(p):
    return p.get_value() if isinstance(p, nnx.Variable) else p


def dense(eq: str, x: jax.Array, w, b=None) -> jax.Array:
    """einsum(eq, x, w) with float32 accumulation, plus the bias b, rounded once to x's dtype.
    w and b are Params or their values; w is a plain array or a registered kind of weight."""
    y = any_matmul(eq, x, _value(w))
    if b is not None:
        y = y + _value(b).astype(jnp.float32)
    return y.astype(x.dtype)


def any_matmul(eq: str, x: jax.Array, w) -> jax.Array:
    """einsum(eq, x, w) in float32 for w of any registered kind (a plain array: `matmul`)."""
    return _MATMULS.get(type(w), matmul)(eq, x, w)


def matmul(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
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
        q = dense("bte,hde->bthd", x, self.q_proj, self.q_bias)             # [B, T, Hq, D]
        k = dense("bte,gde->btgd", x, self.k_proj, self.k_bias)             # [B, T, G, D]
        v = dense("bte,gde->btgd", x, self.v_proj, self.v_bias)             # [B, T, G, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layout is not None:
            repeat = layout.kv_repeat(k.shape[2], q.shape[2])   # > 1 only when tensor > KV heads
            k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))
            q = layout.constrain(q, ("batch", "seq", "q_heads", "head_dim"))
            k, v = (layout.constrain(x, ("batch", "seq", "kv_heads", "head_dim")) for x in (k, v))
        out = attend(q, k, v)                                                # [B, T, Hq, D]
        return dense("bthd,ehd->bte", out, self.o_proj)


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
        [T, 2F] float32 intermediates and their gradients exist for T / k tokens at once, at the
        cost of one more forward of the MLP in the backward pass."""
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
        gate_up = dense("bte,cfe->btcf", x, self.gate_up_proj)           # [B, T, 2, F]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        hidden = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up
        return dense("btf,ef->bte", hidden, self.down_proj)


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


# run_blocks(blocks, x, call) -> x: runs the blocks over x in order, block i as `call(i, block, x)`.
# Training passes one that adds remat and gradient fences (train/remat.py).
BlockRunner = Callable[[Sequence["Block"], jax.Array, Callable[[int, "Block", jax.Array], jax.Array]], jax.Array]


def run_in_order(blocks: Sequence[Block], x: jax.Array, call) -> jax.Array:
    """The plain block runner: each block on the previous one's output."""
    for i, block in enumerate(blocks):
        x = call(i, block, x)
    return x


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
                 head: bool = True, run_blocks: BlockRunner | None = None):
        """tokens, positions [B, T] -> logits [B, T, V] in the weights' dtype ([B, 1, V] with
        last_only; without `head`, the final-normed hidden state [B, T, H] instead) and, with
        hidden_states, the embedding and every layer's output [L + 1, B, T, H].
        With a layout, activations are constrained to its logical shardings. `run_blocks` runs the
        blocks (default `run_in_order`; training's adds remat, see train/remat.py)."""
        x = self.embed[...][tokens]                                         # [B, T, H]
        cos, sin = rope_tables(positions, self.config, x.dtype)
        hidden = [x]

        def call(i: int, block: Block, x: jax.Array) -> jax.Array:
            return block(x, cos, sin, functools.partial(attend, i), layout)

        if hidden_states:
            if run_blocks is not None:
                raise ValueError("hidden_states needs the plain block runner (no remat)")
            plain = call

            def call(i, block, x):
                hidden.append(plain(i, block, x))
                return hidden[-1]

        x = (run_blocks or run_in_order)(list(self.layers), x, call)
        if last_only:
            x = x[:, -1:]
        out = self.final_norm(x)
        if head:
            out = dense("bte,ve->btv", out, self.lm_head)
        return (out, jnp.stack(hidden)) if hidden_states else out


def abstract_model(config: GLMConfig, dtype) -> GLM:
    """The model's structure with ShapeDtypeStructs for weights: nothing allocated."""
    return nnx.eval_shape(lambda: GLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
