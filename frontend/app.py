"""The Litestar app: routes over the serving layer. `create_app` is the one wiring point.

The lifespan loads the tokenizer and chat template and starts the engine client, but does not
wait for the engine: /health answers 503 until the engine reports ready, and generation
requests get a 503 until then.

With `--api-key` every route needs `Authorization: Bearer KEY` except /health (for probes)
and /metrics (unless `--metrics-require-key`). The OpenAPI document is at
/schema/openapi.json, Prometheus metrics at /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from litestar import HttpMethod, Litestar, Request, Response, get, post, route
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath
from litestar.response import Stream

from frontend.admission import RequestLoad
from frontend.chat_template import load_chat_template
from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient
from frontend.errors import EXCEPTION_HANDLERS, OpenAIError, bad_request, client_closed_request, decode_body
from frontend.generation_config import describe as describe_generation_defaults
from frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from frontend.metrics import FrontendMetrics
from frontend.openapi import OpenAIJsonRenderPlugin
from frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    ignored_fields,
)
from frontend.serving_chat import OpenAIServingChat
from frontend.protocol_responses import ResponsesRequest, ignored_response_fields
from frontend.serving_completions import OpenAIServingCompletion
from frontend.protocol_embeddings import EmbeddingRequest, ignored_embedding_fields
from frontend.serving_embeddings import OpenAIServingEmbedding
from frontend.serving_responses import OpenAIServingResponses
from frontend.sse import SSE_HEADERS
from frontend.stats_logger import StatsLogger
from frontend.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

# Worker threads for tokenizing and rendering chat templates, so the event loop stays free for
# /health and the streams. A few suffice: a prompt too long for the context is refused after
# tokenizing a few pieces of it (see `tokenizer.encode_prompt`).
MAX_PREPARE_THREADS = 4


def _version() -> str:
    try:
        return importlib.metadata.version("furiosa-llm")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"


@dataclass
class Services:
    """The long-lived objects the routes use; built by the lifespan."""

    config: FrontendConfig
    engine_client: object
    completions: OpenAIServingCompletion
    chat: OpenAIServingChat
    metrics: FrontendMetrics

    @property
    def tokenizer(self):
        return self.completions.tokenizer

    @functools.cached_property
    def responses(self) -> OpenAIServingResponses:
        return OpenAIServingResponses(self.chat)

    @functools.cached_property
    def embeddings(self) -> OpenAIServingEmbedding:
        """The /v1/embeddings endpoint (--runner pooling), sharing the chat endpoint's load and hooks."""
        chat = self.chat
        return OpenAIServingEmbedding(self.config, self.engine_client, chat.tokenizer, chat.eos_token_ids,
                                      load=chat.load, on_request_finished=chat.on_request_finished,
                                      executor=chat.executor)


def _services(state: State) -> Services:
    return state.services


# ---------------------------------------------------------------------------------------
# Routes


def _decode_generation_body(raw: bytes, cls: type, request: Request, find_ignored=ignored_fields):
    """The request body; one warning names the fields it ignores, so none is ignored silently."""
    body = decode_body(raw, cls)
    ignored = find_ignored(raw, body)
    if ignored:
        logger.warning("%s %s: ignoring the fields %s: this server does not use them", request.method,
                       request.url.path, ", ".join(map(repr, ignored)))
    return body


async def _generation_response(create, body, request: Request) -> Response:
    """A streamed body's SSE stream, or the whole result (abandoned if the client goes away)."""
    if body.stream:
        return Stream(await create(body), media_type="text/event-stream", headers=SSE_HEADERS)
    return Response(await _unless_disconnected(create(body), request))


@post("/v1/completions", status_code=200)
async def create_completion(request: Request, state: State) -> Response:
    services = _services(state)
    body = _decode_generation_body(await request.body(), CompletionRequest, request)
    return await _generation_response(services.completions.create_completion, body, request)


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request, state: State) -> Response:
    services = _services(state)
    body = _decode_generation_body(await request.body(), ChatCompletionRequest, request)
    return await _generation_response(services.chat.create_chat_completion, body, request)


@post("/v1/responses", status_code=200)
async def create_response(request: Request, state: State) -> Response:
    services = _services(state)
    body = _decode_generation_body(await request.body(), ResponsesRequest, request, ignored_response_fields)
    return await _generation_response(services.responses.create_response, body, request)


@post("/v1/embeddings", status_code=200)
async def create_embedding(request: Request, state: State) -> Response:
    services = _services(state)
    body = _decode_generation_body(await request.body(), EmbeddingRequest, request, ignored_embedding_fields)
    return Response(await _unless_disconnected(services.embeddings.create_embedding(body), request))


@get("/v1/models")
async def list_models(state: State) -> ModelList:
    return ModelList([_model_card(_services(state))])


@get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: FromPath[str], state: State) -> ModelCard:
    services = _services(state)
    services.completions.check_model(model_id.lstrip("/"))
    return _model_card(services)


@route("/health", http_method=[HttpMethod.GET, HttpMethod.HEAD])  # load balancers send HEAD
async def health(state: State) -> Response:
    client = _services(state).engine_client
    if client.is_dead:
        raise OpenAIError(503, f"The engine is not running: {client.dead_reason}", code="engine_dead")
    if not client.is_ready:
        raise OpenAIError(503, "The model is still loading.", code="engine_not_ready")
    return Response(b"", status_code=200)


@get("/version")
async def version() -> VersionResponse:
    return VersionResponse(_version())


@get("/metrics")
async def metrics(state: State) -> Response:
    return Response(_services(state).metrics.render(), media_type=METRICS_CONTENT_TYPE)


@post("/tokenize", status_code=200)
async def tokenize(request: Request, state: State) -> TokenizeResponse:
    services = _services(state)
    body = decode_body(await request.body(), TokenizeRequest)
    services.completions.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Give exactly one of prompt and messages.", param="prompt")
    run_blocking = services.completions.run_blocking  # off the event loop
    if body.prompt is not None:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await run_blocking(services.tokenizer.encode, body.prompt, add_special_tokens=add_special_tokens)
    else:
        text = await run_blocking(
            services.chat.prompt_builder.render,
            body.messages,
            tools=body.tools,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
        )
        tokens = await run_blocking(services.tokenizer.encode, text, add_special_tokens=bool(body.add_special_tokens))
    return TokenizeResponse(count=len(tokens), max_model_len=_max_model_len(services), tokens=tokens)


@post("/detokenize", status_code=200)
async def detokenize(request: Request, state: State) -> DetokenizeResponse:
    services = _services(state)
    body = decode_body(await request.body(), DetokenizeRequest)
    services.completions.check_model(body.model)
    vocab_size = _vocab_size(services)
    for token_id in body.tokens:
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"{token_id} is not a token id (the vocabulary has {vocab_size}).", param="tokens")
    return DetokenizeResponse(prompt=await services.completions.run_blocking(services.tokenizer.decode, body.tokens))


def _model_card(services: Services) -> ModelCard:
    return ModelCard(
        id=services.config.served_model_name,
        max_model_len=_max_model_len(services),
        root=services.config.engine.model,
    )


def _vocab_size(services: Services) -> int:
    """The bound on token ids, as prompts have it: the model's vocabulary, which may be padded
    past the tokenizer's (ids there decode to nothing)."""
    info = services.engine_client.model_info
    return info.vocab_size if info is not None else len(services.tokenizer)


def _max_model_len(services: Services) -> int | None:
    info = services.engine_client.model_info
    return info.max_model_len if info is not None else services.config.engine.max_model_len


async def _unless_disconnected(work, request: Request):
    """Runs `work` unless the client goes away first; then it is cancelled, which aborts its
    engine requests. ASGI reports a disconnect as the next message on `receive`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        logger.info("client disconnected; aborting %s %s", request.method, request.url.path)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise client_closed_request()
    finally:
        watcher.cancel()
        task.cancel()
        # An exception raised here holds this frame in its traceback, and the task holds the
        # exception: a cycle, which would keep the request (a prompt of megabytes) alive until
        # the cyclic collector ran.
        del task, watcher


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _api_key_check(api_key: str, *, is_metrics_public: bool):
    """Every route needs the key but /health (load balancers' probes) and, unless
    --metrics-require-key, /metrics (scrapers). Compared in constant time."""
    expected = f"Bearer {api_key}".encode()
    public_paths = {"/health", "/metrics"} if is_metrics_public else {"/health"}

    def check(request: Request) -> None:
        if request.url.path in public_paths or request.method == "OPTIONS":
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise OpenAIError(
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    return check


# ---------------------------------------------------------------------------------------
# The app


def create_app(config: FrontendConfig, engine_client=None, tokenizer=None) -> Litestar:
    """The frontend app. Tests pass a fake `engine_client` (then it is neither started nor shut
    down here) and a ready `tokenizer`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        tok = tokenizer if tokenizer is not None else load_tokenizer(config.engine.model)
        chat_template = load_chat_template(config.chat_template, tok)
        eos_ids = eos_token_ids(tok, config.engine.model)
        client = engine_client
        if client is None:
            client = EngineClient(config)
            await client.start()
        serving_args = (config, client, tok, eos_ids)
        metrics = FrontendMetrics(config.served_model_name, client, config.engine)
        executor = ThreadPoolExecutor(MAX_PREPARE_THREADS, thread_name_prefix="prepare")
        load = RequestLoad.for_limits(max_num_seqs=config.engine.max_num_seqs, max_waiting_requests=config.max_waiting_requests)
        shared = dict(load=load,
                      on_request_finished=metrics.observe_request, executor=executor)
        app.state.services = Services(
            config=config,
            engine_client=client,
            completions=OpenAIServingCompletion(*serving_args, **shared),
            chat=OpenAIServingChat(*serving_args, chat_template=chat_template, **shared),
            metrics=metrics,
        )
        logger.info("sampling defaults for fields a request leaves out: %s (--generation-config %s)",
                    describe_generation_defaults(app.state.services.chat.generation_defaults), config.generation_config)
        stats_task = None if config.disable_log_stats else asyncio.create_task(StatsLogger(client).run())
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
                await asyncio.gather(stats_task, return_exceptions=True)
            if engine_client is None:
                await client.shutdown()
            executor.shutdown(wait=False, cancel_futures=True)

    return Litestar(
        route_handlers=[
            create_completion,
            create_chat_completion,
            create_response,
            create_embedding,
            list_models,
            retrieve_model,
            health,
            version,
            metrics,
            tokenize,
            detokenize,
        ],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=(_api_key_check(config.api_key, is_metrics_public=not config.metrics_require_key)
                        if config.api_key else None),
        cors_config=CORSConfig(allow_origins=list(config.allowed_origins)) if config.allowed_origins else None,
        openapi_config=OpenAPIConfig(title="furiosa-llm", version=_version(), path="/schema",
                                     render_plugins=[OpenAIJsonRenderPlugin()]),
        logging_config=None,  # the process configures logging (see __main__)
    )
