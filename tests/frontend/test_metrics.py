"""GET /metrics (Prometheus text, vLLM's families under `furiosa_llm:`) and the periodic stats
line, against the fake engine client."""

from __future__ import annotations

from fake_model import text_script
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from frontend.app import create_app
from frontend.stats_logger import StatsLogger
from ipc.messages import SchedulerStats

USER_HI = [{"role": "user", "content": "hi"}]


def scrape(client) -> dict[str, float]:
    """Every sample as `name{label=value,...}` (model_name left out) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert sample.labels.pop("model_name", None) == "test-model"
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_count_requests_tokens_and_latencies(client, engine, tokenizer):
    before = scrape(client)
    assert before["furiosa_llm:num_requests_running{engine=0}"] == 0 and before["furiosa_llm:generation_tokens_total"] == 0
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "ignore_eos": True})
    assert response.json()["usage"]["completion_tokens"] == 5
    engine.script = text_script(tokenizer, "Hello world!")
    body = {"messages": USER_HI, "n": 2, "stream": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    engine.latest_stats = SchedulerStats(num_running=2, num_waiting=3, kv_cache_usage=0.5, num_preemptions=4,
                                         num_prompt_tokens_computed=42, num_prompt_tokens=58)
    after = scrape(client)
    assert after["furiosa_llm:num_requests_running{engine=0}"] == 2
    assert after["furiosa_llm:num_requests_waiting{engine=0}"] == 3
    assert after["furiosa_llm:kv_cache_usage_perc{engine=0}"] == 0.5
    assert after["furiosa_llm:num_preemptions_total"] == 4
    # vLLM's prompt_tokens_total counts whole prompts, cached tokens too; the computed ones apart
    assert after["furiosa_llm:prompt_tokens_total"] == 58
    assert after["furiosa_llm:prompt_tokens_computed_total"] == 42
    num_chat_tokens = engine.num_generation_tokens - 5
    assert num_chat_tokens > 2 and after["furiosa_llm:generation_tokens_total"] == engine.num_generation_tokens
    assert after["furiosa_llm:request_success_total{finished_reason=length}"] == 1
    assert after["furiosa_llm:request_success_total{finished_reason=stop}"] == 2  # one per choice
    assert after["furiosa_llm:time_to_first_token_seconds_count"] == 2
    assert after["furiosa_llm:e2e_request_latency_seconds_count"] == 2
    # between the outputs of each choice: 4 for the completion, (tokens - 1) per chat choice
    assert after["furiosa_llm:inter_token_latency_seconds_count"] == 4 + num_chat_tokens - 2
    assert after["furiosa_llm:generation_tokens_after_disconnect_total"] == 0
    assert "furiosa_llm:request_queue_time_seconds_count" in after


def test_failed_requests_count_as_errors(client, engine):
    engine.error_message = "does not fit"
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 400
    assert scrape(client)["furiosa_llm:request_success_total{finished_reason=error}"] == 1


def test_each_app_has_its_own_registry(config, engine, tokenizer, client):
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as other:
        samples = scrape(other)
    assert "furiosa_llm:request_success_total{finished_reason=length}" not in samples
    assert scrape(client)["furiosa_llm:request_success_total{finished_reason=length}"] == 1


class StubEngineClient:
    def __init__(self) -> None:
        self.latest_stats: SchedulerStats | None = None
        self.num_generation_tokens = 0


def test_stats_line_reports_throughput_while_busy_and_nothing_while_idle():
    engine = StubEngineClient()
    stats_logger = StatsLogger(engine, interval_s=10.0)
    assert stats_logger.line(now=100.0) is None  # idle from the start
    engine.num_generation_tokens = 500
    engine.latest_stats = SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.125, num_preemptions=0,
                                         num_prompt_tokens_computed=200)
    line = stats_logger.line(now=110.0)
    assert line == ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 50.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 12.5%")
    engine.latest_stats = SchedulerStats(0, 0, 0.0, 0, 200)
    assert stats_logger.line(now=120.0) is None  # nothing new and nothing running
    engine.latest_stats = SchedulerStats(1, 0, 0.25, 0, 300, prefix_cache_queried_tokens=400,
                                         prefix_cache_hit_tokens=100)
    assert stats_logger.line(now=130.0).endswith("KV cache usage: 25.0%, Prefix cache hit rate: 25.0%")


def test_furiosa_names_repeat_the_same_values_with_a_leader_device(client, engine):
    """FuriosaAI's documented names (furiosa_llm_*, labelled leader_device) read the same
    bookkeeping as the vLLM-style ones: equal values, for gauges, counters and histograms."""
    body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True, "n": 2}
    assert client.post("/v1/completions", json=body).status_code == 200
    engine.latest_stats = SchedulerStats(num_running=1, num_waiting=2, kv_cache_usage=0.25, num_preemptions=0, num_prompt_tokens_computed=4,
                                         prefix_cache_queried_tokens=7, prefix_cache_hit_tokens=5, num_prompt_tokens=9)
    samples = scrape(client)
    theirs = {k: v for k, v in samples.items() if k.startswith("furiosa_llm_")}
    as_ours = {}
    for key, value in theirs.items():
        assert "leader_device=cpu" in key, key
        key = key.replace(",leader_device=cpu", "").replace("{leader_device=cpu,", "{").replace("{leader_device=cpu}", "")
        key = key.replace("kv_cache_usage_percent", "kv_cache_usage_perc")
        as_ours["furiosa_llm:" + key.removeprefix("furiosa_llm_")] = value
    assert as_ours == {k: v for k, v in samples.items() if k in as_ours}
    documented = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_percent", "prefix_cache_hits_total",
                  "prefix_cache_queries_total", "prompt_tokens_total", "generation_tokens_total",
                  "request_success_total", "request_prompt_tokens_count", "request_generation_tokens_count",
                  "request_params_n_count", "request_params_max_tokens_count", "time_to_first_token_seconds_count",
                  "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count", "cache_config_info"]
    for name in documented:
        assert any(k.startswith(f"furiosa_llm_{name}{{") for k in theirs), name
    assert theirs["furiosa_llm_request_params_n_sum{leader_device=cpu}"] == 2
    assert theirs["furiosa_llm_request_generation_tokens_sum{leader_device=cpu}"] == 6
    assert theirs["furiosa_llm_request_params_max_tokens_bucket{le=5.0,leader_device=cpu}"] == 1
    assert theirs["furiosa_llm_prefix_cache_hits_total{leader_device=cpu}"] == 5
    assert 0.25 in [v for k, v in theirs.items() if k.startswith("furiosa_llm_kv_cache_usage_percent{")]


def test_cache_config_info_names_the_kv_cache_settings(client):
    samples = scrape(client)
    labels = "block_size=16,cache_dtype=auto,enable_prefix_caching=True,num_blocks=64,num_gpu_blocks=64"
    assert samples[f"furiosa_llm:cache_config_info{{{labels}}}"] == 1
    with_device = labels.replace(",num_blocks", ",leader_device=cpu,num_blocks")
    assert samples[f"furiosa_llm_cache_config_info{{{with_device}}}"] == 1


def test_cache_config_info_waits_for_the_engine(config, tokenizer):
    from fake_engine import FakeEngineClient
    from fake_model import MAX_MODEL_LEN, MODEL_NAME, rotating_script

    from ipc.messages import EngineReady

    info = EngineReady(MODEL_NAME, MAX_MODEL_LEN, len(tokenizer), num_kv_blocks=64, block_size=16)
    engine = FakeEngineClient(info, script=rotating_script(tokenizer), ready=False)
    with TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer)) as not_ready:
        text = not_ready.get("/metrics").text
    assert "cache_config_info" not in text
    assert "furiosa_llm_num_requests_running" in text
