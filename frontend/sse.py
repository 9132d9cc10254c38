"""Server-sent events as OpenAI frames them: one `data: JSON` event a chunk, `data: [DONE]` last.

The one place that frames a stream; the routes send `SSE_HEADERS` with it. While no chunk is
ready (the request waits in the queue, or a long prefill runs) it sends an SSE comment every
`KEEPALIVE_INTERVAL_S`, which clients ignore, so that proxies with idle timeouts keep the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import msgspec

from frontend.errors import OpenAIError, error_event, internal_error

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment line: every client skips it
KEEPALIVE_INTERVAL_S = 10.0  # well under the 60 s idle timeout of common proxies


def sse_event(payload: msgspec.Struct) -> bytes:
    """One server-sent event exactly as OpenAI frames it (LF line ends, no `event:` field)."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def sse_stream(chunks: AsyncIterator[msgspec.Struct], *, frame: Callable[[msgspec.Struct], bytes] = sse_event,
                     done: bytes | None = SSE_DONE) -> AsyncIterator[bytes]:
    """Frames chunks as SSE (`frame`) and always ends with `done` (`[DONE]`; None for the
    Responses API, whose stream ends with its own event); a failure after the 200 status was
    sent becomes an `{"error": ...}` event."""
    try:
        # closed in this order: the keep-alive wrapper ends its pending read before `chunks` closes
        async with contextlib.aclosing(chunks), contextlib.aclosing(_with_keepalives(chunks)) as waiting:
            async for chunk in waiting:
                yield SSE_KEEPALIVE if chunk is None else frame(chunk)
    except OpenAIError as exc:
        yield error_event(exc)
    except Exception:
        logger.exception("a streamed request failed")
        yield error_event(internal_error())
    if done is not None:
        yield done


async def _with_keepalives(chunks: AsyncIterator[msgspec.Struct]) -> AsyncIterator[msgspec.Struct | None]:
    """`chunks`, with a None whenever the next one has not come for `KEEPALIVE_INTERVAL_S`. The
    pending chunk is awaited in a task that a keep-alive does not disturb; if this generator is
    closed or cancelled (the client left), that task is cancelled and awaited here, so the
    cancellation reaches `chunks` (whose `finally` aborts the engine request) and no task is left."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(chunks))
            done, _ = await asyncio.wait((pending,), timeout=KEEPALIVE_INTERVAL_S)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))
            if not pending.cancelled():
                pending.exception()  # retrieved: a failure after the client left is no news


async def _next(chunks: AsyncIterator[msgspec.Struct]) -> msgspec.Struct:
    return await anext(chunks)
