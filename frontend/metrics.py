"""Prometheus metrics for GET /metrics, with vLLM's metric meanings under a `furiosa_llm:` prefix.

Two sources feed them:

- the engine client's live state (the `SchedulerStats` of the latest engine step, which come
  with every outputs message, and its token counts), read by a collector at scrape time:
  `num_requests_running`, `num_requests_waiting`, `kv_cache_usage_perc` (a fraction, 1 is
  full) per engine core, labelled `engine="0"`, `"1"`, ... as vLLM does (with
  `--data-parallel-size`: sum them for the server's total), and as counters summed over the
  engines: `prompt_tokens_total` (as vLLM: the whole prompt of every request whose prefill
  finished, cached tokens included, once), `prompt_tokens_computed_total` (prefill tokens
  the engine computed: not those found in the prefix cache, recomputation after preemption
  included), `prefix_cache_queries_total` and `prefix_cache_hits_total` (prompt tokens looked
  up in the prefix cache, and found there), `generation_tokens_total`, `num_preemptions_total`, and
  `generation_tokens_after_disconnect_total` (tokens the engine still made for requests whose
  client had gone, until the abort reached it);
- one `RequestTiming` per finished request from the serving layer: `request_success_total`
  by `finished_reason` (stop, length, abort, error; one per choice), and the histograms
  `time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`,
  `request_queue_time_seconds` (engine arrival to first step).

Every app has its own `CollectorRegistry`, so tests can build many apps in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "furiosa_llm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                     120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class RequestTiming:
    """When a request arrived, produced its first token and finished (wall-clock seconds), and
    how each of its choices ended: what the metrics observe once per request."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # engine-measured, one per engine request: from its arrival in the engine to its first step
    queue_times_s: list[float] = field(default_factory=list)
    # per choice, between consecutive outputs that carried tokens
    inter_token_latencies_s: list[float] = field(default_factory=list)
    # per choice: "stop", "length", "abort" (the client went away) or "error"
    finish_reasons: list[str] = field(default_factory=list)

    def note_tokens(self, last_token_time: float | None) -> float:
        """A choice's output carried tokens now, its previous one at `last_token_time` (None:
        these are its first); returns now, the choice's new last token time."""
        now = time.time()
        if self.first_token_time is None:
            self.first_token_time = now
        if last_token_time is not None:
            self.inter_token_latencies_s.append(now - last_token_time)
        return now


class _EngineCollector:
    """The engine-side values, read from the engine client whenever /metrics is scraped."""

    def __init__(self, engine_client, model_name: str) -> None:
        self.engine_client = engine_client
        self.labels = [model_name]

    def collect(self):
        client = self.engine_client
        stats = client.latest_stats  # summed over the engines
        preemptions, prompt_tokens, computed, queried, hits = (
            (0, 0, 0, 0, 0) if stats is None else
            (stats.num_preemptions, stats.num_prompt_tokens, stats.num_prompt_tokens_computed,
             stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens)
        )
        per_engine = client.engine_stats or [stats]
        yield self._gauge("num_requests_running", "Sequences in the engine's running batch.",
                          [0 if s is None else s.num_running for s in per_engine])
        yield self._gauge("num_requests_waiting", "Sequences waiting in the engine to be scheduled.",
                          [0 if s is None else s.num_waiting for s in per_engine])
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 means 100 percent).",
                          [0.0 if s is None else s.kv_cache_usage for s in per_engine])
        yield self._counter("num_preemptions", "Sequences preempted by the engine (recomputed later).", preemptions)
        yield self._counter("prompt_tokens", "Prompt tokens of requests whose prefill finished (cached ones included).",
                            prompt_tokens)
        yield self._counter("prompt_tokens_computed",
                            "Prefill tokens computed by the engine (not found in the prefix cache).", computed)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).", hits)
        yield self._counter("generation_tokens", "Tokens generated by the engine.", client.num_generation_tokens)
        yield self._counter("generation_tokens_after_disconnect",
                            "Tokens generated for requests whose client had already gone.",
                            client.num_tokens_after_disconnect)

    def _gauge(self, name: str, documentation: str, values: list[float]) -> GaugeMetricFamily:
        """One sample per engine core, labelled with its rank."""
        family = GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name", "engine"])
        for rank, value in enumerate(values):
            family.add_metric([*self.labels, str(rank)], value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family


class FrontendMetrics:
    def __init__(self, model_name: str, engine_client) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_client, model_name))
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self._success = Counter(PREFIX + "request_success", "Finished requests (one per choice) by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first generated token.",
                               buckets=TTFT_BUCKETS_S, **labels).labels(model_name)
        self._itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between a choice's token outputs.",
                              buckets=ITL_BUCKETS_S, **labels).labels(model_name)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the last output of a request.",
                              buckets=REQUEST_BUCKETS_S, **labels).labels(model_name)
        self._queue = Histogram(PREFIX + "request_queue_time_seconds",
                                "Time a request waited in the engine before its first step.",
                                buckets=REQUEST_BUCKETS_S, **labels).labels(model_name)

    def observe_request(self, timing: RequestTiming) -> None:
        """The serving layer's `on_request_finished` hook: called once per request, on every path."""
        for reason in timing.finish_reasons:
            self._success.labels(self._model_name, reason).inc()
        if timing.first_token_time is not None:
            self._ttft.observe(timing.first_token_time - timing.arrival_time)
        for latency in timing.inter_token_latencies_s:
            self._itl.observe(latency)
        for queue_time in timing.queue_times_s:
            self._queue.observe(queue_time)
        if timing.finish_time is not None:
            self._e2e.observe(timing.finish_time - timing.arrival_time)

    def render(self) -> bytes:
        """The Prometheus text exposition format (serve with `CONTENT_TYPE`)."""
        return generate_latest(self.registry)
