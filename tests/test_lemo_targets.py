"""Predictor training targets on disk: the same arrays as in memory, reused across caches, refused
when written for another model, other layers or other windows, written atomically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import data
from tokensparse.config import preset
from tokensparse.lemo import targets as target_store
from tokensparse.llama import Llama

CONFIG = preset("tiny", n_layers=3)
BLOCK, T = 16, 128
LAYERS = (0, 1)


def _model(seed=0, **overrides):
    return Llama(preset("tiny", n_layers=3, **overrides), rngs=nnx.Rngs(seed))


def _windows(seed=0):
    docs = [np.random.default_rng(i).integers(1, CONFIG.vocab_size, 700) for i in range(3)]
    return data.WindowBatches(docs, batch_size=1, seq_len=T, seed=seed)


def _assert_same(a, b):
    assert set(a) == set(b)
    for layer in a:
        for x, y in zip(a[layer], b[layer], strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def model():
    return _model()


def test_disk_targets_equal_memory_targets_and_are_collected_once(model, tmp_path):
    memory = target_store.TargetCache(model, _windows(), LAYERS, BLOCK)
    disk = target_store.TargetCache(model, _windows(), LAYERS, BLOCK, directory=tmp_path / "t")
    for i in (0, 2):
        _assert_same(disk(i), memory(i))
    assert disk.collected() == [0, 2] and disk.seconds > 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "000000.npz", "000002.npz", "manifest.json"]  # no temporary files left behind
    again = target_store.TargetCache(model, _windows(), LAYERS, BLOCK, directory=tmp_path / "t")
    again._collect = None  # reading must not collect
    _assert_same(again(2), memory(2))
    assert again.seconds == 0.0


def test_bfloat16_inputs_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(1, 8, 4)).astype(jnp.bfloat16)
    tiles = np.random.default_rng(1).normal(size=(1, 2, 2)).astype(np.float32)
    target_store.save_targets(tmp_path / "w.npz", {"3": (x, tiles)}, "abc")
    loaded, sha = target_store.load_targets(tmp_path / "w.npz")
    assert sha == "abc"
    _assert_same(loaded, {"3": (x, tiles)})
    target_store.save_targets(tmp_path / "v.npz", {"3": (x, tiles), "5": (x[:, :4], tiles)}, "d")
    assert set(target_store.load_targets(tmp_path / "v.npz", ["5"])[0]) == {"5"}


def test_a_directory_of_another_model_layers_or_windows_is_refused(model, tmp_path):
    directory = tmp_path / "t"
    target_store.TargetCache(model, _windows(), LAYERS, BLOCK, directory=directory)(0)
    with pytest.raises(target_store.TargetStoreError, match="another weights"):
        target_store.TargetCache(_model(seed=1), _windows(), LAYERS, BLOCK, directory=directory)
    with pytest.raises(target_store.TargetStoreError, match="another layers"):
        target_store.TargetCache(model, _windows(), (0, 2), BLOCK, directory=directory)
    with pytest.raises(target_store.TargetStoreError, match="another block_size"):
        target_store.TargetCache(model, _windows(), LAYERS, 32, directory=directory)
    other_windows = target_store.TargetCache(model, _windows(seed=5), LAYERS, BLOCK,
                                             directory=directory)
    assert not np.array_equal(_windows(seed=5).batch(0).tokens, _windows().batch(0).tokens)
    with pytest.raises(target_store.TargetStoreError, match="other tokens than window 0"):
        other_windows(0)


def test_weights_digest_sees_every_parameter(model):
    digest = target_store.weights_digest(model)
    assert digest == target_store.weights_digest(_model())
    changed = _model()
    with changed.layers.editing() as layers:  # layers are stored stacked: edit a per-layer view
        kernel = layers[2].mlp.down_proj.kernel
        kernel[...] = kernel[...].at[0, 0].add(1e-3)
    assert target_store.weights_digest(changed) != digest


def test_an_interrupted_write_leaves_no_window_file(model, tmp_path, monkeypatch):
    cache = target_store.TargetCache(model, _windows(), LAYERS, BLOCK, directory=tmp_path)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(KeyboardInterrupt):
        cache(1)
    assert cache.collected() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    monkeypatch.undo()
    _assert_same(cache(1), target_store.TargetCache(model, _windows(), LAYERS, BLOCK)(1))
    assert jax.tree.leaves(cache(1))  # readable after the retry
