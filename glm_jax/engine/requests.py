"""A request to the engine: its sampling parameters (validated here, once), its state, and the
engine's refusals."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import numpy as np

from ..sampling import MAX_STOP_IDS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation parameters (temperature 0: greedy; top_k 0 / top_p 1: off).
    The seed counts modulo 2**32. Raises ValueError naming a parameter out of range."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1 and np.float32(self.top_p) > 0):    # the device takes it as float32
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(self.stop_ids)}")
        if any(t < 0 for t in self.stop_ids):
            raise ValueError(f"stop ids must be >= 0, got {self.stop_ids}")


class QueueFull(Exception):
    """The engine's queue of waiting requests is full: retry later."""


class EngineClosed(Exception):
    """The engine is shutting down: it takes no new requests."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_tokens: Callable[["Request", list[int]], None] | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    cached: int = 0                          # prompt tokens whose K/V were reused
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    ttft: float | None = None                # seconds from submit to the first token
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    prefilled: int = 0                       # prompt tokens in the row so far
    draft_tokens: int = 0                    # speculative drafts a verification step may take (0: none)
    proposed: int = 0                        # drafts verified so far
    accepted: int = 0                        # of which the model kept

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)
