"""Targets for LeMo's pattern predictors: per layer, the normed input X and the oracle tile matrix
of one dense forward of the frozen model, collected per window and kept in memory or on disk.

On disk (``TargetCache(..., directory=DIR)``) each window is one ``DIR/<index>.npz``, written
atomically, so an interrupted collection or training run loses at most the window in flight and a
resumed (or different) training run over the same windows collects nothing again. Host memory then
stays one window, however many windows are trained on. ``DIR/manifest.json`` names the model
(config and a digest of its weights), the layers and the block size; each file also stores a digest
of its window's tokens. A cache over another model, other layers or other windows refuses to read
files it did not write (:class:`TargetStoreError`).

Disk use per window: ``len(layers) · seq_len · d_model`` values of X in the model's compute dtype
plus ``len(layers) · n_b²`` fp32 tiles (SmolLM2-135M at 2K, 15 layers: 71 MB in fp32).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse.lemo import scoring
from tokensparse.lemo.rules import scoring_qk
from tokensparse.llama import Llama, default_positions

Targets = dict[str, tuple[np.ndarray, np.ndarray]]  # {str(layer): (X [B, T, D], tiles [B, n_b, n_b])}
_VIEWED = {"bfloat16": (jnp.bfloat16, np.uint16)}  # dtypes .npz cannot store natively


class TargetStoreError(ValueError):
    """A target directory holds files written for another model, other layers or other windows."""


def collect_targets(model: Llama, tokens, layer_ids: Sequence[int], opts: scoring.ScoreOptions
                    ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{str(layer): (X [B, T, D], oracle tiles [B, n_b, n_b])}`` from one dense forward.

    X is the layer's normed input; the tiles score its q, k (pre-RoPE unless ``opts.post_rope``; with
    whatever LoRA the model carries; training uses the frozen base). Jit it with :func:`nnx.jit`."""
    wanted = set(layer_ids)

    def layer_fn(block, h, layer, _):
        target = None
        if layer.kind:
            u = block.input_norm(h)
            target = (u, scoring.block_tiles(*scoring_qk(block, u, layer.positions, opts), opts))
        return block(h, layer.positions, layer.segment_ids, None), target

    kinds = [i in wanted for i in range(len(model.layers))]
    _, outputs = model.run_layers(model.embed(tokens), default_positions(tokens), layer_fn=layer_fn,
                                  kinds=kinds, stop=max(wanted) + 1)
    return {str(i): outputs[i] for i in sorted(wanted)}


def weights_digest(model: nnx.Module) -> str:
    """A digest of every parameter of ``model`` (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0],
                          key=lambda item: jax.tree_util.keystr(item[0])):
        x = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def tokens_digest(tokens) -> str:
    tokens = np.ascontiguousarray(np.asarray(tokens, np.int64))
    return hashlib.blake2b(f"{tokens.shape}".encode() + tokens.tobytes(), digest_size=16).hexdigest()


def save_targets(path: pathlib.Path, targets: Targets, tokens_sha: str) -> None:
    """Write one window's targets to ``path`` (.npz) atomically."""
    arrays = {"tokens_sha": np.array(tokens_sha)}
    for layer, pair in targets.items():
        for name, x in zip(("x", "tiles"), pair, strict=True):
            x = np.asarray(x)
            key = f"{name}_{layer}_{x.dtype.name}"
            arrays[key] = x.view(_VIEWED[x.dtype.name][1]) if x.dtype.name in _VIEWED else x
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_targets(path: pathlib.Path, layers: Sequence[str] | None = None) -> tuple[Targets, str]:
    """``(targets, tokens_sha)`` of a file written by :func:`save_targets`; only ``layers`` (str
    layer ids) when given, reading nothing else."""
    with np.load(path) as f:
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key in f.files:
            if key == "tokens_sha":
                continue
            name, layer, dtype = key.split("_")
            if layers is not None and layer not in layers:
                continue
            x = f[key]
            pairs.setdefault(layer, {})[name] = x.view(_VIEWED[dtype][0]) if dtype in _VIEWED else x
        sha = str(f["tokens_sha"])
    return {layer: (p["x"], p["tiles"]) for layer, p in pairs.items()}, sha


class TargetCache:
    """Targets of window ``i`` of ``windows`` (``windows.batch(i)``), collected on first use.

    ``directory=None``: kept in host memory. Otherwise stored as ``directory/<i>.npz`` and read back
    on every use (see the module docstring); ``directory`` is created if missing. ``options``: the
    score's flags (``ScoreOptions.from_lemo(lemo)``; default the spec's at ``block_size``), recorded
    in the manifest when they differ from the default."""

    def __init__(self, model: Llama, windows, layer_ids: Sequence[int], block_size: int, *,
                 directory: str | os.PathLike | None = None,
                 options: scoring.ScoreOptions | None = None):
        self.windows = windows
        self.layer_ids = tuple(int(i) for i in layer_ids)
        opts = options or scoring.ScoreOptions(block_size=block_size)
        if opts.block_size != block_size:
            raise ValueError(f"options.block_size={opts.block_size} differs from block_size="
                             f"{block_size}.")
        self.options = opts
        self._collect = nnx.jit(lambda m, t: collect_targets(m, t, self.layer_ids, opts))
        self._model = model
        self._memory: dict[int, Targets] = {}
        self.seconds = 0.0  # spent collecting
        self.directory = None if directory is None else pathlib.Path(directory)
        if self.directory is not None:
            self._open(block_size)

    def _open(self, block_size: int) -> None:
        manifest = {"model": self._model.config.to_dict(), "weights": weights_digest(self._model),
                    "layers": list(self.layer_ids), "block_size": block_size}
        if self.options != scoring.ScoreOptions(block_size=block_size):  # (older caches: default)
            manifest["score_options"] = self.options.to_dict()
        manifest = json.loads(json.dumps(manifest))
        path = self.directory / "manifest.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != manifest:
                differ = sorted(k for k in manifest if saved.get(k) != manifest[k])
                raise TargetStoreError(
                    f"targets in {self.directory} were collected with another {', '.join(differ)}; "
                    "use another directory (or delete this one to collect again).")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".manifest.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)

    def __call__(self, index: int) -> Targets:
        if self.directory is None and index in self._memory:
            return self._memory[index]
        tokens = self.windows.batch(index).tokens
        path = None if self.directory is None else self.directory / f"{index:06d}.npz"
        if path is not None and path.exists():
            targets, sha = load_targets(path)
            if sha != tokens_digest(tokens):
                raise TargetStoreError(
                    f"{path} holds the targets of other tokens than window {index} (another corpus, "
                    "tokenizer, context or window seed); use another directory.")
            return targets
        start = time.perf_counter()
        targets = jax.tree.map(np.asarray, self._collect(self._model, jnp.asarray(tokens)))
        self.seconds += time.perf_counter() - start
        if path is None:
            self._memory[index] = targets
        else:
            save_targets(path, targets, tokens_digest(tokens))
        return targets

    def collected(self) -> list[int]:
        """Indices of the windows stored in ``directory`` (or held in memory)."""
        if self.directory is None:
            return sorted(self._memory)
        return sorted(int(p.stem) for p in self.directory.glob("[0-9]*.npz"))
