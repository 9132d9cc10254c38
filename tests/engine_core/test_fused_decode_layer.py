"""A step of one decoding token runs each layer in one compiled call (kernels.decode_layer) where
the layers are plain Llama-style ones: the same kernels in the same order as the general path,
so its logits are the general path's, and SmolLM2 decoding one prompt at a time still follows
transformers' greedy tokens."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import gguf
import numpy as np
import pytest

import tiny_families
from engine_core import kernels
from engine_core.kernels.attention import to_cache
from engine_core import model as model_module
from engine_core.loader import load_artifact
from engine_core.model import AttentionSpan, DecoderModel, ForwardBatch, KVCache, batch_decodes
from engine_helpers import request, run_to_completion

GOLDEN = json.loads((pathlib.Path(__file__).parents[1] / "golden" / "smollm2_greedy.json").read_text())


def decode_logits(model: DecoderModel, config, prompt: list[int], fused: bool, *, block_size: int = 4) -> np.ndarray:
    """Prefill `prompt` but its last token, then decode that token alone; its logits."""
    cache = KVCache(config, num_blocks=16, block_size=block_size)
    n = len(prompt) - 1
    blocks = np.arange(-(-len(prompt) // block_size), dtype=np.int64)
    prefill = ForwardBatch(np.array(prompt[:-1]), np.arange(n), np.arange(n), [AttentionSpan(0, n, blocks, n)], None,
                           np.array([n - 1]))
    model.forward(prefill, cache)
    saved = model.fused_layers
    if not fused:
        model.fused_layers = None
    try:
        decode = ForwardBatch(np.array(prompt[-1:]), np.array([n]), np.array([n]), [],
                              batch_decodes([0], [blocks], [n + 1]), np.array([0]))
        return model.logits(model.forward(decode, cache))
    finally:
        model.fused_layers = saved


def requantized(w, qtype: str):
    """A QuantizedWeight's values in another format (rounded to it)."""
    dense = kernels.dequantize(w)
    if qtype == "F16":
        return kernels.pack_half("F16", dense.astype(np.float16).view(np.uint16))
    if qtype == "BF16":
        return kernels.pack_half("BF16", to_cache(dense, np.dtype(np.uint16)))  # bfloat16 bits, rounded to nearest even
    raw = gguf.quants.quantize(dense, gguf.GGMLQuantizationType[qtype])
    return kernels.pack(qtype, kernels.unpack(qtype, raw, w.cols), w.rows, w.cols)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_fused_layers_give_the_general_paths_logits_in_every_kind_of_format(smollm2, qtype):
    """SmolLM2's first two layers, their matrices turned into each kernel family's formats."""
    config, weights = smollm2
    config = dataclasses.replace(config, num_layers=2)
    layer = re.compile(r"model\.layers\.(\d+)\.")
    kept = {}
    for name, w in weights.items():
        m = layer.match(name)
        if m and int(m.group(1)) >= 2:
            continue
        kept[name] = requantized(w, qtype) if m and isinstance(w, kernels.QuantizedWeight) else w
    model = DecoderModel(config, kept, max_len=256)
    assert model.fused_layers is not None and model.layers[0]["qkv"][0].qtype == qtype
    prompt = GOLDEN["cases"][1]["prompt_token_ids"]
    general = decode_logits(model, config, prompt, fused=False, block_size=16)
    fused = decode_logits(model, config, prompt, fused=True, block_size=16)
    np.testing.assert_allclose(fused, general, rtol=0, atol=1e-6 * np.abs(general).max())


def test_fused_layers_on_the_default_model(smollm2):
    config, weights = smollm2
    model = DecoderModel(config, weights, max_len=256)
    assert model.fused_layers is not None and kernels.num_threads() == 1
    prompt = GOLDEN["cases"][0]["prompt_token_ids"]
    general = decode_logits(model, config, prompt, fused=False, block_size=16)
    fused = decode_logits(model, config, prompt, fused=True, block_size=16)
    # not the same bits over 30 layers: the small kernels compiled into decode_layer may be
    # vectorized differently there (seen: 3e-5 on logits up to 20)
    np.testing.assert_allclose(fused, general, rtol=0, atol=1e-5 * np.abs(general).max())


@pytest.mark.parametrize("min_work", [0, 1 << 18])
def test_fused_layers_on_two_threads_give_the_logits_of_one(smollm2, monkeypatch, min_work):
    """With more than one kernel thread the fused layers split their GEMVs' tiles between the
    threads (every GEMV with min_work 0; SmolLM2's from the default). Each tile is computed by the
    same loop, though compiled into the parallel kernel, where the compiler may contract its
    multiply-adds differently: the same bits were seen alone, 2e-5 on logits up to 17 after
    other tests had compiled the kernels in another order."""
    config, weights = smollm2
    model = DecoderModel(config, weights, max_len=256)
    prompt = GOLDEN["cases"][2]["prompt_token_ids"]
    one = decode_logits(model, config, prompt, fused=True, block_size=16)
    calls = []
    monkeypatch.setattr(kernels, "FUSED_PARALLEL_MIN_WORK", min_work)
    monkeypatch.setattr(model_module, "decode_layer", _counting(calls))
    kernels.set_num_threads(2)
    try:
        two = decode_logits(model, config, prompt, fused=True, block_size=16)
    finally:
        kernels.set_num_threads(1)
    assert calls and all(c == (2, min_work) for c in calls)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5 * np.abs(one).max())


def decode_batch_logits(model: DecoderModel, config, prompts: list[list[int]], fused: bool, *,
                        block_size: int = 4) -> np.ndarray:
    """Prefill each prompt but its last token (each in its own blocks), then decode all the last
    tokens in one step; their logits, one row per prompt."""
    cache = KVCache(config, num_blocks=64, block_size=block_size)
    tables, lens, next_block = [], [], 0
    for prompt in prompts:
        n = len(prompt) - 1
        blocks = np.arange(next_block, next_block + -(-len(prompt) // block_size), dtype=np.int64)
        next_block += len(blocks)
        slots = blocks[np.arange(n) // block_size] * block_size + np.arange(n) % block_size
        model.forward(ForwardBatch(np.array(prompt[:-1]), np.arange(n), slots, [AttentionSpan(0, n, blocks, n)],
                                   None, np.array([n - 1])), cache)
        tables.append(blocks)
        lens.append(n)
    saved = model.fused_layers
    if not fused:
        model.fused_layers = None
    try:
        last = np.array([p[-1] for p in prompts])
        positions = np.array(lens)
        slots = np.array([t[n // block_size] * block_size + n % block_size for t, n in zip(tables, lens)])
        rows = np.arange(len(prompts))
        decode = ForwardBatch(last, positions, slots, [], batch_decodes(list(rows), tables, [n + 1 for n in lens]), rows)
        return model.logits(model.forward(decode, cache))
    finally:
        model.fused_layers = saved


@pytest.mark.parametrize("threads", [1, 2])
def test_several_decodes_in_one_step_take_the_fused_layers_with_the_general_paths_logits(
        smollm2, monkeypatch, threads):
    """A step of only decodes, as many as the GEMVs take, runs the fused layers too: each row as
    the general path computes it, whatever the other rows' context lengths."""
    config, weights = smollm2
    config = dataclasses.replace(config, num_layers=4)
    model = DecoderModel(config, {n: w for n, w in weights.items()
                                  if not re.match(r"model\.layers\.([4-9]|[1-9]\d)\.", n)}, max_len=256)
    prompts = [case["prompt_token_ids"] for case in GOLDEN["cases"][:5]]
    prompts[1] = prompts[1][:3]  # contexts of 3 to ~30 tokens, in blocks of 4
    general = decode_batch_logits(model, config, prompts, fused=False)
    calls = []
    monkeypatch.setattr(model_module, "decode_layer", _counting(calls))
    monkeypatch.setattr(kernels, "FUSED_PARALLEL_MIN_WORK", 0)  # with two threads, every GEMV split
    kernels.set_num_threads(threads)
    try:
        fused = decode_batch_logits(model, config, prompts, fused=True)
    finally:
        kernels.set_num_threads(1)
    assert len(calls) == 4
    np.testing.assert_allclose(fused, general, rtol=0, atol=1e-5 * np.abs(general).max())
    alone = decode_batch_logits(model, config, prompts[2:3], fused=True)  # a row is its own
    np.testing.assert_allclose(fused[2:3], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_more_decodes_than_the_gemvs_take_keep_the_general_path(smollm2, monkeypatch):
    config, weights = smollm2
    config = dataclasses.replace(config, num_layers=1)
    model = DecoderModel(config, {n: w for n, w in weights.items()
                                  if not re.match(r"model\.layers\.([1-9]|[1-9]\d)\.", n)}, max_len=256)
    calls = []
    monkeypatch.setattr(model_module, "decode_layer", _counting(calls))
    limit = min(map(kernels.gemv_max_rows, model.fused_formats))
    prompts = [[1, 2, 3 + i] for i in range(limit + 1)]
    decode_batch_logits(model, config, prompts[:limit], fused=True)
    assert len(calls) == 1
    decode_batch_logits(model, config, prompts, fused=True)
    assert len(calls) == 1


def _counting(calls):
    real = model_module.decode_layer

    def wrapper(*args):
        calls.append(args[-2:])
        return real(*args)
    return wrapper


def test_layers_it_does_not_cover_keep_the_general_path(tmp_path):
    # QK norms; Gemma's sandwich norms and GELU; a V projection that cannot join Q and K's tiles
    for variant in ("qwen3", "gemma3_6l", "mistral_full"):
        config, weights = load_artifact(tiny_families.write_gguf(tmp_path / f"{variant}.gguf", variant, "Q8_0"))
        assert DecoderModel(config, weights, max_len=64).fused_layers is None, variant


def test_greedy_tokens_match_transformers_one_prompt_at_a_time(make_core):
    """Every golden case alone: all its decode steps go through the fused layers."""
    core = make_core()
    assert core.runner.model.fused_layers is not None
    for i, case in enumerate(GOLDEN["cases"]):
        core.add_request(request(str(i), case["prompt_token_ids"], temperature=0.0, ignore_eos=True,
                                 max_tokens=len(case["greedy_token_ids"])))
        assert run_to_completion(core)[str(i)][0] == case["greedy_token_ids"], case["name"]
