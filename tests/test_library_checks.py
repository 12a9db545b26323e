"""Library checks: bad token ids, bad routing arguments and out-of-range routing indices, LeMo's
channel-sparse MLP backward refusing trainable MLP weights, predictors read from a missing directory,
and one- or two-file corpora that pretrain (validation taken from within the documents)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from tokensparse import data, lora, routing, train, validation
from tokensparse.config import preset
from tokensparse.data.batching import Batch
from tokensparse.generate import Decoder, generate
from tokensparse.llama import Llama

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return Llama(preset("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))


def _batch(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    return Batch(tokens, None, jnp.zeros(tokens.shape, jnp.int32))


# --------------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1])
def test_eager_entry_points_name_the_bad_id(model, bad):
    tokens = np.array([[1, 2, 3, 4], [5, bad, 6, 7]], np.int32)
    pattern = rf"vocab_size={VOCAB}\) but id {bad} \(at index \(1, 1\)\)"
    with pytest.raises(ValueError, match=pattern):
        model(jnp.asarray(tokens))  # a concrete jax array
    with pytest.raises(ValueError, match=pattern):
        train.lm_loss(model, _batch(tokens))
    with pytest.raises(ValueError, match=rf"prompt token ids.*vocab_size={VOCAB}\) but id {bad} "):
        generate(model, [[1, 2], [3, bad]], max_new_tokens=1)
    with pytest.raises(ValueError, match=rf"prompt token ids.*id {bad}"):
        Decoder(model, 8).prefill(tokens, np.array([4, 4]))
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}\) but id {bad} "):
        data.check_tokens(tokens, VOCAB)  # what the pipelines run on their encoded corpus


def test_valid_ids_pass_and_empty_is_fine(model):
    tokens = jnp.asarray([[0, VOCAB - 1, 3]], jnp.int32)
    assert np.isfinite(np.asarray(model(tokens))).all()
    validation.check_token_ids(np.zeros((0, 3), np.int32), VOCAB)
    with pytest.raises(ValueError, match="must be integers"):
        validation.check_token_ids(np.array([1.5]), VOCAB)


def test_without_the_check_a_bad_id_is_silently_wrong(model):
    """Why the check exists: under jit nothing is checked, and JAX's lookup gives NaN / wraps."""
    tokens = jnp.asarray([[1, 2, VOCAB]], jnp.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert np.isnan(np.asarray(logits[0, 2])).all()


def test_jit_with_checkify_reports_the_bad_id(model):
    tokens = jnp.asarray([[1, 2, 3, VOCAB + 3]], jnp.int32)
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        return train.lm_loss(nnx.merge(graphdef, state), _batch(tokens))[0]

    with validation.debug_checks():
        checked = jax.jit(checkify.checkify(loss))
        err, _ = checked(state, tokens)
        ok, value = checked(state, tokens.at[0, 3].set(5))
    assert f"token id {VOCAB + 3} is outside [0, vocab_size={VOCAB})" in str(err.get())
    assert ok.get() is None and np.isfinite(float(value))
    with validation.debug_checks():  # negative ids too (checkify's own index checks let them wrap)
        err, _ = jax.jit(checkify.checkify(loss))(state, tokens.at[0, 0].set(-2))
    assert "token id -2 is outside" in str(err.get())


def test_debug_mode_under_jit_without_checkify_says_so(model):
    graphdef, state = nnx.split(model)
    with validation.debug_checks(), pytest.raises(Exception, match="checkify"):
        jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.ones((1, 4), jnp.int32))


def test_debug_switch_from_the_environment(monkeypatch):
    monkeypatch.delenv(validation.DEBUG_ENV, raising=False)
    assert not validation.debug_enabled()
    monkeypatch.setenv(validation.DEBUG_ENV, "1")
    assert validation.debug_enabled()
    with validation.debug_checks(False):
        assert not validation.debug_enabled()
    monkeypatch.setenv(validation.DEBUG_ENV, "0")
    assert not validation.debug_enabled()


# ---------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("shards", [0, -2, 1.5, True])
def test_bad_shards_is_a_value_error(shards):
    scores = jnp.zeros((1, 8))
    with pytest.raises(ValueError, match=rf"shards={shards!r} must be a positive static integer"):
        routing.topk_select(scores, 4, shards=shards)
    with pytest.raises(ValueError, match="shards="):
        routing.block_topk_select(scores, 2, 2, shards=shards)
    with pytest.raises(ValueError, match="shards="):
        routing.Selection(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), shards=shards)


@pytest.mark.parametrize("block_size", [0, -64, 2.0])
def test_bad_block_size_is_a_value_error(block_size):
    with pytest.raises(ValueError, match=r"block_size=.* must be a positive static integer"):
        routing.block_topk_select(jnp.zeros((1, 8)), block_size, 2)


def test_uneven_shards_is_a_value_error():
    with pytest.raises(ValueError, match="cannot be split into 3"):
        routing.topk_select(jnp.zeros((1, 8)), 4, shards=3)


def _bad_selection(index, shards=1):
    indices = jnp.asarray([[1, 3, index, 6]], jnp.int32)
    return routing.Selection(indices, jnp.asarray([[True, True, True, False]]), shards=shards)


@pytest.mark.parametrize("index", [8, 11, -1])
def test_debug_mode_checks_gather_and_scatter_indices_eagerly(index):
    x = jnp.arange(8.0).reshape(1, 8, 1)
    sel = _bad_selection(index)
    # Off (the default), JAX clamps or drops silently: the gathered row is some other row.
    assert routing.gather(x, sel).shape == (1, 4, 1)
    with validation.debug_checks():
        with pytest.raises(ValueError, match=rf"routing.gather: index {index} .* outside \[0, 8\)"):
            routing.gather(x, sel)
        with pytest.raises(ValueError, match=rf"routing.scatter_add: index {index} "):
            routing.scatter_add(x, sel, jnp.ones((1, 4, 1)))
        # An invalid slot's index is never read or written, so it may be anything.
        routing.gather(x, routing.Selection(jnp.asarray([[1, 3, 5, 99]], jnp.int32), sel.valid))


def test_debug_mode_checks_each_shard_locally():
    """Index 5 is inside the sequence but outside the first of two pieces, where its slot reads."""
    x = jnp.arange(8.0).reshape(1, 8, 1)
    sel = routing.Selection(jnp.asarray([[0, 5, 4, 6]], jnp.int32), jnp.ones((1, 4), bool), shards=2)
    with validation.debug_checks(), pytest.raises(ValueError, match="within its sequence shard"):
        routing.gather(x, sel)


def test_debug_mode_checks_traced_indices_with_checkify():
    x = jnp.arange(8.0).reshape(1, 8, 1)

    def f(indices):
        sel = routing.Selection(indices, jnp.ones(indices.shape, bool))
        return routing.scatter_add(x, sel, routing.gather(x, sel)).sum()

    with validation.debug_checks():
        checked = jax.jit(checkify.checkify(f))
        err, _ = checked(jnp.asarray([[1, 9]], jnp.int32))
        ok, _ = checked(jnp.asarray([[1, 7]], jnp.int32))
    assert "index 9 is outside [0, 8)" in str(err.get())
    assert ok.get() is None


def test_valid_selections_route_the_same_with_debug_checks():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 3)), jnp.float32)
    sel = routing.topk_select(jnp.asarray(rng.standard_normal((2, 16))), 6, shards=2)
    blocks = routing.block_topk_select(jnp.asarray(rng.standard_normal((2, 4))), 4, 2)
    for s in (sel, blocks):
        plain = routing.scatter_add(x, s, 2 * routing.gather(x, s))
        with validation.debug_checks():
            checked = routing.scatter_add(x, s, 2 * routing.gather(x, s))
        np.testing.assert_array_equal(np.asarray(checked), np.asarray(plain))


# ------------------------------------------------------------------------------- predictors
def test_load_predictors_does_not_create_the_directory(tmp_path):
    from tokensparse.checkpoint import CheckpointError
    from tokensparse.lemo import predictor

    missing = tmp_path / "nowhere" / "predictors"
    with pytest.raises(CheckpointError, match=r"no predictors in .*nowhere/predictors: the directory "
                                              r"does not exist"):
        predictor.load_predictors(missing, preset("tiny"))
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no predictors"):
        predictor.load_predictors(tmp_path / "empty", preset("tiny"))
    assert list((tmp_path / "empty").iterdir()) == []


# -------------------------------------------------------------- LeMo's channel-sparse MLP backward
def _lemo_model():
    from tokensparse.config import LoRAConfig

    base = Llama(preset("tiny", vocab_size=VOCAB, n_layers=2), rngs=nnx.Rngs(0))
    return lora.add_lora(base, LoRAConfig(), rngs=nnx.Rngs(1))


def _lemo_step(mlp_mode, wrt):
    import optax
    from _lemo import spec_lemo

    from tokensparse.lemo.forward import group_layers, lemo_loss

    lemo = spec_lemo(block_size=8, keep_ratio=0.5, schedule="all", mlp_mode=mlp_mode, mlp_drop=0.5)
    model = group_layers(_lemo_model(), lemo)
    optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=wrt)
    step = train.make_train_step(lambda m, b: lemo_loss(m, b, lemo=lemo), wrt=wrt)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 32))
    return lambda: step(model, optimizer, _batch(tokens))


def test_channel_sparse_mlp_backward_refuses_trainable_mlp_weights():
    """wrt=nnx.Param trains the MLP kernels, whose gradients the channel-sparse backward zeroes."""
    with pytest.raises(ValueError, match=r"\['gate_proj', 'up_proj', 'down_proj'\] are being trained"
                                         r".*mlp_mode='channel_sparse_bwd'"):
        _lemo_step("channel_sparse_bwd", nnx.Param)()
    assert np.isfinite(float(_lemo_step("channel_sparse_bwd", lora.LoRAParam)()["loss"]))


def test_sparse_backward_mlp_checks_what_is_differentiated():
    """Differentiating the input alone is fine; the MLP weights themselves are refused."""
    from tokensparse.lemo.mlp import sparse_backward_mlp

    model = Llama(preset("tiny"), rngs=nnx.Rngs(0))
    mlp = model.layers[0].mlp
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, model.config.d_model)), jnp.float32)

    def loss(mlp, x):
        return sparse_backward_mlp(mlp, x, 4).sum()

    dx = jax.grad(loss, argnums=1)(mlp, x)  # the input only: fine
    assert np.isfinite(np.asarray(dx)).all()
    with pytest.raises(ValueError, match="mlp_mode"):
        nnx.grad(loss)(mlp, x)  # the MLP's own weights


# ------------------------------------------------------------------------- one- and two-file corpora
def _text(seed: int, lines: int = 120) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "sword", "night", "speaks", "falls", "and", "of", "a"]
    return "".join(" ".join(rng.choice(words, 8)) + ".\n" for _ in range(lines))


def _small_corpus(tmp_path, files: int) -> tuple[str, dict[str, str]]:
    source = tmp_path / "corpus"
    source.mkdir()
    texts = {f"doc{i}": _text(i) for i in range(files)}
    for name, text in texts.items():
        (source / f"{name}.txt").write_text(text)
    return str(source if files > 1 else source / "doc0.txt"), texts


@pytest.mark.parametrize("files", [1, 2])
def test_small_corpus_takes_validation_from_document_tails(tmp_path, files):
    source, texts = _small_corpus(tmp_path, files)
    corpus = data.load_corpus(source)
    assert corpus.validation, "validation must not be empty"
    parts = {d.name: d.text for d in corpus.train + corpus.validation + corpus.test}
    assert sorted(d.name for d in corpus.validation) == sorted(f"{n}.tail" for n in texts)
    for name, text in texts.items():  # every document: head in train, tail in validation, disjoint
        head, tail = parts[name], parts[f"{name}.tail"]
        assert head + tail == text
        assert 0.05 * len(text) < len(tail) < 0.2 * len(text)
        assert head.endswith("\n")  # cut at a line break
    with pytest.raises(ValueError, match="too small to hold out validation text"):
        (tmp_path / "one.txt").write_text("x")
        data.load_corpus(str(tmp_path / "one.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("files", [1, 2])
def test_small_corpus_pretrains(tmp_path, monkeypatch, files):
    """Before: "no documents" (an empty validation split). Now a few steps train and evaluate."""
    from tokensparse.config import DataConfig, TrainConfig
    from tokensparse.pipelines.pretrain import PretrainConfig, pretrain

    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path / "cache"))
    source, _ = _small_corpus(tmp_path, files)
    tc = TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, log_every=1, eval_every=3,
                     eval_batches=2, checkpoint_every=3, tensorboard=False)
    config = PretrainConfig(model=preset("tiny"), train=tc, progress=False,
                            data=DataConfig(source=source, vocab_size=300))
    summary = pretrain(config, tmp_path / "run")
    assert np.isfinite(summary["val_loss"]), summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 3
