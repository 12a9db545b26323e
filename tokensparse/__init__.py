"""tokensparse: token-sparse long-context LoRA fine-tuning (LeMo / Jenga) and subsampled decoders
(SUBLLM) in JAX / Flax NNX.

The public submodules are attributes of the package, imported on first use (so ``import
tokensparse`` is instant and pulls in JAX only when a submodule is touched)::

    import tokensparse

    model, config, tokenizer = tokensparse.hf.load_llama("path/to/hf_dir")   # or zoo.load(name)
    tokensparse.lora.add_lora(model, tokensparse.config.LoRAConfig(), rngs=nnx.Rngs(0))
    ...
    tokensparse.export.save_merged(model, config, "out_dir", tokenizer=tokenizer)

- models: :mod:`~tokensparse.llama`, :mod:`~tokensparse.config`, :mod:`~tokensparse.lora`;
  loading: :mod:`~tokensparse.hf`, :mod:`~tokensparse.gguf`, :mod:`~tokensparse.zoo` (each returns
  ``(model, config, tokenizer)``); a run's workdir: :mod:`~tokensparse.runs`; out:
  :mod:`~tokensparse.export`.
- training: :mod:`~tokensparse.data` (``Batch``, corpora, tokenizers), :mod:`~tokensparse.train`,
  :mod:`~tokensparse.loop`, :mod:`~tokensparse.checkpoint`, :mod:`~tokensparse.sharding`,
  :mod:`~tokensparse.pipelines`.
- methods: :mod:`~tokensparse.lemo` (LeMo token elimination), :mod:`~tokensparse.subllm` (SUBLLM);
  inference: :mod:`~tokensparse.generate`, :mod:`~tokensparse.decode`.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("tokensparse")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "unknown"

_SUBMODULES = (
    "attention", "backends", "checkpoint", "chunked_attention", "config", "data", "decode",
    "export", "flops", "generate", "gguf", "hf", "layer_loop", "layer_stack", "lemo", "llama",
    "loop", "lora", "metrics", "pipelines", "remat", "rope", "routing", "runs", "sharding",
    "subllm", "train", "zoo",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
