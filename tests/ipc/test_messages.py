"""The wire contract: every message survives msgpack, each decoder accepts only its direction,
and the engine's EngineConfig survives its JSON trip to the engine process."""

from __future__ import annotations

import struct

import msgspec
import pytest

from ipc.config import EngineConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    FinishCause,
    FinishReason,
    PoolingParams,
    SamplingParams,
    SchedulerStats,
    TokenLogprobs,
    decode_to_engine,
    decode_to_frontend,
    encode,
)

FULL_PARAMS = SamplingParams(
    max_tokens=64,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=1234,
    presence_penalty=0.5,
    frequency_penalty=-0.25,
    repetition_penalty=1.1,
    min_tokens=3,
    stop_token_ids=[2, 7, 99],
    ignore_eos=True,
    logprobs=5,
    prompt_logprobs=2,
    n=3,
    best_of=5,
    use_beam_search=True,
    length_penalty=0.8,
    early_stopping="never",
    logit_bias={28: 100.0, 49151: -0.5},
)


def logprobs(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(token_id, -0.125, 2, [11, token_id], [-0.0625, -0.125])


TO_ENGINE = [
    EngineCoreRequest("req-full", [1, 2, 3, 40000], FULL_PARAMS, [2, 0], 1712345678.25),
    EngineCoreRequest("req-default", [5], SamplingParams(max_tokens=0), [], 0.0),
    EngineCoreRequest("req-stop-early", [5], SamplingParams(max_tokens=1, early_stopping=True), [2], 1.5),
    EngineCoreAbort(["a", "b"]),
    EngineCoreAbort(["a", "b"], indices=[0, 2]),
    EngineCoreAbort([]),
]

STATS = SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.375, num_preemptions=2,
                       num_prompt_tokens_computed=4096)

TO_FRONTEND = [
    EngineReady("smollm2", max_model_len=8192, vocab_size=49152, num_kv_blocks=1024, block_size=16),
    EngineCoreOutputs([], STATS, 1712345678.5),
    EngineCoreOutputs(
        [
            EngineCoreOutput("r1", 0, [17]),  # a plain delta: every optional field at its default
            EngineCoreOutput("r1", 1, [18, 19], new_logprobs=[logprobs(18), logprobs(19)]),
            EngineCoreOutput(
                "r2", 0, [2], new_logprobs=[logprobs(2)], finish_reason=FinishReason.STOP,
                prompt_logprobs=[None, logprobs(5), logprobs(6)], cumulative_logprob=-3.5,
                num_generated_tokens=9,
            ),
            EngineCoreOutput("r3", 0, [7], finish_reason=FinishReason.STOP, stop_reason=7),
            EngineCoreOutput("r4", 2, [], finish_reason=FinishReason.LENGTH, prompt_logprobs=[None]),
            EngineCoreOutput("r5", 0, [], finish_reason=FinishReason.ABORT),
            EngineCoreOutput("r6", 0, [], finish_reason=FinishReason.ERROR, error="does not fit the KV cache"),
        ],
        STATS,
        1712345679.0,
    ),
    EngineDead("RuntimeError: boom"),
]


@pytest.mark.parametrize("message", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_frontend_to_engine_messages_round_trip(message):
    decoded = decode_to_engine(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", TO_FRONTEND, ids=lambda m: type(m).__name__)
def test_engine_to_frontend_messages_round_trip(message):
    decoded = decode_to_frontend(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_round_trip_keeps_field_types():
    request = decode_to_engine(encode(TO_ENGINE[0]))
    params = request.sampling_params
    assert params.early_stopping == "never" and params == FULL_PARAMS
    assert decode_to_engine(encode(TO_ENGINE[2])).sampling_params.early_stopping is True
    outputs = decode_to_frontend(encode(TO_FRONTEND[2])).outputs
    assert [type(o.finish_reason) for o in outputs if o.finish_reason is not None] == [FinishReason] * 5
    assert outputs[2].prompt_logprobs[0] is None and isinstance(outputs[2].prompt_logprobs[1], TokenLogprobs)
    assert outputs[0].new_logprobs is None and outputs[0].finish_reason is None
    assert decode_to_engine(encode(TO_ENGINE[3])).indices is None


def test_wire_layout_is_positional_with_int_enums_and_tags():
    """Structs travel as arrays in field order (appending is safe, reordering is not), enums as ints."""
    raw = msgspec.msgpack.decode(encode(EngineCoreOutput("r", 0, [1], finish_reason=FinishReason.LENGTH)))
    assert raw[:5] == ["r", 0, [1], None, 1]
    assert msgspec.msgpack.decode(encode(SamplingParams(max_tokens=3, seed=7)))[:6] == [3, 1.0, 1.0, 0, 0.0, 7]
    assert msgspec.msgpack.decode(encode(EngineDead("x"))) == ["dead", "x"]
    assert msgspec.msgpack.decode(encode(EngineCoreAbort(["a"]))) == ["abort", ["a"], None]


@pytest.mark.parametrize("message", TO_FRONTEND, ids=lambda m: type(m).__name__)
def test_engine_decoder_rejects_engine_to_frontend_messages(message):
    with pytest.raises(msgspec.ValidationError):
        decode_to_engine(encode(message))


@pytest.mark.parametrize("message", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_frontend_decoder_rejects_frontend_to_engine_messages(message):
    with pytest.raises(msgspec.ValidationError):
        decode_to_frontend(encode(message))


@pytest.mark.parametrize(
    "raw",
    [
        ["request", "r", [1], [8], [2]],  # a field missing
        ["request", "r", [1], [8, 1.0, 1.0, 0, 0.0, None, 0.0, 0.0, 1.0, 0, [], False, None, None, 1, None,
                              False, 1.0, "always"], [2], 0.0],  # early_stopping must be a bool or "never"
        ["abort", "r"],  # request_ids must be a list
        ["bogus", ["r"]],  # an unknown tag
    ],
)
def test_engine_decoder_rejects_malformed_messages(raw):
    with pytest.raises(msgspec.ValidationError):
        decode_to_engine(msgspec.msgpack.encode(raw))


def test_frontend_decoder_rejects_an_unknown_finish_reason():
    raw = ["outputs", [["r", 0, [1], None, 9]], [0, 0, 0.0, 0, 0], 0.0]
    with pytest.raises(msgspec.ValidationError):
        decode_to_frontend(msgspec.msgpack.encode(raw))


def test_finish_cause_round_trips_as_the_last_field():
    outputs = [EngineCoreOutput("r", index, [7], finish_reason=cause.finish_reason, finish_cause=cause,
                                stop_reason=7 if cause == FinishCause.STOP_TOKEN else None)
               for index, cause in enumerate(FinishCause)]
    decoded = decode_to_frontend(encode(EngineCoreOutputs(outputs, STATS, 0.0))).outputs
    assert decoded == outputs and all(type(o.finish_cause) is FinishCause for o in decoded)
    raw = msgspec.msgpack.decode(encode(outputs[FinishCause.GRAMMAR_END]))
    # appended after the fields that came before it (only `pooled` came later)
    assert EngineCoreOutput.__struct_fields__[-2:] == ("finish_cause", "pooled")
    assert len(raw) == len(EngineCoreOutput.__struct_fields__) and raw[-2] == 2 and raw[4] == FinishReason.STOP
    # an output without one (not final, or from an engine that predates the field) decodes to None
    (old,) = decode_to_frontend(msgspec.msgpack.encode(["outputs", [["r", 0, [1], None, 1]],
                                                          [0, 0, 0.0, 0, 0], 0.0])).outputs
    assert old.finish_reason == FinishReason.LENGTH and old.finish_cause is None


def test_each_finish_cause_has_its_openai_finish_reason():
    assert [c.finish_reason for c in FinishCause] == [
        FinishReason.STOP, FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT,
        FinishReason.ERROR, FinishReason.STOP,
    ]
    assert [c.name for c in FinishCause] == ["EOS", "STOP_TOKEN", "GRAMMAR_END", "LENGTH", "ABORT", "ERROR", "POOLED"]


def test_engine_config_json_round_trip():
    config = EngineConfig(
        model="/models/llama", served_model_name="llama", max_model_len=4096,
        max_num_seqs=8, max_num_batched_tokens=512, block_size=32, kv_cache_gib=0.5, num_threads=2,
        log_level="debug", input_address="ipc:///tmp/x/in.sock", output_address="ipc:///tmp/x/out.sock",
        runner="pooling", pooler_type="mean",
    )
    assert EngineConfig.from_json(config.to_json()) == config
    defaults = EngineConfig(model="m.gguf", served_model_name="m")
    assert EngineConfig.from_json(defaults.to_json()) == defaults
    assert EngineConfig.from_json('{"model": "m.gguf", "served_model_name": "m"}') == defaults


def test_engine_config_json_rejects_wrong_types():
    with pytest.raises(msgspec.ValidationError):
        EngineConfig.from_json('{"model": "m.gguf", "served_model_name": "m", "block_size": "eight"}')
    with pytest.raises(msgspec.ValidationError):
        EngineConfig.from_json('{"served_model_name": "m"}')


def test_pooling_request_and_pooled_vector_round_trip():
    request = EngineCoreRequest("e", [1, 2], SamplingParams(max_tokens=0), [], 1.0, pooling=PoolingParams())
    assert decode_to_engine(encode(request)) == request
    plain = EngineCoreRequest("g", [1, 2], SamplingParams(max_tokens=4), [2], 1.0)
    assert msgspec.msgpack.decode(encode(plain))[-1] is None  # the appended field, unset
    assert decode_to_engine(encode(plain)).pooling is None
    vector = struct.pack("<3f", 0.5, -0.25, 1.0)
    output = EngineCoreOutput("e", 0, [], finish_reason=FinishReason.STOP, finish_cause=FinishCause.POOLED,
                              pooled=vector)
    (decoded,) = decode_to_frontend(encode(EngineCoreOutputs([output], STATS, 0.0))).outputs
    assert decoded.pooled == vector and FinishCause.POOLED.finish_reason == FinishReason.STOP
