"""LeMo block informativeness against a NumPy brute-force loop: every flag, GQA, padding, masks,
linear memory, and block selection."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokensparse.lemo import scoring
from tokensparse.lemo.scoring import ScoreOptions
from tokensparse.metrics import compiled_memory

FLAG_NAMES = ("scale_by_sqrt_d", "divide_by_heads", "causal", "exclude_diagonal")
ALL_FLAGS = [dict(zip(FLAG_NAMES, bits, strict=True))
             for bits in itertools.product((False, True), repeat=len(FLAG_NAMES))]


def flag_id(flags: dict) -> str:
    return "-".join(name for name, on in flags.items() if on) or "target"


# ScoreOptions is a static pytree node: each (options, shapes) pair compiles once.
block_scores_jit = jax.jit(scoring.block_scores)
reference_jit = jax.jit(scoring.block_scores_reference)
select_jit = jax.jit(scoring.select_blocks, static_argnums=(1, 2), static_argnames="seq_len")


def reference_columns(q, k, opts, valid=None):
    return scoring.column_scores(scoring.block_scores_reference(q, k, opts, valid=valid))


# ----------------------------------------------------------------------------- brute force


def np_tiles(q, k, opts: ScoreOptions, valid=None):
    """Tile matrix and column scores by explicit loops over (i, j), in float64.

    An entry counts when both tokens exist and are valid (and i != j if the diagonal is excluded);
    a tile is the max of its counting entries (0 if none), causal tiles m < n are 0, and a key block
    without any valid token scores -inf.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    bsz, t, h, d = q.shape
    group = h // k.shape[2]
    valid = np.ones((bsz, t), bool) if valid is None else np.asarray(valid)
    bs = opts.block_size
    nb = math.ceil(t / bs)
    factor = 1.0
    if opts.scale_by_sqrt_d:
        factor /= math.sqrt(d)
    if opts.divide_by_heads:
        factor /= h
    tiles = np.zeros((bsz, nb, nb))
    cols = np.zeros((bsz, nb))
    for b in range(bsz):
        a = np.zeros((t, t))
        for i in range(t):
            for j in range(t):
                total = 0.0
                for head in range(h):
                    total += max(float(q[b, i, head] @ k[b, j, head // group]), 0.0)
                a[i, j] = total * factor
        for m in range(nb):
            for n in range(nb):
                entries = [a[i, j]
                           for i in range(m * bs, min((m + 1) * bs, t))
                           for j in range(n * bs, min((n + 1) * bs, t))
                           if valid[b, i] and valid[b, j]
                           and not (opts.exclude_diagonal and i == j)]
                tile = max(entries) / opts.normalizer if entries else 0.0
                if opts.causal and m < n:
                    tile = 0.0
                tiles[b, m, n] = tile
        for n in range(nb):
            has_key = valid[b, n * bs:min((n + 1) * bs, t)].any()
            cols[b, n] = tiles[b, :, n].sum() if has_key else -np.inf
            if not has_key:
                tiles[b, :, n] = -np.inf
    return tiles, cols


def make_qk(seed, b, t, h, hkv, d, scale=1.0):
    """NumPy inputs: indexing them in tests costs no eager JAX compilations."""
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((b, t, h, d)).astype(np.float32),
            scale * rng.standard_normal((b, t, hkv, d)).astype(np.float32))


# Small cases: batch, T, H, Hkv, d, block, with a valid mask. "mixed" is GQA + ragged T + a mask.
CASES = {
    "mha": (2, 32, 4, 4, 8, 8, False),
    "gqa": (2, 32, 4, 2, 8, 8, False),
    "ragged": (2, 30, 4, 2, 8, 8, False),
    "mixed": (2, 30, 4, 2, 8, 8, True),
}


def case_inputs(name, seed=0):
    b, t, h, hkv, d, bs, masked = CASES[name]
    q, k = make_qk(seed, b, t, h, hkv, d)
    valid = None
    if masked:
        valid = np.random.default_rng(seed).random((b, t)) > 0.25
        valid[1, 16:] = False  # row 1: its last two blocks hold no valid token
    return q, k, bs, valid


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=flag_id)
def test_every_flag_reference_and_segmented_match_brute_force(flags):
    """GQA, ragged T and a valid mask at once: the dense reference equals the brute-force loop, and
    the scanned ``block_scores`` equals the reference, for every flag combination."""
    q, k, bs, valid = case_inputs("mixed", seed=1)
    opts = ScoreOptions(block_size=bs, **flags)
    want_tiles, want_cols = np_tiles(q, k, opts, valid)
    tiles = reference_jit(q, k, opts, valid=valid)
    np.testing.assert_allclose(tiles, want_tiles, rtol=1e-5, atol=1e-7)
    ref_cols = scoring.column_scores(tiles)
    np.testing.assert_allclose(ref_cols, want_cols, rtol=1e-5, atol=1e-7)
    got = block_scores_jit(q, k, opts, valid=valid)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, ref_cols, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref_cols))
    assert np.isneginf(got[1, 2:]).all() and np.isfinite(got[1, :2]).all()


def test_reference_matches_brute_force_mha():
    q, k, bs, _ = case_inputs("mha")
    opts = ScoreOptions(block_size=bs)
    want_tiles, want_cols = np_tiles(q, k, opts)
    tiles = reference_jit(q, k, opts)
    np.testing.assert_allclose(tiles, want_tiles, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(block_scores_jit(q, k, opts), want_cols, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["mha", "gqa", "ragged"])
def test_block_scores_matches_brute_force(case):
    q, k, bs, valid = case_inputs(case, seed=2)
    opts = ScoreOptions(block_size=bs, causal=True, exclude_diagonal=True)
    got = block_scores_jit(q, k, opts, valid=valid)
    np.testing.assert_allclose(got, np_tiles(q, k, opts, valid)[1], rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.asarray(got)).all()


def test_padding_tokens_never_contribute():
    """Ragged T is padded; scoring T real tokens equals scoring them followed by masked garbage."""
    opts = ScoreOptions(block_size=8)
    q, k = make_qk(3, 2, 48, 4, 2, 8)
    real = 44  # 5.5 blocks: the last block is real but only half full
    short = block_scores_jit(q[:, :real], k[:, :real], opts)
    garbage = np.arange(48) >= real
    q_bad = np.where(garbage[None, :, None, None], 100.0, q).astype(np.float32)
    k_bad = np.where(garbage[None, :, None, None], 100.0, k).astype(np.float32)
    valid = np.broadcast_to(~garbage, (2, 48))
    padded = block_scores_jit(q_bad, k_bad, opts, valid=valid)
    assert short.shape == padded.shape == (2, 6)
    assert np.isfinite(np.asarray(short)).all()
    np.testing.assert_allclose(padded, short, rtol=1e-6, atol=0)


def test_head_permutation_invariance():
    """Permuting K heads, together with their groups of query heads (any order inside a group)."""
    q, k = make_qk(5, 2, 32, 6, 3, 8)
    opts = ScoreOptions(block_size=8, divide_by_heads=True, scale_by_sqrt_d=True)
    kv_perm = np.array([2, 0, 1])
    q_perm = np.concatenate([2 * g + np.array([1, 0]) for g in kv_perm])
    base = block_scores_jit(q, k, opts)
    permuted = block_scores_jit(q[:, :, q_perm], k[:, :, kv_perm], opts)
    np.testing.assert_allclose(permuted, base, rtol=1e-6)
    mha_perm = np.random.default_rng(0).permutation(6)
    qm, km = make_qk(6, 1, 32, 6, 6, 8)
    np.testing.assert_allclose(block_scores_jit(qm[:, :, mha_perm], km[:, :, mha_perm], opts),
                               block_scores_jit(qm, km, opts), rtol=1e-6)


def test_no_gradient_flows_through_scores():
    q, k = make_qk(7, 1, 16, 2, 2, 4)
    grads = jax.grad(lambda q, k: scoring.block_scores(q, k, ScoreOptions(block_size=8)).sum(),
                     argnums=(0, 1))(q, k)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_default_options_are_the_artifact_target():
    opts = ScoreOptions()
    assert (opts.block_size, opts.normalizer) == (64, 1024.0)
    assert not (opts.scale_by_sqrt_d or opts.divide_by_heads or opts.causal
                or opts.exclude_diagonal or opts.post_rope)
    with pytest.raises(ValueError, match="block_size"):
        ScoreOptions(block_size=0)


def test_memory_is_linear_in_sequence_length():
    """Doubling T doubles block_scores' temp bytes; the dense reference's grow 4x (T x T logits).

    The valid mask is a runtime argument so the compiler cannot fuse the reference's masking away.
    """
    opts = ScoreOptions(block_size=64)

    def temps(fn, t):
        q = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
        return compiled_memory(jax.jit(fn), q, k, valid).temp_bytes

    def segmented(q, k, valid):
        return scoring.block_scores(q, k, opts, valid=valid)

    def dense(q, k, valid):
        return reference_columns(q, k, opts, valid)

    seg = [temps(segmented, t) for t in (1024, 2048)]
    ref = [temps(dense, t) for t in (1024, 2048)]
    assert seg[1] / seg[0] < 3.0, seg
    assert ref[1] / ref[0] > 3.5, ref
    assert seg[1] < ref[1] / 4, (seg, ref)
    # Far below a single [T, T] fp32 matrix.
    assert seg[1] < 2048 * 2048 * 4 / 8, seg


def test_select_blocks_keeps_floor_of_ratio_ascending():
    rng = np.random.default_rng(8)
    scores = rng.random((3, 10)).astype(np.float32)
    sel = select_jit(jnp.asarray(scores), 0.4, 4)
    k = 4  # floor(0.4 * 10)
    assert sel.indices.shape == (3, k * 4)
    idx = np.asarray(sel.indices)
    assert (np.diff(idx, axis=1) > 0).all()
    assert np.asarray(sel.valid).all()
    for row in range(3):
        top = np.sort(np.argsort(-scores[row], kind="stable")[:k])
        np.testing.assert_array_equal(idx[row], (top[:, None] * 4 + np.arange(4)).ravel())
    # floor, not ceil: 0.4 * 7 = 2.8 -> 2 blocks.
    assert select_jit(jnp.asarray(scores[:, :7]), 0.4, 4).indices.shape == (3, 8)


def test_select_blocks_never_prefers_padding_blocks():
    scores = np.array([[0.5, 3.0, 1.0, -np.inf, -np.inf],
                       [0.1, 0.2, 0.3, 9.0, 8.0]], np.float32)
    # Row 1's blocks 3, 4 lie beyond its valid count, whatever their scores.
    sel = select_jit(jnp.asarray(scores), 0.4, 2, n_valid_blocks=jnp.array([5, 3]))
    np.testing.assert_array_equal(sel.indices, [[2, 3, 4, 5], [2, 3, 4, 5]])
    assert np.asarray(sel.valid).all()
    # Capacity above the number of real blocks: padding blocks fill the slots but are invalid.
    full = select_jit(jnp.asarray(scores), 1.0, 2, n_valid_blocks=jnp.array([5, 3]))
    block_of = np.asarray(full.indices) // 2
    np.testing.assert_array_equal(np.asarray(full.valid), block_of < 3)


def test_select_blocks_marks_tail_past_seq_len_invalid():
    scores = jnp.array([[1.0, 2.0, 3.0]])
    sel = select_jit(scores, 0.7, 4, seq_len=10)  # blocks 1, 2; tokens 10, 11 padding
    np.testing.assert_array_equal(sel.indices, [[4, 5, 6, 7, 8, 9, 10, 11]])
    np.testing.assert_array_equal(sel.valid, [[True] * 6 + [False] * 2])


def test_end_to_end_scores_pick_the_planted_block():
    """A key block that every query attends to strongly is always kept."""
    q, k = make_qk(9, 1, 64, 2, 2, 8, scale=0.1)
    direction = np.ones((8,), np.float32) / math.sqrt(8)
    q = q + direction
    k[:, 40:48] += 5.0 * direction  # block 5 of 8
    scores = block_scores_jit(q, k, ScoreOptions(block_size=8))
    assert int(jnp.argmax(scores[0])) == 5
    sel = select_jit(scores, 0.25, 8)
    assert 40 in np.asarray(sel.indices[0]).tolist()
