"""Admission control: how many sequences may be in flight, and refusing a request beyond that.

Request preparation calls `RequestLoad.check` itself (before its costly part, tokenizing,
and again after it); the serving layer holds a request's sequences (`RequestLoad.holding`)
from the moment its engine requests are sent until its last output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from frontend.errors import bad_request, engine_unavailable

OVERLOAD_RETRY_AFTER_S = 2


class RequestLoad:
    """Sequences in flight, shared by both endpoints, to refuse work beyond a bound.

    Every prompt of a request runs max(n, best_of) sequences (the beam width, with beam
    search). The engine runs `max_num_seqs` of them and queues the rest; once `max_num_seqs +
    max_waiting_requests` are in flight a request gets a 503 with `Retry-After` instead of an
    ever longer queue, and a request that alone needs more gets a 400, since it can never be
    admitted. Sequences count from the moment their engine requests are sent, so a burst of
    requests that all pass `check()` before any of them starts can overshoot the bound by that
    burst.
    """

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.num_seqs = 0

    @classmethod
    def for_limits(cls, *, max_num_seqs: int, max_waiting_requests: int) -> RequestLoad:
        """The bound: what the engine runs at once plus what may wait for it."""
        return cls(max_num_seqs + max_waiting_requests)

    def check(self, num_seqs: int) -> None:
        """Whether a request of `num_seqs` sequences can be admitted now."""
        if num_seqs > self.max_num_seqs:
            raise bad_request(
                f"The request needs {num_seqs} sequences (prompts x max(n, best_of)), more than the "
                f"{self.max_num_seqs} this server admits at once; split it into smaller requests.",
                param="prompt",
            )
        if self.num_seqs + num_seqs > self.max_num_seqs:
            raise engine_unavailable(
                f"The server is overloaded ({self.num_seqs} sequences in flight); retry later.",
                code="server_overloaded",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )

    @contextlib.contextmanager
    def holding(self, num_seqs: int) -> Iterator[None]:
        """Counts `num_seqs` sequences as in flight for the duration."""
        self.num_seqs += num_seqs
        try:
            yield
        finally:
            self.num_seqs -= num_seqs
