"""GGUF checkpoints (llama.cpp's format) in: weights, config and tokenizer, with numpy only.

Most small open checkpoints circulate as GGUF. :func:`load_gguf` reads one with the ``gguf``
package's memory-mapped reader, dequantises each tensor to float32 on the host (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), maps ``llama.*`` metadata to :class:`ModelConfig`, renames the
tensors to their Hugging Face names and places them with :mod:`tokensparse.hf`'s table. llama.cpp's
converter interleaves each q/k head's two rotary halves (it rotates adjacent pairs); our RoPE, like
HF's, rotates halves, so those rows are permuted back. The tokenizer is rebuilt from the file's vocabulary
and merges as a byte-level BPE ``tokenizers.Tokenizer``.

Every malformed file raises :class:`GGUFError` (a ``ValueError``) naming what is wrong: bad magic,
truncation, unreadable or ill-typed metadata, metadata that describes no valid model, a broken
vocabulary, tensors that do not fit; never a raw ``KeyError``, ``UnicodeDecodeError`` or tokenizers
exception (a fuzz test flips and truncates bytes of a small file to hold this).
"""

from __future__ import annotations

import mmap
import os
import pathlib
import re
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tokensparse import hf
from tokensparse.config import ModelConfig, RopeScaling

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
MAGIC = b"GGUF"

# GGUF tensor name (layer-free part) -> HF Llama name.
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # RoPE tables some old converters wrote

# Pre-tokenizers by ``tokenizer.ggml.pre``, as llama.cpp splits text for each family.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_GPT2 = ("gpt-2", "gpt2", "default", "olmo", "poro-chat", "viking", "jais")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")
PRE_TOKENIZERS = _DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3


class GGUFError(ValueError):
    """A file that is not a readable GGUF checkpoint of a supported model."""


def read(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open ``path`` with ``gguf.GGUFReader``, turning its low-level failures into clear errors."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}.")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _HeaderWalk(buf, path).walk()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, ArithmeticError, OSError) as e:
        raise GGUFError(f"{path} ({path.stat().st_size} bytes) is truncated or corrupt: the GGUF "
                        f"reader failed with {type(e).__name__}: {e}") from e


# GGUF value types: fixed sizes of the scalars, then STRING (8) and ARRAY (9).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4


class _HeaderWalk:
    """Walks the header's key/value and tensor-info tables, checking every count and length against
    the bytes left in the file, before ``gguf.GGUFReader`` reads them.

    The reader trusts the counts: with a corrupted array length it loops over empty reads past the
    end of the file, for hours and gigabytes, instead of failing. Here every count is bounded by the
    bytes that could hold it, so the walk is linear in the header size and a bad count is a
    :class:`GGUFError` naming its offset."""

    def __init__(self, buf, path: pathlib.Path):
        self.buf, self.path, self.pos, self.size = buf, path, 4, len(buf)
        self.order = "<"

    def fail(self, what: str):
        raise GGUFError(f"{self.path} ({self.size} bytes) is truncated or corrupt: {what} (at byte "
                        f"{self.pos}).")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} ({n} bytes) runs past the end of the file")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, width: int, what: str) -> int:
        return struct.unpack_from(self.order + ("I" if width == 4 else "Q"), self.buf,
                                  self.take(width, what))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.uint(8, what)
        if n > (self.size - self.pos) // min_item_bytes:
            self.fail(f"{what} = {n} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.uint(8, f"{what} length")
        start = self.take(n, what)
        return bytes(self.buf[start:start + min(n, 80)]).decode("utf-8", "replace")

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind], what)
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY:
            if depth >= _MAX_NESTING:
                self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
            item = self.uint(4, f"{what} item type")
            if item in _SCALAR_SIZES:
                self.take(self.count(f"{what} length", _SCALAR_SIZES[item]) * _SCALAR_SIZES[item], what)
            elif item in (_STRING, _ARRAY):
                for _ in range(self.count(f"{what} length", 8 if item == _STRING else 12)):
                    self.value(item, what, depth + 1)
            else:
                self.fail(f"{what} has unknown item type {item}")
        else:
            self.fail(f"{what} has unknown value type {kind}")

    def walk(self) -> None:
        version = self.uint(4, "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            self.fail(f"GGUF version {version} is not supported (2 or 3)")
        tensors = self.uint(8, "the tensor count")
        pairs = self.count("the metadata count", 13)  # key length, type, one byte of value
        for i in range(pairs):
            key = self.string(f"metadata key {i}")
            self.value(self.uint(4, f"metadata {key!r} type"), f"metadata {key!r}")
        if tensors > (self.size - self.pos) // 24:  # name length, dims count, type, offset
            self.fail(f"the tensor count {tensors} cannot fit in the {self.size - self.pos} bytes left")
        for i in range(tensors):
            self.string(f"tensor {i} name")
            dims = self.uint(4, f"tensor {i} dimension count")
            if dims > _MAX_DIMS:
                self.fail(f"tensor {i} has {dims} dimensions (at most {_MAX_DIMS})")
            self.take(8 * dims + 4 + 8, f"tensor {i} shape, type and offset")


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's key/value metadata as Python values (strings, numbers, lists)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
            raise GGUFError(f"The GGUF metadata field {name!r} is unreadable ({type(e).__name__}: "
                            f"{e}); the file is corrupt.") from e
    return out


def dequantize(tensor) -> np.ndarray:
    """A reader tensor as a float32 array in numpy order (``[rows, cols]``: GGUF's dims reversed)."""
    kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"Tensor {tensor.name!r} is stored as {kind}, which is not supported; "
                        f"supported types: {', '.join(SUPPORTED_TYPES)}.")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if kind in ("F32", "F16"):
        values = np.asarray(tensor.data, np.float32)
    else:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return values.reshape(shape).astype(np.float32, copy=False)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it stores the rotary pairs interleaved
    (``x0, x{d/2}, x1, ...``); HF and :mod:`tokensparse.rope` keep the halves apart."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(meta: dict, key: str, default: Any = None, *, required: bool = False):
    if key in meta:
        return meta[key]
    if required:
        raise GGUFError(f"The GGUF metadata lacks {key!r}, which a llama model needs.")
    return default


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str] | None = None, *, dtype=None
                     ) -> ModelConfig:
    """A :class:`ModelConfig` from GGUF ``llama.*`` metadata; tied embeddings when the file has no
    ``output.weight`` (pass ``tensor_names`` to decide that; without it, untied)."""
    try:
        return _config(meta, tensor_names, dtype)
    except GGUFError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:  # ill-typed values, zero heads
        raise GGUFError(f"The GGUF metadata does not describe a valid llama model: {e}") from e


def _config(meta: dict[str, Any], tensor_names: set[str] | None, dtype) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"general.architecture={arch!r} is not supported; only 'llama' GGUF files "
                        "(Llama, SmolLM, TinyLlama, Mistral-style dense decoders) can be loaded.")
    if int(_field(meta, "llama.expert_count", 0) or 0) > 0:
        raise GGUFError("Mixture-of-experts llama files (llama.expert_count > 0) are not supported.")
    d_model = int(_field(meta, "llama.embedding_length", required=True))
    n_heads = int(_field(meta, "llama.attention.head_count", required=True))
    head_dim = int(_field(meta, "llama.attention.key_length", d_model // n_heads))
    if int(_field(meta, "llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFError("llama.attention.value_length != key_length is not supported.")
    rot = int(_field(meta, "llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={rot} rotates part of each {head_dim}-wide "
                        "head; only full-head RoPE is supported.")
    scaling = RopeScaling()
    kind = _field(meta, "llama.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling.linear(float(_field(meta, "llama.rope.scaling.factor", required=True)))
    elif kind != "none":
        raise GGUFError(f"llama.rope.scaling.type={kind!r} is not supported (only none / linear).")
    if tensor_names is not None and "rope_freqs.weight" in tensor_names:
        raise GGUFError("The file carries rope_freqs.weight (Llama-3.1-style frequency scaling), "
                        "which is not supported by the GGUF loader.")
    vocab = _field(meta, "llama.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError("The GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens.")
        vocab = len(tokens)
    n_kv = _field(meta, "llama.attention.head_count_kv", n_heads)
    dtype = "float32" if dtype is None else jnp.dtype(dtype).name
    return ModelConfig(
        vocab_size=int(vocab), d_model=d_model,
        n_layers=int(_field(meta, "llama.block_count", required=True)),
        n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=head_dim,
        ffn_dim=int(_field(meta, "llama.feed_forward_length", required=True)),
        rms_eps=float(_field(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(meta, "llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_positions=int(_field(meta, "llama.context_length", 2048)),
        tie_embeddings=tensor_names is not None and "output.weight" not in tensor_names,
        dtype=dtype, param_dtype=dtype)


def hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor (``None`` for tensors the model does not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def _model(reader: gguf.GGUFReader, config: ModelConfig, attention_backend: str):
    """The model built abstractly and filled tensor by tensor (one float32 copy at a time)."""
    names = hf.hf_param_names(config)
    graphdef, flat = hf._abstract(config, attention_backend)
    values, unexpected, mismatched = {}, [], []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or name not in names:
            if not _IGNORED.match(tensor.name):
                unexpected.append(tensor.name)
            continue
        path, transpose = names[name]
        want = hf._hf_shape(flat[path], transpose)
        got = tuple(int(n) for n in reversed(tensor.shape))
        if want != got:
            mismatched.append(f"{tensor.name}: expected {want}, got {got}")
            continue
        try:
            array = dequantize(tensor)
        except GGUFError:
            raise
        except (ValueError, TypeError, IndexError, ArithmeticError) as e:  # data short of its shape
            raise GGUFError(f"Tensor {tensor.name!r} is unreadable ({type(e).__name__}: {e}).") from e
        if name.endswith("q_proj.weight"):
            array = unpermute_rotary(array, config.n_heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rotary(array, config.n_kv_heads)
        array = array.astype(config.weight_dtype)
        values[path] = np.ascontiguousarray(array.T if transpose else array)
    present = {hf_name(t.name) for t in reader.tensors}
    missing = [n for n in names if n not in present]
    if missing or unexpected or mismatched:
        problems = [f"missing tensors (HF names): {missing}" if missing else "",
                    f"unexpected tensors: {unexpected}" if unexpected else "",
                    "shape mismatches:\n  " + "\n  ".join(mismatched) if mismatched else ""]
        raise GGUFError("The GGUF tensors do not match a Llama with its metadata:\n"
                        + "\n".join(p for p in problems if p))
    return hf.build(graphdef, flat, values)


def _pre_tokenizer(pre: str | None, add_prefix_space: bool):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre is None or pre in _GPT2:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    raise GGUFError(f"tokenizer.ggml.pre={pre!r} is not supported; supported: {PRE_TOKENIZERS}.")


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF describes (``tokenizer.ggml.model == 'gpt2'``).

    Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so
    both are matched whole. ``bos_token_id`` / ``eos_token_id`` (or ``None``) are set as attributes;
    BOS/EOS are added on encode when the file's ``add_bos_token`` / ``add_eos_token`` say so.
    """
    try:
        return _tokenizer(meta)
    except GGUFError:
        raise
    except Exception as e:  # tokenizers raises plain Exception; bad ids IndexError, bad types TypeError
        raise GGUFError(f"The GGUF tokenizer metadata is malformed ({type(e).__name__}: {e}).") from e


def _tokenizer(meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE "
                        "('gpt2') tokenizers can be built from a GGUF file.")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError("The GGUF metadata lacks tokenizer.ggml.tokens (the vocabulary).")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("tokenizer.ggml.tokens holds duplicate tokens.")
    merges = []
    for merge in meta.get("tokenizer.ggml.merges", []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"Malformed merge {merge!r} in tokenizer.ggml.merges.")
        merges.append(tuple(pair))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"),
                                       bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=False) if kind == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types, strict=False) if kind == 4])

    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        specials = [(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on]
        first = f"{tokens[bos]}:0 " if add_bos else ""
        last = f" {tokens[eos]}:0" if add_eos else ""
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} {first}$B:1{last}",
            special_tokens=specials)
    tok.bos_token_id, tok.eos_token_id = bos, eos
    return tok


def load_gguf(path: str | os.PathLike, *, dtype=None, attention_backend: str = "auto"
              ) -> tuple[Any, ModelConfig, Tokenizer]:
    """Load a llama-architecture GGUF file as ``(Llama, ModelConfig, tokenizers.Tokenizer)``.

    ``dtype`` (e.g. ``"bfloat16"``) sets compute and parameter dtype; ``None`` keeps float32.
    Quantised weights are dequantised (the model holds plain dense weights, exportable with
    :func:`tokensparse.hf.save_llama`).
    """
    reader = read(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, names, dtype=dtype)
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK_RE.match, names) if m})
    # Before a model of n_layers is built (a corrupt count may be 2**64 - 1): blocks 0..n-1 exist.
    if config.n_layers != len(blocks) or blocks != list(range(len(blocks))):
        raise GGUFError(f"llama.block_count={config.n_layers}, but the file's tensors belong to "
                        f"{len(blocks)} blocks (indices {blocks[:1]}..{blocks[-1:]}).")
    tokenizer = tokenizer_from_gguf(meta)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise GGUFError(f"The tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                        f"{config.vocab_size}.")
    return _model(reader, config, attention_backend), config, tokenizer


__all__ = ["SUPPORTED_TYPES", "GGUFError", "config_from_gguf", "dequantize", "hf_name", "load_gguf",
           "metadata", "read", "tokenizer_from_gguf", "unpermute_rotary"]
