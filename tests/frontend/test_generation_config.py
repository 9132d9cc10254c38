"""`--generation-config`: the model's sampling defaults (generation_config.json or a GGUF's
`general.sampling.*`) fill the fields a request leaves out; a request's own values win."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import pytest
from fake_model import MODEL_NAME
from litestar.testing import TestClient

from frontend.app import create_app
from frontend.config import FrontendConfig
from frontend.generation_config import load_generation_defaults
from ipc.config import EngineConfig

MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
USER_HI = [{"role": "user", "content": "hi"}]


def write_hf_dir(path: Path, values: dict) -> str:
    path.mkdir(exist_ok=True)
    # do_sample and max_length are generation_config.json fields that are not sampling defaults here
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "max_length": 99, **values}))
    return str(path)


def write_gguf(path: Path) -> str:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_float32("general.sampling.temp", 0.6)
    writer.add_float32("general.sampling.top_p", 0.9)
    writer.add_uint32("general.sampling.top_k", 20)
    writer.add_float32("general.sampling.min_p", 0.05)
    writer.add_float32("general.sampling.penalty_repeat", 1.1)
    writer.add_float32("general.sampling.xtc_probability", 0.5)  # not one we take
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def sampling(params) -> dict:
    return {name: getattr(params, name) for name in NEUTRAL}


def served(model: str, setting: str, engine, tokenizer):
    config = FrontendConfig(engine=EngineConfig(model=model, served_model_name=MODEL_NAME, max_num_seqs=16),
                            generation_config=setting)
    return TestClient(create_app(config, engine_client=engine, tokenizer=tokenizer))


def test_readers(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", MODEL_DEFAULTS)
    assert load_generation_defaults("auto", hf) == MODEL_DEFAULTS
    assert load_generation_defaults("vllm", hf) == {}
    assert load_generation_defaults("auto", write_gguf(tmp_path / "m.gguf")) == MODEL_DEFAULTS  # float32 read back
    # DIR: its generation_config.json, whatever the model has
    other = write_hf_dir(tmp_path / "other", {"temperature": 0.3})
    assert load_generation_defaults(other, hf) == {"temperature": 0.3}
    assert load_generation_defaults("auto", str(tmp_path / "nothing-here")) == {}
    assert load_generation_defaults("auto", write_hf_dir(tmp_path / "nulls", {"temperature": None})) == {}
    with pytest.raises(ValueError, match="generation-config"):
        load_generation_defaults(str(tmp_path / "missing-dir"), hf)


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 2}),
])
def test_requests_without_sampling_fields_get_the_models_defaults(tmp_path, engine, tokenizer, caplog, kind, path,
                                                                  body):
    model = write_hf_dir(tmp_path / "hf", MODEL_DEFAULTS) if kind == "hf" else write_gguf(tmp_path / "m.gguf")
    with caplog.at_level(logging.INFO, logger="frontend.app"), served(model, "auto", engine, tokenizer) as client:
        assert client.post(path, json=body).status_code == 200
        assert sampling(engine.requests[-1].sampling_params) == pytest.approx(MODEL_DEFAULTS)
        # null is the same as absent
        nulls = dict.fromkeys(MODEL_DEFAULTS)
        assert client.post(path, json={**body, **nulls}).status_code == 200
        assert sampling(engine.requests[-1].sampling_params) == pytest.approx(MODEL_DEFAULTS)
        # a value the request sets wins, the neutral ones (0 and 1) too
        explicit = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
        assert client.post(path, json={**body, **explicit}).status_code == 200
        assert sampling(engine.requests[-1].sampling_params) == {**NEUTRAL, "temperature": 0.0}
        # one field set: the others still come from the model
        assert client.post(path, json={**body, "temperature": 1.5}).status_code == 200
        assert sampling(engine.requests[-1].sampling_params) == pytest.approx({**MODEL_DEFAULTS, "temperature": 1.5})
    lines = [r.getMessage() for r in caplog.records if "sampling defaults" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("sampling defaults for fields a request leaves out: the model's")
    assert "temperature=0.6" in lines[0] and "top_k=20" in lines[0]


def test_vllm_ignores_the_models_defaults(tmp_path, engine, tokenizer, caplog):
    model = write_hf_dir(tmp_path / "hf", MODEL_DEFAULTS)
    with caplog.at_level(logging.INFO, logger="frontend.app"), served(model, "vllm", engine, tokenizer) as client:
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert sampling(engine.requests[-1].sampling_params) == NEUTRAL
    assert any("vLLM's neutral sampling defaults (--generation-config vllm)" in r.getMessage() for r in caplog.records)


def test_a_directory_supplies_the_defaults(tmp_path, engine, tokenizer):
    model = write_hf_dir(tmp_path / "hf", MODEL_DEFAULTS)
    other = write_hf_dir(tmp_path / "other", {"temperature": 0.3, "top_k": 5})
    with served(model, other, engine, tokenizer) as client:
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert sampling(engine.requests[-1].sampling_params) == pytest.approx({**NEUTRAL, "temperature": 0.3, "top_k": 5})


def test_beam_search_ignores_the_defaults(tmp_path, engine, tokenizer):
    model = write_hf_dir(tmp_path / "hf", MODEL_DEFAULTS)
    with served(model, "auto", engine, tokenizer) as client:
        body = {"prompt": "x", "max_tokens": 2, "use_beam_search": True, "n": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
    params = engine.requests[-1].sampling_params
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)
