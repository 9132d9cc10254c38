"""Pooling (`--runner pooling`): a prompt's final-normed hidden states -> one vector.

A pooling request is prefill only. Each step the engine asks the model runner for the hidden
states of the rows this pooler needs from each scheduled chunk (`rows_of`): the last prompt
token's row once the chunk reaches it (`last`, what decoder embedding models such as
Qwen3-Embedding and e5-mistral use), or every row of every chunk (`mean`). `accumulate` folds
a chunk's rows into the request as they come, so a chunked prompt pools exactly as a whole one
(a float64 running sum, restarted when a chunk starts at position 0: a preempted request is
recomputed from there). Mean pooling needs every position computed, so such a request never
starts on cached prefix blocks; `last` may (the last token is always left to compute).
"""

from __future__ import annotations

import enum

import numpy as np

from engine_core.request import Request


class PoolingType(enum.Enum):
    LAST = "last"
    MEAN = "mean"


class Pooler:
    def __init__(self, pooling_type: str) -> None:
        self.type = PoolingType(pooling_type)

    @property
    def needs_every_position(self) -> bool:
        return self.type is PoolingType.MEAN

    def rows_of(self, start: int, num_tokens: int, num_prompt_tokens: int) -> tuple[int, int]:
        """For a chunk of positions [start, start + num_tokens): (first row in the chunk, count)."""
        if self.type is PoolingType.MEAN:
            return 0, num_tokens
        is_last_chunk = start + num_tokens == num_prompt_tokens
        return (num_tokens - 1, 1) if is_last_chunk else (0, 0)

    def accumulate(self, request: Request, start: int, hidden: np.ndarray) -> None:
        """hidden: the rows `rows_of` named for the chunk that starts at position `start`."""
        if start == 0 or request.pooled_sum is None:
            request.pooled_sum = np.zeros(hidden.shape[1], dtype=np.float64)
            request.num_pooled_rows = 0
        request.pooled_sum += hidden.sum(axis=0, dtype=np.float64)
        request.num_pooled_rows += hidden.shape[0]

    def result(self, request: Request) -> np.ndarray:
        """The pooled vector (float32), L2-normalized unless the request says otherwise."""
        vector = request.pooled_sum / max(1, request.num_pooled_rows)
        if request.pooling.normalize:
            norm = np.linalg.norm(vector)
            if norm > 0:
                vector = vector / norm
        return vector.astype(np.float32)
