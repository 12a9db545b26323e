"""LeMo pattern predictors: shapes and math against NumPy, pruning, zero counters, recall,
training (loss falls, exact resume), save/load, and predictor-driven selection in the LeMo forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import data, lora, routing, train
from tokensparse.checkpoint import CheckpointError
from tokensparse.config import LeMoConfig, LoRAConfig, preset
from tokensparse.lemo import predictor, scoring
from tokensparse.lemo import predictor_metrics as pm
from tokensparse.lemo import predictor_training as pt
from tokensparse.lemo import targets as target_store
from tokensparse.lemo.forward import check_lemo, lemo_loss
from tokensparse.lemo.selection import layer_selection
from tokensparse.llama import Llama
from tokensparse.metrics import compiled_memory

CONFIG = preset("tiny", n_layers=3)  # d_model 64, 4 heads (slices of 16), head_dim 16
BLOCK, T = 16, 128


def _model(seed=0, config=CONFIG):
    return Llama(config, rngs=nnx.Rngs(seed))


def _predictors(seed=0, **kw):
    return predictor.LeMoPredictors(CONFIG, block_size=BLOCK, h1=8, h2=24, rngs=nnx.Rngs(seed), **kw)


def _x(seed=0, b=2, t=T):
    return jax.random.normal(jax.random.key(seed), (b, t, CONFIG.d_model))


def _windows(seed=0, t=T):
    docs = [np.random.default_rng(i).integers(1, CONFIG.vocab_size, 700) for i in range(3)]
    return data.WindowBatches(docs, batch_size=1, seq_len=t, seed=seed)


# ----------------------------------------------------------------------------- math


def test_block_rows_are_head_slices_of_each_block():
    x = np.asarray(_x(1))
    rows = np.asarray(predictor.block_rows(jnp.asarray(x), n_heads=4, block_size=BLOCK))
    assert rows.shape == (2, 4, T // BLOCK, BLOCK * 16)
    for b, h, n in [(0, 0, 0), (1, 3, 5), (0, 2, 7)]:
        expected = x[b, n * BLOCK:(n + 1) * BLOCK, h * 16:(h + 1) * 16].reshape(-1)
        np.testing.assert_array_equal(rows[b, h, n], expected)
    with pytest.raises(ValueError, match="multiple of the block size"):
        predictor.block_rows(jnp.zeros((1, T + 1, 64)), 4, BLOCK)


def test_path_forward_matches_numpy():
    rng = np.random.default_rng(0)
    w = {"w1": rng.normal(size=(32, 8)), "w2": rng.normal(size=(8, 5)), "w3": rng.normal(size=(5, 3))}
    rows = rng.normal(size=(2, 4, 32))
    out, (a1, a2) = predictor.path_forward({k: jnp.asarray(v) for k, v in w.items()},
                                           jnp.asarray(rows), jnp.float32)
    h1 = np.maximum(rows @ w["w1"], 0)
    h2 = np.maximum(h1 @ w["w2"], 0)
    np.testing.assert_allclose(a1, rows @ w["w1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a2, h1 @ w["w2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, h2 @ w["w3"], rtol=1e-5, atol=1e-5)


def test_column_scores_equal_column_sums_of_the_tile_matrix():
    q_hat, k_hat = (jax.random.normal(jax.random.key(i), (2, 4, 9, 16)) for i in (1, 2))
    tiles = np.asarray(predictor.predicted_tiles(q_hat, k_hat))
    brute = np.einsum("bhmd,bhnd->bmn", np.asarray(q_hat, np.float64), np.asarray(k_hat, np.float64))
    np.testing.assert_allclose(tiles, brute, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(predictor.predicted_column_scores(q_hat, k_hat), brute.sum(axis=1),
                               rtol=1e-4, atol=1e-3)


def test_layer_predictor_shapes_and_no_gradient_into_its_input():
    p = _predictors().for_layer(0)
    x = _x()
    assert p.tiles(x).shape == (2, T // BLOCK, T // BLOCK)
    assert p.column_scores(x).shape == (2, T // BLOCK)
    grad = jax.grad(lambda x: p.column_scores(x).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)


def test_predictors_cover_every_layer_but_the_last_by_default_and_count_their_params():
    p = _predictors()
    assert p.layer_ids == (0, 1) and p.for_layer(2) is None
    per_path = BLOCK * 16 * 8 + 8 * 24 + 24 * 16
    assert p.num_params() == 2 * 2 * per_path
    with pytest.raises(ValueError, match="distinct layers"):
        _predictors(layer_ids=(0, 3))


# ----------------------------------------------------------------------------- pruning


def test_zero_counters_match_a_brute_force_count():
    p = _predictors(1)
    x = _x(2)
    targets = {"0": (x, jnp.zeros((2, T // BLOCK, T // BLOCK))),
               "1": (x, jnp.zeros((2, T // BLOCK, T // BLOCK)))}
    params = p.params()
    _, aux = pt.predictor_loss(params, targets, n_heads=4, block_size=BLOCK, dtype=jnp.float32)
    rows = np.asarray(predictor.block_rows(x, 4, BLOCK), np.float64).reshape(-1, BLOCK * 16)
    for layer in ("0", "1"):
        for side in ("q", "k"):
            w = {k: np.asarray(v, np.float64) for k, v in params[layer][side].items()}
            a1 = rows @ w["w1"]
            a2 = np.maximum(a1, 0) @ w["w2"]
            np.testing.assert_array_equal(aux["zeros"][layer][side]["a1"], (a1 <= 0).sum(0))
            np.testing.assert_array_equal(aux["zeros"][layer][side]["a2"], (a2 <= 0).sum(0))


def test_pruning_neurons_that_never_fire_leaves_outputs_unchanged():
    p = _predictors(3)
    params = jax.tree.map(np.array, p.params())  # writable copies
    dead1, dead2 = [1, 5], [0, 7, 20]
    for layer in params.values():
        for side in layer.values():
            side["w1"][:, dead1] = 0.0  # pre-activation exactly 0 (<= 0) on every input
            side["w2"][:, dead2] = 0.0
    p.set_params(params)
    x = _x(4)
    before = {i: np.asarray(p.for_layer(i).tiles(x)) for i in p.layer_ids}
    targets = {str(i): (x, jnp.zeros((2, T // BLOCK, T // BLOCK))) for i in p.layer_ids}
    _, aux = pt.predictor_loss(p.params(), targets, n_heads=4, block_size=BLOCK, dtype=jnp.float32)
    rows = 2 * 4 * (T // BLOCK)
    keep = pt.neurons_to_keep(jax.tree.map(np.asarray, aux["zeros"]), rows, tau=0.999)
    for layer in keep.values():
        for kept1, kept2 in layer.values():
            assert not set(dead1) & set(kept1.tolist()) and not set(dead2) & set(kept2.tolist())
    pruned = pt.prune_tree(p.params(), keep)
    smaller = predictor.LeMoPredictors(CONFIG, block_size=BLOCK, widths=pt.widths_of(pruned),
                                       rngs=nnx.Rngs(9))
    smaller.set_params(pruned)
    assert smaller.num_params() < p.num_params()
    for i in p.layer_ids:
        np.testing.assert_allclose(smaller.for_layer(i).tiles(x), before[i], rtol=1e-6, atol=1e-6)


def test_prune_tree_slices_adam_moments_like_the_weights():
    params = _predictors().params()
    tx = pt.make_optimizer(pt.PredictorTrainConfig(seq_len=T, block_size=BLOCK))
    state = tx.init(params)
    grads = jax.tree.map(lambda w: jnp.arange(w.size, dtype=jnp.float32).reshape(w.shape), params)
    _, state = tx.update(grads, state, params)
    keep = {layer: {side: (np.array([0, 3]), np.array([1, 2, 10])) for side in ("q", "k")}
            for layer in params}
    new_params, new_state = pt.prune_tree(params, keep), pt.prune_tree(state, keep)
    mu = new_state[0].mu
    for layer in params:
        for side in ("q", "k"):
            assert new_params[layer][side]["w1"].shape == (BLOCK * 16, 2)
            assert new_params[layer][side]["w2"].shape == (2, 3)
            assert new_params[layer][side]["w3"].shape == (3, 16)
            old_mu = state[0].mu[layer][side]
            old_w2, old_w3 = np.asarray(old_mu["w2"]), np.asarray(old_mu["w3"])
            np.testing.assert_array_equal(mu[layer][side]["w2"], old_w2[np.ix_([0, 3], [1, 2, 10])])
            np.testing.assert_array_equal(mu[layer][side]["w3"], old_w3[[1, 2, 10]])


def test_neurons_to_keep_uses_the_threshold_and_keeps_one_at_least():
    zeros = {"0": {"q": {"a1": np.array([0, 5, 9, 10]), "a2": np.array([10, 10])},
                   "k": {"a1": np.array([8, 8, 8, 8]), "a2": np.array([3, 10])}}}
    keep = pt.neurons_to_keep(zeros, rows=10, tau=0.8)
    assert keep["0"]["q"][0].tolist() == [0, 1]  # 0.9 and 1.0 exceed 0.8
    assert keep["0"]["q"][1].tolist() == [0]         # all dead: the first least-zero survives
    assert keep["0"]["k"][0].tolist() == [0, 1, 2, 3] and keep["0"]["k"][1].tolist() == [0]


def test_prune_schedule_follows_the_spec():
    tc = pt.PredictorTrainConfig(seq_len=T, block_size=BLOCK)
    taus = {s: tc.prune_tau(s) for s in range(1, 700) if tc.prune_tau(s) is not None}
    assert list(taus) == [100, 200, 300, 400, 500, 600]
    assert [round(t, 4) for t in taus.values()][:4] == [0.8, 0.75, 0.7, 0.65]


# ----------------------------------------------------------------------------- metrics


def test_recall_against_brute_force():
    rng = np.random.default_rng(0)
    oracle = rng.normal(size=20)
    assert pm.recall_at(oracle, oracle, 0.4) == 1.0  # oracle-as-predictor recall is 1
    assert pm.recall_at(-oracle, oracle, 0.4) == 0.0  # 8 of 20: the bottom 8 miss the top 8
    pred = oracle + rng.normal(size=20)
    k = 8
    expected = len(set(np.argsort(-pred)[:k]) & set(np.argsort(-oracle)[:k])) / k
    assert pm.recall_at(pred, oracle, 0.4) == expected
    assert pm.spearman(oracle, oracle) == pytest.approx(1.0)
    assert pm.spearman(-oracle, oracle) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- training


def test_targets_are_the_oracle_tiles_of_each_layer_input():
    model = _model()
    tokens = jnp.asarray(_windows().batch(0).tokens)
    targets = nnx.jit(lambda m, t: target_store.collect_targets(m, t, (0, 2), scoring.ScoreOptions(BLOCK)))(
        model, tokens)
    assert set(targets) == {"0", "2"}
    h = model.embed(tokens)
    u = model.layers[0].input_norm(h)
    np.testing.assert_allclose(targets["0"][0], u, rtol=1e-6)
    attn = model.layers[0].attn
    q = attn.q_proj(u).reshape(1, T, attn.n_heads, attn.head_dim)
    k = attn.k_proj(u).reshape(1, T, attn.n_kv_heads, attn.head_dim)
    np.testing.assert_allclose(targets["0"][1],
                               scoring.block_scores_reference(q, k, scoring.ScoreOptions(BLOCK)),
                               rtol=1e-5, atol=1e-6)


def _train_config(**kw):
    base = dict(seq_len=T, steps=12, train_windows=3, block_size=BLOCK, h1=8, h2=24, lr=3e-3,
                warmup_steps=2, prune_every=5, prune_until=11, log_every=1, checkpoint_every=4)
    return pt.PredictorTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("predictors")
    return workdir, pt.train_predictors(_model(), _windows(), _train_config(), workdir,
                                        progress=False)


@pytest.mark.xdist_group("test_lemo_predictor:trained")
def test_training_lowers_the_loss_prunes_and_saves(trained):
    workdir, run = trained
    losses = [r["loss"] for r in run.history]
    assert run.step == 12 and not run.interrupted
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    pruned = [r for r in run.history if "prune_tau" in r]
    assert [r["step"] for r in pruned] == [5, 10]
    assert run.predictors.num_params() <= _predictors().num_params()
    loaded = predictor.load_predictors(workdir / "predictors", CONFIG)
    assert loaded.widths() == run.predictors.widths()
    jax.tree.map(np.testing.assert_array_equal, loaded.params(), run.predictors.params())


@pytest.mark.xdist_group("test_lemo_predictor:trained")
def test_resumed_training_equals_straight_training(trained, tmp_path):
    _, straight = trained
    pt.train_predictors(_model(), _windows(), _train_config(steps=7), tmp_path, progress=False)
    resumed = pt.train_predictors(_model(), _windows(), _train_config(), tmp_path, progress=False)
    assert straight.collect_s > 0 and resumed.collect_s == 0.0  # its targets were on disk
    assert resumed.predictors.widths() == straight.predictors.widths()
    jax.tree.map(np.testing.assert_array_equal, resumed.predictors.params(),
                 straight.predictors.params())
    with pytest.raises(CheckpointError, match="another model or training config"):
        pt.train_predictors(_model(), _windows(), _train_config(lr=1e-2), tmp_path, progress=False)


@pytest.mark.xdist_group("test_lemo_predictor:trained")
def test_loading_checks_the_model_and_the_directory(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(ValueError, match="trained for"):
        predictor.load_predictors(workdir / "predictors", preset("tiny", n_layers=3, n_heads=8,
                                                                   n_kv_heads=4, head_dim=8))
    with pytest.raises(CheckpointError, match="no predictors"):
        predictor.load_predictors(tmp_path / "empty", CONFIG)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of block_size"):
        pt.PredictorTrainConfig(seq_len=100, block_size=64)
    with pytest.raises(ValueError, match="loss"):
        pt.PredictorTrainConfig(loss="l1")
    with pytest.raises(ValueError, match="keep_ratio"):
        pt.PredictorTrainConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="layers or sparse_only"):
        pt.PredictorTrainConfig(layers=(1, 2), sparse_only=True)


def test_sparse_only_trains_the_default_schedules_sparse_layers(tmp_path):
    assert pt.PredictorTrainConfig(sparse_only=True).layer_ids(32) == tuple(range(15, 31))  # spec
    assert pt.PredictorTrainConfig(layers=(0, 2)).layer_ids(32) == (0, 2)
    assert pt.PredictorTrainConfig().layer_ids(32) is None
    config = preset("tiny", n_layers=5)  # sparse: 1, 2, 3 (every layer but the last: 0..3)
    run = pt.train_predictors(Llama(config, rngs=nnx.Rngs(0)), _windows(),
                              _train_config(steps=1, sparse_only=True, prune_every=0), tmp_path,
                              progress=False)
    assert run.predictors.layer_ids == (1, 2, 3)
    assert predictor.load_predictors(tmp_path / "predictors", config).layer_ids == (1, 2, 3)


# ----------------------------------------------------------------------------- the LeMo forward


LEMO = LeMoConfig(block_size=BLOCK, selector="predictor", keep_ratio=0.5, keep_first_block=False)


def _lemo_model(predictors=None):
    model = _model(5)
    if predictors is not None:
        predictor.attach(model, predictors)
    lora.add_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
    return model


def test_predictor_selection_is_the_top_blocks_of_the_predicted_scores():
    p = _predictors(7)
    model = _lemo_model(p)
    u = _x(3)
    sel = layer_selection(model.layers[0], u, 0.5, LEMO, p.for_layer(0))
    expected = scoring.select_blocks(p.for_layer(0).column_scores(u), 0.5, BLOCK)
    np.testing.assert_array_equal(sel.indices, expected.indices)
    oracle = layer_selection(model.layers[0], u, 0.5, LEMO)
    assert not np.array_equal(sel.indices, oracle.indices)  # a random predictor is not the oracle
    assert sel.indices.shape[1] == routing.capacity(T // BLOCK, 0.5, rounding="floor") * BLOCK


def test_lemo_loss_uses_the_attached_predictors():
    batch = _windows().batch(1)
    model = _lemo_model(_predictors(7))
    loss = nnx.jit(lambda m, b: lemo_loss(m, b, lemo=LEMO))
    oracle = nnx.jit(lambda m, b: lemo_loss(m, b, lemo=LEMO.replace(selector="oracle")))
    with_predictors, _ = loss(model, batch)
    assert np.isfinite(with_predictors)
    assert float(with_predictors) != pytest.approx(float(oracle(model, batch)[0]), abs=1e-6)
    other = _lemo_model(_predictors(8))
    assert float(loss(other, batch)[0]) != pytest.approx(float(with_predictors), abs=1e-6)


def test_selector_errors_are_clear():
    with pytest.raises(ValueError, match="needs trained predictors"):
        check_lemo(_lemo_model(), LEMO, T)
    model = _lemo_model(_predictors(layer_ids=(0,)))  # half schedule on 3 layers: 0 and 1 sparse
    with pytest.raises(ValueError, match=r"layers \[1\] are sparse but have no predictor"):
        check_lemo(model, LEMO, T)
    with pytest.raises(ValueError, match="16-token blocks"):
        check_lemo(_lemo_model(_predictors()), LEMO.replace(block_size=32), T)
    with pytest.raises(ValueError, match="expect"):
        predictor.attach(_model(config=preset("tiny", n_layers=3, n_heads=8, n_kv_heads=4,
                                              head_dim=8)), _predictors())


def test_dense_evaluation_never_calls_the_predictor(monkeypatch):
    model = _lemo_model(_predictors())

    def spy(*args, **kwargs):
        raise AssertionError("the predictor ran during dense evaluation")

    monkeypatch.setattr(predictor.LayerPredictor, "__call__", spy)
    loss, _ = train.lm_loss(model, _windows().batch(0))
    assert np.isfinite(loss)
    with pytest.raises(AssertionError, match="predictor ran"):
        lemo_loss(model, _windows().batch(0), lemo=LEMO)


def test_predictor_step_memory_is_linear_in_the_sequence_length():
    """Compiled temp bytes of a LeMo LoRA step with predictor selection (chunked attention, no
    [T, T] anywhere): doubling T at most doubles them (plus slack), where the oracle-free dense
    attention logits alone would quadruple."""
    config = preset("tiny", n_layers=3, max_positions=4096)
    lemo = LeMoConfig(selector="predictor")
    temps = []
    for t in (1024, 2048):
        model = Llama(config, attention_backend="chunked", rngs=nnx.Rngs(0))
        predictor.attach(model, predictor.LeMoPredictors(config, block_size=64, h1=8, h2=32,
                                                         rngs=nnx.Rngs(0)))
        lora.add_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
        graphdef, params, rest = nnx.split(model, lora.LoRAParam, ...)

        def step(params, rest, tokens, graphdef=graphdef):
            def loss(params):
                m = nnx.merge(graphdef, params, rest)
                return lemo_loss(m, data.Batch(tokens, None, None), lemo=lemo)[0]
            return jax.grad(loss)(params)

        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        temps.append(compiled_memory(step, params, rest, tokens).temp_bytes)
    assert temps[1] <= 2.3 * temps[0], temps


def test_predictor_path_fields_are_dataclass_friendly():
    tc = _train_config()
    assert dataclasses.replace(tc, steps=3).steps == 3


def test_column_loss_sees_only_the_ranking_of_column_scores():
    p = _predictors(2)
    x = _x(5)
    q_hat, k_hat = p.for_layer(0)(x)
    tiles = predictor.predicted_tiles(q_hat, k_hat)
    params = {"0": p.params()["0"]}

    def loss(t):
        return pt.predictor_loss(params, {"0": (x, t)}, n_heads=4, block_size=BLOCK,
                                 dtype=jnp.float32, loss="column")[0]

    # Targets whose column sums are an affine image of the prediction's: zero loss.
    assert float(loss(3.0 * tiles + 0.7)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(-tiles)) > 1.0  # the reversed ranking is far off
    assert float(pt.predictor_loss(params, {"0": (x, 3.0 * tiles + 0.7)}, n_heads=4, block_size=BLOCK,
                                   dtype=jnp.float32)[0]) > 1.0  # the tile loss is not invariant
