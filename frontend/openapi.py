"""The OpenAPI document at /schema/openapi.json, with the request bodies of the API routes.

The routes decode their bodies themselves (so that a malformed body is a 400 in OpenAI's
envelope, naming the field), which hides the bodies from Litestar's generated document. This
plugin adds them from msgspec's JSON Schema of the very Structs the routes decode, so the
document describes exactly what is accepted (and fuzzers generate real requests).
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from frontend.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from frontend.protocol_embeddings import EmbeddingRequest
from frontend.protocol_responses import ResponsesRequest

REQUEST_BODIES: dict[str, type[msgspec.Struct]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def add_request_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of `document` whose POST operations in `REQUEST_BODIES` have a JSON request body."""
    document = copy.deepcopy(document)
    paths = [p for p in REQUEST_BODIES if "post" in document.get("paths", {}).get(p, {})]
    schemas, components = msgspec.json.schema_components(
        [REQUEST_BODIES[p] for p in paths], ref_template="#/components/schemas/{name}"
    )
    document.setdefault("components", {}).setdefault("schemas", {}).update(components)
    for path, schema in zip(paths, schemas):
        document["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    return document


class OpenAIJsonRenderPlugin(JsonRenderPlugin):
    """Serves the document with its request bodies (computed once)."""

    def __init__(self) -> None:
        super().__init__(path="/openapi.json")
        self._document: dict[str, Any] | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._document is None:
            self._document = add_request_bodies(openapi_schema)
        return super().render(request, self._document)
