"""The model without a KV cache: plain causal self-attention on one device's tokens, or the tokens
laid out zigzag over the `sequence` mesh axis with context-parallel attention (ring.py).

`forward(graphdef, state, ...)` merges the split state inside `jax.jit`, so the hot path is a
function of arrays only; the train step runs `device_order_call` and keeps the device order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import PAD, AttentionFn, get_attention, segment_index
from .model import GLM, LayerAttend
from .ring import context_parallel, token_order
from .sharding import Layout


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
