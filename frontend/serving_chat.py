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
    CompletionTokensDetails,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    Tool,
    ToolCall,
    UsageInfo,
)
from frontend.output_processor import ChoiceDelta, PreparedPrompt
from frontend.reasoning_parsers import ReasoningParser, ReasoningParserRegistry
from frontend.serving import GenerationJob, OpenAIServing, random_id
from frontend.serving_logprobs import (
    TokenStrings,
    clamp_logprob,
    prompt_logprobs,
)
from frontend.serving_tools import ChatOutputPlan
from frontend.serving_validation import (
    check_num_logprobs,
    check_prompt_logprobs,
    check_sampling_fields,
    check_stop_token_ids,
    make_sampling_params,
    resolve_logit_bias,
    resolve_max_tokens,
)
from frontend.tool_parsers import ParsedDelta, StopCutToolCallStream, ToolCallStream
from frontend.tool_parsers import ToolCall as ParsedToolCall
from ipc.messages import TokenLogprobs

# Names the template call sets itself; `chat_template_kwargs` cannot override them.
_RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt"}


class ChatPromptBuilder:
    """Renders a conversation to prompt text (shared with /tokenize). Blocking: the serving layer
    calls it from a worker thread."""

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


def _message_to_dict(message: ChatMessage, position: int) -> dict[str, Any]:
    """A message as Hugging Face chat templates expect it: text content as one string (empty,
    not null, for a message that only calls tools, as vLLM renders it: templates that join
    strings, like ChatML, would fail on null), tool call arguments as objects, and absent
    fields left out rather than null."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if part.type != "text":
                raise bad_request(
                    f"Only text content parts are supported, got a {part.type!r} part.",
                    param=f"messages[{position}].content[{k}]",
                )
            if part.text is None:
                raise bad_request(
                    "A 'text' content part needs its `text` field.",
                    param=f"messages[{position}].content[{k}].text",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    result: dict[str, Any] = {"role": message.role, "content": content}
    if content is None:
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
        name = self.config.reasoning_parser
        self.reasoning_parser: type[ReasoningParser] | None = ReasoningParserRegistry.get(name) if name else None

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[bytes]:
        return await self.respond(await self.prepare(request))

    async def prepare(self, request: ChatCompletionRequest) -> ChatJob:
        """Validates and renders a request into a job ready to run (admission checked, nothing
        sent to the engine yet); bad input raises an OpenAIError. The Responses API runs its
        requests through here too."""
        arrival_time = time.time()
        self.check_model(request.model)
        info = self.engine_info()
        check_sampling_fields(request, max_num_seqs=self.config.engine.max_num_seqs)
        check_stop_token_ids(request, info.vocab_size)
        bias = resolve_logit_bias(request, info.vocab_size)
        plan = ChatOutputPlan.for_request(request, self.config)
        logprobs = self._num_logprobs(request)
        check_prompt_logprobs(request, self.config.max_logprobs)
        num_seqs = max(request.n, request.best_of or 0)
        self.load.check(num_seqs)  # before the costly part, rendering and tokenizing
        text = await self.run_blocking(
            self.prompt_builder.render,
            request.messages,
            tools=request.tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        token_ids = await self.encode_prompt(text, add_special_tokens=False, max_model_len=info.max_model_len,
                                             param="messages")
        use_completion_tokens = request.max_completion_tokens is not None
        max_tokens = resolve_max_tokens(
            request.max_completion_tokens if use_completion_tokens else request.max_tokens,
            param="max_completion_tokens" if use_completion_tokens else "max_tokens",
            default=None,
            num_prompt_tokens=len(token_ids),
            max_model_len=info.max_model_len,
            clamp=self.config.clamp_max_tokens,
        )
        params = make_sampling_params(request, max_tokens=max_tokens, logprobs=logprobs, logit_bias=bias,
                                      prompt_logprobs=request.prompt_logprobs, structured_output=plan.structured_output,
                                      defaults=self.generation_defaults)
        chat_id = random_id("chatcmpl")
        prompt = PreparedPrompt(self.make_engine_request(chat_id, token_ids, params, arrival_time), text, 0)
        self.load.check(num_seqs)  # again: others may have started while this one was rendered
        return ChatJob(self, request, chat_id, prompt, arrival_time, logprobs, plan)

    def _num_logprobs(self, request: ChatCompletionRequest) -> int | None:
        top = request.top_logprobs
        if top is not None:
            check_num_logprobs(top, "top_logprobs", self.config.max_logprobs)
            if top > 0 and not request.logprobs:
                raise bad_request("top_logprobs needs logprobs to be true.", param="top_logprobs")
        return (top or 0) if request.logprobs else None


class ChatJob(GenerationJob):
    """One chat completion: its choices as messages, or as a stream of message deltas."""

    def __init__(
        self,
        serving: OpenAIServingChat,
        request: ChatCompletionRequest,
        chat_id: str,
        prompt: PreparedPrompt,
        arrival_time: float,
        logprobs: int | None,
        plan: ChatOutputPlan,
    ) -> None:
        super().__init__(serving, request, chat_id, [prompt], arrival_time)
        self.logprobs_builder = ChatLogprobsBuilder(serving.token_strings, logprobs or 0) if logprobs is not None else None
        self.role = serving.config.response_role
        self.tool_parser = plan.tool_parser
        self.is_constrained = plan.structured_output is not None
        self.num_reasoning_tokens = [0] * request.n

    def new_reasoning_parser(self) -> ReasoningParser | None:
        """A fresh parser for one choice, or None without --reasoning-parser."""
        parser_class = self.serving.reasoning_parser
        if parser_class is None:
            return None
        return parser_class.for_request(prompt_text=self.prompts[0].prompt_text,
                                        chat_template_kwargs=self.request.chat_template_kwargs,
                                        is_constrained=self.is_constrained)

    def split_reasoning(self, delta: ChoiceDelta, parser: ReasoningParser | None) -> tuple[str, str]:
        """A delta's text as (reasoning, content); its tokens count as reasoning tokens if the
        choice was in its think block at the delta's start or end."""
        if parser is None:
            return "", delta.text
        was_in_reasoning = parser.is_in_reasoning
        reasoning, content = parser.feed(delta.text)
        if delta.finish_reason is not None:
            tail = parser.finish()
            reasoning, content = reasoning + tail[0], content + tail[1]
        if was_in_reasoning or parser.is_in_reasoning or reasoning:
            self.num_reasoning_tokens[delta.index] += len(delta.token_ids)
        return reasoning, content

    def usage_info(self) -> UsageInfo:
        """The job's token counts so far, with its reasoning tokens under --reasoning-parser."""
        usage = self.usage.usage()
        if self.serving.reasoning_parser is not None:
            usage.completion_tokens_details = CompletionTokensDetails(sum(self.num_reasoning_tokens))
        return usage

    def _logprobs(self, delta: ChoiceDelta) -> list[ChatCompletionLogProb] | None:
        if self.logprobs_builder is None:
            return None
        return self.logprobs_builder.build(delta.token_ids, delta.logprobs)

    async def collect(self) -> ChatCompletionResponse:
        n = self.request.n
        texts: list[list[str]] = [[] for _ in range(n)]
        reasoning_texts: list[list[str]] = [[] for _ in range(n)]
        reasoners = [self.new_reasoning_parser() for _ in range(n)]
        logprobs: list[list[ChatCompletionLogProb]] = [[] for _ in range(n)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * n
        token_ids: list[list[int]] = [[] for _ in range(n)]
        prompt_entries = None
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                reasoning, content = self.split_reasoning(delta, reasoners[delta.index])
                reasoning_texts[delta.index].append(reasoning)
                texts[delta.index].append(content)
                token_ids[delta.index].extend(delta.token_ids)
                prompt_entries = prompt_entries or delta.prompt_logprobs
                logprobs[delta.index].extend(self._logprobs(delta) or [])
                if delta.finish_reason is not None:
                    finish[delta.index] = (delta.finish_reason, delta.stop_reason)
        choices = []
        for i in range(n):
            message = self._message("".join(texts[i]), is_cut_by_stop=isinstance(finish[i][1], str))
            if reasoners[i] is not None and reasoners[i].has_reasoning:
                message.reasoning_content = message.reasoning = "".join(reasoning_texts[i])
                message.content = message.content or None
            choices.append(
                ChatCompletionResponseChoice(
                    index=i,
                    message=message,
                    logprobs=ChatCompletionLogProbs(logprobs[i]) if self.logprobs_builder is not None else None,
                    finish_reason=_chat_finish_reason(finish[i][0], has_tool_calls=bool(message.tool_calls)),
                    stop_reason=finish[i][1],
                    token_ids=token_ids[i] if self.request.return_token_ids else None,
                )
            )
        prompt_token_ids = self.prompts[0].request.prompt_token_ids
        num_top = self.request.prompt_logprobs
        return ChatCompletionResponse(
            id=self.response_id, model=self.serving.model_name, choices=choices, usage=self.usage_info(), created=self.created,
            prompt_logprobs=None if num_top is None else prompt_logprobs(
                self.serving.token_strings, prompt_token_ids, prompt_entries, num_top),
            prompt_token_ids=prompt_token_ids if self.request.return_token_ids else None,
        )

    def _message(self, text: str, *, is_cut_by_stop: bool) -> ChatResponseMessage:
        if self.tool_parser is None:
            return ChatResponseMessage(role=self.role, content=text)
        content, calls = self.tool_parser.extract(text, is_cut_by_stop=is_cut_by_stop)
        if not calls:
            return ChatResponseMessage(role=self.role, content=content or "")
        return ChatResponseMessage(role=self.role, content=content, tool_calls=[_tool_call(c) for c in calls])

    async def stream_chunks(self) -> AsyncIterator[ChatCompletionStreamResponse]:
        def usage():
            return self.usage_info() if self.include_continuous_usage else None

        # OpenAI opens every choice with a chunk that only names the role.
        with_ids = self.request.return_token_ids
        for i in range(self.request.n):
            role_delta = DeltaMessage(role=self.role, content="")
            chunk = self._chunk([ChatCompletionStreamChoice(i, role_delta)], usage())
            if with_ids and i == 0:
                chunk.prompt_token_ids = self.prompts[0].request.prompt_token_ids
            yield chunk
        # One tool-call parser per choice; it holds back text that may start a call (and, where
        # a stop string may cut a call short, a call's deltas until the output ends).
        parsers: list[ToolCallStream | StopCutToolCallStream | None] = [self._tool_stream() for _ in range(self.request.n)]
        # One reasoning parser per choice, before the tool-call parser: calls are read from the
        # content only. A delta that ends the think block is sent as a reasoning chunk, then the
        # content chunk.
        reasoners = [self.new_reasoning_parser() for _ in range(self.request.n)]
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                entries = self._logprobs(delta)
                reasoning, content = self.split_reasoning(delta, reasoners[delta.index])
                message, has_tool_calls = _delta_message(content, delta, parsers[delta.index])
                if reasoning:
                    reasoning_delta = DeltaMessage(reasoning_content=reasoning, reasoning=reasoning)
                    if message is None:
                        message = reasoning_delta
                    else:
                        yield self._chunk([ChatCompletionStreamChoice(delta.index, reasoning_delta)], usage())
                if message is None and delta.finish_reason is None and not entries and not (with_ids and delta.token_ids):
                    continue  # nothing to say yet (text held back for a stop string or a tool call)
                choice = ChatCompletionStreamChoice(
                    index=delta.index,
                    delta=message or DeltaMessage(),
                    logprobs=ChatCompletionLogProbs(entries) if entries is not None else None,
                    finish_reason=_chat_finish_reason(delta.finish_reason, has_tool_calls=has_tool_calls),
                    stop_reason=delta.stop_reason,
                    token_ids=delta.token_ids if with_ids else None,
                )
                yield self._chunk([choice], usage())
        if self.include_usage:
            yield self._chunk([], self.usage_info())

    def _tool_stream(self) -> ToolCallStream | StopCutToolCallStream | None:
        if self.tool_parser is None:
            return None
        stream = self.tool_parser.stream()
        return StopCutToolCallStream(stream) if self.settings.stop else stream

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.response_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.serving.model_name,
            choices=choices,
            usage=usage,
        )


def _delta_message(
    text: str, delta: ChoiceDelta, parser: ToolCallStream | StopCutToolCallStream | None
) -> tuple[DeltaMessage | None, bool]:
    """What a delta's content text says once tool calls are parsed out (None: nothing yet), and
    whether the choice has made tool calls so far."""
    if parser is None:
        return (DeltaMessage(content=text) if text else None), False
    parsed = parser.feed(text)
    if delta.finish_reason is not None:
        if isinstance(parser, StopCutToolCallStream):
            tail = parser.finish(is_cut_by_stop=isinstance(delta.stop_reason, str))
        else:
            tail = parser.finish()
        parsed = ParsedDelta(parsed.content + tail.content, parsed.tool_calls + tail.tool_calls)
    if parsed.is_empty:
        return None, parser.num_calls > 0
    calls = [
        DeltaToolCall(
            index=c.index,
            id=c.id,
            type="function" if c.id is not None else None,
            function=DeltaFunctionCall(name=c.name, arguments=c.arguments if c.arguments or c.id else None),
        )
        for c in parsed.tool_calls
    ]
    return DeltaMessage(content=parsed.content or None, tool_calls=calls or None), parser.num_calls > 0


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _chat_finish_reason(reason: str | None, *, has_tool_calls: bool) -> str | None:
    """A choice that called tools and ended by itself ends with "tool_calls"."""
    return "tool_calls" if reason == "stop" and has_tool_calls else reason
