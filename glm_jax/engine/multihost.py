"""Several processes, one engine: process 0 plans every scheduler round and shares the plan; every
process runs the same device programs in the same order.

A `Plan` travels as a fixed-shape pytree of numpy arrays (`pack`: the same shapes on every
process, set by the batch and the prefill chunk) through `multihost_utils.broadcast_one_to_all`,
then its page-table entries, when it has any, in a second broadcast (a power-of-two bucket of
rows, its size known to every process from the first).
Floats travel as float32, the precision the device programs take them in; seeds as uint32 (the
engine draws with seed mod 2**32).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from ..sampling import MAX_STOP_IDS
from .requests import SamplingParams


@dataclasses.dataclass
class Chunk:
    """One prefill chunk of one row: tokens [size], left-padded; the real ones are the last `real`,
    at positions start, start+1, ...; `admit`: the row's parameters when this chunk ends its prompt;
    `drawn`: tokens the request emitted before (it resumes after a preemption)."""
    row: int
    tokens: np.ndarray
    start: int
    real: int
    admit: SamplingParams | None
    drawn: int = 0


@dataclasses.dataclass
class Plan:
    """One scheduler round, as every process runs it: page-table entries to set [U, 3] (row,
    logical page, page), rows to cancel [B], prefill chunks (at most B, one a row), then a burst of
    `steps` tokens for the rows in `decode` (cache rows [b <= B], padded with B), if any; or, when
    `drafts` (int32 [b, K], -1 after a row's last) is set, one verification step of those drafts."""
    cancel: np.ndarray
    chunks: list[Chunk]
    decode: np.ndarray
    steps: int = 0
    stop: bool = False
    pages: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))
    drafts: np.ndarray | None = None

    @classmethod
    def stopping(cls, batch: int) -> "Plan":
        return cls(np.zeros(batch, bool), [], np.zeros(0, np.int32), stop=True)


_CHUNK_FIELDS = ("row", "size", "start", "real", "admit", "max_tokens", "top_k", "drawn")   # int32 [B] each


def pack(plan: Plan, batch: int, prefill_chunk: int, draft_tokens: int = 0) -> dict[str, np.ndarray]:
    """The plan as arrays whose shapes depend only on `batch`, `prefill_chunk` and `draft_tokens`
    (the engine's drafts per row)."""
    i32 = lambda *shape: np.zeros(shape, np.int32)
    out = {"round": np.array([plan.stop, plan.steps, len(plan.chunks), len(plan.decode), len(plan.pages),
                              plan.drafts is not None], np.int32),
           "drafts": np.full((batch, max(draft_tokens, 1)), -1, np.int32),        # never empty: broadcast
           "cancel": plan.cancel.astype(np.int32), "decode": i32(batch), "tokens": i32(batch, prefill_chunk),
           "seed": np.zeros(batch, np.uint32), "temperature": np.zeros(batch, np.float32),
           "top_p": np.zeros(batch, np.float32), "stop_ids": np.full((batch, MAX_STOP_IDS), -1, np.int32),
           **{name: i32(batch) for name in _CHUNK_FIELDS}}
    out["decode"][:len(plan.decode)] = plan.decode
    if plan.drafts is not None:
        out["drafts"][:len(plan.drafts)] = plan.drafts
    for i, c in enumerate(plan.chunks):
        p = c.admit or SamplingParams(0)
        values = {"row": c.row, "size": len(c.tokens), "start": c.start, "real": c.real, "admit": c.admit is not None,
                  "drawn": c.drawn,
                  "max_tokens": p.max_tokens, "top_k": p.top_k, "seed": p.seed % 2**32,
                  "temperature": p.temperature, "top_p": p.top_p}
        for name, value in values.items():
            out[name][i] = value
        out["tokens"][i, :len(c.tokens)] = c.tokens
        out["stop_ids"][i, :len(p.stop_ids)] = p.stop_ids
    return out


def unpack(arrays: dict[str, np.ndarray], pages: np.ndarray | None = None) -> Plan:
    """The plan `pack` packed (with its page-table entries: `pages`, rows beyond its count ignored)."""
    a = {name: np.asarray(x) for name, x in arrays.items()}
    stop, steps, chunks, decode, updates, drafted = map(int, a["round"])
    plan = Plan(a["cancel"].astype(bool), [], a["decode"][:decode].copy(), steps=steps, stop=bool(stop),
                pages=np.zeros((0, 3), np.int32) if pages is None else np.asarray(pages)[:updates].copy(),
                drafts=a["drafts"][:decode].copy() if drafted else None)
    for i in range(chunks):
        params = None
        if a["admit"][i]:
            params = SamplingParams(int(a["max_tokens"][i]), float(a["temperature"][i]), float(a["top_p"][i]),
                                    int(a["top_k"][i]), int(a["seed"][i]),
                                    tuple(int(t) for t in a["stop_ids"][i] if t >= 0))
        plan.chunks.append(Chunk(int(a["row"][i]), a["tokens"][i, :a["size"][i]].copy(), int(a["start"][i]),
                                 int(a["real"][i]), params, int(a["drawn"][i])))
    return plan


def share(plan: Plan | None, batch: int, prefill_chunk: int, draft_tokens: int = 0) -> Plan:
    """Process 0's plan, on every process; `plan` itself when there is one process."""
    if jax.process_count() == 1:
        return plan
    from jax.experimental import multihost_utils

    empty = Plan(np.zeros(batch, bool), [], np.zeros(0, np.int32))
    mine = plan if plan is not None and jax.process_index() == 0 else empty
    arrays = multihost_utils.broadcast_one_to_all(pack(mine, batch, prefill_chunk, draft_tokens))
    updates = int(np.asarray(arrays["round"])[4])
    if not updates:
        return unpack(arrays)
    bucket = np.zeros((1 << (updates - 1).bit_length(), 3), np.int32)
    bucket[:len(mine.pages)] = mine.pages
    return unpack(arrays, multihost_utils.broadcast_one_to_all(bucket))


def follow(execute: Callable[[Plan], object], batch: int, prefill_chunk: int, draft_tokens: int = 0) -> None:
    """On processes other than 0: runs every round process 0 plans until it stops."""
    while not (plan := share(None, batch, prefill_chunk, draft_tokens)).stop:
        execute(plan)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this process, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
