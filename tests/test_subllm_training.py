"""SUBLLM training: the step-aware loss, evaluation modes, scorer learning rate, the Balancer's control
loop, and pretraining runs (SUBLLM and its dense twin) end to end (Balancer, training forward, recipe)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import run_configs
from experiments.configs import pretrain_subllm_tiny
from tokensparse import data, hf, train
from tokensparse.config import TrainConfig
from tokensparse.loop import check_resumable
from tokensparse.pipelines import pretrain
from tokensparse.subllm import training
from tokensparse.subllm.balancer import balance, balancer_bands
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import parse_structure, subllm_preset


def _model(seed=0, **fields):
    base = subllm_preset("subllm-tiny")
    return SubLLM(base.replace(model=base.model.replace(n_layers=4), structure="T(T(T)T)", **fields),
                  rngs=nnx.Rngs(seed))


def _batch(seed=0, b=2, t=32):
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (b, t), 0, 256), np.int32)
    return data.Batch(tokens, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                      np.zeros((b, t), np.int32))


def test_topk_mode_is_deterministic_and_keeps_the_training_capacity():
    model, batch = _model(), _batch()
    fwd = nnx.jit(lambda m, b: m.forward(b.tokens, b.positions, b.segment_ids, mode="topk"))
    (h1, aux1), (h2, _) = fwd(model, batch), fwd(model, batch)
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    sel1, sel2 = aux1["selections"]
    assert sel1.indices.shape == (2, 21) and sel2.indices.shape == (2, 14)  # ceil(.64·32), ceil(.64·21)
    top = np.sort(np.argsort(-np.asarray(aux1["scores"][0]), axis=1)[:, :21], axis=1)
    np.testing.assert_array_equal(np.asarray(sel1.indices), top)
    np.testing.assert_allclose(np.asarray(aux1["weights"][0]),
                               np.clip(np.take_along_axis(np.asarray(aux1["scores"][0]), top, 1), 0, 1))


def test_train_loss_uses_the_step_for_coins_and_schedules():
    # Under the spec's init the inner levels barely move the loss at step 0 (the flip changes it by
    # < 1e-5), so this uses the plain one, where it shows.
    model, batch = _model(init="backbone"), _batch()
    for scorer in model.scorers:  # scores of order 1, so the penalty's flip visibly changes weights
        scorer.weight[...] = scorer.weight[...] * 100.0
    loss_fn = nnx.jit(lambda m, b, step: training.train_loss(seed=3)(m, b, step)[0])
    a = loss_fn(model, batch, 5)
    assert float(a) == float(loss_fn(model, batch, 5))  # same step: same coins
    flips = {float(loss_fn(model, batch, s)) for s in range(6)}
    assert len(flips) > 1  # the discard-penalty flip differs across steps
    with pytest.raises(ValueError, match="step_multiplier"):
        training.train_loss(step_multiplier=0.0)
    with pytest.raises(ValueError, match="eval mode"):
        training.eval_loss("train")


def test_train_mode_passes_the_configured_balancer_statistic_margin_and_grad_scale(monkeypatch):
    import tokensparse.subllm.model as model_module

    seen = []

    def recording_balance(scores, **kwargs):
        seen.append((kwargs["statistic"], kwargs["margin"], kwargs["grad_scale"]))
        return balance(scores, **kwargs)

    def scales(model, step):
        seen.clear()
        training.train_loss()(model, _batch(), step)
        return [(stat, margin, round(float(scale), 6)) for stat, margin, scale in seen]

    monkeypatch.setattr(model_module, "balance", recording_balance)
    model = _model()
    cfg = model.subllm_config
    assert (cfg.balancer_statistic, cfg.balancer_margin) == ("mean_std", 0.05)  # the spec's, by default
    assert scales(model, 0) == [("mean_std", 0.05, 0.04)] * 2  # one call per subsampler
    model.subllm_config = cfg.replace(balancer_statistic="proportion", balancer_margin=0.01,
                                      balancer_start_scale=0.5, balancer_start_steps=100)
    assert scales(model, 0) == [("proportion", 0.01, 0.5)] * 2
    assert scales(model, 50) == [("proportion", 0.01, 0.27)] * 2
    assert scales(model, 100) == [("proportion", 0.01, 0.04)] * 2


def test_scorer_learning_rate_is_scaled():
    """One AdamW step from the same gradients: the scorer moves exactly half as far, nothing else
    differs; the model's scorer weights are the leaves the optimiser scales."""
    tc = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    params = {"scorers": [{"weight": jnp.ones(8)}], "layers": [{"kernel": jnp.ones((8, 8))}],
              "norm": {"scale": jnp.ones(8)}}
    grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape), params)
    moved = {}
    for scale in (1.0, 0.5):
        tx = training.make_optimizer(tc, scorer_lr_scale=scale)
        moved[scale] = tx.update(grads, tx.init(params), params)[0]
    np.testing.assert_allclose(moved[0.5]["scorers"][0]["weight"], 0.5 * moved[1.0]["scorers"][0]["weight"])
    assert np.abs(np.asarray(moved[1.0]["scorers"][0]["weight"])).max() > 0
    for key in ("layers", "norm"):
        jax.tree.map(np.testing.assert_array_equal, moved[0.5][key], moved[1.0][key])
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(_model(), nnx.Param))[0]]
    assert sum(map(training.is_scorer, paths)) == 2  # the tiny model's two scorer weights
    with pytest.raises(ValueError, match="scorer_lr_scale"):
        training.make_optimizer(tc, scorer_lr_scale=0.0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_scorer_without_warmup_runs_at_the_peak_rate_during_it(schedule):
    """``scorer_warmup=False``: the scorer's schedule is the rest's (× the scale) except that its
    warm-up steps already run at the peak; so Adam's first step moves the scorer by the scaled peak rate
    times sign(g) (first Adam steps are scale-free, so clipping does not change this) while the warmed-up
    rest stays put."""
    tc = TrainConfig(lr=1e-2, warmup_steps=10, steps=40, schedule=schedule, weight_decay=0.1)
    flat = train.learning_rate_schedule(tc, warmup=False)
    warm = train.learning_rate_schedule(tc)
    assert [float(flat(t)) for t in (0, 5, 9)] == pytest.approx([1e-2] * 3)
    assert float(warm(5)) == pytest.approx(0.5e-2)
    for t in (10, 17, 25, 39, 60):
        assert float(flat(t)) == pytest.approx(float(warm(t)), rel=1e-6), t
    params = {"scorers": [{"weight": jnp.ones(8)}], "layers": [{"kernel": jnp.ones((8, 8))}]}
    grads = jax.tree.map(lambda x: jnp.linspace(-3.0, 5.0, x.size).reshape(x.shape), params)
    tx = training.make_optimizer(tc, scorer_lr_scale=0.5, scorer_warmup=False)
    update = tx.update(grads, tx.init(params), params)[0]
    np.testing.assert_allclose(update["scorers"][0]["weight"],
                               -0.5e-2 * np.sign(grads["scorers"][0]["weight"]), rtol=1e-4)
    np.testing.assert_array_equal(update["layers"][0]["kernel"], 0.0)  # warm-up step 0: lr 0
    warmed = training.make_optimizer(tc, scorer_lr_scale=0.5)
    update = warmed.update(grads, warmed.init(params), params)[0]
    np.testing.assert_array_equal(update["scorers"][0]["weight"], 0.0)


def test_scorer_warmup_from_the_config():
    """``config.subllm.scorer_warmup=False`` reaches the optimiser and the run's metadata (where it is
    recorded only when off: runs written before the option resume)."""
    c = _config("subllm", 2)
    tc = run_configs.pretrain_config(c).train
    assert tc.warmup_steps > 0
    for flag in (True, False):
        c.subllm.scorer_warmup = flag
        setup = pretrain.subllm_setup(run_configs.pretrain_config(c), 512, tc)
        assert setup.metadata["subllm"].get("scorer_warmup", True) is flag
        assert ("scorer_warmup" in setup.metadata["subllm"]) is (not flag)
        params = nnx.state(setup.model, nnx.Param)
        grads = jax.tree.map(jnp.ones_like, params)
        update = setup.tx.update(grads, setup.tx.init(params), params)[0]
        moved = np.abs(np.asarray(update["scorers"][0]["weight"][...])).max()
        assert bool(moved > 0) is (not flag)
        assert np.abs(np.asarray(update["embed"]["embedding"][...])).max() == 0.0


def _scorer_run(start: float, active: bool, keep=0.64, n=4096, d=16, steps=500, drift=0.0,
                statistic="mean_std", margin=0.05):
    """Fractions of positive scores over the last 100 of ``steps`` Adam steps, and the final rms, of a
    bias-free scorer on features with one constant channel, trained on a loss whose gradient is fresh
    per-token noise g_t plus ``drift``·|g_t|: a coherent push (downwards for drift > 0) of that share
    of each token's gradient. Only the Balancer's nudges (when ``active``) push back."""
    x = jax.random.normal(jax.random.key(0), (n, d)).at[:, 0].set(1.0)
    w0 = (0.05 * jax.random.normal(jax.random.key(1), (d,))).at[0].set(start)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(w, state, key):
        noise = jax.random.normal(key, (n,))

        def loss(w):
            s = balance((x @ w)[None], keep=keep, valid=jnp.ones((1, n), bool), active=active,
                        statistic=statistic, margin=margin)
            return jnp.mean((noise + drift * jnp.abs(noise)) * s[0])

        updates, state = tx.update(jax.grad(loss)(w), state)
        return optax.apply_updates(w, updates), state

    w, state, fractions = w0, tx.init(w0), []
    for i in range(steps):
        w, state = step(w, state, jax.random.key(i + 1))
        if i >= steps - 100:
            fractions.append(float(jnp.mean(x @ w > 0)))
    return np.asarray(fractions), float(jnp.sqrt(jnp.mean((x @ w) ** 2)))


@pytest.mark.parametrize("start", [-0.5, 1.5])
def test_balancer_control_loop_brings_scores_to_the_band(start):
    """From ~0% (start −0.5) or 100% (start 1.5) positive scores the Balancer alone brings the fraction
    to the band [keep − 0.05, keep + 0.05] and holds it there, give or take 0.025 (the penalty is zero
    inside the band, so noise keeps it hovering at the edge it came from), and lifts the rms into its
    band; without it the fraction stays where it started."""
    keep, bands = 0.64, balancer_bands(0.64)
    fractions, rms = _scorer_run(start, active=True)
    assert keep - 0.075 <= fractions.mean() <= keep + 0.075, fractions[::10]
    assert fractions.max() - fractions.min() < 0.03, fractions[::10]  # and it stays there
    assert bands.rms[0] * 0.9 <= rms <= bands.rms[1], rms
    idle, _ = _scorer_run(start, active=False)
    assert idle.max() < 0.2 if start < 0 else idle.min() > 0.9, idle[::10]


def test_balancer_holds_the_band_against_a_coherent_push_below_its_grad_scale():
    """The Balancer's reach is its 4% (grad_scale) of each token's |g|. Against a loss pushing every
    score down by 2% of its gradient, the ``proportion`` statistic holds the fraction at the band's
    lower edge 0.59 and ``mean_std`` at 0.56: the Gaussian image Φ(0.148) of its μ/σ band's lower
    edge (icefall's 0.814·atanh(2p − 1) is not Φ⁻¹, so the μ/σ band [0.148, 0.326] means
    [0.559, 0.628] positive for Gaussian scores). A 6% push beats either; without the Balancer even
    1% drives the fraction far out."""
    lo, hi = balancer_bands(0.64).proportion
    held, _ = _scorer_run(0.3, active=True, drift=0.02, statistic="proportion")
    assert lo - 0.01 <= held.min() and held.max() <= hi, held[::10]
    gaussian_edge, _ = _scorer_run(0.3, active=True, drift=0.02)
    assert 0.545 <= gaussian_edge.mean() <= 0.575, gaussian_edge[::10]
    for statistic in ("proportion", "mean_std"):
        beaten, _ = _scorer_run(0.3, active=True, drift=0.06, statistic=statistic)
        assert beaten.mean() < 0.45, (statistic, beaten[::10])
    idle, _ = _scorer_run(0.3, active=False, drift=0.01)
    assert idle.mean() < 0.3, idle[::10]


@pytest.mark.parametrize("start, drift", [(-0.5, 0.0), (1.5, 0.0), (0.3, 0.02)])
def test_balancer_aiming_inside_the_band_holds_every_step_inside_it(start, drift):
    """With ``proportion`` and margin 0.01 (it acts outside [0.63, 0.65]) every one of the last 100
    steps lies strictly inside the spec's band [0.59, 0.69]: from ~0% and ~100% positive, and against
    a 2% coherent push (which holds the spec's margin-0.05 Balancer at the band's lower edge, above)."""
    lo, hi = balancer_bands(0.64).proportion
    fractions, _ = _scorer_run(start, active=True, drift=drift, statistic="proportion", margin=0.01)
    assert lo < fractions.min() and fractions.max() < hi, fractions[::10]


# --- pretraining runs ----------------------------------------------------------------------------


def _config(kind, steps, eval_modes=("infer", "topk")):
    c = pretrain_subllm_tiny.get_config()
    c.model = kind
    c.train.steps, c.train.seq_len, c.train.batch_size = steps, 64, 2
    c.train.log_every, c.train.checkpoint_every, c.train.eval_batches = 1, 2, 1
    c.subllm.overrides.n_layers = 2
    c.subllm.structure = "T(T)"
    c.subllm.eval_modes = list(eval_modes)
    c.progress = False
    return c


def _pretrain(c, workdir):
    return pretrain.pretrain(run_configs.pretrain_config(c), workdir)


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def subllm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("subllm")
    return workdir, _pretrain(_config("subllm", 4), workdir)


@pytest.mark.xdist_group("test_subllm_training:subllm_run")
def test_pretrain_subllm_outputs(subllm_run):
    workdir, summary = subllm_run
    assert {"val_loss", "val_topk_loss", "subllm"} <= set(summary)
    assert set(summary["subllm"]) == {"positive_fraction_0", "keep_rate_0", "bypass_c_0"}
    meta = json.loads((workdir / "config.json").read_text())
    assert meta["subllm"]["structure"] == "T(T)" and meta["subllm"]["kind"] == "subllm"
    assert not (workdir / "hf").exists()  # no Llama export: the SUBLLM modules would be lost


def test_stats_of_a_level_behind_a_shut_one():
    """Level 1 keeps nothing (its scores are all 0, not above θ = 0), so level 2 receives nothing:
    both keep rate 0.0, level 2's fraction None (no NaN from an empty mean), and both are warned."""
    model = _model()
    model.scorers[0].weight[...] = jnp.zeros_like(model.scorers[0].weight[...])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "mean of empty slice" would raise here
        stats = pretrain.subllm_stats(model, _batch())
    assert stats["positive_fraction_0"] == 0.0 and stats["keep_rate_0"] == 0.0
    assert stats["positive_fraction_1"] is None and stats["keep_rate_1"] == 0.0
    with pytest.warns(RuntimeWarning, match=r"\[0, 1\] keep no token"):
        assert pretrain.warn_shut_subsamplers(stats) == [0, 1]


def test_a_shut_subsampler_is_warned_about():
    stats = {"positive_fraction_0": 0.7, "keep_rate_0": 0.7, "bypass_c_0": 0.5,
             "positive_fraction_1": 0.0, "keep_rate_1": 0.0, "bypass_c_1": 0.5}
    with pytest.warns(RuntimeWarning, match=r"subsampler\(s\) \[1\] keep no token"):
        assert pretrain.warn_shut_subsamplers(stats) == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pretrain.warn_shut_subsamplers({**stats, "keep_rate_1": 0.01}) == []


@pytest.mark.xdist_group("test_subllm_training:subllm_run")
@pytest.mark.slow
def test_pretrain_subllm_resumes_with_identical_losses(subllm_run, tmp_path):
    """The coins are a function of the step, so 2 steps + resume to 4 equals 4 straight steps."""
    straight, _ = subllm_run
    _pretrain(_config("subllm", 2, ["infer"]), tmp_path)
    _pretrain(_config("subllm", 4, ["infer"]), tmp_path)
    assert _losses(tmp_path) == _losses(straight)


@pytest.mark.xdist_group("test_subllm_training:subllm_run")
def test_pretrain_on_an_fsdp_mesh_matches_one_device(subllm_run, tmp_path):
    """``config.mesh`` shards parameters, optimizer state and batch rows; without a seq axis the
    routing is unchanged, so the losses are the single-device run's."""
    straight, _ = subllm_run
    c = _config("subllm", 2, ["infer"])
    c.mesh.fsdp = 2
    summary = _pretrain(c, tmp_path)
    got, want = _losses(tmp_path), _losses(straight)
    assert set(got) == {1, 2}
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5), step
    assert np.isfinite(summary["val_loss"])
    with pytest.raises(ValueError, match="config.mesh"):
        c.mesh.tensor = 0
        _pretrain(c, tmp_path / "bad")


@pytest.mark.xdist_group("test_subllm_training:subllm_run")
def _by_name(flat):
    """{top-level name: {rest of the path: value}} of a flat parameter dict."""
    out = {}
    for path, var in flat.items():
        out.setdefault(path[0], {})[path[1:]] = np.asarray(var[...])
    return out


def test_dense_twin_setup(subllm_run):
    """``config.model="dense"``: the same backbone (same seed → the same initial weights) without the
    SUBLLM modules, one evaluation mode, and its checkpoints are not interchangeable with SUBLLM's."""
    tc = run_configs.pretrain_config(_config("dense", 2)).train
    twin = pretrain.subllm_setup(run_configs.pretrain_config(_config("dense", 2)), 512, tc)
    sub = pretrain.subllm_setup(run_configs.pretrain_config(_config("subllm", 2)), 512, tc)
    assert twin.model.structure.text == "TT" and list(twin.eval_losses) == [""]
    assert twin.metadata["model"] == sub.metadata["model"]
    # Per layer: the twin stores its layers as one group, SUBLLM as one group per level segment.
    twin_params = _by_name(hf.per_layer_params(twin.model))
    sub_params = _by_name(hf.per_layer_params(sub.model))
    assert set(sub_params) - set(twin_params) == {"scorers", "bypasses"}
    for name in twin_params:
        jax.tree.map(np.testing.assert_array_equal, twin_params[name], sub_params[name])
    with pytest.raises(ValueError):
        check_resumable(subllm_run[0], twin.metadata)


def test_per_level_keep_and_route_shards_from_the_config():
    c = _config("subllm", 2)
    c.subllm.structure, c.subllm.overrides.n_layers = "T(T(T)T)", 4
    c.subllm.level_keep, c.subllm.route_shards = [0.75, 0.5], 2
    config = run_configs.subllm_config(c.subllm, "subllm")
    assert config.keep == (0.75, 0.5) and config.route_shards == 2
    ops = parse_structure(config.structure, config.keep).ops
    assert [op.keep for op in ops if op.kind == "down"] == [0.75, 0.5]
    c.subllm.level_keep = []
    assert run_configs.subllm_config(c.subllm, "subllm").keep == c.subllm.keep


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c, "model", "moe"), "subllm"),
    (lambda c: setattr(c.subllm, "eval_modes", ["train"]), "eval_modes"),
    (lambda c: setattr(c.subllm, "structure", "T(T(T)T"), "config.subllm"),
    (lambda c: setattr(c.subllm, "scorer_lr_scale", -1.0), "scorer_lr_scale"),
    (lambda c: setattr(c.subllm, "level_keep", [0.5, 0.5]), "config.subllm"),  # "T(T)" has 1 level
])
def test_pretrain_bad_subllm_config(tmp_path, change, match):
    c = _config("subllm", 2)
    change(c)
    with pytest.raises(ValueError, match=match):
        _pretrain(c, tmp_path)
