"""Prometheus metrics, one CollectorRegistry per app (no global registry state).

HTTP-level numbers (request counts, latencies) are recorded as requests run; the engine's gauges and
cumulative counters are read from `engine.stats()` at scrape time by a custom collector.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.engine.llm_engine import OVERLAP_REFUSALS, STEP_PATHS

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# (stats field, metric name, help): gauges are current values, counters are cumulative since start.
_GAUGES = (
    ("num_running", "pensieve_num_requests_running", "Requests being processed by the engine"),
    ("num_waiting", "pensieve_num_requests_waiting", "Requests waiting to be scheduled"),
    ("gpu_blocks_total", "pensieve_gpu_blocks_total", "KV blocks in the GPU pool"),
    ("gpu_blocks_used", "pensieve_gpu_blocks_used", "GPU KV blocks held by running requests"),
    ("gpu_blocks_cached", "pensieve_gpu_blocks_cached", "GPU KV blocks holding idle conversations' cache"),
    ("cpu_blocks_total", "pensieve_cpu_blocks_total", "KV blocks in the CPU pool"),
    ("cpu_blocks_used", "pensieve_cpu_blocks_used", "CPU KV blocks in use"),
)
_COUNTERS = (
    ("prompt_tokens", "pensieve_prompt_tokens", "Prompt tokens received"),
    ("generation_tokens", "pensieve_generation_tokens", "Tokens generated"),
    ("recomputed_tokens", "pensieve_recomputed_tokens", "Tokens once cached but dropped, computed again"),
    ("swapped_out_blocks", "pensieve_swapped_out_blocks", "Blocks copied GPU -> CPU"),
    ("swapped_in_blocks", "pensieve_swapped_in_blocks", "Blocks copied CPU -> GPU"),
    ("dropped_blocks", "pensieve_dropped_blocks", "Cached blocks dropped from the last tier"),
    ("preemptions", "pensieve_preemptions", "Running requests suspended for lack of blocks"),
    ("finished_requests", "pensieve_finished_requests", "Requests finished by the engine"),
    ("steps_overlapped", "pensieve_engine_steps_overlapped",
     "Decode steps launched while the previous step still ran (async scheduling)"),
    # tensor parallelism: what reaching the other ranks costs rank 0 (zero with one GPU)
    ("rank_messages", "pensieve_rank_messages", "Step messages rank 0 broadcast to the other tensor-parallel ranks"),
    ("rank_message_seconds", "pensieve_rank_message_seconds",
     "Seconds rank 0 spent broadcasting step messages to the other tensor-parallel ranks"),
)


class EngineCollector(Collector):
    """Reads the engine's stats on each scrape; fields a stats object lacks are skipped."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for attr, name, doc in _GAUGES:
            if hasattr(stats, attr):
                yield GaugeMetricFamily(name, doc, value=float(getattr(stats, attr)))
        for attr, name, doc in _COUNTERS:
            if hasattr(stats, attr):
                yield CounterMetricFamily(name, doc, value=float(getattr(stats, attr)))
        hits = CounterMetricFamily("pensieve_hit_tokens", "Prompt tokens served from cache, by tier", labels=["tier"])
        hits.add_metric(["gpu"], float(getattr(stats, "gpu_hit_tokens", 0)))
        hits.add_metric(["cpu"], float(getattr(stats, "cpu_hit_tokens", 0)))
        yield hits
        # where serving time goes: engine steps by how their forward ran (see EngineStats)
        steps = CounterMetricFamily("pensieve_engine_steps", "Engine steps by forward path", labels=["path"])
        wall = CounterMetricFamily("pensieve_engine_step_seconds", "Wall time of engine steps by forward path",
                                   labels=["path"])
        gpu = CounterMetricFamily("pensieve_engine_step_gpu_seconds",
                                  "GPU span of engine steps by forward path (CUDA only)", labels=["path"])
        for path in STEP_PATHS:
            steps.add_metric([path], float(getattr(stats, f"steps_{path}", 0)))
            wall.add_metric([path], float(getattr(stats, f"step_seconds_{path}", 0.0)))
            gpu.add_metric([path], float(getattr(stats, f"step_gpu_seconds_{path}", 0.0)))
        yield from (steps, wall, gpu)
        refused = CounterMetricFamily("pensieve_engine_steps_not_overlapped",
                                      "Busy steps that waited for the step before, by reason (async scheduling)",
                                      labels=["reason"])
        for reason in OVERLAP_REFUSALS:
            refused.add_metric([reason], float(getattr(stats, f"not_overlapped_{reason}", 0)))
        yield refused

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: nothing to check at registration


class GatewayCollector(Collector):
    """The load and cache gauges routers read, under vLLM's names (the names the Kubernetes Gateway API
    inference extension's model-server protocol lists): queue and running requests, KV utilisation (the
    share of blocks held by running requests, per tier) and the cache layout (block size, pool sizes)."""

    def __init__(self, stats: Callable[[], Any], block_size: int | None) -> None:
        self._stats = stats
        self._block_size = block_size

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gpu = s.gpu_blocks_used / s.gpu_blocks_total if s.gpu_blocks_total else 0.0
        cpu = s.cpu_blocks_used / s.cpu_blocks_total if s.cpu_blocks_total else 0.0
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests being processed", value=s.num_running)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "GPU KV cache usage (1 = full)", value=gpu)
        yield GaugeMetricFamily("vllm:gpu_cache_usage_perc", "GPU KV cache usage (1 = full; older name)", value=gpu)
        yield GaugeMetricFamily("vllm:cpu_cache_usage_perc", "CPU KV cache usage (1 = full)", value=cpu)
        usage = GaugeMetricFamily("pensieve_kv_cache_usage_perc",
                                  "KV blocks in use by tier, as a share of the tier (GPU: held by running requests)",
                                  labels=["tier"])
        usage.add_metric(["gpu"], gpu)
        usage.add_metric(["cpu"], cpu)
        yield usage
        if self._block_size is not None:
            info = GaugeMetricFamily("vllm:cache_config_info", "KV cache layout", labels=[
                "block_size", "num_gpu_blocks", "num_cpu_blocks"])
            info.add_metric([str(self._block_size), str(s.gpu_blocks_total), str(s.cpu_blocks_total)], 1.0)
            yield info
            yield GaugeMetricFamily("pensieve_kv_block_size", "Tokens per KV block", value=self._block_size)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ServerMetrics:
    def __init__(self, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pensieve_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.e2e_latency = Histogram("pensieve_request_e2e_seconds", "End-to-end HTTP request latency",
                                     ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("pensieve_time_to_first_token_seconds", "Time from request to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("pensieve_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_TOKEN_GAP_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (streaming-safe): counts each request at its last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app dies before sending a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The route template (not the raw path) keeps label cardinality bounded.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.e2e_latency.labels(endpoint).observe(time.perf_counter() - start)
