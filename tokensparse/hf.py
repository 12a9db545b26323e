"""Hugging Face Llama checkpoints: ``config.json`` + safetensors in and out, without torch.

Loading builds the model abstractly (no random init) and fills it straight from the files, so a
large checkpoint costs one copy of its weights. HF ``nn.Linear`` weights are ``[out, in]``; ours are
``[in, out]``, hence the transposes. HF Llama stores q/k in the rotate-half RoPE layout that
:mod:`tokensparse.rope` uses, so no head permutation is needed.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tokensparse.config import ModelConfig, RopeScaling
from tokensparse.layer_stack import per_layer_flat, stacked_flat
from tokensparse.llama import Llama
from tokensparse.lora import has_lora

ROPE_TYPES = ("default", "linear", "llama3")
# Buffers some older exports carry; HF itself ignores them on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
Path = tuple[str | int, ...]


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """(theta, scaling) from either the transformers 4.x or 5.x layout, with 5.x's precedence."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"RoPE type {kind!r} is not supported; supported types: {ROPE_TYPES}.")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: RoPE rotates whole heads.")

    def need(key):
        if key not in params:
            raise ValueError(f"RoPE type {kind!r} needs {key!r} in rope_scaling/rope_parameters.")
        return float(params[key])

    if kind == "linear":
        return theta, RopeScaling.linear(need("factor"))
    if kind == "llama3":
        original = params.get("original_max_position_embeddings",
                              hf.get("max_position_embeddings", 2048))
        return theta, RopeScaling(kind="llama3", factor=need("factor"),
                                  low_freq_factor=need("low_freq_factor"),
                                  high_freq_factor=need("high_freq_factor"),
                                  original_max_positions=int(original))
    return theta, RopeScaling()


def config_from_hf(hf: dict, *, dtype=None) -> ModelConfig:
    """A :class:`ModelConfig` from a HF Llama ``config.json`` dict (defaults as transformers').

    ``dtype`` (e.g. ``"bfloat16"``) sets both compute and parameter dtype; ``None`` keeps float32.
    """
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type={hf.get('model_type')!r} is not supported; only 'llama' "
                         "checkpoints (LlamaForCausalLM) can be loaded.")
    missing = [k for k in _REQUIRED_KEYS if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}.")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, supported) != supported:
            raise ValueError(f"config.json has {key}={hf[key]!r}; only {supported!r} is supported.")
    theta, scaling = _rope_from_hf(hf)
    n_heads = hf["num_attention_heads"]
    dtype = "float32" if dtype is None else jnp.dtype(dtype).name
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"], rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        max_positions=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype,
        init_std=float(hf.get("initializer_range", 0.02)))


def config_to_hf(config: ModelConfig) -> dict:
    """A ``LlamaForCausalLM`` config dict for transformers 5.x (``rope_parameters``) and 4.x
    (``rope_theta`` / ``rope_scaling``); 5.x prefers ``rope_scaling`` if set, so the two agree.
    """
    s = config.rope_scaling
    scaling = None
    if s.kind == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s.kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_positions}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_positions, "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": config.init_std, "use_cache": True,
        "dtype": config.param_dtype, "torch_dtype": config.param_dtype,
        "rope_theta": config.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}),
                            "rope_theta": config.rope_theta},
    }


def hf_param_names(config: ModelConfig) -> dict[str, tuple[Path, bool]]:
    """HF tensor name → (our NNX state path, whether the weight is transposed)."""
    names = {"model.embed_tokens.weight": (("embed", "embedding"), False),
             "model.norm.weight": (("final_norm", "scale"), False)}
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        for p in ("q", "k", "v", "o"):
            path = ("layers", i, "attn", f"{p}_proj", "kernel")
            names[f"{pre}self_attn.{p}_proj.weight"] = (path, True)
        for p in ("gate", "up", "down"):
            names[f"{pre}mlp.{p}_proj.weight"] = (("layers", i, "mlp", f"{p}_proj", "kernel"), True)
        names[f"{pre}input_layernorm.weight"] = (("layers", i, "input_norm", "scale"), False)
        names[f"{pre}post_attention_layernorm.weight"] = (("layers", i, "post_attn_norm", "scale"),
                                                          False)
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    return names


def _abstract(config: ModelConfig, attention_backend: str = "auto"):
    """(graphdef, {per-layer path: abstract Param}) of ``Llama(config)`` without allocating
    weights; :func:`build` makes the model from values for those paths."""
    model = nnx.eval_shape(lambda: Llama(config, attention_backend=attention_backend,
                                         rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = per_layer_flat(dict(nnx.to_flat_state(state)), model.layers.sizes)
    table = {p for p, _ in hf_param_names(config).values()}
    if set(flat) != table:  # llama.py and this mapping drifted apart: a bug here, not in the file
        raise RuntimeError(f"hf_param_names is out of date with Llama: {sorted(set(flat) ^ table)}")
    return graphdef, flat


def _hf_shape(var, transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(var.shape)) if transpose else tuple(var.shape)


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        files = [path / f for f in sorted(shards)]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {absent}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path} (expected model.safetensors "
                                "or model.safetensors.index.json with its shards).")
    return files


def _read_bf16(file: pathlib.Path, name: str) -> np.ndarray:
    """A BF16 tensor read from the raw file, for safetensors versions whose numpy API lacks it."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(size))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + size + start)
        data = fh.read(end - start)
    return np.frombuffer(data, np.dtype(jnp.bfloat16)).reshape(info["shape"])


def _read(handle, file: pathlib.Path, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except (TypeError, ValueError, KeyError, SafetensorError):
        if handle.get_slice(name).get_dtype() != "BF16":
            raise
        return _read_bf16(file, name)


def load_llama(path: str | os.PathLike, *, dtype=None, attention_backend: str = "auto"):
    """Load a local HF Llama directory as ``(Llama, ModelConfig)``.

    Every tensor is checked before any is read: one ``ValueError`` lists all missing, unexpected
    and wrongly shaped tensors, so a bad checkpoint is diagnosed in one go.
    """
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: load_llama expects a Hugging "
                                "Face model directory holding config.json and *.safetensors.")
    config = config_from_hf(json.loads((path / "config.json").read_text()), dtype=dtype)
    names = hf_param_names(config)
    graphdef, flat = _abstract(config, attention_backend)

    where: dict[str, pathlib.Path] = {}
    unexpected, mismatched = [], []
    for file in _safetensors_files(path):
        with safe_open(file, framework="np") as f:
            keys = f.keys()
            for name in keys:
                if name in where:
                    raise ValueError(f"Tensor {name} appears in both {where[name]} and {file}.")
                if name not in names:
                    tied_head = name == "lm_head.weight" and config.tie_embeddings
                    if not (tied_head or name.endswith(_IGNORED_SUFFIXES)):
                        unexpected.append(name)
                    continue
                where[name] = file
                p, transpose = names[name]
                want, got = _hf_shape(flat[p], transpose), tuple(f.get_slice(name).get_shape())
                if want != got:
                    mismatched.append(f"{name}: expected {want}, got {got}")
    missing = [n for n in names if n not in where]
    if missing or unexpected or mismatched:
        problems = [f"missing tensors: {missing}" if missing else "",
                    f"unexpected tensors: {unexpected}" if unexpected else "",
                    "shape mismatches:\n  " + "\n  ".join(mismatched) if mismatched else ""]
        raise ValueError(f"{path} does not match a Llama with this config.json:\n"
                         + "\n".join(p for p in problems if p))

    values = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="np") as f:
            for name in (n for n, fl in where.items() if fl == file):
                p, transpose = names[name]
                array = _read(f, file, name).astype(config.weight_dtype)
                values[p] = np.ascontiguousarray(array.T if transpose else array)
    return build(graphdef, flat, values), config


def build(graphdef, flat: dict, values: dict):
    """The model of :func:`_abstract`'s ``(graphdef, flat)`` holding ``values`` (host arrays by
    per-layer path), its layers stacked."""
    sizes = (1 + max(p[1] for p in flat if p[0] == "layers"),)
    per_layer = {p: var.replace(values[p]) for p, var in flat.items()}
    return nnx.merge(graphdef, nnx.from_flat_state(stacked_flat(per_layer, sizes)))


def per_layer_params(model: Llama) -> dict:
    """``{path: Param}`` of ``model`` with one entry per layer (``("layers", i, ...)``, the paths of
    :func:`hf_param_names`), whatever its layer groups."""
    return per_layer_flat(dict(nnx.to_flat_state(nnx.state(model, nnx.Param))), model.layers.sizes)


def save_llama(model: Llama, config: ModelConfig, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` for ``LlamaForCausalLM.from_pretrained``.

    Tensors are stored in ``config.param_dtype``; a tied head is not written (HF re-ties it).
    """
    if has_lora(model):
        raise ValueError("The model still has LoRA adapters; call "
                         "tokensparse.lora.merge_lora(model) first to fold them into the weights.")
    params = per_layer_params(model)
    _, flat = _abstract(config)
    names = hf_param_names(config)
    problems = [f"{p}: not in the model" for p in flat if p not in params]
    problems += [f"{p}: not in a Llama with this config" for p in params if p not in flat]
    problems += [f"{p}: model has {params[p].shape}, config expects {flat[p].shape}"
                 for p in flat if p in params and params[p].shape != flat[p].shape]
    if problems:
        raise ValueError("The model does not match the config:\n  " + "\n  ".join(problems))
    tensors = {}
    for name, (p, transpose) in names.items():
        array = np.asarray(params[p][...]).astype(config.weight_dtype)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2, sort_keys=True)
                                      + "\n")
