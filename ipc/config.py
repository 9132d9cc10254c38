"""The engine core's settings: what the launcher hands the engine process, as JSON.

The launcher parses every flag once (frontend/cli.py) into a `frontend.config.FrontendConfig`,
which holds an `EngineConfig`; the engine gets only that part on its command line. HTTP, auth
and CORS settings never travel to the engine. The frontend reads a few engine settings too
(the model path for its tokenizer, the served name, `max_num_seqs` for admission, the socket
addresses) from the same `EngineConfig`, so each setting has one owner.
"""

from __future__ import annotations

import msgspec


RUNNERS = ("generate", "pooling")  # --runner (vLLM's names): generation, or embeddings only
POOLER_TYPES = ("last", "mean")  # --pooler-type: how a pooling request's hidden states become one vector


class EngineConfig(msgspec.Struct, kw_only=True):
    model: str  # artifact path: a GGUF file or a Hugging Face directory
    served_model_name: str
    devices: str = "cpu"
    max_model_len: int | None = None  # None: the model's own context length
    allow_long_max_model_len: bool = False  # max_model_len may exceed max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float = 4.0
    kv_cache_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # float32 | int8: what the few-row matmuls over 4-bit weights multiply by (int8: activations
    # quantized per 32 values as llama.cpp does; faster decode, outputs differ slightly)
    activation_dtype: str = "float32"
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # BLAS threads in the engine; None: its DEFAULT_NUM_THREADS (1)
    log_level: str = "info"
    runner: str = "generate"  # generate | pooling (vLLM's --runner): pooling serves embeddings only
    pooler_type: str = "last"  # last | mean: how a pooling request's hidden states become one vector
    # Set by the launcher: the two ZeroMQ endpoints (ipc:// paths in a private temp dir).
    input_address: str = ""  # frontend -> engine
    output_address: str = ""  # engine -> frontend
    # --data-parallel-size: engine-core processes behind the one frontend, each with its own
    # KV cache of kv_cache_gib and num_threads threads. Rank and CPU set are set by the launcher.
    data_parallel_size: int = 1
    data_parallel_rank: int = 0  # this engine's index among them
    cpu_ids: list[int] = []  # the CPUs this engine is pinned to (before its threads start); empty: not pinned

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        return msgspec.json.decode(text, type=cls)
