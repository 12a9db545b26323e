"""KV-cache decoding (dense and SUBLLM per-level caches) and generation (SUBLLM: prefill == decode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import attention, decode, decode_attention
from tokensparse.config import preset
from tokensparse.generate import Decoder, generate, pad_prompts, sample
from tokensparse.llama import Llama
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm.calibrate import calibrate_thresholds
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import parse_structure, subllm_preset

T = 24                              # every sequence: one compilation of prefill, step and forward
PROMPT_LENGTHS = np.array([4, 9, 6], np.int32)
STEPS = T - int(PROMPT_LENGTHS.max())


def _sharpen(model, factor=12.0):
    """Scale q/k projections so attention is far from uniform: at the init scale softmax barely
    depends on positions, and a position bug would hide below the test tolerance."""
    with model.layers.editing() as layers:  # layers are stored stacked: edit per-layer views
        for block in layers:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.kernel[...] = proj.kernel[...] * factor
    return model


def _subllm(**changes):
    base = subllm_preset("subllm-tiny")
    cfg = base.replace(model=base.model.replace(n_layers=4), structure="T(T(T)T)", **changes)
    return _sharpen(SubLLM(cfg, rngs=nnx.Rngs(0)))


def _tokens(seed=1, shape=(3, T)):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, 256), np.int32)


@functools.partial(nnx.jit, static_argnames=("capacities",))
def _full_forward(model, tokens, capacities=None):
    if isinstance(model, SubLLM):
        h, aux = model.forward(tokens, mode="infer", capacities=capacities)
        return model.head(h), aux
    return model(tokens), {}


def _teacher_forced(decoder, tokens, lengths, steps):
    """Logits from prefill(prompts) and then feeding the true next tokens, [B, steps + 1, V]:
    entry i of row b predicts token lengths[b] + i."""
    logits, cache = decoder.prefill(tokens, lengths)
    out = [np.asarray(logits)]
    rows = np.arange(len(lengths))
    for i in range(steps):
        pos = lengths + i
        logits, cache = decoder.step(cache, tokens[rows, pos], pos)
        out.append(np.asarray(logits))
    return np.stack(out, 1), cache


def _reference(full_logits, lengths, steps):
    idx = lengths[:, None] - 1 + np.arange(steps + 1)[None, :]
    return np.take_along_axis(np.asarray(full_logits), idx[..., None], axis=1)


def test_dense_prefill_then_decode_equals_forward():
    model = _sharpen(Llama(preset("tiny", n_layers=3), rngs=nnx.Rngs(0)))
    tokens = _tokens()
    got, cache = _teacher_forced(Decoder(model, T), tokens, PROMPT_LENGTHS, STEPS)
    np.testing.assert_allclose(got, _reference(_full_forward(model, jnp.asarray(tokens))[0],
                                               PROMPT_LENGTHS, STEPS), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths[0]), PROMPT_LENGTHS + STEPS)


CASES = {  # name: config changes
    "composed": {},
    "overflow": {"infer_capacity": 0.5},
    "parent": {"level_positions": "parent", "infer_capacity": 0.75},
    "per_level": {"infer_capacity": 0.75},  # plus one θ per level, calibrated in the fixture
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    tokens = _tokens()
    changes = dict(CASES[request.param])
    if request.param == "per_level":  # level 2 keeps far fewer than θ_1 would let it
        changes["infer_threshold"] = calibrate_thresholds(_subllm(), tokens, keep=(0.7, 0.35))
    model = _subllm(**changes)
    decoder = Decoder(model, T)
    lay = subllm_decode.layout(model, T)
    full, aux = _full_forward(model, jnp.asarray(tokens), capacities=lay.group_sizes[1:])
    got, cache = _teacher_forced(decoder, tokens, PROMPT_LENGTHS, STEPS)
    return request.param, model, decoder, tokens, lay, full, aux, got, cache


@pytest.mark.xdist_group("test_decode:case")
def test_subllm_prefill_then_decode_equals_forward(case):
    name, model, _, tokens, lay, full, aux, got, _ = case
    np.testing.assert_allclose(got, _reference(full, PROMPT_LENGTHS, STEPS), atol=2e-5, rtol=2e-5)
    # The comparison covered tokens dropped at level 1 and at level 2, with per-row keep patterns.
    sel1, sel2 = aux["selections"]
    kept1 = np.asarray(sel1.valid).sum(1)
    patterns = {tuple(np.asarray(sel1.indices)[b][np.asarray(sel1.valid)[b]]) for b in range(len(kept1))}
    assert np.all(kept1 < T) and len(patterns) == len(kept1)
    assert np.all(np.asarray(sel2.valid).sum(1) < kept1)
    if name == "overflow":  # more tokens wanted level 1 than it had room for: first-come decided
        wanted = (np.asarray(aux["scores"][0]) > 0).sum(1)
        assert np.any(wanted > lay.group_sizes[1]) and np.all(kept1 <= lay.group_sizes[1])


@pytest.mark.xdist_group("test_decode:case")
def test_decode_caches_equal_prefill_caches(case):
    """After decoding, every group's cache (slots, positions, lengths) equals a one-shot prefill's."""
    _, _, decoder, tokens, lay, _, _, _, cache = case
    _, want = decoder.prefill(tokens, PROMPT_LENGTHS + STEPS)
    for g in range(len(lay.group_sizes)):
        n = np.asarray(want.lengths[g])
        np.testing.assert_array_equal(np.asarray(cache.lengths[g]), n)
        for b in range(len(n)):
            np.testing.assert_array_equal(np.asarray(cache.positions[g])[b, :n[b]],
                                          np.asarray(want.positions[g])[b, :n[b]])
    for i, g in enumerate(lay.layer_groups):
        n = np.asarray(want.lengths[g])
        for got_buf, want_buf in ((cache.keys[i], want.keys[i]), (cache.values[i], want.values[i])):
            for b in range(len(n)):
                np.testing.assert_allclose(np.asarray(got_buf)[b, :n[b]], np.asarray(want_buf)[b, :n[b]],
                                           atol=2e-5, rtol=2e-5)


@pytest.mark.xdist_group("test_decode:case")
def test_group_positions_are_original_or_parent_ranks(case):
    name, model, _, _, _, _, aux, _, cache = case
    sel1, sel2 = aux["selections"]
    n1, n2 = (np.asarray(x) for x in cache.lengths[1:])
    pos1, pos2 = (np.asarray(x) for x in cache.positions[1:])
    for b in range(len(n1)):
        kept1 = np.asarray(sel1.indices)[b][np.asarray(sel1.valid)[b]]
        kept2_slots = np.asarray(sel2.indices)[b][np.asarray(sel2.valid)[b]]
        # the level-1 cache holds the kept tokens' original positions, in order
        np.testing.assert_array_equal(pos1[b, :n1[b]], kept1[:n1[b]])
        # level 2: original positions (composed) or the rank in the level-1 stream (parent)
        slot_rank = np.cumsum(np.asarray(sel1.valid)[b]) - 1
        want = slot_rank[kept2_slots] if name == "parent" else np.asarray(sel1.indices)[b][kept2_slots]
        np.testing.assert_array_equal(pos2[b, :n2[b]], want[:n2[b]])


def test_dropped_sequences_leave_inner_caches_untouched():
    model = _subllm()
    decoder = Decoder(model, T)
    tokens = _tokens(seed=3)
    lengths = np.full(3, 8, np.int32)
    _, cache = decoder.prefill(tokens, lengths)
    seen_drop = seen_keep = 0
    for t in range(8, 16):
        before = jax.tree.map(np.array, cache)
        _, cache = decoder.step(cache, tokens[:, t], np.full(3, t, np.int32))
        grew = np.asarray(cache.lengths[1]) - before.lengths[1]
        for i, g in enumerate(subllm_decode.layout(model, T).layer_groups):
            if g == 0:
                continue
            same = np.all(np.asarray(cache.keys[i]) == before.keys[i], axis=(1, 2, 3))
            dropped = (grew == 0) | (np.asarray(cache.lengths[g]) == before.lengths[g])
            assert np.all(same[dropped])
        seen_drop += int(np.sum(grew == 0))
        seen_keep += int(np.sum(grew == 1))
    assert seen_drop and seen_keep  # both outcomes happened


def test_region_tree_and_layout():
    model = _subllm(infer_capacity=0.5)
    lay = subllm_decode.layout(model, 100)
    assert lay.group_sizes == (100, 50, 25)
    assert lay.layer_groups == (0, 1, 2, 1)
    tree = subllm_decode.region_tree(parse_structure("TT(T)T(T(T))"))
    assert [type(i).__name__ for i in tree.items] == ["int", "int", "Region", "int", "Region"]
    assert tree.items[4].items[1].group == 3 and tree.items[4].items[1].parent == 2


# --- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_model():
    return _subllm()


@pytest.fixture(scope="module")
def gen_decoder(gen_model):
    return Decoder(gen_model, T)


def test_greedy_generation_equals_repeated_full_forward(gen_model, gen_decoder):
    prompts = [[5, 9, 33, 2], [7, 1]]
    out = generate(gen_model, prompts, max_new_tokens=6, decoder=gen_decoder)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            padded = jnp.asarray([seq + [0] * (T - len(seq))], jnp.int32)
            logits = _full_forward(gen_model, padded, subllm_decode.layout(gen_model, T).group_sizes[1:])[0]
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert out.sequences[b, :len(seq)].tolist() == seq
        assert out.lengths[b] == len(seq)


def test_eos_stops_a_row_and_pads_it(gen_model, gen_decoder):
    first = generate(gen_model, [[5, 9, 33, 2]], max_new_tokens=6, decoder=gen_decoder).new_tokens[0]
    eos = int(first[2])
    out = generate(gen_model, [[5, 9, 33, 2]], max_new_tokens=6, eos_id=eos, pad_id=0, decoder=gen_decoder)
    stop = first.tolist().index(eos)
    assert out.new_tokens[0, :stop + 1].tolist() == first[:stop + 1].tolist()
    assert np.all(out.new_tokens[0, stop + 1:] == 0) and out.lengths[0] == 4 + stop + 1


def test_sampling():
    logits = jnp.asarray([[0.0, 3.0, 1.0, -2.0]] * 4000)
    assert np.all(np.asarray(sample(logits, None)) == 1)
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=1.0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.03)
    nucleus = np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_p=0.9))
    assert set(np.unique(nucleus).tolist()) == {1, 2}  # p = .84, .11, .04, .01: the top two reach 0.9
    assert np.all(np.asarray(sample(logits, jax.random.key(1), temperature=1.0, top_p=0.5)) == 1)


def test_temperature_generation_is_reproducible(gen_model, gen_decoder):
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=0.9, decoder=gen_decoder)
    a = generate(gen_model, [[5, 9]], rng=jax.random.key(3), **kw)
    b = generate(gen_model, [[5, 9]], rng=jax.random.key(3), **kw)
    c = generate(gen_model, [[5, 9]], rng=jax.random.key(4), **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.new_tokens, c.new_tokens)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2, "temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 2, "top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 2, "temperature": 0.5}, "rng"),
    ({"max_new_tokens": 30, "max_len": 8}, "max_len"),
])
def test_generate_bad_arguments(gen_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(gen_model, [[1, 2]], **kwargs)


def test_bad_prompts(gen_model):
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([])
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1], []])
    with pytest.raises(ValueError, match="token ids"):
        generate(gen_model, [[1, 999]], max_new_tokens=1)


# --- length-bounded decode attention and the end of the cache ------------------------------------


def test_bucket_sizes_cover_every_filled_length():
    for size in (1, 5, 40, 2304, 3072, 4096):
        sizes = decode_attention.bucket_sizes(size)
        assert sizes[-1] == size and list(sizes) == sorted(set(sizes))
        assert len(sizes) <= decode_attention.DECODE_BUCKETS
        for n in range(1, size + 1):  # the bucket for n filled slots wastes < size/buckets + multiple
            bucket = min(x for x in sizes if x >= n)
            assert bucket - n < size / decode_attention.DECODE_BUCKETS + decode_attention.BUCKET_MULTIPLE


def _core(backend):
    def core(q, k, v, pos, seg, kv_pos, kv_seg):
        return attention.attention(q, k, v, q_positions=pos, kv_positions=kv_pos, q_segment_ids=seg,
                                   kv_segment_ids=kv_seg, backend=backend)
    return core


@pytest.mark.parametrize("filled", [[3, 17, 29], [1, 2, 9], [40, 5, 0]])
@pytest.mark.parametrize("core", [None, "reference", "xla"])
def test_stacked_attention_equals_full_buffer(core, filled):
    """Attention over the filled prefix of layer 1 of a head-major stack (ragged per row; grouped
    queries; two queries per row, at positions that need not be slots) equals the reference over
    that layer's full token-major buffer with the unfilled slots masked, forward and gradient, with
    the plain-JAX slice attention (``None``) and with a backend core. The unfilled slots hold large
    garbage, which a cut at too short a bucket or a mask leak would show; a query that sees no key
    returns zeros."""
    n, b, s, h, hkv, d, tq = 3, 3, 40, 4, 2, 8, 2
    keys = jax.random.split(jax.random.key(1), 4)
    filled = jnp.asarray(filled, jnp.int32)
    unfilled = (jnp.arange(s)[None, :] >= filled[:, None])[None, :, None, :, None]
    key_stack = jnp.where(unfilled, 30.0, jax.random.normal(keys[0], (n, b, hkv, s, d)))
    value_stack = jnp.where(unfilled, 1e3, jax.random.normal(keys[1], (n, b, hkv, s, d)))
    q = jax.random.normal(keys[2], (b, tq, h, d))
    cot = jax.random.normal(keys[3], (b, tq, h, d))
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) * 2, (b, s))
    kv_seg = jnp.where(unfilled[0, :, 0, :, 0], -1, 0).astype(jnp.int32)
    pos = jnp.stack([2 * filled - 3, 2 * filled - 2], axis=1)  # the second query sees one key more
    q_seg = jnp.zeros((b, tq), jnp.int32)

    def bounded(q, ks, vs):
        return decode_attention.stacked_attention(
            q, ks, vs, jnp.int32(1), q_positions=pos, kv_positions=kv_pos, kv_segment_ids=kv_seg,
            filled=filled, core=None if core is None else _core(core))

    def full(q, ks, vs):
        return attention.reference_attention(
            q, jnp.swapaxes(ks[1], 1, 2), jnp.swapaxes(vs[1], 1, 2), q_positions=pos,
            kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    def loss(fn, *args):
        out = fn(*args)
        return jnp.sum(out * cot), out

    (_, want), want_grads = jax.value_and_grad(functools.partial(loss, full), (0, 1, 2),
                                               has_aux=True)(q, key_stack, value_stack)
    (_, got), got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, bounded), (0, 1, 2),
                                                     has_aux=True))(q, key_stack, value_stack)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(want))) < 10  # the garbage values stayed out of both
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    # a query sees a key iff its row holds one at a position <= its own (slot 0 sits at position 0)
    sees = (np.asarray(filled)[:, None] > 0) & (np.asarray(pos) >= 0)
    assert np.all(np.asarray(got)[~sees] == 0) and np.all(np.abs(np.asarray(got)[sees]).sum(-1) > 0)


def test_decoding_past_the_end_raises_eagerly_and_is_flagged_under_jit():
    model = Llama(preset("tiny", n_layers=2), rngs=nnx.Rngs(0))
    tokens, lengths = jnp.asarray(_tokens(shape=(2, 6))), jnp.asarray([6, 4], jnp.int32)
    _, cache = decode.prefill(model, tokens, lengths, 6)
    token, positions = jnp.zeros(2, jnp.int32), jnp.asarray([6, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"rows \[0\] already hold max_len=6"):
        decode.decode_step(model, cache, token, positions)
    _, after = nnx.jit(decode.decode_step)(model, cache, token, positions)
    assert np.asarray(decode.overflowed(after)).tolist() == [True, False]
    assert not np.any(np.asarray(decode.overflowed(cache)))
    decoder = Decoder(model, 6)
    with pytest.raises(ValueError, match=r"Decoder.step: positions \[6\] \(rows \[0\]\)"):
        decoder.step(cache, token, positions)
    _, cache = decoder.prefill(tokens, jnp.asarray([5, 4], jnp.int32))
    _, cache = decoder.step(cache, token, jnp.asarray([5, 4], jnp.int32))  # the last slot is fine
    assert np.asarray(cache.lengths[0]).tolist() == [6, 5]
