"""LeMo fine-tuning of your own base with the default (learned) selector: its weights come from an
``experiments.train_selector`` file (``FinetuneConfig.selector_weights``, ``--config.lemo.selector_weights``),
a run without them stops before its workdir is written, and a resume notices changed weights."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _env import subprocess_env
from test_tokenizer_travel import _corpus, _finetune_config, _hf_dir, _hf_style_tokenizer

from experiments import run_configs
from experiments.configs import finetune_tiny
from tokensparse.config import preset
from tokensparse.lemo import learned_selector as ls
from tokensparse.pipelines import finetune

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 320
SPARSE = (0,)  # the `half` schedule of the 2-layer tiny preset


def _weights(path, seed=0, n_layers=2, layers=SPARSE):
    config = preset("tiny", vocab_size=VOCAB, n_layers=n_layers)
    selector = ls.LearnedSelector(config.n_layers, config.d_model, layers=layers, hidden=8)
    selector.set_params(ls.init_params(config.n_layers, config.d_model, 8, seed=seed))
    ls.save(selector, path)
    return str(path)


def _lemo_config(tmp_path, weights="", steps=2):
    base = tmp_path / "base"
    if not base.exists():
        _hf_dir(base, vocab_size=VOCAB, tokenizer=_hf_style_tokenizer())
        _corpus(tmp_path / "corpus")
    c = _finetune_config(base, tmp_path / "corpus")
    lemo = c.lemo.replace(selector="learned", keep_ratio=0.5, block_size=64)
    return c.replace(method="lemo", lemo=lemo, selector_weights=weights,
                     train=c.train.replace(seq_len=256, steps=steps, checkpoint_every=1))


def test_lemo_trains_with_selector_weights_from_a_file_and_resume_checks_them(tmp_path):
    weights = _weights(tmp_path / "selector.npz")
    summary = finetune.finetune(_lemo_config(tmp_path, weights), tmp_path / "run")
    assert np.isfinite(summary["val_loss"]) and np.isfinite(summary["val_sparse_loss"])
    recorded = json.loads((tmp_path / "run" / "fingerprint.json").read_text())["fingerprint"]
    assert recorded["selector_weights"] == str((tmp_path / "selector.npz").resolve())
    digest = recorded["built.selector_weights_sha256"]
    # Extending the run with the same file resumes; other weights at the same path are refused.
    finetune.finetune(_lemo_config(tmp_path, weights, steps=3), tmp_path / "run")
    _weights(tmp_path / "selector.npz", seed=1)
    with pytest.raises(ValueError, match="other settings.*selector_weights_sha256") as err:
        finetune.finetune(_lemo_config(tmp_path, weights, steps=4), tmp_path / "run")
    assert digest in str(err.value) and "\n" not in str(err.value)


def test_learned_selection_without_weights_stops_before_the_workdir_is_written(tmp_path):
    needs = r"experiments\.train_selector.*--config\.lemo\.selector_weights"
    with pytest.raises(ValueError, match=needs) as err:
        finetune.finetune(_lemo_config(tmp_path), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not any(p.name != ".lock" for p in (tmp_path / "run").iterdir())
    # The sensitivity schedule picks its layers later, but still needs weights to start.
    tuned = _lemo_config(tmp_path)
    tuned = tuned.replace(lemo=tuned.lemo.replace(schedule="sensitivity"))
    with pytest.raises(ValueError, match=r"experiments\.train_selector"):
        finetune.finetune(tuned, tmp_path / "tuned")
    assert not (tmp_path / "tuned" / "config.json").exists()


def test_selector_weights_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"selector_weights='.*missing\.npz' is not a file"):
        finetune.check(_lemo_config(tmp_path, str(tmp_path / "missing.npz")))
    only = "selector_weights='x.npz' is for method='lemo' with lemo.selector='learned'"
    with pytest.raises(ValueError, match=only):
        _lemo_config(tmp_path).replace(method="lora", selector_weights="x.npz")
    other = _weights(tmp_path / "other.npz", n_layers=3)
    with pytest.raises(ValueError, match=r"trained for a model with \(n_layers, d_model\) = \(3, "):
        finetune.finetune(_lemo_config(tmp_path, other), tmp_path / "run")
    narrow = _weights(tmp_path / "narrow.npz", layers=(1,))
    with pytest.raises(ValueError, match=r"layers \[0\] are sparse but the learned selector was trained for"):
        finetune.finetune(_lemo_config(tmp_path, narrow), tmp_path / "run2")


def test_command_line_form_puts_selector_weights_under_lemo():
    c = finetune_tiny.get_config()
    assert c.lemo.selector_weights == ""
    c.method, c.lemo.selector, c.lemo.selector_weights = "lemo", "auto", "sel.npz"
    run = run_configs.finetune_config(c)
    assert run.selector_weights == "sel.npz" and run.lemo.selector == "learned"
    assert run_configs.finetune_dict(run).lemo.selector_weights == "sel.npz"
    assert "experiments.train_selector" in run_configs.field_help("finetune", "lemo.selector_weights")


@pytest.mark.slow
def test_readme_flow_trains_a_selector_for_an_hf_base_then_fine_tunes_with_it(tmp_path):
    """The README's two commands on a tiny Hugging Face directory: experiments.train_selector, then
    experiments.finetune with --config.lemo.selector_weights."""
    base = _hf_dir(tmp_path / "base", vocab_size=VOCAB, tokenizer=_hf_style_tokenizer())
    corpus, weights = _corpus(tmp_path / "corpus"), tmp_path / "selector.npz"

    def run(module, *args):
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run("experiments.train_selector", f"--base={base}", f"--out={weights}", "--windows=2",
        "--eval_windows=1", "--english_windows=1", "--seq_len=256", "--steps=10", "--layers=0")
    assert ls.load(weights).layers == SPARSE
    run("experiments.finetune", "--config=experiments/configs/finetune_small.py",
        f"--workdir={tmp_path / 'run'}", f"--config.base={base}", "--config.method=lemo",
        "--config.lemo.keep_ratio=0.7", f"--config.lemo.selector_weights={weights}",
        f"--config.data.source={corpus}", "--config.train.steps=2", "--config.train.seq_len=256",
        "--config.train.eval_batches=1", "--config.train.loss_segment=128", "--config.progress=False")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["val_sparse_loss"]) and summary["steps"] == 2
