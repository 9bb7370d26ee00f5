"""Next-token cross-entropy without the [T, vocab] logits: chunked, vocab-parallel, float32.

At 128K tokens x 151,552 vocab the float32 logits of one sequence are 77 GB. The loss runs inside
one shard_map over the mesh: each device takes its own tokens (its batch rows and `sequence` slice)
in chunks of `chunk` tokens and its own rows of the output layer (`vocab` on `tensor`); a chunk's
logits [b, chunk, V / tensor] live only inside a rematerialised scan step, and the log-sum-exp and
the target's logit are reduced over `tensor` (psum) as Megatron's vocab-parallel cross-entropy does.

When few targets count (answer-only fine-tuning: a few answer tokens in a long prompt), a static
budget `counted` (at least the most counted targets of any row, see `counted_budget`) gathers
those positions first, so the output layer runs on them alone instead of on every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..model import dense
from ..sharding import Layout
from .data import IGNORE  # -100: a target that does not count (transformers' ignore_index)


def shift_labels(labels: jax.Array) -> jax.Array:
    """labels [B, T] aligned with the input ids (transformers' convention) -> targets [B, T]:
    position t predicts labels[t + 1]; the last position predicts nothing."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


MIN_BUDGET = 16  # the smallest gathered budget (fewer shapes to compile)


def counted_budget(labels: np.ndarray, seq_len: int) -> int | None:
    """The `counted` budget of a batch's labels [..., T] (IGNORE where nothing counts): the most
    counted labels of any row, rounded up to a power of two (from MIN_BUDGET, so a run compiles a
    few step shapes); None (every position goes through the output layer) from half of seq_len on."""
    most = int((np.asarray(labels) != IGNORE).sum(-1).max(initial=0))
    budget = max(MIN_BUDGET, 1 << max(most - 1, 0).bit_length())
    return None if 2 * budget >= seq_len else budget


def gather_counted(h: jax.Array, y: jax.Array, counted: int) -> tuple[jax.Array, jax.Array]:
    """h [b, t, H], y [b, t] -> the first `counted` positions of each row whose target counts, in
    order: h [b, counted, H], y [b, counted] (IGNORE past a row's last counted target). A row with
    more counted targets than `counted` would lose the rest: the budget must cover every row."""
    idx = jnp.argsort(y == IGNORE, axis=1, stable=True)[:, :counted]              # counted first [b, K]
    return jnp.take_along_axis(h, idx[..., None], axis=1), jnp.take_along_axis(y, idx, axis=1)


def cross_entropy(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, layout: Layout, *,
                  chunk: int = 1024, counted: int | None = None) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, H] (final-normed, the model's dtype), lm_head [V, H], targets [B, T] (IGNORE
    where nothing counts) -> (summed float32 loss, number of counted targets) over the whole mesh.
    Logits are rounded to the model's dtype before the float32 softmax, as the model (and
    transformers' loss on its logits) does. T must divide by the `sequence` axis.
    counted: at most this many targets count in any row (static; None: any number): only their
    positions go through the output layer (`gather_counted`)."""
    vocab = layout.mesh_axes("vocab", lm_head.shape[0])
    batch = layout.mesh_axes("batch", hidden.shape[0])
    seq = layout.mesh_axes("seq", hidden.shape[1])
    vocab_axis = vocab[0] if vocab else None

    def local(h, w, y):                                   # h [b, t, H], w [v, H], y [b, t]
        if counted is not None and counted < h.shape[1]:
            h, y = gather_counted(h, y, counted)          # [b, counted, H], [b, counted]
        b, t, e = h.shape
        c = min(chunk, t)
        pad = -t % c
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        y = jnp.pad(y, ((0, 0), (0, pad)), constant_values=IGNORE)
        hs = h.reshape(b, -1, c, e).swapaxes(0, 1)        # [n, b, c, H]
        ys = y.reshape(b, -1, c).swapaxes(0, 1)           # [n, b, c]
        v = w.shape[0]
        offset = jax.lax.axis_index(vocab_axis) * v if vocab_axis else 0

        @jax.checkpoint
        def chunk_loss(h, y):                             # h [b, c, H], y [b, c]
            logits = dense("bce,ve->bcv", h, w).astype(jnp.float32)           # [b, c, v]
            m = jax.lax.stop_gradient(logits.max(-1))
            if vocab_axis:
                m = jax.lax.pmax(m, vocab_axis)
            se = jnp.exp(logits - m[..., None]).sum(-1)
            local_y = y - offset
            hit = (local_y >= 0) & (local_y < v)
            target = jnp.take_along_axis(logits, jnp.clip(local_y, 0, v - 1)[..., None], axis=-1)[..., 0]
            target = jnp.where(hit, target, 0.0)
            if vocab_axis:
                se, target = jax.lax.psum(se, vocab_axis), jax.lax.psum(target, vocab_axis)
            counted = y != IGNORE
            return jnp.where(counted, jnp.log(se) + m - target, 0.0).sum(), counted.sum(dtype=jnp.int32)

        losses, counts = jax.lax.map(lambda xs: chunk_loss(*xs), (hs, ys))     # [n] each
        loss, count = losses.sum(), counts.sum()
        spread = (*batch, *seq)
        if spread:
            loss, count = jax.lax.psum(loss, spread), jax.lax.psum(count, spread)
        return loss, count

    x_spec = P(batch or None, seq or None)
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(P(*x_spec, None), P(vocab_axis, None), x_spec),
                         out_specs=(P(), P()))(hidden, lm_head, targets)
