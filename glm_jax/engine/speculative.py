"""Speculative decoding: drafts proposed on the host, verified on device in one model step.

A drafter proposes up to k tokens to follow a request's context (its prompt, its output and its
pending token): `NgramDrafter` looks the context's last n tokens up earlier in it (prompt lookup)
and proposes what followed them. The device feeds the pending token and the drafts as k+1 queries
(programs.verify_step), draws the model's own token after each of them with the key of that draw
number, exactly as plain decoding would (`sample`: greedy, or Gumbel-max at temperature > 0), and
keeps the drafts up to the first one that differs from the model's draw (`accepted`), then the
model's draw after the last kept one.

For a deterministic draft x (a point mass q), the standard speculative-sampling rule accepts x with
probability p(x) and otherwise draws from max(p - q, 0) normalised: p without x. Drawing y from p and
accepting x exactly when y == x does both (P(y == x) = p(x); given y != x, y follows p without x),
and it is what plain decoding draws with the same key: sampled output, seeded, is the same token
for token with and without speculation, greedy output too.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..options import NGRAM_MAX, NGRAM_MIN, SPECULATIVE, check_choice


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to follow `context` (the request's tokens, its pending token last); [] for none."""


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n
    tokens, for n from `max_n` down to `min_n` (the longest match wins)."""

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min <= max, got min {min_n}, max {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = np.asarray(context, np.int64)
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            tail = ctx[-n:]
            starts = np.flatnonzero(ctx[:len(ctx) - n] == tail[0])           # earlier n-grams (not the tail itself)
            for i in range(1, n):
                starts = starts[ctx[starts + i] == tail[i]]
            if len(starts):
                follow = starts[-1] + n
                return ctx[follow:follow + k].tolist()
        return []


def make_drafter(kind: str | None, num_tokens: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> Drafter | None:
    """The drafter named `kind` (options.SPECULATIVE) for `num_tokens` drafts a step, None for None.
    Raises ValueError naming a bad setting."""
    if kind is None:
        return None
    check_choice("speculative method", kind, SPECULATIVE)
    if num_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {num_tokens}")
    return NgramDrafter(max_n, min_n)


def accepted(drafts: jax.Array, n: jax.Array, targets: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Drafts kept [b]: the longest prefix of drafts [b, K] (the first n [b] of each row count) equal to
    the model's draws targets [b, K+1] after the pending token and each draft, cut after a stop id."""
    k = drafts.shape[1]
    agree = (drafts == targets[:, :k]) & (jnp.arange(k) < n[:, None])
    stop = jnp.any(drafts[:, :, None] == stop_ids[:, None, :], axis=-1)             # [b, K]
    after_stop = (jnp.cumsum(stop, axis=1) - stop) > 0
    return jnp.cumprod(agree & ~after_stop, axis=1).sum(axis=1).astype(jnp.int32)
