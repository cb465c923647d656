"""Prometheus metrics of one server (its own registry, so that several apps in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("ragkit_ttft_seconds", "Arrival to first token (queue, retrieval and prefill)",
                              ["mode"], buckets=TTFT_BUCKETS, registry=r)
        self.chunks = Counter("ragkit_answer_chunks", "Chunks put in answer prompts", registry=r)
        self.chunk_hits = Counter("ragkit_answer_chunk_hits", "Chunks whose KV came from the cache", registry=r)
        self.hit_rate = Gauge("ragkit_cache_hit_rate", "Chunk hits / chunks over answers served so far", registry=r)
        self.store_hit_rate = Gauge("ragkit_kv_store_hit_rate", "KV store lookups that hit", registry=r)
        self.queue = Gauge("ragkit_queue_length", "Jobs waiting for a slot", registry=r)
        self.running = Gauge("ragkit_running", "Jobs being answered", registry=r)
        self.cache_bytes = Gauge("ragkit_cache_bytes", "Bytes held by the KV store, per tier", ["tier"], registry=r)
        self._seen = self._hit = 0

    def answered(self, done: dict) -> None:
        self.ttft.labels(done["mode"]).observe(done["ttft_s"])
        self.chunks.inc(len(done["chunk_ids"]))
        self.chunk_hits.inc(done["cache_hits"])
        self._seen += len(done["chunk_ids"])
        self._hit += done["cache_hits"]

    def render(self, scheduler, cache: dict) -> bytes:
        """The exposition text, with the gauges read now."""
        self.hit_rate.set(self._hit / self._seen if self._seen else 0.0)
        self.store_hit_rate.set(cache["hit_rate"])
        self.queue.set(scheduler.queue_length)
        self.running.set(scheduler.running)
        for tier, nbytes in cache["tiers"].items():
            self.cache_bytes.labels(tier).set(nbytes)
        return generate_latest(self.registry)
