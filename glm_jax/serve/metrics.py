"""The server's Prometheus metrics: requests, tokens, time to first token, and the engine's queue,
KV page pool, prefix cache and speculative drafts (read from `Engine.stats` at each scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glm_jax.engine import Engine

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Prometheus metrics in the app's own registry (so that several apps in a process never clash)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("glm_jax_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("glm_jax_prompt_tokens", "prompt tokens of submitted requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("glm_jax_generation_tokens", "tokens generated",
                                         registry=self.registry)
        self.ttft = Histogram("glm_jax_time_to_first_token_seconds", "from submit to the first generated token",
                              buckets=TTFT_BUCKETS_S, registry=self.registry)
        Gauge("glm_jax_requests_waiting", "requests queued for a batch slot",
              registry=self.registry).set_function(lambda: engine.stats()["waiting"])
        Gauge("glm_jax_requests_running", "requests holding a batch slot",
              registry=self.registry).set_function(lambda: engine.stats()["running"])
        self.registry.register(_EngineCollector(engine))


class _EngineCollector:
    """The engine's KV page pool, prefix cache and speculative drafts, read from `Engine.stats` at each scrape."""

    GAUGES = {"pages_total": "pages in the KV cache's pool", "pages_used": "pages held by running requests",
              "pages_cached": "full pages holding a cached prefix (held or not)",
              "pages_free": "pages a request can take now (free or cached unreferenced)"}
    COUNTERS = {"prefix_queries": "pages looked up in the prefix cache", "prefix_hits": "pages found there",
                "preemptions": "running requests preempted for pages (recomputed later)",
                "evictions": "cached pages reused for others",
                "speculative_proposed": "speculative draft tokens verified",
                "speculative_accepted": "speculative draft tokens the model agreed with (emitted)"}

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"glm_jax_kv_{name}", doc, value=stats[name])
        yield GaugeMetricFamily("glm_jax_prefix_cache_hit_rate", "prefix-cache hits / pages looked up",
                                value=stats["prefix_hit_rate"])
        yield GaugeMetricFamily("glm_jax_speculative_acceptance_rate", "speculative drafts accepted / proposed",
                                value=stats["speculative_acceptance_rate"])
        for name, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"glm_jax_{name}", doc, value=stats[name])
