"""The server's settings, parsed once by the launcher and handed to both processes.

The launcher serializes a `ServeConfig` to JSON and passes it on each child's command line,
so the engine core and the frontend read the same values without parsing flags twice.
"""

from __future__ import annotations

import msgspec


class ServeConfig(msgspec.Struct, kw_only=True):
    model: str  # artifact path: a GGUF file or a Hugging Face directory
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    devices: str = "cpu"
    max_model_len: int | None = None  # None: the model's own context length
    allow_long_max_model_len: bool = False  # max_model_len may exceed max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float = 4.0
    kv_cache_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # BLAS threads in the engine; None: chosen at start-up
    chat_template: str | None = None  # a file path
    response_role: str = "assistant"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    api_key: str | None = None
    metrics_require_key: bool = False
    allowed_origins: list[str] = []
    max_waiting_requests: int = 1024
    clamp_max_tokens: bool = False
    disable_log_stats: bool = False
    log_level: str = "info"
    shutdown_timeout_s: float = 30.0  # after SIGTERM, in-flight requests get this long to finish
    # Set by the launcher: the two ZeroMQ endpoints (ipc:// paths in a private temp dir).
    input_address: str = ""  # frontend -> engine
    output_address: str = ""  # engine -> frontend
    engine_pid: int | None = None  # lets the frontend notice the engine's death

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        return msgspec.json.decode(text, type=cls)
