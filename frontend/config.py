"""The frontend's settings: HTTP, auth, CORS, templates, tools, admission, shutdown.

The launcher (`cli.py`) builds one `FrontendConfig`, takes its flags' defaults from it and
from `EngineConfig`, and passes it to the frontend process as JSON; the engine gets only
`config.engine`. The frontend reads the engine settings it needs (model path, served name,
`max_num_seqs`, the socket addresses) from `config.engine`, never from a copy.
"""

from __future__ import annotations

import msgspec

from ipc.config import EngineConfig

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default `max_logprobs`


class FrontendConfig(msgspec.Struct, kw_only=True):
    engine: EngineConfig
    host: str = "localhost"
    port: int = 8000
    chat_template: str | None = None  # a file path
    response_role: str = "assistant"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # a frontend.reasoning_parsers name: <think> blocks -> reasoning_content
    api_key: str | None = None  # never in the JSON on a command line: the launcher passes it in the environment
    metrics_require_key: bool = False
    allowed_origins: list[str] = []
    max_waiting_requests: int = 1024
    clamp_max_tokens: bool = False
    generation_config: str = "auto"  # "auto" (the model's sampling defaults), "vllm" (neutral) or a directory
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # logprobs, top_logprobs and prompt_logprobs above this are a 400
    disable_log_stats: bool = False
    shutdown_timeout_s: float = 30.0  # after SIGTERM, in-flight requests get this long to finish
    engine_pid: int | None = None  # set by the launcher: lets the frontend notice the engine's death
    # set by the launcher with --data-parallel-size: each engine's (input, output) addresses and
    # pid, in rank order (empty: the one engine of `engine` and `engine_pid`)
    engine_addresses: list[tuple[str, str]] = []
    engine_pids: list[int] = []

    @property
    def engine_endpoints(self) -> list[tuple[str, str]]:
        return self.engine_addresses or [(self.engine.input_address, self.engine.output_address)]

    @property
    def served_model_name(self) -> str:
        return self.engine.served_model_name

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> FrontendConfig:
        return msgspec.json.decode(text, type=cls)
