"""What both schemathesis runs (the app with a fake engine, and the real server) feed in and check."""

from __future__ import annotations

import json
import zlib

from schemathesis.core.transport import STREAM_CUT_SHORT_ATTRIBUTE

ERROR_FIELDS = {"message", "type", "param", "code"}


def name_model_and_half_stream(body, model: str):
    """Most generated model names are unknown (a 404 before anything else is looked at): name
    the served model instead, so that the rest of the body is exercised. And as optional fields
    are mostly left out, half the bodies without `stream` (by a hash of their text) stream."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = model
        if "stream" not in body and zlib.crc32(json.dumps(body, sort_keys=True).encode()) % 2:
            body["stream"] = True
    return body


def check_response(response) -> None:
    """No server error; every error body is exactly OpenAI's envelope; streams end with [DONE]
    and carry errors as `data: {"error": ...}` events."""
    where = f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert set(error) == ERROR_FIELDS and isinstance(error["message"], str) and error["message"], where
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        if str(response.request.url).endswith("/v1/responses"):
            check_responses_stream(response.text, where)
            assert not getattr(response, STREAM_CUT_SHORT_ATTRIBUTE, False), where
            return
        # (a ": keep-alive" comment, sent while a stream waits, is no event)
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line and not line.startswith(":")]
        assert events[-1] == "[DONE]" and not getattr(response, STREAM_CUT_SHORT_ATTRIBUTE, False), where
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert set(payload["error"]) == ERROR_FIELDS, where


RESPONSES_TERMINAL_EVENTS = {"response.completed", "response.incomplete", "response.failed"}


def check_responses_stream(text: str, where: str) -> None:
    """A Responses stream: `event:`/`data:` pairs of the same type, sequence numbers 0, 1, ...,
    and exactly one terminal event, the last."""
    blocks = [block for block in text.split("\n\n") if block and not block.startswith(":")]
    events = []
    for block in blocks:
        event_line, data_line = block.split("\n")
        payload = json.loads(data_line[len("data: "):])
        assert event_line == f"event: {payload['type']}", where
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events))), where
    terminal = [e for e in events if e["type"] in RESPONSES_TERMINAL_EVENTS]
    assert len(terminal) == 1 and events[-1] is terminal[0], where
