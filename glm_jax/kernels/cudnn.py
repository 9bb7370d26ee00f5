"""A prefill chunk by cuDNN's fused (flash) attention; the one import of JAX's private cuDNN module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import State, as_state, merge


def cudnn_chunk(q, k, v, start, implementation: str = "cudnn") -> State:
    """A prefill chunk by fused attention: q [B,C,Hq,D] at slots [start, start+C) of a cache k/v
    [B,S,G,D] that one device holds whole, every row filled from slot 0. The chunk's causal
    self-attention and its attention to slots [0, start) are two fused calls, merged by their
    float32 log-sum-exp (the public `jax.nn.dot_product_attention` rounds cuDNN's to the
    activation dtype, so the cuDNN call is the private module behind it).
    implementation "xla": the same decomposition through jax.nn's XLA path (a test seam: the
    engine always runs "cudnn")."""
    b, c, hq, d = q.shape
    g = k.shape[2]

    def run(keys, values, causal, kv_len=None):
        lengths = None if kv_len is None else (jnp.full((b,), c, jnp.int32), jnp.full((b,), kv_len, jnp.int32))
        if implementation == "cudnn":
            from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

            mask = {(True, False): MaskType.CAUSAL, (False, True): MaskType.PADDING}[causal, lengths is not None]
            q_len, kv_len = lengths or (None, None)
            out, lse = dot_product_attention(q, keys, values, q_seqlen=q_len, kv_seqlen=kv_len, scale=1.0 / np.sqrt(d),
                                             mask_type=mask, return_residual=True)                # lse [B, Hq, C]
        else:
            out, lse = jax.nn.dot_product_attention(
                q, keys, values, is_causal=causal, query_seq_lengths=lengths and lengths[0],
                key_value_seq_lengths=lengths and lengths[1], implementation=implementation, return_residual=True)
            lse = lse.transpose(0, 2, 1)                                         # [B, C, Hq] -> [B, Hq, C]
        out = out.astype(jnp.float32).reshape(b, c, g, hq // g, d).transpose(0, 2, 3, 1, 4)  # [B,G,R,C,D]
        return as_state(out, lse.astype(jnp.float32).reshape(b, g, hq // g, c))

    own = run(*(jax.lax.dynamic_slice_in_dim(x, start, c, 1) for x in (k, v)), True)
    return jax.lax.cond(start > 0, lambda: merge(own, run(k, v, False, start)), lambda: own)
