"""Server-sent events as OpenAI frames them: one `data: JSON` event a chunk, `data: [DONE]` last.

The one place that frames a stream; the routes send `SSE_HEADERS` with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec

from frontend.errors import OpenAIError, error_event, internal_error

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: msgspec.Struct) -> bytes:
    """One server-sent event exactly as OpenAI frames it (LF line ends, no `event:` field)."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def sse_stream(chunks: AsyncIterator[msgspec.Struct]) -> AsyncIterator[bytes]:
    """Frames chunks as SSE and always ends with `[DONE]`; a failure after the 200 status was
    sent becomes an `{"error": ...}` event."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield sse_event(chunk)
    except OpenAIError as exc:
        yield error_event(exc)
    except Exception:
        logger.exception("a streamed request failed")
        yield error_event(internal_error())
    yield SSE_DONE
