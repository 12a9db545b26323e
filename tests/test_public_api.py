"""The library surface a user meets first: ``import tokensparse``, a model with its tokenizer, LoRA
with Flax's own filter, a training step on a ``Batch``, LeMo, and export (the README's path)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _env import subprocess_env
from flax import nnx

import tokensparse


def test_import_tokensparse_exposes_the_submodules_lazily():
    code = ("import sys, tokensparse; light = 'jax' not in sys.modules; "
            "f = tokensparse.hf.load_llama; import json; "
            "print(json.dumps([light, sorted(tokensparse.__all__), callable(f)]))")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    light, names, callable_ = json.loads(done.stdout.strip().splitlines()[-1])
    assert light and callable_
    for name in ("config", "data", "export", "hf", "lemo", "lora", "runs", "train", "zoo"):
        assert name in names


def test_readme_path_load_lora_step_lemo_export(tmp_path):
    from tokensparse import config, data, export, hf, lemo, lora, runs, train

    # A small "pretrained" model with its own tokenizer, written as a Hugging Face directory.
    texts = ["the quick brown fox jumps over the lazy dog. " * 20, "to be or not to be. " * 30]
    tok = data.train_tokenizer(texts, vocab_size=300)
    base_config = config.preset("tiny").replace(vocab_size=320)
    hf.save_llama(tokensparse.llama.Llama(base_config, rngs=nnx.Rngs(0)), base_config,
                  tmp_path / "base", tokenizer=tok)

    model, cfg, tokenizer = tokensparse.hf.load_llama(tmp_path / "base")
    assert tokenizer.encode(texts[1]).ids == tok.encode(texts[1]).ids
    runs.set_context(model, cfg)  # the public name of the pipelines' context switch (a no-op here)
    lora.add_lora(model, config.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    ids = np.asarray(tokenizer.encode(" ".join(texts)).ids[:128], np.int32).reshape(2, 64)
    batch = data.Batch(tokens=jnp.asarray(ids))
    assert batch.positions is None and batch.segment_ids is None

    # Flax's own LoRAParam filter selects the project's adapters.
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param,
                                                               nnx.Not(nnx.LoRAParam))))
    optimizer = nnx.Optimizer(model, train.make_optimizer(config.TrainConfig(lr=1e-2,
                                                                             warmup_steps=0)),
                              wrt=nnx.LoRAParam)
    step = train.make_train_step(train.lm_loss, wrt=nnx.LoRAParam)
    metrics = step(model, optimizer, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                         jax.tree.leaves(after), strict=True))
    jax.tree.map(np.testing.assert_array_equal, frozen,
                 jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param,
                                                                   nnx.Not(nnx.LoRAParam)))))

    # LeMo from the package's entry points: a sparse step on the same batch.
    lemo_config = lemo.LeMoConfig(block_size=16, keep_ratio=0.5, selector="oracle")
    lemo.check_lemo(model, lemo_config, 64)
    lemo_step = train.make_train_step(
        lambda m, b: lemo.lemo_loss(m, b, lemo=lemo_config), wrt=nnx.LoRAParam)
    assert np.isfinite(float(lemo_step(model, optimizer, batch)["loss"]))

    # Out: a merged HF directory with the tokenizer, and a peft adapter.
    model.eval()
    want = model(batch.tokens)
    merged = export.save_merged(model, cfg, tmp_path / "merged", tokenizer=tokenizer)
    loaded, _, loaded_tok = tokensparse.hf.load_llama(merged)
    np.testing.assert_allclose(loaded(batch.tokens), want, atol=2e-5, rtol=1e-5)
    assert loaded_tok.encode(texts[0]).ids == tok.encode(texts[0]).ids
    adapter = export.save_peft(model, tmp_path / "adapter", base_model_name_or_path="base")
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json",
                                                   "adapter_model.safetensors"}


def test_every_loader_returns_model_config_tokenizer(tmp_path, monkeypatch):
    """One loader shape: hf.load_llama, gguf.load_gguf, zoo.load and runs.load_base all give
    ``(Llama, ModelConfig, tokenizers.Tokenizer)``."""
    import pathlib

    import tokenizers
    from test_gguf import _tiny_file

    from tokensparse import config, data, gguf, hf, runs, zoo
    from tokensparse.lemo import learned_selector
    from tokensparse.llama import Llama
    from tokensparse.pipelines import base

    def check(loaded):
        assert isinstance(loaded, tuple) and len(loaded) == 3
        model, cfg, tokenizer = loaded
        assert isinstance(model, Llama) and isinstance(cfg, config.ModelConfig)
        assert isinstance(tokenizer, tokenizers.Tokenizer)
        assert model.config == cfg and tokenizer.get_vocab_size() <= cfg.vocab_size

    tok = data.train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    cfg = config.preset("tiny").replace(vocab_size=320)
    hf_dir = tmp_path / "hf"
    hf.save_llama(Llama(cfg, rngs=nnx.Rngs(0)), cfg, hf_dir, tokenizer=tok)
    check(hf.load_llama(hf_dir))
    check(runs.load_base(str(hf_dir)))
    assert runs.load_base is base.load_base and runs.set_context is base.set_context

    file, _ = _tiny_file(tmp_path / "tiny.gguf")
    check(gguf.load_gguf(file))
    monkeypatch.setattr(zoo, "fetch", lambda name: pathlib.Path(file))
    monkeypatch.setattr(learned_selector, "shipped_path", lambda name: None)
    check(zoo.load("smollm2-135m"))
