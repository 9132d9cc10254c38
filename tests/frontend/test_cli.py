"""The launcher's flags: a value out of range is a start-up error naming the flag, never a
server that starts and then refuses every request, nor a silent default."""

from __future__ import annotations

import msgspec
import pytest

from frontend.cli import build_parser, config_from_args
from frontend.config import FrontendConfig
from frontend.data_parallel import plan as plan_data_parallel
from ipc.config import EngineConfig


def config_of(*flags: str):
    return config_from_args(build_parser().parse_args(["serve", *flags]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-model-len", "-5"], "--max-model-len must be positive, got -5"),
        (["--max-model-len", "0"], "--max-model-len must be positive, got 0"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib must be a positive number of GiB, got 0.0"),
        (["--kv-cache-gib", "-2"], "--kv-cache-gib must be a positive number of GiB, got -2.0"),
        (["--kv-cache-gib", "nan"], "--kv-cache-gib must be a positive number of GiB, got nan"),
        (["--kv-cache-gib", "inf"], "--kv-cache-gib must be a positive number of GiB, got inf"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be 0 or more seconds, got -1.0"),
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--port", "65536"], "--port must be between 1 and 65535, got 65536"),
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--num-threads", "0"], "--num-threads must be positive, got 0"),
        (["--block-size", "0"], "--block-size must be positive, got 0"),
        (["--max-num-seqs", "-1"], "--max-num-seqs must be positive, got -1"),
        (["--max-waiting-requests", "-1"], "--max-waiting-requests must be 0 or more, got -1"),
        (["--max-logprobs", "-1"], "--max-logprobs must be 0 or more, got -1"),
        (["--generation-config", "/no/such/dir"], "--generation-config must be auto, vllm or a directory, got /no/such/dir"),
    ],
)
def test_a_value_out_of_range_is_an_error_naming_the_flag(default_model, flags, message):
    with pytest.raises(SystemExit) as info:
        config_of(default_model, *flags)
    assert str(info.value) == f"furiosa-llm: {message}"


@pytest.mark.parametrize("flags", [["--port", "1"], ["--port", "65535"], ["--kv-cache-gib", "0.01"],
                                   ["--max-model-len", "1"], ["--num-threads", "1"]])
def test_the_edges_of_each_range_are_accepted(default_model, flags):
    config_of(default_model, *flags)


def test_max_logprobs_defaults_to_vllms_20_and_reaches_the_frontend_config(default_model):
    assert config_of(default_model).max_logprobs == 20
    assert config_of(default_model, "--max-logprobs", "0").max_logprobs == 0


def test_max_model_len_defaults_to_the_models_own_and_long_ones_need_the_flag(default_model):
    config = config_of(default_model)
    assert config.engine.max_model_len is None and not config.engine.allow_long_max_model_len
    config = config_of(default_model, "--max-model-len", "100000", "--allow-long-max-model-len")
    assert config.engine.max_model_len == 100000 and config.engine.allow_long_max_model_len


def test_the_override_is_documented_in_help():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = " ".join(serve.format_help().split())
    assert "--allow-long-max-model-len" in text and "max_position_embeddings" in text


def test_frontend_config_json_round_trip_keeps_the_frontend_settings_out_of_the_engines_part():
    engine = EngineConfig(model="/models/llama", served_model_name="llama", max_num_seqs=8, log_level="debug",
                          input_address="ipc:///tmp/x/in.sock", output_address="ipc:///tmp/x/out.sock")
    config = FrontendConfig(
        engine=engine, host="0.0.0.0", port=9000,
        chat_template="/t/chat.jinja", enable_auto_tool_choice=True, tool_call_parser="llama3_json",
        api_key="secret", metrics_require_key=True, allowed_origins=["https://a.example", "*"],
        clamp_max_tokens=True, engine_pid=4242,
    )
    assert FrontendConfig.from_json(config.to_json()) == config
    assert not {"host", "port", "api_key", "allowed_origins"} & set(msgspec.json.decode(engine.to_json()))
    with pytest.raises(msgspec.ValidationError):
        FrontendConfig.from_json('{"engine": {"model": "m.gguf", "served_model_name": "m"}, "port": "eighty"}')


def test_flag_defaults_are_the_configs_defaults():
    config = config_of("/")  # an existing path stands in for the artifact
    # but the engine count: the flag's default is auto, the config holds what auto chose
    # (EngineConfig's default of 1 is the Python API's single engine)
    auto_size = plan_data_parallel("auto", 1, "/", config.engine.kv_cache_gib).size
    assert config == FrontendConfig(engine=EngineConfig(model="/", served_model_name=config.served_model_name,
                                                        data_parallel_size=auto_size))
    assert config.host == "localhost"  # as README documents


def test_generation_config_defaults_to_auto_and_reaches_the_frontend_config(default_model, tmp_path):
    assert config_of(default_model).generation_config == "auto"
    assert config_of(default_model, "--generation-config", "vllm").generation_config == "vllm"
    assert config_of(default_model, "--generation-config", str(tmp_path)).generation_config == str(tmp_path)


def test_runner_and_pooler_type_reach_the_engine_config(default_model):
    engine = config_of().engine
    assert (engine.runner, engine.pooler_type) == ("generate", "last")
    engine = config_of("--runner", "pooling", "--pooler-type", "mean").engine
    assert (engine.runner, engine.pooler_type) == ("pooling", "mean")


@pytest.mark.parametrize("flags", [["--runner", "embed"], ["--pooler-type", "cls"]])
def test_an_unknown_runner_or_pooler_type_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *flags])
    assert f"argument {flags[0]}: invalid choice" in capsys.readouterr().err
