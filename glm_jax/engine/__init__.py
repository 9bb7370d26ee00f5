"""The continuous-batching decode engine: `cache` (the paged, sharded KV cache), `pages` (the page
allocator and prefix cache), `planner` (admission, pages, preemption), `programs` (the device
programs), `scheduler` (the Engine), `requests`, `buckets` (compiled shapes) and `multihost`."""

from .buckets import cache_length
from .cache import KVCache, abstract_cache, cache_dtype, init_cache, one_row_cache
from .multihost import to_host
from .programs import model_step, programs_for
from .requests import EngineClosed, QueueFull, Request, SamplingParams
from .scheduler import Engine

__all__ = ["Engine", "EngineClosed", "KVCache", "QueueFull", "Request", "SamplingParams", "abstract_cache",
           "cache_dtype", "cache_length", "init_cache", "model_step", "one_row_cache", "programs_for", "to_host"]
