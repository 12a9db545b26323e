"""GGUF header fuzzing: random byte flips and truncations of a small valid file either load or
raise ``GGUFError``, never another exception, a hang or a runaway allocation.

The file is a one-layer llama with a five-token vocabulary, written here with ``gguf.GGUFWriter``,
so most of its bytes are header (metadata and tensor infos): the flips land where the parsing is.
"""

import collections
import pathlib

import gguf
import numpy as np
import pytest

from tokensparse import gguf as tg

CASES = 1200
SEED = 20261206


def _write_tiny(path: pathlib.Path) -> pathlib.Path:
    tokens = ["<s>", "a", "b", "ab", "c"]
    d, ffn, heads, kv = 8, 16, 2, 1
    hd = d // heads
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    shapes = {"token_embd": (len(tokens), d), "output_norm": (d,), "blk.0.attn_norm": (d,),
              "blk.0.ffn_norm": (d,), "blk.0.attn_q": (heads * hd, d), "blk.0.attn_k": (kv * hd, d),
              "blk.0.attn_v": (kv * hd, d), "blk.0.attn_output": (d, heads * hd),
              "blk.0.ffn_gate": (ffn, d), "blk.0.ffn_up": (ffn, d), "blk.0.ffn_down": (d, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mutations(raw: bytes, header_end: int, rng):
    """(description, bytes): 30% truncations anywhere, 70% one to three header bytes replaced or
    bit-flipped."""
    for _ in range(CASES):
        if rng.random() < 0.3:
            cut = int(rng.integers(len(raw)))
            yield f"truncated to {cut} bytes", raw[:cut]
            continue
        data = bytearray(raw)
        changes = []
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(header_end))
            old = data[pos]
            data[pos] = int(rng.integers(256)) if rng.random() < 0.5 else old ^ (1 << int(rng.integers(8)))
            changes.append(f"byte {pos}: {old:#04x}->{data[pos]:#04x}")
        yield ", ".join(changes), bytes(data)


def test_fuzzed_headers_load_or_raise_gguf_error(tmp_path):
    original = _write_tiny(tmp_path / "tiny.gguf")
    model, config, _ = tg.load_gguf(original)
    assert config.n_layers == 1 and config.vocab_size == 5
    raw = original.read_bytes()
    header_end = tg.read(original).data_offset
    assert header_end > len(raw) / 3  # the flips target the header, a good part of the file

    outcomes, escaped = collections.Counter(), []
    case = tmp_path / "case.gguf"
    for i, (change, data) in enumerate(_mutations(raw, header_end, np.random.default_rng(SEED))):
        case.write_bytes(data)
        try:
            tg.load_gguf(case)
            outcomes["loaded"] += 1
        except tg.GGUFError as e:
            assert "\n" not in str(e).strip() or str(e).startswith("The GGUF tensors"), str(e)
            outcomes["GGUFError"] += 1
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            escaped.append(f"case {i} ({change}): {type(e).__name__}: {e}"[:300])
    print(f"\n{CASES} cases: {dict(outcomes)}")
    assert not escaped, f"{len(escaped)} of {CASES} cases raised something else:\n" + "\n".join(escaped[:20])
    assert outcomes["GGUFError"] > CASES / 2 and outcomes["loaded"] > 0


@pytest.mark.parametrize("where, value", [("version", 7), ("tensor_count", 2**40), ("kv_count", 2**40)])
def test_corrupt_counts_are_named(tmp_path, where, value):
    """The fixed fields of the header: an unsupported version or a count the file cannot hold."""
    raw = bytearray(_write_tiny(tmp_path / "tiny.gguf").read_bytes())
    offset, width = {"version": (4, 4), "tensor_count": (8, 8), "kv_count": (16, 8)}[where]
    raw[offset:offset + width] = value.to_bytes(width, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    expected = {"version": "version 7 is not supported", "tensor_count": "tensor count",
                "kv_count": "metadata count"}[where]
    with pytest.raises(tg.GGUFError, match=expected):
        tg.load_gguf(tmp_path / "bad.gguf")


def test_array_length_past_the_end_is_refused_quickly(tmp_path):
    """A huge array length made gguf's reader loop over empty reads for minutes, gigabytes deep."""
    path = _write_tiny(tmp_path / "tiny.gguf")
    field = tg.read(path).fields["tokenizer.ggml.tokens"]
    raw = bytearray(path.read_bytes())
    length_at = field.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # key, type, item type
    assert int.from_bytes(raw[length_at:length_at + 8], "little") == 5
    raw[length_at:length_at + 8] = (2**50).to_bytes(8, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(tg.GGUFError, match=r"'tokenizer.ggml.tokens' length = 1125899906842624 "
                                           r"cannot fit"):
        tg.load_gguf(tmp_path / "bad.gguf")


@pytest.mark.parametrize("key, value, message", [
    ("llama.block_count", 10**6, r"block_count=1000000, but the file's tensors belong to 1 "),
    ("llama.attention.head_count", 0, "does not describe a valid llama model"),
    ("llama.attention.head_count_kv", 3, "does not describe a valid llama model"),
    ("llama.embedding_length", 0, "rotates part of each 0-wide head"),
    ("tokenizer.ggml.bos_token_id", 99, r"tokenizer metadata is malformed \(IndexError"),
])
def test_impossible_metadata_values(tmp_path, key, value, message):
    """Values that parse but describe no model: zero heads, a million layers (the model would be
    built before its tensors were found missing), ids past the vocabulary."""
    path = _write_tiny(tmp_path / "tiny.gguf")
    field = tg.read(path).fields[key]
    raw = bytearray(path.read_bytes())
    value_at = field.offset + 8 + len(key) + 4  # key length, key, value type
    raw[value_at:value_at + 4] = value.to_bytes(4, "little")  # all these fields are 32-bit
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(tg.GGUFError, match=message):
        tg.load_gguf(tmp_path / "bad.gguf")
