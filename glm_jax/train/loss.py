"""Next-token cross-entropy without the [T, vocab] logits: chunked, vocab-parallel, float32.

At 128K tokens x 151,552 vocab the float32 logits of one sequence are 77 GB. The loss runs inside
one shard_map over the mesh: each device takes its own tokens (its batch rows and `sequence` slice)
in chunks of `chunk` tokens and its own rows of the output layer (`vocab` on `tensor`); a chunk's
logits [b, chunk, V / tensor] live only inside one scan step (their gradients are made there too,
see `cross_entropy`), and the log-sum-exp and the target's logit are reduced over `tensor` (psum)
as Megatron's vocab-parallel cross-entropy does.

When few targets count (answer-only fine-tuning: a few answer tokens in a long prompt), a static
budget `counted` (at least the most counted targets of any row, see `counted_budget`) gathers
those positions first, so the output layer runs on them alone instead of on every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
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
    positions go through the output layer (`gather_counted`).

    Differentiated, the pass over the chunks also makes the gradients (a custom VJP): a chunk's
    logit gradient, softmax minus the target's one-hot (rounded to the model's dtype, as the
    rounding's transpose does), goes straight into the hidden state's gradient and a float32 sum
    for the output layer's (only for the inputs being differentiated: a frozen output layer gets
    none), and the backward pass scales them by the loss's cotangent: three [chunk, V] products
    a chunk, where differentiating the rematerialised chunks would take four. The output layer's
    gradient accumulates transposed ([H, v] += hᵀ·d), so XLA's CPU matmul reads the [chunk, v]
    logit gradient as it lies instead of copying it into a transpose first."""
    vocab = layout.mesh_axes("vocab", lm_head.shape[0])
    batch = layout.mesh_axes("batch", hidden.shape[0])
    seq = layout.mesh_axes("seq", hidden.shape[1])
    vocab_axis = vocab[0] if vocab else None
    spread = (*batch, *seq)
    x_spec = P(batch or None, seq or None)
    h_spec, w_spec = P(*x_spec, None), P(vocab_axis, None)

    if counted is not None:
        def gather(h, y):
            return gather_counted(h, y, counted) if counted < h.shape[1] else (h, y)

        hidden, targets = jax.shard_map(gather, mesh=layout.mesh, in_specs=(h_spec, x_spec),
                                        out_specs=(h_spec, x_spec))(hidden, targets)

    def chunks(h, w, y, grad_h: bool, grad_w: bool):
        """The local pass: h [b, t, H], w [v, H], y [b, t] -> (loss, count[, dh [b, t, H]][, dw [v, H]])."""
        b, t, e = h.shape
        c = min(chunk, t)
        pad = -t % c
        hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, e).swapaxes(0, 1)           # [n, b, c, H]
        ys = jnp.pad(y, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, -1, c).swapaxes(0, 1)  # [n, b, c]
        v = w.shape[0]
        offset = jax.lax.axis_index(vocab_axis) * v if vocab_axis else 0

        def step(carry, xs):
            loss, count, dw = carry
            h_c, y_c = xs                                                     # [b, c, H], [b, c]
            logits = dense("bce,ve->bcv", h_c, w).astype(jnp.float32)         # [b, c, v]
            m = logits.max(-1)
            if vocab_axis:
                m = jax.lax.pmax(m, vocab_axis)
            e_c = jnp.exp(logits - m[..., None])
            se = e_c.sum(-1)
            local_y = y_c - offset
            hit = (local_y >= 0) & (local_y < v)
            target = jnp.take_along_axis(logits, jnp.clip(local_y, 0, v - 1)[..., None], axis=-1)[..., 0]
            target = jnp.where(hit, target, 0.0)
            if vocab_axis:
                se, target = jax.lax.psum(se, vocab_axis), jax.lax.psum(target, vocab_axis)
            counts = y_c != IGNORE
            loss = loss + jnp.where(counts, jnp.log(se) + m - target, 0.0).sum()
            count = count + counts.sum(dtype=jnp.int32)
            if not (grad_h or grad_w):
                return (loss, count, dw), None
            onehot = jax.lax.broadcasted_iota(jnp.int32, e_c.shape, 2) == local_y[..., None]
            d = jnp.where(counts[..., None], e_c / se[..., None] - onehot, 0.0).astype(h.dtype)   # [b, c, v]
            dh_c = dense("bcv,ve->bce", d, w) if grad_h else None            # this shard's part [b, c, H]
            if grad_w:
                dw = dw + jnp.einsum("bce,bcv->ev", h_c, d, preferred_element_type=jnp.float32)
            return (loss, count, dw), dh_c

        zero_dw = jnp.zeros(w.shape[::-1], jnp.float32) if grad_w else None                       # [H, v]
        (loss, count, dw), dh = jax.lax.scan(step, (jnp.float32(0), jnp.int32(0), zero_dw), (hs, ys))
        if spread:
            loss, count = jax.lax.psum(loss, spread), jax.lax.psum(count, spread)
        out = (loss, count)
        if grad_h:
            dh = dh.swapaxes(0, 1).reshape(b, -1, e)[:, :t]                   # [b, t, H]
            out += (jax.lax.psum(dh, vocab_axis) if vocab_axis else dh,)
        if grad_w:
            out += ((jax.lax.psum(dw, spread) if spread else dw).T.astype(w.dtype),)
        return out

    def run(h, w, y, grad_h=False, grad_w=False):
        outs = (P(), P()) + ((h_spec,) if grad_h else ()) + ((w_spec,) if grad_w else ())
        return jax.shard_map(lambda h, w, y: chunks(h, w, y, grad_h, grad_w), mesh=layout.mesh,
                             in_specs=(h_spec, w_spec, x_spec), out_specs=outs, check_vma=False)(h, w, y)

    @jax.custom_vjp
    def loss_and_count(h, w, y):
        return run(h, w, y)

    def forward(h, w, y):
        grad_h, grad_w = h.perturbed, w.perturbed
        loss, count, *grads = run(h.value, w.value, y.value, grad_h, grad_w)
        dh = grads.pop(0) if grad_h else None
        return (loss, count), (dh, grads[0] if grad_w else None)

    def backward(res, cotangents):
        dh, dw = res
        g = cotangents[0]
        if isinstance(g, SymbolicZero):
            return None, None, None
        scale = lambda x: None if x is None else (g * x.astype(jnp.float32)).astype(x.dtype)
        return scale(dh), scale(dw), None

    loss_and_count.defvjp(forward, backward, symbolic_zeros=True)
    return loss_and_count(hidden, lm_head, targets)
