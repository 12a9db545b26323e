"""Text generation for the dense Llama and SUBLLM: batched prefill, then token-by-token decoding.

::

    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=20)                 # greedy
    out = generate(model, prompts, max_new_tokens=20, temperature=0.8, top_p=0.95,
                   rng=jax.random.key(0), eos_id=2)
    out.sequences, out.lengths          # right-padded prompt + continuation, real length per row

:class:`Decoder` is the compiled pair underneath (``prefill`` and ``step``, one compilation per prompt
width and ``max_len``); benchmarks time its ``step``. Prompts may differ in length: they are
right-padded and every row continues at its own position. SUBLLM models decode with per-level caches
(:mod:`tokensparse.subllm.decode`), the dense model with one cache (:mod:`tokensparse.decode`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from tokensparse import decode
from tokensparse.llama import Llama
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm.model import SubLLM
from tokensparse.validation import check_token_ids


def sample(logits: Float[Array, "b v"], key: Array | None, temperature: float = 0.0,
           top_p: float = 1.0) -> Int[Array, " b"]:
    """Greedy when ``temperature == 0``; otherwise softmax(logits / T) restricted to the smallest set
    of tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    check_sampling(temperature, top_p)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs rng (a PRNG key).")
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(drop_sorted)
        scaled = jnp.where(drop, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


_pick = jax.jit(sample, static_argnames=("temperature", "top_p"))


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")


@dataclasses.dataclass(frozen=True)
class Generation:
    """``sequences`` [B, W]: each row's prompt then its continuation, right-padded with ``pad_id``;
    ``lengths`` [B]: real tokens per row; ``new_tokens`` [B, N]: the continuations (``pad_id`` after
    a row's ``eos_id``)."""

    sequences: np.ndarray
    lengths: np.ndarray
    new_tokens: np.ndarray


class Decoder:
    """Compiled prefill / decode-step functions for ``model`` (a :class:`Llama` or :class:`SubLLM`)
    with caches of ``max_len`` tokens per sequence."""

    def __init__(self, model: Llama, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be positive.")
        self.model, self.max_len = model, max_len
        module = subllm_decode if isinstance(model, SubLLM) else decode
        graphdef, self.state = nnx.split(model)

        def prefill(state, tokens, lengths):
            return module.prefill(nnx.merge(graphdef, state), tokens, lengths, max_len)

        def step(state, cache, tokens, positions):
            return module.decode_step(nnx.merge(graphdef, state), cache, tokens, positions)

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, donate_argnums=1)

    def prefill(self, tokens, lengths) -> tuple[Array, decode.DecodeCache]:
        """Logits at each row's last real prompt token, and the filled cache."""
        check_token_ids(tokens, self.model.config.vocab_size, what="prompt token ids")
        return self._prefill(self.state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32))

    def lower_prefill(self, tokens, lengths):
        """The compiled prefill's lowering for these shapes (arrays or ``jax.ShapeDtypeStruct`` s):
        ``.compile()`` it for compile-only costs (FLOPs, memory)."""
        return self._prefill.lower(self.state, tokens, lengths)

    def step(self, cache: decode.DecodeCache, tokens, positions) -> tuple[Array, decode.DecodeCache]:
        """Next-token logits for one token per row at ``positions``; consumes ``cache``.

        Raises when a concrete position is ``>= max_len`` (its row's cache has no slot left: a
        sequence of positions 0, 1, ... fills slot p at position p). Traced positions cannot be
        checked: the compiled step then drops the token and ``tokensparse.decode.overflowed(cache)``
        reports it."""
        if not isinstance(positions, jax.core.Tracer):
            late = np.flatnonzero(np.asarray(positions) >= self.max_len)
            if late.size:
                raise ValueError(f"Decoder.step: positions {np.asarray(positions)[late].tolist()} "
                                 f"(rows {late.tolist()}) are past the end of the caches "
                                 f"(max_len={self.max_len}); build the Decoder with a larger max_len.")
        return self._step(self.state, cache, jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(positions, jnp.int32))


def pad_prompts(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A list of token lists (or a [B, T] array) → right-padded [B, W] int32 array and lengths."""
    if isinstance(prompts, np.ndarray | jax.Array):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts must be [batch, time], got shape {arr.shape}.")
        rows: Sequence = list(arr)
    else:
        rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt.")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token (e.g. the bos token).")
    out = np.full((len(rows), int(lengths.max())), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


def generate(model: Llama, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             rng: Array | None = None, eos_id: int | None = None, pad_id: int = 0,
             max_len: int | None = None, decoder: Decoder | None = None) -> Generation:
    """Continue each prompt by ``max_new_tokens`` tokens (fewer real ones after ``eos_id``).

    ``max_len`` (default: longest prompt + ``max_new_tokens``) sizes the caches; pass a ``decoder``
    to reuse its compilation across calls.
    """
    check_sampling(temperature, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    tokens, lengths = pad_prompts(prompts, pad_id)  # (Decoder.prefill checks their ids)
    needed = int(lengths.max()) + max_new_tokens
    if decoder is None:
        decoder = Decoder(model, max_len or needed)
    if decoder.max_len < needed:
        raise ValueError(f"max_len={decoder.max_len} cannot hold the longest prompt ({lengths.max()}) plus "
                         f"max_new_tokens={max_new_tokens}.")
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng (a PRNG key).")
    keys = [None] * max_new_tokens if rng is None else list(jax.random.split(rng, max_new_tokens))

    logits, cache = decoder.prefill(tokens, lengths)
    new = np.full((len(lengths), max_new_tokens), pad_id, np.int32)
    done = np.zeros(len(lengths), bool)
    for i in range(max_new_tokens):
        nxt = np.asarray(_pick(logits, keys[i], temperature=temperature, top_p=top_p))
        new[:, i] = np.where(done, pad_id, nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
        if i + 1 < max_new_tokens:
            logits, cache = decoder.step(cache, new[:, i], lengths + i)
    n_new = _real_counts(new, eos_id) if eos_id is not None else np.full(len(lengths), max_new_tokens)
    width = int(lengths.max()) + max_new_tokens
    sequences = np.full((len(lengths), width), pad_id, np.int32)
    for b, n in enumerate(lengths):
        sequences[b, :n] = tokens[b, :n]
        sequences[b, n:n + n_new[b]] = new[b, :n_new[b]]
    return Generation(sequences, lengths + n_new.astype(np.int32), new)


def _real_counts(new: np.ndarray, eos_id: int) -> np.ndarray:
    """Tokens up to and including each row's first ``eos_id`` (all of them when it never appears)."""
    is_eos = new == eos_id
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, new.shape[1])
    return first.astype(np.int32)
