"""POST /v1/chat/completions: a conversation rendered by the chat template, then generated.

The rendered text carries its own special tokens (the template writes BOS and the role
markers), so it is tokenized with `add_special_tokens=False`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.errors import bad_request
from frontend.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionTopLogprob,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    Tool,
)
from frontend.serving import (
    ChoiceDelta,
    OpenAIServing,
    PreparedPrompt,
    RequestTiming,
    UsageCounter,
    random_id,
    sse_stream,
)
from frontend.serving_logprobs import (
    TokenStrings,
    clamp_logprob,
)
from frontend.serving_validation import (
    MAX_LOGPROBS,
    TextSettings,
    check_sampling_fields,
    check_stop_token_ids,
    make_sampling_params,
    resolve_max_tokens,
    text_settings,
)
from ipc.messages import TokenLogprobs

# Names the template call sets itself; `chat_template_kwargs` cannot override them.
_RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt"}


class ChatPromptBuilder:
    """Renders a conversation to prompt text and token ids (shared with /tokenize)."""

    def __init__(self, chat_template: ChatTemplate | None, tokenizer) -> None:
        self.chat_template = chat_template
        self.tokenizer = tokenizer

    def render(
        self,
        messages: list[ChatMessage],
        *,
        tools: list[Tool] | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> str:
        if self.chat_template is None:
            raise bad_request(
                "This model has no chat template; start the server with --chat-template FILE "
                "or use /v1/completions.",
                param="messages",
            )
        if not messages:
            raise bad_request("messages must not be empty.", param="messages")
        if add_generation_prompt and continue_final_message:
            raise bad_request(
                "add_generation_prompt and continue_final_message cannot both be true.",
                param="continue_final_message",
            )
        extra = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_VARIABLES}
        conversation = [_message_to_dict(m, i) for i, m in enumerate(messages)]
        tool_dicts = [_drop_none(msgspec.to_builtins(t)) for t in tools] if tools else None
        try:
            text = self.chat_template.render(
                conversation, tools=tool_dicts, add_generation_prompt=add_generation_prompt, **extra
            )
        except ChatTemplateError as exc:
            raise bad_request(f"The chat template could not render the messages: {exc}", param="messages") from None
        if continue_final_message:
            text = _cut_after_final_message(text, conversation[-1].get("content"))
        return text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def _message_to_dict(message: ChatMessage, position: int) -> dict[str, Any]:
    """A message as Hugging Face chat templates expect it: text content as one string, tool
    call arguments as objects, and absent fields left out rather than null."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"Only text content parts are supported, got a {part.type!r} part.",
                    param=f"messages[{position}].content[{k}]",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    result: dict[str, Any] = {"role": message.role, "content": content}
    if content is None and not message.tool_calls:
        result["content"] = ""
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result


def _arguments(arguments: str) -> Any:
    """Templates index into tool-call arguments, so a JSON object string becomes a dict."""
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _cut_after_final_message(text: str, final_content: str | None) -> str:
    """The prompt ends inside the final message, so the model continues it."""
    if not final_content:
        return text
    for content in (final_content, final_content.strip()):
        end = text.rfind(content)
        if content and end >= 0:
            return text[: end + len(content)]
    raise bad_request(
        "continue_final_message: the chat template does not render the final message's content verbatim.",
        param="continue_final_message",
    )


class ChatLogprobsBuilder:
    def __init__(self, token_strings: TokenStrings, num_top: int) -> None:
        self.token_strings = token_strings
        self.num_top = num_top

    def build(self, token_ids: list[int], entries: list[TokenLogprobs] | None) -> list[ChatCompletionLogProb]:
        if entries is None:
            return []
        result = []
        for token_id, entry in zip(token_ids, entries):
            top = [
                self._top(top_id, top_logprob)
                for top_id, top_logprob in list(zip(entry.top_token_ids, entry.top_logprobs))[: self.num_top]
            ]
            chosen = self._top(token_id, entry.logprob)
            result.append(ChatCompletionLogProb(chosen.token, chosen.logprob, chosen.bytes, top))
        return result

    def _top(self, token_id: int, logprob: float) -> ChatCompletionTopLogprob:
        data = self.token_strings.bytes_of(token_id)
        return ChatCompletionTopLogprob(data.decode("utf-8", errors="replace"), clamp_logprob(logprob), list(data))


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, chat_template: ChatTemplate | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_builder = ChatPromptBuilder(chat_template, self.tokenizer)

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[bytes]:
        job = self._prepare(request)
        if request.stream:
            return sse_stream(job.stream_chunks())
        return await job.collect()

    def _prepare(self, request: ChatCompletionRequest) -> "_ChatJob":
        arrival_time = time.time()
        self.check_model(request.model)
        info = self.engine_info()
        check_sampling_fields(request, max_num_seqs=self.config.max_num_seqs)
        check_stop_token_ids(request, info.vocab_size)
        self._check_tools(request)
        logprobs = self._num_logprobs(request)
        text = self.prompt_builder.render(
            request.messages,
            tools=request.tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        token_ids = self.prompt_builder.encode(text)
        use_completion_tokens = request.max_completion_tokens is not None
        max_tokens = resolve_max_tokens(
            request.max_completion_tokens if use_completion_tokens else request.max_tokens,
            param="max_completion_tokens" if use_completion_tokens else "max_tokens",
            default=None,
            num_prompt_tokens=len(token_ids),
            max_model_len=info.max_model_len,
            clamp=self.config.clamp_max_tokens,
        )
        params = make_sampling_params(request, max_tokens=max_tokens, logprobs=logprobs)
        chat_id = random_id("chatcmpl")
        prompt = PreparedPrompt(self.make_engine_request(chat_id, token_ids, params, arrival_time), text, 0)
        return _ChatJob(self, request, chat_id, prompt, text_settings(request), arrival_time, logprobs)

    def _check_tools(self, request: ChatCompletionRequest) -> None:
        choice = request.tool_choice
        if choice == "auto" and not self.config.enable_auto_tool_choice:
            raise bad_request(
                '"auto" tool choice requires the server to be started with --enable-auto-tool-choice '
                "and --tool-call-parser.",
                param="tool_choice",
            )
        if choice is not None and choice not in ("none", "auto"):
            raise bad_request(
                "Only tool_choice \"none\" and \"auto\" are supported.", param="tool_choice"
            )
        if choice is not None and choice != "none" and not request.tools:
            raise bad_request("tool_choice needs tools.", param="tool_choice")
        response_format = request.response_format
        if response_format is not None and response_format.type != "text":
            raise bad_request(
                f"response_format {response_format.type!r} is not supported; only \"text\" is.",
                param="response_format",
            )

    @staticmethod
    def _num_logprobs(request: ChatCompletionRequest) -> int | None:
        top = request.top_logprobs
        if top is not None:
            if not 0 <= top <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}.", param="top_logprobs")
            if top > 0 and not request.logprobs:
                raise bad_request("top_logprobs needs logprobs to be true.", param="top_logprobs")
        return (top or 0) if request.logprobs else None


class _ChatJob:
    def __init__(
        self,
        serving: OpenAIServingChat,
        request: ChatCompletionRequest,
        chat_id: str,
        prompt: PreparedPrompt,
        settings: TextSettings,
        arrival_time: float,
        logprobs: int | None,
    ) -> None:
        self.serving = serving
        self.request = request
        self.chat_id = chat_id
        self.prompt = prompt
        self.settings = settings
        self.created = int(arrival_time)
        self.timing = RequestTiming(arrival_time)
        self.usage = UsageCounter([prompt])
        self.logprobs_builder = ChatLogprobsBuilder(serving.token_strings, logprobs or 0) if logprobs is not None else None
        self.role = serving.config.response_role

    def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        return self.serving.generate_choices([self.prompt], self.settings, self.usage, self.timing)

    def _logprobs(self, delta: ChoiceDelta) -> list[ChatCompletionLogProb] | None:
        if self.logprobs_builder is None:
            return None
        return self.logprobs_builder.build(delta.token_ids, delta.logprobs)

    async def collect(self) -> ChatCompletionResponse:
        n = self.request.n
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[ChatCompletionLogProb]] = [[] for _ in range(n)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * n
        async with contextlib.aclosing(self._deltas()) as deltas:
            async for delta in deltas:
                texts[delta.index].append(delta.text)
                logprobs[delta.index].extend(self._logprobs(delta) or [])
                if delta.finish_reason is not None:
                    finish[delta.index] = (delta.finish_reason, delta.stop_reason)
        choices = [
            ChatCompletionResponseChoice(
                index=i,
                message=ChatResponseMessage(role=self.role, content="".join(texts[i])),
                logprobs=ChatCompletionLogProbs(logprobs[i]) if self.logprobs_builder is not None else None,
                finish_reason=finish[i][0],
                stop_reason=finish[i][1],
            )
            for i in range(n)
        ]
        return ChatCompletionResponse(
            id=self.chat_id, model=self.serving.model_name, choices=choices, usage=self.usage.usage(), created=self.created
        )

    async def stream_chunks(self) -> AsyncIterator[ChatCompletionStreamResponse]:
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous_usage = include_usage and options.continuous_usage_stats

        def usage():
            return self.usage.usage() if continuous_usage else None

        # OpenAI opens every choice with a chunk that only names the role.
        for i in range(self.request.n):
            role_delta = DeltaMessage(role=self.role, content="")
            yield self._chunk([ChatCompletionStreamChoice(i, role_delta)], usage())
        async with contextlib.aclosing(self._deltas()) as deltas:
            async for delta in deltas:
                entries = self._logprobs(delta)
                if not delta.text and delta.finish_reason is None and not entries:
                    continue  # nothing to say yet (text held back for a possible stop string)
                choice = ChatCompletionStreamChoice(
                    index=delta.index,
                    delta=DeltaMessage(content=delta.text or None),
                    logprobs=ChatCompletionLogProbs(entries) if entries is not None else None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
                yield self._chunk([choice], usage())
        if include_usage:
            yield self._chunk([], self.usage.usage())

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.chat_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.serving.model_name,
            choices=choices,
            usage=usage,
        )
