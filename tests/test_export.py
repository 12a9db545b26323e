"""Export: merged Hugging Face directories and PEFT adapters, checked in Hugging Face's own terms.

The base is a checkpoint written by transformers (tests/fixtures/hf), so "HF space" below is the
real thing: ``W`` is ``nn.Linear``'s ``[out, in]`` weight and peft applies an adapter as
``W + (lora_alpha / r) * lora_B @ lora_A``. The expected key names, shapes and config fields are
written out here from the peft convention (peft 0.20, ``PeftModel.save_pretrained`` of a
``LlamaForCausalLM``), not taken from tokensparse.export.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tokensparse import export, hf, lora
from tokensparse.config import LoRAConfig

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "gqa"
ALL = ("q", "k", "v", "o", "gate", "up", "down")
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


def _load(path):
    model, config, _ = hf.load_llama(path)
    return model, config


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _tokens(vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 24), 0, vocab)


def _adapted(lora_config, seed=0):
    """The fixture base with adapters of ``lora_config``, every a and b random (b is zero at init,
    which would make any export look right)."""
    model, config = _load(FIXTURE)
    lora.add_lora(model, lora_config, rngs=nnx.Rngs(seed))
    state = lora.lora_state(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]))
    return model, config


def _hf_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each Llama projection, from a transformers config.json."""
    d, hd, ffn = hf_config["hidden_size"], hf_config["head_dim"], hf_config["intermediate_size"]
    q, kv = hf_config["num_attention_heads"] * hd, hf_config["num_key_value_heads"] * hd
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (ffn, d), "up": (ffn, d),
            "down": (d, ffn)}


def _hand_merged(base_dir, adapter_dir) -> dict[str, np.ndarray]:
    """The base's HF tensors with the saved adapter applied the way peft does (HF space only)."""
    tensors = load_file(base_dir / "model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    for key in [k for k in adapter if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"] + scale * (b @ a)
    return tensors


def _write_hf(tensors, config_dir, out) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out / "config.json")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ALL])
def test_peft_adapter_follows_peft_names_shapes_and_config(tmp_path, targets):
    cfg = LoRAConfig(rank=4, alpha=12.0, dropout=0.05, targets=targets)
    model, _ = _adapted(cfg)
    out = export.save_peft(model, tmp_path / "adapter", base_model_name_or_path="my/base")
    hf_config = json.loads((FIXTURE / "config.json").read_text())
    shapes = _hf_shapes(hf_config)
    expected = {}
    for i in range(hf_config["num_hidden_layers"]):
        for t in targets:
            stem = f"base_model.model.model.layers.{i}.{MODULES[t]}"
            n_out, n_in = shapes[t]
            expected[f"{stem}.lora_A.weight"] = (cfg.rank, n_in)
            expected[f"{stem}.lora_B.weight"] = (n_out, cfg.rank)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    with safe_open(out / "adapter_model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        names = f.keys()
        got = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        assert {f.get_slice(k).get_dtype() for k in names} == {"F32"}
    assert got == expected
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["lora_dropout"] == 0.05
    assert sorted(config["target_modules"]) == sorted(MODULES[t].split(".")[1] for t in targets)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "my/base"
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["modules_to_save"] is None and config["inference_mode"] is True


def test_peft_adapter_applied_by_hand_gives_the_fine_tuned_model(tmp_path):
    # peft's arithmetic on the transformers-written base, then our loader: the same logits as the
    # model with its adapters. q/k included: any RoPE row-layout slip would show here.
    model, config = _adapted(LoRAConfig(rank=4, alpha=8.0, targets=ALL))
    tokens = _tokens(config.vocab_size)
    want = _logits(model, tokens)
    adapter = export.save_peft(model, tmp_path / "adapter")
    merged_by_hand = _write_hf(_hand_merged(FIXTURE, adapter), FIXTURE, tmp_path / "by_hand")
    np.testing.assert_allclose(_logits(_load(merged_by_hand)[0], tokens), want, atol=2e-5,
                               rtol=1e-5)


def test_merged_export_loads_with_the_fine_tuned_logits(tmp_path):
    model, config = _adapted(LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "down")))
    tokens = _tokens(config.vocab_size)
    want = _logits(model, tokens)
    out = export.save_merged(model, config, tmp_path / "merged")
    assert lora.has_lora(model)  # merged on a copy
    loaded, loaded_config = _load(out)
    assert loaded_config == config and not lora.has_lora(loaded)
    np.testing.assert_allclose(_logits(loaded, tokens), want, atol=2e-5, rtol=1e-5)
    # The merged weights are the base plus peft's update of the exported adapter.
    adapter = export.save_peft(model, tmp_path / "adapter")
    by_hand = _hand_merged(FIXTURE, adapter)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(by_hand)
    for key, value in by_hand.items():
        np.testing.assert_allclose(written[key], value, atol=1e-6, err_msg=key)


def test_merged_export_in_place_and_sharded(tmp_path):
    model, config = _adapted(LoRAConfig(rank=2, targets=("v", "up")))
    tokens = _tokens(config.vocab_size)
    want = _logits(model, tokens)
    out = export.save_merged(model, config, tmp_path / "sharded", max_shard_bytes=40_000,
                             in_place=True)
    assert not lora.has_lora(model)
    assert (out / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(_logits(_load(out)[0], tokens), want, atol=2e-5, rtol=1e-5)


def test_peft_export_needs_adapters(tmp_path):
    model, _ = _load(FIXTURE)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export.save_peft(model, tmp_path)


def test_peft_base_names():
    assert export.peft_base_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert export.peft_base_name(str(FIXTURE)) == str(FIXTURE.resolve())
    assert export.peft_base_name("org/name") == "org/name"
    with pytest.raises(ValueError, match="format"):
        export.export_run(FIXTURE, "unused", format="gguf")


def test_lora_alpha_is_written_exactly(tmp_path):
    model, _ = _adapted(LoRAConfig(rank=8, alpha=12.5, targets=("q",)))
    assert export.peft_config(model)["lora_alpha"] == 12.5  # not rounded to an int
    model, _ = _adapted(LoRAConfig(rank=8, alpha=16.0, targets=("q",)))
    alpha = export.peft_config(model)["lora_alpha"]
    assert alpha == 16 and isinstance(alpha, int)  # peft's field is an int


# --- a run's workdir: load_run and export_run --------------------------------------------------

def test_checkpoint_items_are_read_alone(tmp_path):
    from tokensparse.checkpoint import Checkpointer, CheckpointError

    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "layers": {"0": np.ones(4)}}
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(1, {"params": params, "opt": {"mu": np.zeros(5)}}, {"step": 1})
        ckpt.save(2, {"params": jax.tree.map(lambda x: x + 1, params), "opt": {"mu": np.ones(5)}},
                  {"step": 2})
    reader = Checkpointer(tmp_path / "ckpt", save_every=1, read_only=True)
    part, meta = reader.restore_items(("params",))
    assert set(part) == {"params"} and meta["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, part["params"],
                 jax.tree.map(lambda x: x + 1, params))
    part, meta = reader.restore_items(("params",), step=1)
    jax.tree.map(np.testing.assert_array_equal, part["params"], params)
    with pytest.raises(CheckpointError, match="holds no"):
        reader.restore_items(("ema",))
    assert not (tmp_path / "absent").exists()
    Checkpointer(tmp_path / "absent", save_every=1, read_only=True).close()
    assert not (tmp_path / "absent").exists()  # read-only: nothing made


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A 2-step tiny pretraining run and a 2-step LeMo fine-tune of it (its layers regrouped to
    LeMo's schedule, so its checkpoint is grouped differently from a fresh model)."""
    from experiments import run_configs
    from experiments.configs import finetune_tiny, pretrain_tiny
    from tokensparse.pipelines import finetune, pretrain

    root = tmp_path_factory.mktemp("runs")
    c = pretrain_tiny.get_config()
    c.train.steps, c.train.checkpoint_every, c.train.eval_batches, c.progress = 2, 2, 1, False
    pretrain.pretrain(run_configs.pretrain_config(c), root / "pt")
    f = finetune_tiny.get_config()
    f.base, f.method, f.progress = str(root / "pt"), "lemo", False
    f.lemo.block_size, f.lemo.selector = 32, "oracle"
    f.train.steps, f.train.checkpoint_every, f.train.seq_len, f.train.eval_batches = 2, 1, 128, 2
    f.train.lr = 1e-2  # adapters visibly away from their init after 2 steps
    finetune.finetune(run_configs.finetune_config(f), root / "ft")
    return root


def _val_loss(model, tokenizer, workdir):
    """The fine-tune's dense validation loss recomputed the way its summary was."""
    import itertools

    from tokensparse import data, train
    from tokensparse.pipelines import common

    tc = json.loads((workdir / "config.json").read_text())["experiment"]["train"]
    val = data.encode_documents(tokenizer, data.load_corpus("shakespeare").validation)
    batches = list(itertools.islice(data.eval_windows(val, seq_len=tc["seq_len"]),
                                    tc["eval_batches"]))
    return common.eval_fn(batches, lambda m, b: train.lm_loss(
        m, b, loss_segment=tc["loss_segment"]))(model)["loss"]


@pytest.mark.slow
@pytest.mark.xdist_group("test_export:runs")
def test_load_run_restores_pretraining_and_fine_tuning_runs(runs_dir, tmp_path):
    from tokensparse import runs

    tokens = _tokens(300)
    # Pretraining: the final checkpoint is the model the run exported to hf/.
    model, config, tokenizer = runs.load_run(runs_dir / "pt")
    exported, exported_config = _load(runs_dir / "pt" / "hf")
    assert config == exported_config and tokenizer.get_vocab_size() == 512
    np.testing.assert_array_equal(_logits(model, tokens), _logits(exported, tokens))
    # Fine-tuning: base + the run's adapters reproduce the run's own final validation loss.
    model, config, tokenizer = runs.load_run(runs_dir / "ft")
    assert lora.has_lora(model) and model.layers.sizes == (config.n_layers,)
    summary = json.loads((runs_dir / "ft" / "summary.json").read_text())
    assert _val_loss(model, tokenizer, runs_dir / "ft") == pytest.approx(summary["val_loss"],
                                                                         abs=1e-5)
    b = [np.asarray(x) for p, x in nnx.to_flat_state(lora.lora_state(model)) if p[-1] == "b"]
    assert all(np.abs(x).max() > 0 for x in b)  # trained, not the zero init
    earlier, _, _ = runs.load_run(runs_dir / "ft", step=1)
    assert not np.allclose(_logits(earlier, tokens), _logits(model, tokens))
    # An interrupted run whose newest checkpoint is damaged loads its newest intact one.
    damaged = tmp_path / "damaged"
    shutil.copytree(runs_dir / "ft", damaged)
    for f in (damaged / "checkpoints" / "2").glob("state/**/d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="step 2"):
        fallback, _, _ = runs.load_run(damaged)
    np.testing.assert_array_equal(_logits(fallback, tokens), _logits(earlier, tokens))


@pytest.mark.slow
@pytest.mark.xdist_group("test_export:runs")
def test_export_run_merged_and_peft(runs_dir, tmp_path):
    import subprocess
    import sys

    from _env import subprocess_env

    from tokensparse import runs

    model, config, tokenizer = runs.load_run(runs_dir / "ft")
    tokens = _tokens(300)
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "experiments.export",
                           f"--workdir={runs_dir / 'ft'}", f"--out={tmp_path / 'merged'}"],
                          cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    merged, merged_config, merged_tokenizer = hf.load_llama(tmp_path / "merged")
    assert merged_config == config and not lora.has_lora(merged)
    assert merged_tokenizer.get_vocab() == tokenizer.get_vocab()
    np.testing.assert_allclose(_logits(merged, tokens), _logits(model, tokens), atol=2e-5,
                               rtol=1e-5)
    out = export.export_run(runs_dir / "ft", tmp_path / "peft", format="peft")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((runs_dir / "pt" / "hf").resolve())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # The adapter applied by hand to the base's HF weights gives the merged weights.
    by_hand = _hand_merged(runs_dir / "pt" / "hf", out)
    written = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in by_hand.items():
        np.testing.assert_allclose(written[key], value, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="pretraining run"):
        export.export_run(runs_dir / "pt", tmp_path / "no", format="peft")
