"""`furiosa-llm serve --activation-dtype`: float32 by default, int8 on request, both reach the
engine's config (which the engine's ModelRunner hands to kernels.set_activation_precision)."""

from __future__ import annotations

import pytest

from frontend.cli import build_parser, config_from_args
from ipc.config import EngineConfig


def engine_config_of(*flags: str) -> EngineConfig:
    return config_from_args(build_parser().parse_args(["serve", *flags])).engine


def test_activation_dtype_defaults_to_float32_and_int8_reaches_the_engine_config(default_model):
    assert engine_config_of(default_model).activation_dtype == "float32"
    assert EngineConfig(model="m", served_model_name="m").activation_dtype == "float32"  # the Python API's default
    engine = engine_config_of(default_model, "--activation-dtype", "int8")
    assert engine.activation_dtype == "int8"
    assert EngineConfig.from_json(engine.to_json()).activation_dtype == "int8"  # as the engine process receives it


def test_an_unknown_activation_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--activation-dtype", "int4"])
    assert "argument --activation-dtype: invalid choice" in capsys.readouterr().err


def test_help_says_what_int8_trades(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--activation-dtype {float32,int8}" in text
    assert "per 32 values as llama.cpp does" in text and "outputs differ slightly" in text
