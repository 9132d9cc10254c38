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
  `request_queue_time_seconds` (engine arrival to first step), and per request
  `request_prompt_tokens`, `request_generation_tokens`, `request_params_n`,
  `request_params_max_tokens`;
- the engine's KV cache settings: `cache_config_info` (value 1; block_size, num_gpu_blocks and
  num_blocks, cache_dtype, enable_prefix_caching as labels, as vLLM's), once the engine is ready.

FuriosaAI's server documents its own names for the same quantities (`furiosa_llm_` and an
underscore, a `leader_device` label): `_FuriosaNames` re-exposes the families above under
those names at scrape time from the same collectors and histograms, so their dashboards and
gateways (which read `furiosa_llm_cache_config_info`) work unchanged with no second bookkeeping.

Every app has its own `CollectorRegistry`, so tests can build many apps in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ipc.config import EngineConfig

PREFIX = "furiosa_llm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                     120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))  # vLLM's 1-2-5 series, to 5M
N_BUCKETS = (1, 2, 5, 10, 20)

FURIOSA_PREFIX = "furiosa_llm_"
# our family (after PREFIX) -> FuriosaAI's documented name (after FURIOSA_PREFIX)
FURIOSA_NAMES = {
    "num_requests_running": "num_requests_running",
    "num_requests_waiting": "num_requests_waiting",
    "kv_cache_usage_perc": "kv_cache_usage_percent",
    "prefix_cache_hits": "prefix_cache_hits",
    "prefix_cache_queries": "prefix_cache_queries",
    "prompt_tokens": "prompt_tokens",
    "generation_tokens": "generation_tokens",
    "request_success": "request_success",
    "request_prompt_tokens": "request_prompt_tokens",
    "request_generation_tokens": "request_generation_tokens",
    "request_params_n": "request_params_n",
    "request_params_max_tokens": "request_params_max_tokens",
    "time_to_first_token_seconds": "time_to_first_token_seconds",
    "inter_token_latency_seconds": "inter_token_latency_seconds",
    "e2e_request_latency_seconds": "e2e_request_latency_seconds",
    "cache_config_info": "cache_config_info",
}


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
    # per engine request (prompt): its `n` and `max_tokens`
    params_n: list[int] = field(default_factory=list)
    params_max_tokens: list[int] = field(default_factory=list)

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


class _CacheConfigCollector:
    """vLLM's `cache_config_info`: the KV cache's settings as labels of a constant 1, once the
    engine has said how many blocks it has."""

    def __init__(self, engine_client, model_name: str, engine_config: EngineConfig | None) -> None:
        self.engine_client = engine_client
        self.model_name = model_name
        self.engine_config = engine_config

    def collect(self):
        info = self.engine_client.model_info
        if info is None:
            return
        config = self.engine_config
        dtype = "auto" if config is None else config.kv_cache_dtype
        labels = {"model_name": self.model_name, "block_size": str(info.block_size),
                  "num_gpu_blocks": str(info.num_kv_blocks), "num_blocks": str(info.num_kv_blocks),
                  "cache_dtype": dtype,
                  "enable_prefix_caching": str(config is None or config.enable_prefix_caching)}
        family = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the KV cache configuration.",
                                   labels=list(labels))
        family.add_metric(list(labels.values()), 1)
        yield family


class _FuriosaNames:
    """The families of `sources` that FuriosaAI's server documents, again under its names
    (`FURIOSA_NAMES`), with its `leader_device` label; read from the same sources at each scrape."""

    def __init__(self, sources: list, leader_device: str) -> None:
        self.sources = sources
        self.leader_device = leader_device

    def collect(self):
        for source in self.sources:
            for family in source.collect():
                name = FURIOSA_NAMES.get(family.name.removeprefix(PREFIX))
                if name is None or not family.name.startswith(PREFIX):
                    continue
                renamed = Metric(FURIOSA_PREFIX + name, family.documentation, family.type)
                for sample in family.samples:
                    suffix = sample.name[len(family.name):]
                    labels = {**sample.labels, "leader_device": self.leader_device}
                    renamed.add_sample(FURIOSA_PREFIX + name + suffix, labels, sample.value, sample.timestamp,
                                       sample.exemplar)
                yield renamed


class FrontendMetrics:
    def __init__(self, model_name: str, engine_client, engine_config: EngineConfig | None = None) -> None:
        self.registry = CollectorRegistry()
        engine_collector = _EngineCollector(engine_client, model_name)
        self.registry.register(engine_collector)
        cache_config = _CacheConfigCollector(engine_client, model_name, engine_config)
        self.registry.register(cache_config)
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self._success = Counter(PREFIX + "request_success", "Finished requests (one per choice) by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        latency_histograms = [
            Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first generated token.",
                      buckets=TTFT_BUCKETS_S, **labels),
            Histogram(PREFIX + "inter_token_latency_seconds", "Time between a choice's token outputs.",
                      buckets=ITL_BUCKETS_S, **labels),
            Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the last output of a request.",
                      buckets=REQUEST_BUCKETS_S, **labels),
        ]
        self._ttft, self._itl, self._e2e = (h.labels(model_name) for h in latency_histograms)
        self._queue = Histogram(PREFIX + "request_queue_time_seconds",
                                "Time a request waited in the engine before its first step.",
                                buckets=REQUEST_BUCKETS_S, **labels).labels(model_name)
        request_histograms = [
            Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens of a request.", buckets=TOKEN_BUCKETS, **labels),
            Histogram(PREFIX + "request_generation_tokens", "Tokens generated for a request.",
                      buckets=TOKEN_BUCKETS, **labels),
            Histogram(PREFIX + "request_params_n", "The n request parameter.", buckets=N_BUCKETS, **labels),
            Histogram(PREFIX + "request_params_max_tokens", "The max_tokens request parameter.",
                      buckets=TOKEN_BUCKETS, **labels),
        ]
        self._prompt_tokens, self._generation_tokens, self._params_n, self._params_max_tokens = (
            h.labels(model_name) for h in request_histograms)
        leader_device = "cpu" if engine_config is None else engine_config.devices
        self.registry.register(_FuriosaNames(
            [engine_collector, cache_config, self._success, *latency_histograms, *request_histograms], leader_device))

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
            self._prompt_tokens.observe(timing.num_prompt_tokens)
            self._generation_tokens.observe(timing.num_generation_tokens)
        for n in timing.params_n:
            self._params_n.observe(n)
        for max_tokens in timing.params_max_tokens:
            self._params_max_tokens.observe(max_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition format (serve with `CONTENT_TYPE`)."""
        return generate_latest(self.registry)
