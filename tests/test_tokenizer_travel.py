"""Tokenizers travel with models: a Hugging Face directory's ``tokenizer.json`` (and its special-token
files) is what fine-tuning encodes the corpus with; a base without one needs ``data.tokenizer``; a
tokenizer that does not fit the model's embedding is refused.

The HF directories here are written the way transformers writes them (``tokenizer.json`` from the
``tokenizers`` library, ``tokenizer_config.json`` naming the special tokens), with special tokens
(``<s>``, ``</s>``) that the library's own BPE never uses, so a run that silently trained a fresh
tokenizer could not pass.
"""

import json
import pathlib

import numpy as np
import pytest
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from experiments import run_configs
from experiments.configs import finetune_tiny
from tokensparse import config, data, hf
from tokensparse.llama import Llama
from tokensparse.pipelines import base, finetune

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "wizards", "quietly", "judge", "boxing", "matches", "near", "old", "harbours", "and",
         "every", "sailor", "sings", "about", "distant", "islands"]
SAMPLE = "The lazy wizard sings about seven distant harbours."


def _text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + "."


def _hf_style_tokenizer(vocab_size: int = 300) -> tokenizers.Tokenizer:
    """A byte-level BPE with HF-Llama-like specials: <s> (0), </s> (1), <unk> (2)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_text(i, 200) for i in range(20)], trainer=trainer)
    return tok


def _hf_dir(path: pathlib.Path, *, vocab_size: int, tokenizer=None) -> pathlib.Path:
    """A tiny HF Llama directory; with ``tokenizer``, its files as transformers writes them."""
    model_config = config.preset("tiny").replace(vocab_size=vocab_size)
    hf.save_llama(Llama(model_config, rngs=nnx.Rngs(0)), model_config, path)
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
            "eos_token": {"content": "</s>", "special": True}, "model_max_length": 2048}))
    return path


def _corpus(path: pathlib.Path) -> pathlib.Path:
    path.mkdir()
    for i in range(6):
        (path / f"doc{i}.txt").write_text(_text(100 + i, 400))
    return path


def _ids(tokenizer, text=SAMPLE) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _finetune_config(base_dir, corpus, tokenizer=""):
    c = finetune_tiny.get_config()
    c.base, c.progress = str(base_dir), False
    c.data.source, c.data.tokenizer = str(corpus), tokenizer
    c.train.steps, c.train.seq_len, c.train.batch_size = 2, 128, 1
    c.train.loss_segment, c.train.eval_batches, c.train.eval_every = 64, 1, 0
    return run_configs.finetune_config(c)


def test_finetune_encodes_with_the_hf_directorys_tokenizer(tmp_path):
    tok = _hf_style_tokenizer()
    assert tok.get_vocab_size() == 300
    base_dir = _hf_dir(tmp_path / "base", vocab_size=320, tokenizer=tok)  # a padded embedding
    summary = finetune.finetune(_finetune_config(base_dir, _corpus(tmp_path / "corpus")),
                                tmp_path / "run")
    assert np.isfinite(summary["val_loss"])
    saved = data.load_tokenizer(tmp_path / "run")
    assert _ids(saved) == _ids(tok) and saved.to_str() == tok.to_str()
    # The run's documents end in the directory's EOS (</s>, id 1), not the library BPE's.
    assert saved.eos_token_id == tok.token_to_id("</s>") == 1
    assert data.encode_documents(saved, [SAMPLE])[0][-1] == 1


def test_base_without_tokenizer_needs_data_tokenizer(tmp_path):
    base_dir = _hf_dir(tmp_path / "base", vocab_size=320)
    with pytest.raises(ValueError, match=r"--config\.data\.tokenizer=PATH") as err:
        finetune.finetune(_finetune_config(base_dir, _corpus(tmp_path / "corpus")), tmp_path / "run")
    assert "\n" not in str(err.value) and str(base_dir) in str(err.value)
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    # Given explicitly, that tokenizer is the one used.
    tok = _hf_style_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    _, _, used = base.load_base(str(base_dir), tokenizer=str(tmp_path / "tok.json"))
    assert _ids(used) == _ids(tok)


def test_explicit_tokenizer_must_match_the_bases_own(tmp_path):
    base_dir = _hf_dir(tmp_path / "base", vocab_size=320, tokenizer=_hf_style_tokenizer())
    other = data.train_tokenizer([_text(7, 300)], 290)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="vocabularies differ") as err:
        base.load_base(str(base_dir), tokenizer=str(tmp_path / "other.json"))
    assert "data.tokenizer" in str(err.value) and "\n" not in str(err.value)
    # The same tokenizer given explicitly is fine.
    _, _, used = base.load_base(str(base_dir), tokenizer=str(base_dir / "tokenizer.json"))
    assert _ids(used) == _ids(_hf_style_tokenizer())


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    base_dir = _hf_dir(tmp_path / "base", vocab_size=256, tokenizer=_hf_style_tokenizer(300))
    with pytest.raises(ValueError, match="vocab_size=256") as err:
        hf.load_llama(base_dir)
    assert "tokenizer.json" in str(err.value) and "\n" not in str(err.value)
    bare = _hf_dir(tmp_path / "bare", vocab_size=256)
    big = _hf_style_tokenizer(300)
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match="data.tokenizer"):
        base.load_base(str(bare), tokenizer=str(tmp_path / "big.json"))


def test_pretraining_workdir_without_hf_tokenizer_uses_the_one_beside(tmp_path):
    """Workdirs written before hf/ carried the tokenizer keep it at workdir/tokenizer.json."""
    workdir = tmp_path / "run"
    _hf_dir(workdir / "hf", vocab_size=320)
    tok = data.train_tokenizer([_text(3, 300)], 290)
    tok.save(str(workdir / "tokenizer.json"))
    _, _, used = base.load_base(str(workdir))
    assert _ids(used) == _ids(tok) and data.eos_id(used) == tok.token_to_id(data.EOS)


def test_special_ids_come_from_the_usual_files(tmp_path):
    tok = _hf_style_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert data.load_tokenizer(tmp_path).eos_token_id is None  # no special-token files yet
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    assert data.load_tokenizer(tmp_path).eos_token_id == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    loaded = data.load_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)  # the first of a list
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<unk>"}))
    assert data.load_tokenizer(tmp_path).eos_token_id == 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert data.load_tokenizer(tmp_path).eos_token_id == 1  # tokenizer_config.json wins


@pytest.mark.parametrize("name, content, match", [
    ("tokenizer_config.json", "{not json", "not valid JSON"),
    ("tokenizer_config.json", json.dumps({"eos_token": "<|nope|>"}), "not in"),
    ("tokenizer.json", "{\"model\": 3}", "not a readable tokenizer.json"),
])
def test_bad_tokenizer_files_name_the_file(tmp_path, name, content, match):
    _hf_style_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        data.load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_saved_tokenizer_reads_back_with_its_specials(tmp_path):
    tok = data.load_tokenizer(_hf_dir(tmp_path / "base", vocab_size=320,
                                      tokenizer=_hf_style_tokenizer()))
    data.save_hf_tokenizer(tok, tmp_path / "out")
    again = data.load_tokenizer(tmp_path / "out")
    assert _ids(again) == _ids(tok)
    assert (again.bos_token_id, again.eos_token_id) == (0, 1)
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (written["bos_token"], written["eos_token"]) == ("<s>", "</s>")


def _mesh_config():
    from tokensparse.config import MeshConfig

    return MeshConfig(data=1, fsdp=2, tensor=2)


def test_load_base_with_a_mesh_reads_into_the_training_layout(tmp_path):
    import jax

    from tokensparse import sharding

    base_dir = _hf_dir(tmp_path / "base", vocab_size=320, tokenizer=_hf_style_tokenizer())
    mesh = sharding.make_mesh(_mesh_config())
    model, _, tok = base.load_base(str(base_dir), mesh=mesh)
    assert tok is not None
    want = sharding.state_shardings(nnx.state(model, nnx.Param), mesh)
    got = jax.tree.map(lambda x: x.sharding, nnx.state(model, nnx.Param))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(got))


@pytest.mark.slow
def test_finetune_on_a_mesh_from_an_hf_directory(tmp_path):
    """The sharded load feeds the whole pipeline (LoRA, optimizer, training on the mesh)."""
    tok = _hf_style_tokenizer()
    base_dir = _hf_dir(tmp_path / "base", vocab_size=320, tokenizer=tok)
    ft = _finetune_config(base_dir, _corpus(tmp_path / "corpus"))
    ft = ft.replace(mesh=_mesh_config(), train=ft.train.replace(batch_size=2, steps=1))
    summary = finetune.finetune(ft, tmp_path / "run")
    assert np.isfinite(summary["val_loss"])
    assert _ids(data.load_tokenizer(tmp_path / "run")) == _ids(tok)


def test_predictor_training_encodes_with_the_hf_directorys_tokenizer(tmp_path):
    """train_predictors takes its tokenizer from the base too (and needs data.tokenizer without one)."""
    import dataclasses

    from tokensparse.pipelines import predictors

    tok = _hf_style_tokenizer()
    base_dir = _hf_dir(tmp_path / "base", vocab_size=320, tokenizer=tok)
    corpus = _corpus(tmp_path / "corpus")
    pc = predictors.PredictorsConfig(base=str(base_dir), data=config.DataConfig(source=str(corpus)),
                                     progress=False)
    pc = pc.replace(train=dataclasses.replace(pc.train, seq_len=128))
    *_, used, _ = predictors._setup(pc)
    assert _ids(used) == _ids(tok) and used.eos_token_id == tok.token_to_id("</s>")
    bare = _hf_dir(tmp_path / "bare", vocab_size=320)
    with pytest.raises(ValueError, match=r"--config\.data\.tokenizer=PATH"):
        predictors._setup(pc.replace(base=str(bare)))
