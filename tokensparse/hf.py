"""Hugging Face Llama checkpoints: ``config.json`` + safetensors (+ tokenizer) in and out, without torch.

Loading builds the model abstractly (no random init) and fills it straight from the files, so a
large checkpoint costs one copy of its weights; given a mesh, each device's block is read straight
into the training layout. The directory's tokenizer travels with the model: :func:`load_llama`
returns ``(model, config, tokenizer)`` like :func:`tokensparse.zoo.load` and
:func:`tokensparse.gguf.load_gguf`, and :func:`save_llama` writes it back.

HF ``nn.Linear`` weights are ``[out, in]``; ours are ``[in, out]``, hence the transposes. HF Llama
stores q/k in the rotate-half RoPE layout that :mod:`tokensparse.rope` uses, so no head permutation
is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tokensparse import sharding
from tokensparse.config import ModelConfig, RopeScaling
from tokensparse.layer_stack import per_layer_flat, stacked_flat
from tokensparse.llama import Llama
from tokensparse.lora import has_lora
from tokensparse.validation import json_object

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


PROJECTIONS = {("attn", "q_proj"): "self_attn.q_proj", ("attn", "k_proj"): "self_attn.k_proj",
               ("attn", "v_proj"): "self_attn.v_proj", ("attn", "o_proj"): "self_attn.o_proj",
               ("mlp", "gate_proj"): "mlp.gate_proj", ("mlp", "up_proj"): "mlp.up_proj",
               ("mlp", "down_proj"): "mlp.down_proj"}
"""A decoder layer's projections: our (sub-layer, projection) path → the HF Llama module name."""


def hf_param_names(config: ModelConfig) -> dict[str, tuple[Path, bool]]:
    """HF tensor name → (our NNX state path, whether the weight is transposed)."""
    names = {"model.embed_tokens.weight": (("embed", "embedding"), False),
             "model.norm.weight": (("final_norm", "scale"), False)}
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        for (part, proj), module in PROJECTIONS.items():
            names[f"{pre}{module}.weight"] = (("layers", i, part, proj, "kernel"), True)
        names[f"{pre}input_layernorm.weight"] = (("layers", i, "input_norm", "scale"), False)
        names[f"{pre}post_attention_layernorm.weight"] = (("layers", i, "post_attn_norm", "scale"),
                                                          False)
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    return names


def _abstract_stacked(config: ModelConfig, attention_backend: str = "auto"):
    """(graphdef, {stacked path: abstract Param}, layer group sizes) of ``Llama(config)``, built
    without allocating weights."""
    model = nnx.eval_shape(lambda: Llama(config, attention_backend=attention_backend,
                                         rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    stacked, sizes = dict(nnx.to_flat_state(state)), model.layers.sizes
    table = {p for p, _ in hf_param_names(config).values()}
    flat = per_layer_flat(stacked, sizes)
    if set(flat) != table:  # llama.py and this mapping drifted apart: a bug here, not in the file
        raise RuntimeError(f"hf_param_names is out of date with Llama: {sorted(set(flat) ^ table)}")
    return graphdef, stacked, sizes


def _abstract(config: ModelConfig, attention_backend: str = "auto"):
    """(graphdef, {per-layer path: abstract Param}) of ``Llama(config)`` without allocating
    weights; :func:`build` makes the model from values for those paths."""
    graphdef, stacked, sizes = _abstract_stacked(config, attention_backend)
    return graphdef, per_layer_flat(stacked, sizes)


def _hf_shape(var, transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(var.shape)) if transpose else tuple(var.shape)


def read_config(path: str | os.PathLike, *, dtype=None) -> ModelConfig:
    """The :class:`ModelConfig` of a HF directory's ``config.json``; errors name the file."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: load_llama expects a Hugging Face model "
                                "directory holding config.json and *.safetensors.")
    try:
        return config_from_hf(json_object(file), dtype=dtype)
    except (ValueError, TypeError) as e:
        message = str(e)
        if message.startswith("config.json"):
            message = message.replace("config.json", str(file), 1)
        raise ValueError(message if str(file) in message else f"{file}: {message}") from None


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' (tensor name -> shard file).")
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{path / absent[0]} is missing: {index.name} names shard files that "
                             f"do not exist ({', '.join(absent)}).")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path} (expected model.safetensors "
                                "or model.safetensors.index.json with its shards).")
    return files


@contextlib.contextmanager
def _safetensors_errors(file: pathlib.Path):
    """Turn safetensors' and the OS's low-level failures into a one-line ValueError naming ``file``."""
    try:
        yield
    except (SafetensorError, OSError, BufferError) as e:
        size = file.stat().st_size if file.exists() else 0
        raise ValueError(f"{file} ({size} bytes) is not a readable safetensors file (truncated or "
                         f"corrupt?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None


def _open(stack: contextlib.ExitStack, file: pathlib.Path):
    with _safetensors_errors(file):
        return stack.enter_context(safe_open(file, framework="np"))


def _bf16_view(file: pathlib.Path, name: str) -> np.ndarray:
    """A BF16 tensor memory-mapped from the raw file (slicing it reads only those bytes), for
    safetensors versions whose numpy API lacks bfloat16."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(size))[name]
    start, _ = info["data_offsets"]
    return np.memmap(file, np.dtype(jnp.bfloat16), "r", offset=8 + size + start,
                     shape=tuple(info["shape"]))


def _read_bf16(file: pathlib.Path, name: str) -> np.ndarray:
    """A whole BF16 tensor read from the raw file (see :func:`_bf16_view`)."""
    return np.array(_bf16_view(file, name))


def _read_region(handle, file: pathlib.Path, name: str, index: tuple) -> np.ndarray:
    """``tensor[index]`` (a tuple of slices) of ``name``, reading only that region."""
    with _safetensors_errors(file):
        try:
            return np.asarray(handle.get_slice(name)[index])
        except (TypeError, ValueError, KeyError, SafetensorError):
            if handle.get_slice(name).get_dtype() != "BF16":
                raise
            return np.array(_bf16_view(file, name)[index])


def _check_tensors(path, files, handles, config, flat) -> dict[str, int]:
    """{HF name: index of its file}; one ValueError listing every missing, unexpected and wrongly
    shaped tensor, so a bad checkpoint is diagnosed in one go."""
    names = hf_param_names(config)
    where: dict[str, int] = {}
    unexpected, mismatched = [], []
    for i, (file, f) in enumerate(zip(files, handles, strict=True)):
        with _safetensors_errors(file):
            keys = list(f.keys())
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in keys if name in names}
        for name in keys:
            if name in where:
                raise ValueError(f"Tensor {name} appears in both {files[where[name]]} and {file}.")
            if name not in names:
                tied_head = name == "lm_head.weight" and config.tie_embeddings
                if not (tied_head or name.endswith(_IGNORED_SUFFIXES)):
                    unexpected.append(name)
                continue
            where[name] = i
            p, transpose = names[name]
            want, got = _hf_shape(flat[p], transpose), shapes[name]
            if want != got:
                mismatched.append(f"{name}: expected {want}, got {got}")
    missing = [n for n in names if n not in where]
    if missing or unexpected or mismatched:
        problems = [f"missing tensors: {missing}" if missing else "",
                    f"unexpected tensors: {unexpected}" if unexpected else "",
                    "shape mismatches:\n  " + "\n  ".join(mismatched) if mismatched else ""]
        raise ValueError(f"{path} does not match a Llama with this config.json:\n"
                         + "\n".join(p for p in problems if p))
    return where


def _layer_sources(path: Path, sizes) -> list[Path] | None:
    """The per-layer paths (``("layers", i, *rest)``) a stacked path ``("layers", "groups", g,
    *rest)`` stacks, in order; None for a path outside the layer stack."""
    if path[:2] != ("layers", "groups"):
        return None
    g, rest = path[2], tuple(path[3:])
    start = sum(sizes[:g])
    return [("layers", start + j, *rest) for j in range(sizes[g])]


def load_llama(path: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
               mesh=None):
    """Load a local HF Llama directory as ``(Llama, ModelConfig, tokenizer-or-None)``.

    The tokenizer is the directory's ``tokenizer.json`` with its special-token files
    (:func:`tokensparse.data.tokenizer.load_tokenizer`; None when there is none); one with ids past
    the model's embedding is refused. Every tensor is checked before any is read (one ValueError
    lists all missing, unexpected and wrongly shaped tensors); an unreadable ``config.json``,
    safetensors file or index, or a missing shard, is a one-line ValueError naming the file.

    With ``mesh`` (a :class:`jax.sharding.Mesh`) each weight is created straight in the training
    layout (:func:`tokensparse.sharding.variable_spec`, the rules ``sharding.shard`` places a model
    by) with ``jax.make_array_from_callback``: each device's block is read from the files with
    ``safe_open(...).get_slice``, so no device, and no host beyond its own devices' blocks, ever holds
    a whole checkpoint. Without a mesh the weights go to the default device.
    """
    from tokensparse.data.tokenizer import check_fits, hf_tokenizer

    path = pathlib.Path(path)
    config = read_config(path, dtype=dtype)
    tokenizer = hf_tokenizer(path)
    if tokenizer is not None:
        check_fits(tokenizer, config.vocab_size, f"{path / 'tokenizer.json'}")
    names = hf_param_names(config)
    graphdef, stacked, sizes = _abstract_stacked(config, attention_backend)
    flat = per_layer_flat(stacked, sizes)
    files = _safetensors_files(path)
    with contextlib.ExitStack() as stack:
        handles = [_open(stack, file) for file in files]
        where = _check_tensors(path, files, handles, config, flat)
        source = {names[n][0]: (n, names[n][1], where[n]) for n in names}

        def region(p: Path, index: tuple) -> np.ndarray:
            """Per-layer weight ``p``'s block ``index`` (our [in, out] order), in the model dtype."""
            name, transpose, i = source[p]
            hf_index = tuple(reversed(index)) if transpose else index
            block = _read_region(handles[i], files[i], name, hf_index)
            return np.ascontiguousarray((block.T if transpose else block)
                                        .astype(config.weight_dtype, copy=False))

        def stacked_region(p: Path, index: tuple) -> np.ndarray:
            layers = _layer_sources(p, sizes)
            if layers is None:
                return region(p, index)
            return np.stack([region(q, index[1:]) for q in layers[index[0]]])

        state = {}
        for p, var in stacked.items():
            shape = tuple(var.get_value().shape)
            full = tuple(slice(None) for _ in shape)
            if mesh is None:
                value = jnp.asarray(stacked_region(p, full))
            else:
                target = NamedSharding(mesh, sharding.variable_spec(var, mesh))
                blocks: dict = {}  # replicated blocks are read once, not once per device

                def block(index, p=p, blocks=blocks):
                    key = tuple((s.start, s.stop, s.step) for s in index)
                    if key not in blocks:
                        blocks[key] = stacked_region(p, tuple(index))
                    return blocks[key]

                value = jax.make_array_from_callback(shape, target, block)
            state[p] = var.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(state)), config, tokenizer


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


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Largest safetensors file :func:`save_llama` writes: 5 GB, transformers' ``max_shard_size="5GB"``
(decimal units, as HF counts them)."""
INDEX_FILE = "model.safetensors.index.json"


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files in order, each file at most ``max_shard_bytes`` unless one
    tensor alone is larger (it then gets a file to itself), as transformers shards."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _remove_old_weights(path: pathlib.Path) -> None:
    """Delete a previous export's weights in ``path`` (a stale index would shadow new files)."""
    for old in [path / "model.safetensors", path / INDEX_FILE,
                *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)


def generation_config(tokenizer=None) -> dict:
    """``generation_config.json``: the BOS/EOS ids of ``tokenizer`` where it has them."""
    from tokensparse.data.tokenizer import special_ids

    bos, eos = special_ids(tokenizer) if tokenizer is not None else (None, None)
    ids = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
    return {"_from_model_config": True, **ids}


def save_llama(model: Llama, config: ModelConfig, path: str | os.PathLike, *, tokenizer=None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write a directory ``LlamaForCausalLM.from_pretrained`` (and :func:`load_llama`) reads:
    ``config.json``, ``generation_config.json``, the weights, and with ``tokenizer`` its files
    (:func:`tokensparse.data.tokenizer.save_hf_tokenizer`; BOS/EOS ids also go into the configs).

    Tensors are stored in ``config.param_dtype``; a tied head is not written (HF re-ties it). Weights
    past ``max_shard_bytes`` (default 5 GB, transformers' default) are split into
    ``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json``; else one
    ``model.safetensors``. Each file is written as soon as its tensors are gathered, so the host holds
    at most one file's worth of weights.
    """
    if has_lora(model):
        raise ValueError("The model still has LoRA adapters; call "
                         "tokensparse.lora.merge_lora(model) first to fold them into the weights.")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer.")
    params = per_layer_params(model)
    _, flat = _abstract(config)
    names = hf_param_names(config)
    problems = [f"{p}: not in the model" for p in flat if p not in params]
    problems += [f"{p}: not in a Llama with this config" for p in params if p not in flat]
    problems += [f"{p}: model has {params[p].shape}, config expects {flat[p].shape}"
                 for p in flat if p in params and params[p].shape != flat[p].shape]
    if problems:
        raise ValueError("The model does not match the config:\n  " + "\n  ".join(problems))
    if tokenizer is not None:
        from tokensparse.data.tokenizer import check_fits

        check_fits(tokenizer, config.vocab_size, "the tokenizer")
    itemsize = config.weight_dtype.itemsize
    sizes = {name: int(np.prod(params[p].shape)) * itemsize for name, (p, _) in names.items()}
    plan = _shard_plan(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(path)
    for file, shard in zip(files, plan, strict=True):
        tensors = {}
        for name in shard:
            p, transpose = names[name]
            array = np.asarray(params[p][...]).astype(config.weight_dtype)
            tensors[name] = np.ascontiguousarray(array.T if transpose else array)
        save_file(tensors, path / file, metadata={"format": "pt"})
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, shard in zip(files, plan, strict=True)
                                for name in shard}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    generation = generation_config(tokenizer)
    special = {k: v for k, v in generation.items() if k.endswith("_token_id")}
    (path / "config.json").write_text(json.dumps({**config_to_hf(config), **special}, indent=2,
                                                 sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True)
                                                 + "\n")
    if tokenizer is not None:
        from tokensparse.data.tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, path)
