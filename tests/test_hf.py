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
    model, _, _ = hf.load_llama(FIXTURES / case)
    tokens, expected = _reference(case)
    assert expected.shape == (*tokens.shape, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(_logits(model, tokens)), expected, atol=1e-4, rtol=0)


def test_fixture_configs_are_read_as_written():
    _, gqa, _ = hf.load_llama(FIXTURES / "gqa")
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
    model, config, _ = hf.load_llama(FIXTURES / case)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config.replace(**change),
                                                          rngs=nnx.Rngs(0))))
    wrong = nnx.merge(graphdef, nnx.state(model))
    tokens, expected = _reference(case)
    assert np.abs(np.asarray(_logits(wrong, tokens)) - expected).max() > 1e-2


@pytest.mark.parametrize("case", ["gqa", "tied", "linear_rope_4x", "llama3_rope"])
def test_round_trip_is_exact(case, tmp_path):
    model, config, _ = hf.load_llama(FIXTURES / case)
    hf.save_llama(model, config, tmp_path / "out")
    again, config2, _ = hf.load_llama(tmp_path / "out")
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
    model, config, _ = hf.load_llama(FIXTURES / "gqa", dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    hf.save_llama(model, config, tmp_path / "bf16")
    file = tmp_path / "bf16" / "model.safetensors"
    with safe_open(file, framework="np") as f:
        names = f.keys()
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    again, config2, _ = hf.load_llama(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert config2 == config
    before, after = _params(model), _params(again)
    for path, value in before.items():
        assert after[path].dtype == jnp.bfloat16 and np.array_equal(after[path], value), path
    # bf16 files load into float32 by default, exactly (bf16 -> fp32 is lossless).
    upcast, _, _ = hf.load_llama(tmp_path / "bf16")
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
    model, config, _ = hf.load_llama(FIXTURES / "tied")
    add_lora(model, LoRAConfig(rank=2, targets=("q", "down")), rngs=nnx.Rngs(1))
    with model.layers.editing() as layers:  # layers are stored stacked: edit a per-layer view
        adapter = layers[0].attn.q_proj.adapter
        adapter.b[...] = jax.random.normal(jax.random.key(0), adapter.b.shape)
    with pytest.raises(ValueError, match="merge_lora"):
        hf.save_llama(model, config, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    base_q = np.asarray(model.layers[0].attn.q_proj.kernel[...])
    hf.save_llama(merge_lora(model), config, tmp_path / "out")
    merged, _, _ = hf.load_llama(tmp_path / "out")
    q = np.asarray(merged.layers[0].attn.q_proj.kernel[...])
    assert not np.array_equal(q, base_q)  # the adapter's update is in the export
    np.testing.assert_array_equal(q, np.asarray(model.layers[0].attn.q_proj.kernel[...]))


# --- Files that are not what they claim: one-line ValueErrors naming the file. ---

def _one_line_naming(err, file):
    message = str(err.value)
    assert str(file) in message and "\n" not in message, message


@pytest.mark.parametrize("text, match", [
    ("{\"model_type\": \"llama\",", "not valid JSON"),
    (json.dumps({"model_type": "llama", "hidden_size": 64}), "lacks required keys"),
    (json.dumps(["llama"]), "JSON object"),
])
def test_bad_config_json_names_the_file(tmp_path, text, match):
    path = _copy("gqa", tmp_path)
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        hf.load_llama(path)
    _one_line_naming(err, path / "config.json")


@pytest.mark.parametrize("keep", [0.5, 0.02])  # data cut short; header cut short
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    path = _copy("gqa", tmp_path)
    file = path / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(ValueError, match="safetensors") as err:
        hf.load_llama(path)
    _one_line_naming(err, file)


def test_garbage_safetensors_names_the_file(tmp_path):
    path = _copy("gqa", tmp_path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    with pytest.raises(ValueError) as err:
        hf.load_llama(path)
    _one_line_naming(err, path / "model.safetensors")


def test_missing_shard_names_the_file(tmp_path):
    path = _copy("sharded", tmp_path)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="missing") as err:
        hf.load_llama(path)
    _one_line_naming(err, path / "model-00002-of-00003.safetensors")
    (path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        hf.load_llama(path)
    _one_line_naming(err, path / "model.safetensors.index.json")


# --- Sharded loading: straight into the training layout. ---

def _mesh():
    from tokensparse import sharding
    from tokensparse.config import MeshConfig

    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (conftest.py)"
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("case", ["sharded", "tied"])
def test_sharded_load_matches_training_layout_and_logits(case, monkeypatch):
    from tokensparse import sharding

    mesh = _mesh()
    dense, config, _ = hf.load_llama(FIXTURES / case)
    tokens, expected = _reference(case)
    want = np.asarray(_logits(dense, tokens))
    # The training layout: how the pipelines place a loaded model (common.on_mesh -> shard).
    with jax.set_mesh(mesh):
        sharding.shard(dense, mesh=mesh)
    layout = jax.tree.map(lambda x: x.sharding, nnx.state(dense, nnx.Param))

    reads = []
    real_read = hf._read_region
    monkeypatch.setattr(hf, "_read_region", lambda h, f, name, index: reads.append(
        (name, real_read(h, f, name, index).shape)) or real_read(h, f, name, index))
    model, config2, _ = hf.load_llama(FIXTURES / case, mesh=mesh)
    assert config2 == config
    got = jax.tree.map(lambda x: x.sharding, nnx.state(model, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(layout)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(layout), strict=True):
        assert a == b, (a, b)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(got))  # the mesh does split
    # Split tensors were read a block at a time: never the whole q_proj of layer 0.
    with safe_open(FIXTURES / case / _file_of(case, "model.layers.0.self_attn.q_proj.weight"),
                   framework="np") as f:
        full = tuple(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape())
    q_reads = [s for n, s in reads if n == "model.layers.0.self_attn.q_proj.weight"]
    assert q_reads and all(s != full for s in q_reads), (q_reads, full)
    with jax.set_mesh(mesh):
        logits = np.asarray(_logits(model, tokens))
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def _file_of(case, name) -> str:
    index = FIXTURES / case / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"


# --- Export: tokenizer files, generation_config.json, shards past max_shard_bytes. ---

def _tokenizer():
    """A word-level tokenizer small enough for the fixtures' 96-token vocabulary, whose EOS is
    ``</s>`` (set as the loaders set it)."""
    import tokenizers

    words = ["<unk>", "<s>", "</s>", "a", "small", "tokenizer", "for", "corpus", "the", "of"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.bos_token_id, tok.eos_token_id = 1, 2
    return tok


def test_export_shards_past_max_shard_bytes(tmp_path):
    model, config, _ = hf.load_llama(FIXTURES / "gqa")
    out = tmp_path / "out"
    hf.save_llama(model, config, out)  # first a single file, which the sharded export replaces
    assert (out / "model.safetensors").exists() and not (out / hf.INDEX_FILE).exists()
    hf.save_llama(model, config, out, max_shard_bytes=100_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    total = 0
    for file in files:
        with safe_open(out / file, framework="np") as f:
            names = f.keys()
            sizes = [f.get_tensor(n).nbytes for n in names]
            assert set(names) == {n for n, v in index["weight_map"].items() if v == file}
        assert sum(sizes) <= 100_000 or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    again, config2, _ = hf.load_llama(out)
    assert config2 == config
    for path, value in _params(model).items():
        np.testing.assert_array_equal(_params(again)[path], value)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        hf.save_llama(model, config, out, max_shard_bytes=0)


def test_export_writes_tokenizer_and_generation_config(tmp_path):
    model, config, _ = hf.load_llama(FIXTURES / "gqa")
    tok = _tokenizer()
    hf.save_llama(model, config, tmp_path / "out", tokenizer=tok)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == \
        generation["eos_token_id"]
    _, _, loaded = hf.load_llama(tmp_path / "out")
    text = "a small tokenizer for a corpus"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2)
    # Without a tokenizer: generation_config.json still, and no tokenizer files.
    hf.save_llama(model, config, tmp_path / "bare")
    assert (tmp_path / "bare" / "generation_config.json").exists()
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    assert hf.load_llama(tmp_path / "bare")[2] is None
