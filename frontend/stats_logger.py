"""The periodic one-line stats log of a busy server (off with `--disable-log-stats`).

Every `interval_s` it logs prompt and generation throughput since the previous line, the
engine's running, waiting and KV cache usage, and the share of prompt tokens found in the
prefix cache since start, as vLLM does; an idle server logs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger("furiosa_llm.stats")

STATS_LOG_INTERVAL_S = 10.0


class StatsLogger:
    def __init__(self, engine_client, interval_s: float = STATS_LOG_INTERVAL_S) -> None:
        self.engine_client = engine_client
        self.interval_s = interval_s
        self._last = (time.monotonic(), 0, 0)  # (time, prompt tokens, generation tokens)

    def _counts(self) -> tuple[int, int]:
        stats = self.engine_client.latest_stats
        return (0 if stats is None else stats.num_prompt_tokens_computed), self.engine_client.num_generation_tokens

    def line(self, now: float) -> str | None:
        """The line for the interval ending at `now` (a monotonic time); None while idle."""
        last_time, last_prompt, last_generation = self._last
        prompt, generation = self._counts()
        self._last = (now, prompt, generation)
        stats = self.engine_client.latest_stats
        running, waiting, usage = (0, 0, 0.0) if stats is None else (stats.num_running, stats.num_waiting,
                                                                      stats.kv_cache_usage)
        if prompt == last_prompt and generation == last_generation and running == 0 and waiting == 0:
            return None
        elapsed = max(now - last_time, 1e-9)
        line = (f"Avg prompt throughput: {(prompt - last_prompt) / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {(generation - last_generation) / elapsed:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {usage * 100:.1f}%")
        if stats is not None and stats.prefix_cache_queried_tokens:
            rate = stats.prefix_cache_hit_tokens / stats.prefix_cache_queried_tokens
            line += f", Prefix cache hit rate: {rate * 100:.1f}%"  # of prompt tokens, since start
        return line

    async def run(self) -> None:
        """Until cancelled (the app's lifespan owns this task)."""
        while True:
            await asyncio.sleep(self.interval_s)
            line = self.line(time.monotonic())
            if line is not None:
                logger.info("%s", line)
