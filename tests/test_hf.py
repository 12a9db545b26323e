"""Hugging Face import/export against fixtures written by transformers (scripts/make_hf_fixture.py).

The reference logits come from torch + transformers, never from tokensparse, so parity here means
our Llama reproduces HF Llama: GQA, tied heads, sharded files, 4.x and 5.x RoPE configs.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tokensparse import hf
from tokensparse.config import LoRAConfig, RopeScaling
from tokensparse.llama import Llama
from tokensparse.lora import add_lora, merge_lora

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub (conftest sets it too)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CASES = ("gqa", "tied", "linear_rope_4x", "sharded", "llama3_rope")


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _reference(case):
    ref = np.load(FIXTURES / case / "reference.npz")
    return jnp.asarray(ref["input_ids"], jnp.int32), ref["logits"]


def _params(model):
    return {p: np.asarray(v[...]) for p, v in hf.per_layer_params(model).items()}


def _copy(case, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(FIXTURES / case, tmp_path / case))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    model, _ = hf.load_llama(FIXTURES / case)
    tokens, expected = _reference(case)
    assert expected.shape == (*tokens.shape, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(_logits(model, tokens)), expected, atol=1e-4, rtol=0)


def test_fixture_configs_are_read_as_written():
    _, gqa = hf.load_llama(FIXTURES / "gqa")
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.head_dim, gqa.d_model) == (8, 2, 16, 64)
    assert not gqa.tie_embeddings and gqa.rms_eps == 1e-5
    assert hf.load_llama(FIXTURES / "tied")[1].tie_embeddings
    assert hf.load_llama(FIXTURES / "linear_rope_4x")[1].rope_scaling == RopeScaling.linear(2.0)
    llama3 = hf.load_llama(FIXTURES / "llama3_rope")[1]
    assert llama3.rope_theta == 500000.0
    assert llama3.rope_scaling == RopeScaling("llama3", 4.0, 1.0, 4.0, original_max_positions=32)


@pytest.mark.parametrize("case, change", [
    ("tied", dict(rms_eps=1e-6)),
    ("tied", dict(rope_theta=10000.0)),
    ("linear_rope_4x", dict(rope_scaling=RopeScaling())),
    ("llama3_rope", dict(rope_scaling=RopeScaling.linear(4.0))),
])
def test_fixtures_detect_wrong_hyperparameters(case, change):
    """Parity is a sharp test: a mis-read eps, theta or RoPE scaling moves the logits a lot."""
    model, config = hf.load_llama(FIXTURES / case)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config.replace(**change),
                                                          rngs=nnx.Rngs(0))))
    wrong = nnx.merge(graphdef, nnx.state(model))
    tokens, expected = _reference(case)
    assert np.abs(np.asarray(_logits(wrong, tokens)) - expected).max() > 1e-2


@pytest.mark.parametrize("case", ["gqa", "tied", "linear_rope_4x", "llama3_rope"])
def test_round_trip_is_exact(case, tmp_path):
    model, config = hf.load_llama(FIXTURES / case)
    hf.save_llama(model, config, tmp_path / "out")
    again, config2 = hf.load_llama(tmp_path / "out")
    assert config2 == config
    before, after = _params(model), _params(again)
    assert before.keys() == after.keys()
    for path, value in before.items():
        assert after[path].dtype == value.dtype and np.array_equal(after[path], value), path
    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        names = f.keys()
    assert ("lm_head.weight" in names) == (not config.tie_embeddings)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf.config_from_hf(written) == config


def test_bf16_round_trip(tmp_path):
    model, config = hf.load_llama(FIXTURES / "gqa", dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    hf.save_llama(model, config, tmp_path / "bf16")
    file = tmp_path / "bf16" / "model.safetensors"
    with safe_open(file, framework="np") as f:
        names = f.keys()
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    again, config2 = hf.load_llama(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert config2 == config
    before, after = _params(model), _params(again)
    for path, value in before.items():
        assert after[path].dtype == jnp.bfloat16 and np.array_equal(after[path], value), path
    # bf16 files load into float32 by default, exactly (bf16 -> fp32 is lossless).
    upcast, _ = hf.load_llama(tmp_path / "bf16")
    for path, value in _params(upcast).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, before[path].astype(np.float32))
    # The raw-bytes fallback (for safetensors versions without numpy bfloat16) agrees.
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(file, framework="np") as f:
        np.testing.assert_array_equal(hf._read_bf16(file, name), f.get_tensor(name))


def test_hf_config_styles_agree():
    base = dict(model_type="llama", vocab_size=32, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    v4 = hf.config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})
    v5 = hf.config_from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    assert v4 == v5 and v4.rope_scaling.kind == "llama3" and v4.rope_theta == 500000.0
    plain = hf.config_from_hf({**base, "rope_scaling": None})
    assert (plain.n_kv_heads, plain.head_dim, plain.rope_theta) == (4, 8, 10000.0)
    assert plain.rope_scaling == RopeScaling() and not plain.tie_embeddings
    assert hf.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 4.0}}
                             ).rope_scaling == RopeScaling.linear(4.0)
    with pytest.raises(ValueError, match="mistral"):
        hf.config_from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="gelu"):
        hf.config_from_hf({**base, "hidden_act": "gelu"})


@pytest.mark.parametrize("key, rope", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_unsupported_rope_type(key, rope, tmp_path):
    path = _copy("gqa", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config[key] = rope
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rope["rope_type"]) as err:
        hf.load_llama(path)
    assert "llama3" in str(err.value)  # names the supported types too


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_llama(tmp_path)
    shutil.copy(FIXTURES / "gqa" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.load_llama(tmp_path)


def test_shape_mismatch_lists_name_and_shapes(tmp_path):
    path = _copy("gqa", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((96, 64), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf.load_llama(path)
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), got (16, 64)" in message
    assert "model.layers.1.mlp.down_proj.weight: expected (64, 96), got (96, 64)" in message


def test_missing_and_unexpected_reported_together(tmp_path):
    path = _copy("tied", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: ignored, like HF
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf.load_llama(path)
    message = str(err.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert name in message
    assert "lm_head" not in message


def test_save_refuses_lora_until_merged(tmp_path):
    model, config = hf.load_llama(FIXTURES / "tied")
    add_lora(model, LoRAConfig(rank=2, targets=("q", "down")), rngs=nnx.Rngs(1))
    with model.layers.editing() as layers:  # layers are stored stacked: edit a per-layer view
        adapter = layers[0].attn.q_proj.adapter
        adapter.b[...] = jax.random.normal(jax.random.key(0), adapter.b.shape)
    with pytest.raises(ValueError, match="merge_lora"):
        hf.save_llama(model, config, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    base_q = np.asarray(model.layers[0].attn.q_proj.kernel[...])
    hf.save_llama(merge_lora(model), config, tmp_path / "out")
    merged, _ = hf.load_llama(tmp_path / "out")
    q = np.asarray(merged.layers[0].attn.q_proj.kernel[...])
    assert not np.array_equal(q, base_q)  # the adapter's update is in the export
    np.testing.assert_array_equal(q, np.asarray(model.layers[0].attn.q_proj.kernel[...]))
