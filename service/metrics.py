"""Prometheus series of docs/api.md, under the prefix ``logitserve_``, in one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_TOKENS = tuple(2**i for i in range(0, 18))
_SEQS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "logitserve_"
        self.request_duration = Histogram(
            p + "request_duration_seconds", "Time from request arrival to response, per endpoint and status.",
            ["endpoint", "status"], buckets=_LATENCY, registry=r)
        self.queue_duration = Histogram(
            p + "queue_duration_seconds", "Time a request waited in the queue before its batch was sent to a worker.",
            buckets=_LATENCY, registry=r)
        self.inference_duration = Histogram(
            p + "inference_duration_seconds", "Forward time of one batch, measured in the worker.",
            buckets=_LATENCY, registry=r)
        self.serialization_duration = Histogram(
            p + "serialization_duration_seconds", "Time to encode one response body.", ["format"],
            buckets=_LATENCY, registry=r)
        self.batch_tokens = Histogram(p + "batch_tokens", "Tokens per batch.", buckets=_TOKENS, registry=r)
        self.batch_sequences = Histogram(p + "batch_sequences", "Sequences per batch.", buckets=_SEQS, registry=r)
        self.queue_tokens = Gauge(p + "queue_tokens", "Tokens waiting in the queue.", registry=r)
        self.result_bytes = Gauge(
            p + "result_bytes", "Result bytes held for responses not yet fully sent (--max-result-bytes).", registry=r)
        self.requests_in_flight = Gauge(p + "requests_in_flight", "Requests being handled.", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.requests = Counter(p + "requests", "Requests per endpoint and status.", ["endpoint", "status"], registry=r)
        self.oom_retries = Counter(
            p + "oom_retries", "Sub-batches retried after a batch ran out of device memory (split in halves).",
            registry=r)
        self.cancelled_batches = Counter(
            p + "cancelled_batches", "Batches stopped before or during their forward: every client gone, or shutdown.",
            registry=r)
        self.worker_restarts = Counter(p + "worker_restarts", "Replica restarts after a rank failed.", registry=r)
        self.send_timeouts = Counter(
            p + "send_timeouts", "Responses whose connection was dropped because one send of the body waited longer "
            "than the send timeout (LOGITSERVE_SEND_TIMEOUT) for the client to read.", registry=r)
        self.prefix_shared_tokens = Counter(
            p + "prefix_shared_tokens", "Token rows not recomputed because a batch shared their prefix.", registry=r)
        self.prefix_cache_hit_tokens = Counter(
            p + "prefix_cache_hit_tokens", "Token rows not recomputed because a replica's prefix cache held them.",
            registry=r)
        # Per-replica batch statistics.
        self.replica_batches = Counter(p + "replica_batches", "Batches run per replica.", ["replica"], registry=r)
        self.replica_batch_tokens = Counter(p + "replica_batch_tokens", "Tokens run per replica.", ["replica"], registry=r)
        self.replica_busy_seconds = Counter(
            p + "replica_busy_seconds", "Forward seconds per replica.", ["replica"], registry=r)
        self.replica_inflight_batches = Gauge(
            p + "replica_inflight_batches", "Batches held by a replica (running + prefetched).", ["replica"], registry=r)
        self.prefix_cache_bytes = Gauge(
            p + "prefix_cache_bytes", "Bytes the replica's prefix cache holds now.", ["replica"], registry=r)
        self.replica_ready = Gauge(p + "replica_ready", "1 when the replica's ranks are loaded and answering.",
                                   ["replica"], registry=r)
