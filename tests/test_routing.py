"""Static-capacity routing against NumPy brute force: capacities, selections, gather/scatter."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensparse import routing
from tokensparse.routing import Selection

# Jitted once; capacity / block size are static, so each (shape, capacity) compiles once.
topk_jit = jax.jit(routing.topk_select, static_argnums=1)
threshold_jit = jax.jit(routing.threshold_select, static_argnums=1)
block_topk_jit = jax.jit(routing.block_topk_select, static_argnums=(1, 2))
gather_jit = jax.jit(routing.gather, static_argnames="fill_value")
scatter_jit = jax.jit(routing.scatter_add)


# Hypothesis varies the data over a few fixed (batch, n, capacity) shapes so that each jitted
# function compiles only a handful of times; the shapes cover k == 1, k == n and k < n.
SCORE_SHAPES = [(1, 1, 1), (2, 5, 2), (3, 8, 8), (2, 12, 5)]
BLOCK_SHAPES = [(1, 3, 1), (2, 6, 4)]
SELECTION_SHAPES = [(1, 1, 1), (2, 6, 3), (3, 7, 7)]

# ----------------------------------------------------------------------------- brute force


def np_capacity(n: int, keep_ratio: float, multiple: int = 1, rounding: str = "ceil") -> int:
    """Exact rational arithmetic on the decimal ratio the user wrote: no float noise to guard."""
    exact = Fraction(str(keep_ratio)) * n
    k = math.ceil(exact) if rounding == "ceil" else math.floor(exact)
    k = max(k, 1)
    while k % multiple:
        k += 1
    return min(k, n)


def np_topk_row(scores: np.ndarray, k: int, valid: np.ndarray | None = None) -> list[int]:
    """The k chosen positions: valid before invalid, then higher score, then lower index."""
    n = scores.shape[0]
    valid = np.ones(n, bool) if valid is None else valid
    order = sorted(range(n), key=lambda i: (not valid[i], -scores[i], i))
    return sorted(order[:k])


def np_threshold_row(scores, capacity, threshold, valid=None) -> list[int]:
    keep = scores > threshold
    if valid is not None:
        keep &= valid
    return [int(i) for i in np.flatnonzero(keep)[:capacity]]


def np_gather(x: np.ndarray, idx: np.ndarray, valid: np.ndarray, fill=None) -> np.ndarray:
    b, k = idx.shape
    out = np.stack([x[i, idx[i]] for i in range(b)])
    if fill is not None:
        for i in range(b):
            for j in range(k):
                if not valid[i, j]:
                    out[i, j] = fill
    return out


def np_scatter_add(base: np.ndarray, idx: np.ndarray, valid: np.ndarray, values: np.ndarray):
    out = base.copy()
    b, k = idx.shape
    for i in range(b):
        for j in range(k):
            if valid[i, j]:
                out[i, idx[i, j]] += values[i, j]
    return out


def check_selection_structure(sel: Selection, n: int, k: int, batch: int) -> None:
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    assert idx.shape == (batch, k) and valid.shape == (batch, k)
    assert sel.capacity == k
    assert np.issubdtype(idx.dtype, np.integer) and valid.dtype == np.bool_
    assert (idx >= 0).all() and (idx < n).all()
    for row in idx:
        assert (np.diff(row) > 0).all(), f"indices not strictly ascending/unique: {row}"


def valid_indices(sel: Selection, row: int) -> list[int]:
    idx, valid = np.asarray(sel.indices[row]), np.asarray(sel.valid[row])
    return [int(i) for i in idx[valid]]


@st.composite
def score_batches(draw, shapes=SCORE_SHAPES, distinct=True, with_valid=False):
    b, n, k = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if distinct:
        scores = np.stack([rng.permutation(n) for _ in range(b)]).astype(np.float32)
        scores = scores * 0.75 - n / 3
    else:  # heavy ties on purpose
        scores = rng.integers(0, 3, size=(b, n)).astype(np.float32)
    valid = rng.random((b, n)) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])) if with_valid else None
    return scores, k, valid


# ----------------------------------------------------------------------------- capacity


def test_capacity_spec_examples():
    assert routing.capacity(4096, 0.64) == 2622  # SUBLLM: ceil(2621.44)
    assert routing.capacity(2622, 0.64) == 1679  # SUBLLM nested level: ceil(1678.08)
    assert routing.capacity(4096, 0.5) == 2048
    for nb in (1, 5, 10, 16, 64, 100, 512):  # LeMo: floor(0.4 * nb), at least one block
        expected = max(1, math.floor(Fraction(2, 5) * nb))
        assert routing.capacity(nb, 0.4, rounding="floor") == expected
    assert routing.capacity(10, 0.4, rounding="floor") == 4
    assert routing.capacity(12, 0.4, rounding="floor") == 4
    assert routing.capacity(12, 0.4, rounding="ceil") == 5
    assert routing.capacity(1, 0.01) == 1
    assert routing.capacity(7, 1.0) == 7


@given(
    n=st.integers(1, 100_000),
    keep_ratio=st.integers(1, 10_000).map(lambda i: i / 10_000),
    multiple=st.sampled_from([1, 2, 3, 8, 64, 128]),
    rounding=st.sampled_from(["ceil", "floor"]),
)
def test_capacity_matches_exact_rational_rule(n, keep_ratio, multiple, rounding):
    k = routing.capacity(n, keep_ratio, multiple=multiple, rounding=rounding)
    assert isinstance(k, int)
    assert k == np_capacity(n, keep_ratio, multiple, rounding)
    assert 1 <= k <= n
    assert k % multiple == 0 or k == n


def test_capacity_exhaustive_small_grid_including_float_noise():
    """Every n ≤ 150 × every two-decimal ratio, e.g. 10 * 0.3 == 3.0000000000000004 in floats."""
    noisy = 0
    for n in range(1, 151):
        for pct in range(1, 101):
            ratio = pct / 100
            noisy += n * ratio != Fraction(pct, 100) * n
            for rounding in ("ceil", "floor"):
                assert routing.capacity(n, ratio, rounding=rounding) == np_capacity(
                    n, ratio, 1, rounding), (n, ratio, rounding)
    assert noisy > 100  # the grid really exercises float noise


def test_capacity_multiple_rounds_up_but_never_past_n():
    assert routing.capacity(100, 0.3, multiple=8) == 32
    assert routing.capacity(100, 0.32, multiple=8) == 32
    assert routing.capacity(100, 0.33, multiple=8) == 40
    assert routing.capacity(100, 0.99, multiple=64) == 100
    assert routing.capacity(5, 0.1, multiple=4) == 4


@pytest.mark.parametrize("keep_ratio", [0.0, -0.5, 1.0000001, 2.0])
def test_capacity_rejects_bad_keep_ratio(keep_ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        routing.capacity(16, keep_ratio)


@pytest.mark.parametrize("n", [0, -3])
def test_capacity_rejects_non_positive_n(n):
    with pytest.raises(ValueError, match="n="):
        routing.capacity(n, 0.5)


def test_capacity_rejects_bad_multiple_and_rounding():
    with pytest.raises(ValueError, match="multiple"):
        routing.capacity(16, 0.5, multiple=0)
    with pytest.raises(ValueError, match="rounding"):
        routing.capacity(16, 0.5, rounding="nearest")


# ----------------------------------------------------------------------------- topk_select


@given(score_batches())
def test_topk_matches_numpy_topk_set(case):
    scores, k, _ = case
    b, n = scores.shape
    sel = topk_jit(jnp.asarray(scores), k)
    check_selection_structure(sel, n, k, b)
    assert np.asarray(sel.valid).all()
    for i in range(b):
        expected = np.sort(np.argsort(-scores[i], kind="stable")[:k])
        np.testing.assert_array_equal(np.asarray(sel.indices[i]), expected)


@given(score_batches(distinct=False))
def test_topk_ties_break_towards_lower_index(case):
    scores, k, _ = case
    sel = topk_jit(jnp.asarray(scores), k)
    for i in range(scores.shape[0]):
        assert valid_indices(sel, i) == np_topk_row(scores[i], k)


@pytest.mark.parametrize("n,k", [(1, 1), (6, 3), (9, 9)])
def test_topk_all_equal_scores_pick_prefix(n, k):
    sel = topk_jit(jnp.full((2, n), 0.25), k)
    np.testing.assert_array_equal(np.asarray(sel.indices), np.tile(np.arange(k), (2, 1)))
    assert np.asarray(sel.valid).all()


def test_topk_is_deterministic_across_calls():
    scores = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 11)), jnp.float32)
    first = topk_jit(scores, 5)
    for _ in range(3):
        again = routing.topk_select(scores, 5)
        np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(first.indices))


@given(score_batches(with_valid=True))
def test_topk_respects_valid_mask(case):
    scores, k, valid = case
    b, n = scores.shape
    sel = topk_jit(jnp.asarray(scores), k, jnp.asarray(valid))
    check_selection_structure(sel, n, k, b)
    idx, sv = np.asarray(sel.indices), np.asarray(sel.valid)
    for i in range(b):
        n_valid = int(valid[i].sum())
        # The slot's valid flag is the position's validity; never an invalid position while valid
        # ones remain, and exactly the surplus slots are flagged invalid.
        np.testing.assert_array_equal(sv[i], valid[i][idx[i]])
        assert int(sv[i].sum()) == min(k, n_valid)
        assert valid_indices(sel, i) == [j for j in np_topk_row(scores[i], k, valid[i])
                                         if valid[i][j]]


def test_topk_fewer_valid_than_capacity_marks_surplus_invalid():
    scores = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    valid = jnp.asarray([[False, True, False, False, True, False]])
    sel = topk_jit(scores, 4, valid)
    assert valid_indices(sel, 0) == [1, 4]
    assert int(sel.valid.sum()) == 2
    check_selection_structure(sel, 6, 4, 1)


def test_topk_prefers_valid_positions_even_with_minus_inf_scores():
    # A valid position whose score is -inf (e.g. log of a zero probability) must still beat an
    # invalid position: "invalid positions are never chosen while valid ones remain".
    scores = jnp.asarray([[0.0, -jnp.inf, 1.0, -jnp.inf]])
    valid = jnp.asarray([[False, True, False, True]])
    sel = routing.topk_select(scores, 2, valid)
    assert valid_indices(sel, 0) == [1, 3]
    assert np.asarray(sel.valid).all()


@pytest.mark.parametrize("bad", [0, -1, 6, 100])
def test_topk_rejects_out_of_range_capacity(bad):
    with pytest.raises(ValueError, match=r"capacity=.*<= 5"):
        routing.topk_select(jnp.zeros((2, 5)), bad)


@pytest.mark.parametrize("bad", [2.0, True, "2", None])
def test_topk_rejects_non_int_capacity(bad):
    with pytest.raises(TypeError, match="capacity"):
        routing.topk_select(jnp.zeros((2, 5)), bad)


def test_topk_rejects_traced_capacity():
    with pytest.raises(TypeError, match="static integer"):
        jax.jit(routing.topk_select)(jnp.zeros((2, 5)), 2)


def test_selection_functions_give_scores_zero_gradient():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
    scores = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)
    block_scores = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)

    def through_topk(s):
        return jnp.sum(routing.gather(x, routing.topk_select(s * 3.0, 3)) ** 2)

    def through_threshold(s):
        return jnp.sum(routing.gather(x, routing.threshold_select(s, 4), fill_value=0.0))

    def through_blocks(s):
        sel = routing.block_topk_select(s[:, :3], 2, 2)
        return jnp.sum(routing.gather(jnp.concatenate([x, x], 1), sel) * 2.0)

    cases = [(through_topk, scores), (through_threshold, scores), (through_blocks, block_scores)]
    for fn, s in cases:
        grad = jax.jit(jax.grad(fn))(s)
        assert grad.shape == s.shape
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


# ----------------------------------------------------------------------------- threshold_select


@given(score_batches(with_valid=True), st.sampled_from([-0.5, 0.0, 0.5]), st.booleans())
def test_threshold_keeps_first_come_above_threshold(case, threshold, use_valid):
    scores, k, valid = case
    b, n = scores.shape
    valid = valid if use_valid else np.ones_like(valid)  # valid=None: test_threshold_strictly_...
    sel = threshold_jit(jnp.asarray(scores), k, threshold, jnp.asarray(valid))
    check_selection_structure(sel, n, k, b)
    for i in range(b):
        expected = np_threshold_row(scores[i], k, threshold, valid[i])
        assert valid_indices(sel, i) == expected
        assert int(np.asarray(sel.valid[i]).sum()) == len(expected)


def test_threshold_strictly_greater_and_fits():
    scores = jnp.asarray([[0.0, 1.0, -1.0, 2.0, 0.0, 3.0]])
    sel = threshold_jit(scores, 4, 0.0, None)
    assert valid_indices(sel, 0) == [1, 3, 5]
    assert int(sel.valid.sum()) == 3


def test_threshold_overflow_keeps_earliest():
    scores = jnp.asarray([[1.0, -1.0, 9.0, 2.0, 8.0, 7.0, 0.5]])
    sel = threshold_jit(scores, 3, 0.0, None)
    assert valid_indices(sel, 0) == [0, 2, 3]  # not the three largest (2, 4, 5)
    assert np.asarray(sel.valid).all()


@given(st.integers(0, 2**32 - 1), st.sampled_from([s for s in SCORE_SHAPES if s[1] > 1]),
       st.data())
def test_threshold_is_causal(seed, shape, data):
    rng = np.random.default_rng(seed)
    b, n, k = shape
    t = data.draw(st.integers(0, n - 2))
    scores = rng.normal(size=(b, n)).astype(np.float32)
    valid = rng.random((b, n)) < 0.8
    changed = scores.copy()
    changed[:, t + 1:] = rng.normal(size=(b, n - t - 1)) * 5
    valid_changed = valid.copy()
    valid_changed[:, t + 1:] = rng.random((b, n - t - 1)) < 0.5
    a = threshold_jit(jnp.asarray(scores), k, 0.0, jnp.asarray(valid))
    c = threshold_jit(jnp.asarray(changed), k, 0.0, jnp.asarray(valid_changed))
    for i in range(b):
        kept_a, kept_c = ([j for j in valid_indices(sel, i) if j <= t] for sel in (a, c))
        assert kept_a == kept_c


# ----------------------------------------------------------------------------- blocks


@given(score_batches(BLOCK_SHAPES, with_valid=True), st.sampled_from([1, 4]), st.booleans())
def test_block_topk_expands_to_token_indices(case, block_size, use_valid):
    block_scores, kb, valid_blocks = case
    b, nb = block_scores.shape
    valid_blocks = valid_blocks if use_valid else np.ones_like(block_scores, bool)
    sel = block_topk_jit(jnp.asarray(block_scores), block_size, kb, jnp.asarray(valid_blocks))
    check_selection_structure(sel, nb * block_size, kb * block_size, b)
    idx, sv = np.asarray(sel.indices), np.asarray(sel.valid)
    for i in range(b):
        blocks = np_topk_row(block_scores[i], kb, valid_blocks[i])
        expected_idx = np.concatenate([blk * block_size + np.arange(block_size) for blk in blocks])
        expected_valid = np.repeat(valid_blocks[i][blocks], block_size)
        if valid_blocks[i].sum() >= kb:
            np.testing.assert_array_equal(idx[i], expected_idx)
        # Padding blocks are invalid in every one of their token slots.
        np.testing.assert_array_equal(sv[i], valid_blocks[i][idx[i] // block_size])
        assert int(sv[i].sum()) == int(expected_valid.sum())
        kept_tokens = idx[i][sv[i]]
        np.testing.assert_array_equal(kept_tokens, expected_idx[expected_valid])


def test_expand_blocks_layout():
    blocks = Selection(jnp.asarray([[0, 2], [1, 3]], jnp.int32),
                       jnp.asarray([[True, False], [True, True]]))
    tok = routing.expand_blocks(blocks, 3)
    np.testing.assert_array_equal(np.asarray(tok.indices),
                                  [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]])
    np.testing.assert_array_equal(np.asarray(tok.valid),
                                  [[True] * 3 + [False] * 3, [True] * 6])
    assert tok.capacity == 6


def test_block_topk_padding_blocks_invalid_and_bad_args():
    block_scores = jnp.asarray([[3.0, 2.0, 1.0, 0.0]])
    valid_blocks = jnp.asarray([[False, True, False, False]])
    sel = routing.block_topk_select(block_scores, 2, 2, valid_blocks)
    assert valid_indices(sel, 0) == [2, 3]
    assert int(sel.valid.sum()) == 2
    with pytest.raises(ValueError, match="block_size"):
        routing.block_topk_select(block_scores, 0, 2)
    with pytest.raises(ValueError, match="capacity"):
        routing.block_topk_select(block_scores, 2, 5)


# ----------------------------------------------------------------------------- gather / scatter


@st.composite
def selections(draw):
    """Arbitrary selections: valid slots distinct & ascending, invalid slots point anywhere."""
    b, n, k = draw(st.sampled_from(SELECTION_SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(b)]).astype(np.int32)
    valid = rng.random((b, k)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    # Invalid slots may duplicate a valid index or point at an otherwise unselected row.
    junk = rng.integers(0, n, (b, k)).astype(np.int32)
    idx = np.where(valid, idx, junk)
    return n, idx, valid, rng


FEATURE_SHAPES = [(), (3,), (2, 3)]


@pytest.mark.parametrize("feat", FEATURE_SHAPES)
@given(case=selections())
def test_gather_matches_numpy(feat, case):
    n, idx, valid, rng = case
    b = idx.shape[0]
    x = rng.normal(size=(b, n, *feat)).astype(np.float32)
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(gather_jit(jnp.asarray(x), sel)),
                                  np_gather(x, idx, valid))
    np.testing.assert_array_equal(np.asarray(gather_jit(jnp.asarray(x), sel, fill_value=-1)),
                                  np_gather(x, idx, valid, fill=-1.0))


def test_gather_fill_value_on_integer_ids():
    seg = jnp.asarray([[4, 5, 6, 7]], jnp.int32)
    sel = Selection(jnp.asarray([[0, 2, 3]], jnp.int32), jnp.asarray([[True, False, True]]))
    out = routing.gather(seg, sel, fill_value=-1)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), [[4, -1, 7]])


@pytest.mark.parametrize("feat", FEATURE_SHAPES)
@given(case=selections())
def test_scatter_add_matches_numpy_and_drops_invalid(feat, case):
    n, idx, valid, rng = case
    b, k = idx.shape
    base = rng.normal(size=(b, n, *feat)).astype(np.float32)
    values = rng.normal(size=(b, k, *feat)).astype(np.float32) * 10
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))
    out = np.asarray(scatter_jit(jnp.asarray(base), sel, jnp.asarray(values)))
    np.testing.assert_allclose(out, np_scatter_add(base, idx, valid, values), rtol=0, atol=0)


@given(case=selections())
def test_scatter_add_leaves_unselected_rows_bit_identical(case):
    n, idx, valid, rng = case
    b, k = idx.shape
    base = rng.normal(size=(b, n, 2)).astype(np.float32)
    base[:, ::2] = -0.0
    values = rng.normal(size=(b, k, 2)).astype(np.float32)
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))
    out = np.asarray(scatter_jit(jnp.asarray(base), sel, jnp.asarray(values)))
    for i in range(b):
        touched = set(idx[i][valid[i]].tolist())
        for row in range(n):
            if row not in touched:
                np.testing.assert_array_equal(out[i, row].view(np.uint32),
                                              base[i, row].view(np.uint32))


def test_scatter_add_invalid_duplicate_and_stray_slots_write_nothing():
    base = np.array([[[-0.0], [1.0], [-0.0], [3.0]]], np.float32)
    sel = Selection(jnp.asarray([[1, 1, 2]], jnp.int32), jnp.asarray([[True, False, False]]))
    values = jnp.asarray([[[10.0], [100.0], [1000.0]]])
    out = np.asarray(routing.scatter_add(jnp.asarray(base), sel, values))
    np.testing.assert_array_equal(out[..., 0], [[-0.0, 11.0, -0.0, 3.0]])
    assert np.signbit(out[0, 0, 0]) and np.signbit(out[0, 2, 0])


@given(case=selections())
def test_gather_scatter_roundtrip_is_identity_on_kept_rows(case):
    n, idx, valid, rng = case
    b = idx.shape[0]
    x = rng.normal(size=(b, n, 2, 3)).astype(np.float32)
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))
    out = np.asarray(scatter_jit(jnp.zeros(x.shape), sel, gather_jit(jnp.asarray(x), sel)))
    for i in range(b):
        kept = np.zeros(n, bool)
        kept[idx[i][valid[i]]] = True
        np.testing.assert_array_equal(out[i][kept], x[i][kept])
        np.testing.assert_array_equal(out[i][~kept], 0.0)


@jax.jit
def _gather_grads(x, sel, w, w_fill):
    plain = jax.grad(lambda x: jnp.sum(routing.gather(x, sel) * w))(x)
    filled = jax.grad(lambda x: jnp.sum(routing.gather(x, sel, fill_value=0.0) * w_fill))(x)
    return plain, filled


@jax.jit
def _scatter_grads(base, sel, values, w):
    return jax.grad(lambda b, v: jnp.sum(routing.scatter_add(b, sel, v) * w), (0, 1))(base, values)


@pytest.mark.parametrize("feat", FEATURE_SHAPES)
@given(case=selections())
def test_gather_and_scatter_gradients_match_numpy(feat, case):
    n, idx, valid, rng = case
    b, k = idx.shape
    x = rng.normal(size=(b, n, *feat)).astype(np.float32)
    w = rng.normal(size=(b, k, *feat)).astype(np.float32)
    w_out = rng.normal(size=(b, n, *feat)).astype(np.float32)
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))

    # d/dx sum(gather(x) * w): every slot reads its row; with a fill value only valid slots do.
    expected_plain = np.zeros_like(x)
    expected_filled = np.zeros_like(x)
    for i in range(b):
        for j in range(k):
            expected_plain[i, idx[i, j]] += w[i, j]
            if valid[i, j]:
                expected_filled[i, idx[i, j]] += w[i, j]
    plain, filled = _gather_grads(jnp.asarray(x), sel, jnp.asarray(w), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(plain), expected_plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(filled), expected_filled, rtol=1e-6, atol=1e-6)

    # d/dvalues sum(scatter_add(base, values) * w_out): w_out at the slot's row; 0 if invalid.
    expected_values = np.zeros_like(w)
    for i in range(b):
        for j in range(k):
            if valid[i, j]:
                expected_values[i, j] = w_out[i, idx[i, j]]
    g_base, g_values = _scatter_grads(jnp.asarray(x), sel, jnp.asarray(w), jnp.asarray(w_out))
    np.testing.assert_array_equal(np.asarray(g_base), w_out)
    np.testing.assert_array_equal(np.asarray(g_values), expected_values)


def test_scatter_add_casts_values_to_base_dtype():
    base = jnp.zeros((1, 3, 2), jnp.float32)
    sel = Selection(jnp.asarray([[2]], jnp.int32), jnp.asarray([[True]]))
    out = routing.scatter_add(base, sel, jnp.ones((1, 1, 2), jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out[0, 2]), 1.0)


# ----------------------------------------------------------------------------- all_tokens


@pytest.mark.parametrize("feat", FEATURE_SHAPES)
def test_all_tokens_is_identity_routing(feat):
    b, n = 2, 5
    sel = routing.all_tokens(b, n)
    check_selection_structure(sel, n, n, b)
    assert np.asarray(sel.valid).all()
    np.testing.assert_array_equal(np.asarray(sel.indices), np.tile(np.arange(n), (b, 1)))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(b, n, *feat)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(gather_jit(x, sel)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(scatter_jit(jnp.zeros_like(x), sel, x)), np.asarray(x))
    y = routing.scatter_add(x, sel, gather_jit(x, sel) * 2.0)
    np.testing.assert_allclose(np.asarray(y), 3.0 * np.asarray(x), rtol=1e-6)


def test_routing_pipeline_under_jit_matches_dense_residual():
    """topk → gather → f → scatter_add under one jit equals the NumPy residual update."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 8, 3)).astype(np.float32)
    scores = rng.normal(size=(2, 8)).astype(np.float32)
    valid = np.ones((2, 8), bool)
    valid[1, 5:] = False

    @jax.jit
    def step(x, scores, valid):
        sel = routing.topk_select(scores, 4, valid)
        y = jnp.tanh(routing.gather(x, sel))
        return routing.scatter_add(x, sel, y)

    out = np.asarray(step(jnp.asarray(x), jnp.asarray(scores), jnp.asarray(valid)))
    expected = x.copy()
    for i in range(2):
        for j in np_topk_row(scores[i], 4, valid[i]):
            if valid[i, j]:
                expected[i, j] += np.tanh(x[i, j])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
