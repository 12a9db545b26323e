"""What the kernels compute, and where they can run: the mask rule, the dense references, the block
sizes and the platform check. Everything in ``kernels_pallas`` (and ``tokensparse``, which imports
these) uses the definitions here; this module depends on jax (and jaxtyping) only.

- :func:`visible` is the mask rule: a query at original position p sees a key at position p' iff
  p' <= p (when causal), both carry the same segment id, and that id is >= 0. A query row with no
  visible key returns zeros. :func:`attention_mask` applies it to whole [B, T] layouts.
- :func:`reference_attention` and :func:`block_scores_reference` are the dense definitions the
  segment-attention and block-scoring kernels are tested against.
- :class:`BlockSizes` holds the tile sizes of the segment-attention kernels (both lowerings).
- :func:`platform_target` says which lowering runs here and whether it must be interpreted.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Positions = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]

# ----------------------------------------------------------------------------- platform

INTERPRET_ENV = "TOKENSPARSE_PALLAS_INTERPRET"
_NEEDS = {"triton": "a GPU (sm80+)", "mosaic": "a TPU"}


def interpret_mode() -> str | None:
    """Which interpreter ``TOKENSPARSE_PALLAS_INTERPRET`` asks for: None (compile for this platform),
    ``"gpu"`` (``=1``: the Triton kernels under Pallas' generic interpreter) or ``"tpu"`` (``=tpu``:
    the Mosaic kernels under the TPU interpreter). Read at every call (tests monkeypatch it)."""
    value = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return None
    return "tpu" if value == "tpu" else "gpu"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a kernel runs here: ``lowering`` (``"triton"``, ``"mosaic"``, or None when none can
    run, ``reason`` then says why) and whether it runs under the interpreter."""

    lowering: str | None
    interpret: bool = False
    reason: str | None = None


def platform_target(lowerings: tuple[str, ...] = ("triton", "mosaic")) -> Target:
    """The platform check for a kernel with these lowerings (``"triton"``: GPU, ``"mosaic"``: TPU).

    ``TOKENSPARSE_PALLAS_INTERPRET`` forces interpret mode on any platform (``=tpu`` picks the Mosaic
    lowering where the kernel has one). Otherwise a GPU of compute capability 8.0 or more runs the
    Triton lowering and a TPU the Mosaic one; elsewhere no lowering runs.
    """
    mode = interpret_mode()
    if mode is not None:
        wanted = "mosaic" if mode == "tpu" else "triton"
        return Target(wanted if wanted in lowerings else lowerings[0], interpret=True)
    platform = jax.default_backend()
    if platform == "gpu" and "triton" in lowerings:
        capability = getattr(jax.devices()[0], "compute_capability", None)
        if capability is not None and float(capability) < 8.0:
            return Target(None, reason=f"GPU compute capability {capability} < 8.0: the Triton "
                                       "kernels need sm80+")
        return Target("triton")
    if platform == "tpu" and "mosaic" in lowerings:
        return Target("mosaic")
    needs = " or ".join(_NEEDS[name] for name in lowerings)
    return Target(None, reason=f"{platform} platform: this kernel needs {needs}, or "
                               f"{INTERPRET_ENV}=1 for interpret mode")


# ----------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the segment-attention kernels: the forward's (``block_q`` x ``block_k``), the
    dq kernel's and the dk/dv kernel's. A backward size left None takes the forward one.

    Hashable, so a kernel keeps it in its static configuration. Each lowering fits the sizes to its
    hardware and to the sequence (see its wrapper) before use.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None

    @property
    def q_sizes(self) -> tuple[int, int, int]:
        """Query-tile sizes of the (forward, dq, dk/dv) kernels."""
        return self.block_q, self.block_q_dq or self.block_q, self.block_q_dkv or self.block_q

    @property
    def k_sizes(self) -> tuple[int, int, int]:
        """Key-tile sizes of the (forward, dq, dk/dv) kernels."""
        return self.block_k, self.block_k_dq or self.block_k, self.block_k_dkv or self.block_k

    @classmethod
    def from_sizes(cls, q_sizes: tuple[int, int, int], k_sizes: tuple[int, int, int]) -> BlockSizes:
        """Inverse of (``q_sizes``, ``k_sizes``): every size set."""
        return cls(block_q=q_sizes[0], block_k=k_sizes[0], block_q_dq=q_sizes[1],
                   block_k_dq=k_sizes[1], block_q_dkv=q_sizes[2], block_k_dkv=k_sizes[2])

    @property
    def fwd(self) -> tuple[int, int]:
        return self.q_sizes[0], self.k_sizes[0]

    @property
    def dq(self) -> tuple[int, int]:
        return self.q_sizes[1], self.k_sizes[1]

    @property
    def dkv(self) -> tuple[int, int]:
        return self.q_sizes[2], self.k_sizes[2]


# ----------------------------------------------------------------------------- the mask rule


def visible(q_pos, kv_pos, q_seg=None, kv_seg=None, *, causal: bool = True):
    """The mask rule, elementwise with broadcasting: may the query (q_pos, q_seg) see the key
    (kv_pos, kv_seg)?

    True iff ``kv_pos <= q_pos`` (when ``causal``) and ``q_seg == kv_seg >= 0``. Segment ids are
    given both or neither (neither: one segment, only the causal rule applies); positions may be
    None when not causal. None when there is nothing to check (every key is visible).
    """
    mask = None
    if q_seg is not None:
        mask = (q_seg == kv_seg) & (q_seg >= 0)
    if causal:
        order = kv_pos <= q_pos
        mask = order if mask is None else mask & order
    return mask


def _default_segments(positions: Positions, segment_ids: SegmentIds | None) -> SegmentIds:
    return jnp.zeros(positions.shape, jnp.int32) if segment_ids is None else segment_ids


def attention_mask(
    q_positions: Positions,
    kv_positions: Positions,
    q_segment_ids: SegmentIds | None = None,
    kv_segment_ids: SegmentIds | None = None,
    *,
    causal: bool = True,
) -> Bool[Array, "b tq tk"]:
    """:func:`visible` for every (query, key) pair of a batch; missing segment ids mean segment 0."""
    q_seg = _default_segments(q_positions, q_segment_ids)
    kv_seg = _default_segments(kv_positions, kv_segment_ids)
    return visible(q_positions[:, :, None], kv_positions[:, None, :], q_seg[:, :, None],
                   kv_seg[:, None, :], causal=causal)


# ----------------------------------------------------------------------------- dense attention


def reference_attention(
    q: Float[Array, "b tq h d"],
    k: Float[Array, "b tk hkv d"],
    v: Float[Array, "b tk hkv d"],
    *,
    q_positions: Positions,
    kv_positions: Positions,
    q_segment_ids: SegmentIds | None = None,
    kv_segment_ids: SegmentIds | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> Float[Array, "b tq h d"]:
    """Dense grouped-query attention (H % Hkv == 0) in fp32 under :func:`attention_mask`: the
    definition the attention kernels and backends are tested against. Rows that see no key are 0."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, tq, hkv, h // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal)[:, None, None]
    probs = masked_softmax(logits, mask)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, tq, h, d).astype(q.dtype)


def masked_softmax(logits: Float[Array, "... s"], mask: Bool[Array, "... s"]) -> Float[Array, "... s"]:
    """Softmax over the last axis of the entries where ``mask`` (broadcast against ``logits``);
    masked entries get 0, and so does every entry of a row with none unmasked."""
    row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Mask before exp: a large masked logit must not overflow (inf * 0 = NaN in the gradient).
    weights = jnp.exp(jnp.where(mask, logits - row_max, -jnp.inf))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)


# ----------------------------------------------------------------------------- dense block scores


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering ``seq_len`` tokens; the last one may be partly padding."""
    return -(-seq_len // block_size)


def block_token_mask(valid, b: int, t: int, block_size: int) -> Bool[Array, "b tp"]:
    """The valid mask (all True by default), padded with False to a whole number of blocks."""
    if valid is None:
        valid = jnp.ones((b, t), bool)
    elif valid.shape != (b, t):
        raise ValueError(f"valid has shape {valid.shape}; expected [B, T] = {(b, t)}.")
    pad = num_blocks(t, block_size) * block_size - t
    return jnp.pad(valid.astype(bool), ((0, 0), (0, pad)))


def pad_to_blocks(q, k, valid, block_size: int):
    """fp32 q, k and the token mask, all padded to a whole number of blocks (shapes checked)."""
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, T, H, D] and [B, T, Hkv, D] "
                         f"with H a multiple of Hkv.")
    valid = block_token_mask(valid, b, t, block_size)
    pad = ((0, 0), (0, valid.shape[1] - t), (0, 0), (0, 0))
    return jnp.pad(q.astype(jnp.float32), pad), jnp.pad(k.astype(jnp.float32), pad), valid


def empty_columns_neginf(tiles: Float[Array, "b nb nb"], valid: Bool[Array, "b tp"],
                         block_size: int) -> Float[Array, "b nb nb"]:
    """−inf in the columns of key blocks without a valid token (``valid`` padded to whole blocks)."""
    key_ok = valid.reshape(valid.shape[0], -1, block_size).any(axis=-1)
    return jnp.where(key_ok[:, None, :], tiles, -jnp.inf)


def block_scores_reference(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    *,
    block_size: int = 64,
    valid: Bool[Array, "b t"] | None = None,
    scale: float = 1.0,
    normalizer: float = 1.0,
    causal: bool = False,
    exclude_diagonal: bool = False,
) -> Float[Array, "b nb nb"]:
    """LeMo's tile matrix, densely (materialises [B, H, T, T]: tests and small inputs only)::

        A_ij      = scale · Σ_h ReLU(q_ih · k_jh)       (0 unless tokens i and j are both valid,
                                                       and i != j with ``exclude_diagonal``)
        tile[m,n] = max_{i ∈ block m, j ∈ block n} A_ij / normalizer

    ``causal`` zeroes tiles with key block n > query block m. T is padded to whole blocks with
    invalid tokens; columns of key blocks without a valid token are −inf.
    """
    q, k, valid = pad_to_blocks(q, k, valid, block_size)
    bsz, tp, h, _ = q.shape
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    logits = jnp.einsum("bihd,bjhd->bhij", q, k)
    a = jnp.sum(jnp.maximum(logits, 0.0), axis=1) * scale
    mask = valid[:, :, None] & valid[:, None, :]
    if exclude_diagonal:
        mask = mask & ~jnp.eye(tp, dtype=bool)
    a = jnp.where(mask, a, 0.0)
    nb, bs = tp // block_size, block_size
    tiles = a.reshape(bsz, nb, bs, nb, bs).max(axis=(2, 4)) / normalizer
    if causal:
        tiles = jnp.where(jnp.tril(jnp.ones((nb, nb), bool)), tiles, 0.0)
    return empty_columns_neginf(tiles, valid, bs)
