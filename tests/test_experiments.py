"""The experiment CLIs end to end: outputs, exact resume, SIGTERM, fine-tuning, bad input."""

import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from _env import subprocess_env
from ml_collections import config_dict

from experiments import run_configs
from experiments.configs import finetune_tiny, pretrain_tiny
from tokensparse.checkpoint import CheckpointError
from tokensparse.pipelines import base, finetune, predictors, pretrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cli(module, workdir, *overrides, config=None, wait=True):
    cmd = [sys.executable, "-m", f"experiments.{module}", f"--workdir={workdir}",
           "--config.progress=False", *overrides]
    if config:
        cmd.insert(3, f"--config={ROOT / 'experiments/configs' / config}")
    env = subprocess_env()
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _finetune(c, workdir):
    return finetune.finetune(run_configs.finetune_config(c), workdir)


def _pretrain(c, workdir):
    return pretrain.pretrain(run_configs.pretrain_config(c), workdir)


def _losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    done = _cli("pretrain", workdir, "--config.train.steps=12", "--config.train.log_every=1",
                "--config.train.checkpoint_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_pretrain_writes_its_outputs(pretrained):
    workdir, done = pretrained
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 64
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    assert (workdir / "checkpoints").is_dir() and (workdir / "hf" / "config.json").exists()
    assert "val_loss" in done.stdout and "activation_bytes" in done.stdout


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_resume_across_processes_gives_identical_losses(pretrained, tmp_path):
    straight, _ = pretrained
    first = _cli("pretrain", tmp_path, "--config.train.steps=6", "--config.train.log_every=1",
                 "--config.train.checkpoint_every=4")
    assert first.returncode == 0, first.stderr[-3000:]
    # Continue the same run to 12 steps in a new process (resumes from the step-6 checkpoint).
    rest = _cli("pretrain", tmp_path, "--config.train.steps=12", "--config.train.log_every=1",
                "--config.train.checkpoint_every=4")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert _losses(tmp_path) == _losses(straight)


def test_sigterm_leaves_a_checkpoint_the_run_continues_from(tmp_path):
    proc = _cli("pretrain", tmp_path, "--config.train.steps=100000", "--config.train.log_every=1",
                "--config.train.checkpoint_every=100000", wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, after saving
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "hf").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 3 <= steps[-1] < 100000
    again = _cli("pretrain", tmp_path, f"--config.train.steps={steps[-1] + 2}",
                 "--config.train.log_every=1", "--config.train.checkpoint_every=100000")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(_losses(tmp_path)) == steps[-1] + 2


@pytest.mark.xdist_group("test_experiments:pretrained")
@pytest.mark.parametrize("method", ["lora", "lemo"])
def test_finetune_from_our_pretraining(pretrained, tmp_path, method):
    workdir, _ = pretrained
    done = _cli("finetune", tmp_path, f"--config.base={workdir}", f"--config.method={method}",
                "--config.lemo.block_size=32", config="finetune_tiny.py")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved["rope_scaling"] == {**saved["rope_scaling"], "kind": "linear", "factor": 2.0}
    assert sorted(_losses(tmp_path)) == [5, 10]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    if method == "lemo":  # keep 0.4 in layer 0: the sparse forward scores the windows differently
        assert math.isfinite(summary["val_sparse_loss"]) and math.isfinite(summary["val_sparse_ppl"])
        assert summary["val_sparse_tokens"] == summary["val_tokens"]
        assert summary["val_sparse_loss"] != pytest.approx(summary["val_loss"], abs=1e-4)
    else:
        assert "val_sparse_loss" not in summary


def _lemo_finetune_config(pretrained):
    """finetune_tiny on the shared pretrained base: LeMo, 2 steps, no progress bar."""
    c = finetune_tiny.get_config()
    c.base, c.method, c.progress = str(pretrained[0]), "lemo", False
    c.train.steps = 2
    return c


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_lemo_sparse_eval_equals_dense_eval_when_nothing_is_dropped(pretrained, tmp_path):
    c = _lemo_finetune_config(pretrained)
    c.lemo.block_size, c.lemo.keep_ratio, c.lemo.mlp_mode = 32, 1.0, "dense"
    summary = _finetune(c, tmp_path)
    assert math.isfinite(summary["val_sparse_loss"])
    assert summary["val_sparse_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert summary["val_sparse_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-5)


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_lemo_algorithm1_schedule_tunes_a_profile_then_trains_with_it(pretrained, tmp_path):
    c = _lemo_finetune_config(pretrained)
    c.lemo.block_size, c.lemo.schedule = 32, "algorithm1"
    c.lemo.calibration_windows, c.lemo.tune_rounds = 1, 1
    summary = _finetune(c, tmp_path)
    tuned = json.loads((tmp_path / "lemo_profile.json").read_text())
    n_layers = json.loads((tmp_path / "config.json").read_text())["model"]["n_layers"]
    assert len(tuned["profile"]) == len(tuned["thresholds"]) == n_layers
    assert len(tuned["history"]) == 2  # one round, then the final thresholds
    assert all(0 < r <= 1 for r in tuned["profile"])
    assert math.isfinite(summary["val_sparse_loss"])


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_lemo_sensitivity_schedule_measures_a_profile_then_trains_with_it(pretrained, tmp_path):
    c = _lemo_finetune_config(pretrained)
    c.lemo.block_size, c.lemo.schedule, c.lemo.keep_ratio = 32, "sensitivity", 0.5
    c.lemo.calibration_windows, c.lemo.loss_budget = 1, 10.0  # affords every layer
    summary = _finetune(c, tmp_path)
    measured = json.loads((tmp_path / "lemo_profile.json").read_text())
    n_layers = json.loads((tmp_path / "config.json").read_text())["model"]["n_layers"]
    assert measured["schedule"] == "sensitivity" and len(measured["costs"]) == n_layers
    assert measured["profile"] == [0.5] * n_layers
    assert (measured["keep_ratio"], measured["budget"]) == (0.5, 10.0)
    assert measured["profile_loss"] != pytest.approx(measured["dense_loss"], abs=1e-4)
    # the run trained and evaluates with that profile: its sparse evaluation is not the dense one
    assert math.isfinite(summary["val_sparse_loss"])
    assert summary["val_sparse_loss"] != pytest.approx(summary["val_loss"], abs=1e-4)


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_train_predictors_then_finetune_with_them(pretrained, tmp_path):
    workdir, _ = pretrained
    done = _cli("train_predictors", tmp_path / "pred", f"--config.base={workdir}",
                config="predictors_tiny.py")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 < summary["params_kept_ratio"] <= 1
    assert set(summary["recall@0.4"]) == {"0"} and 0 <= summary["mean_recall@0.4"] <= 1
    assert "mean_recall@0.4" in done.stdout
    c = finetune_tiny.get_config()
    c.base, c.method, c.progress = str(workdir), "lemo", False
    c.train.steps = 2
    c.lemo.block_size, c.lemo.predictors = 32, str(tmp_path / "pred" / "predictors")
    c.lemo.selector = "auto"  # with a predictors directory: the predictors
    with_predictors = _finetune(c, tmp_path / "ft")
    c.lemo.predictors, c.lemo.selector = "", "oracle"
    with_oracle = _finetune(c, tmp_path / "ft_oracle")
    assert math.isfinite(with_predictors["val_sparse_loss"])
    assert with_predictors["val_sparse_loss"] != pytest.approx(with_oracle["val_sparse_loss"], abs=1e-6)
    c.lemo.selector = "predictor"
    with pytest.raises(ValueError, match="needs config.lemo.predictors"):
        _finetune(c, tmp_path / "ft_bad")


def test_unknown_config_key_fails_before_compiling(tmp_path):
    done = _cli("pretrain", tmp_path, "--config.train.stepz=3")
    assert done.returncode != 0 and "stepz" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_multi_host_flags_are_checked_before_anything_runs(tmp_path):
    done = _cli("pretrain", tmp_path, "--process_id=1")
    assert done.returncode != 0 and "--coordinator_address" in done.stderr
    done = _cli("finetune", tmp_path, "--coordinator_address=localhost:1", "--num_processes=2",
                "--process_id=2")
    assert done.returncode != 0 and "--process_id=2 must be < --num_processes=2" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def _tiny(**train):
    c = pretrain_tiny.get_config()
    c.progress = False
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.mark.xdist_group("test_experiments:pretrained")
def test_bad_inputs_fail_with_clear_errors(tmp_path, pretrained):
    with pytest.raises(ValueError, match="seq_len"):
        _pretrain(_tiny(seq_len=1), tmp_path / "a")
    c = _tiny()
    c.model.overrides.vocab_size = 300
    with pytest.raises(ValueError, match="vocab_size"):
        _pretrain(c, tmp_path / "b")
    c = _tiny()
    c.data.source = str(tmp_path / "no_such_corpus")
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_corpus"):
        _pretrain(c, tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    c.data.source = str(empty)
    with pytest.raises(ValueError, match="empty"):
        _pretrain(c, tmp_path / "d")
    # A checkpoint written for another model shape is refused.
    workdir, _ = pretrained
    c = _tiny(steps=13)
    c.model.overrides.d_model = 32
    with pytest.raises(CheckpointError, match="d_model"):
        _pretrain(c, workdir)
    with pytest.raises(ValueError, match="base"):
        ft = finetune_tiny.get_config()
        _finetune(ft, tmp_path / "e")


def test_config_dicts_expose_every_model_field():
    c = run_configs.model_dict("tiny")
    assert isinstance(c, config_dict.ConfigDict)
    c.overrides.n_layers = 3
    assert run_configs.model_config(c).n_layers == 3


@pytest.fixture
def fake_zoo(monkeypatch, tmp_path):
    """``zoo.load`` returning a tiny random Llama (512-token vocabulary, context 512) and the
    corpus' 512-token BPE, so a zoo-named base costs seconds; the cwd holds no such directory."""
    from flax import nnx

    from tokensparse import data, zoo
    from tokensparse.config import preset
    from tokensparse.llama import Llama

    calls = []

    def load(name, *, dtype=None, attention_backend="auto"):
        calls.append((name, attention_backend))
        config = preset("tiny", vocab_size=512, max_positions=512)
        tokenizer = data.get_tokenizer(data.load_corpus("shakespeare"), 512)
        return Llama(config, attention_backend=attention_backend, rngs=nnx.Rngs(0)), config, tokenizer

    monkeypatch.setattr(zoo, "load", load)
    monkeypatch.chdir(tmp_path)
    return calls


def test_load_base_takes_a_zoo_name(fake_zoo):
    model, config, tokenizer = base.load_base("smollm2-135m", attention_backend="xla")
    assert fake_zoo == [("smollm2-135m", "xla")]
    assert config.vocab_size == 512 and tokenizer.get_vocab_size() == 512
    assert model.config == config


def test_load_base_refuses_an_unknown_name_and_lists_the_zoo(fake_zoo):
    with pytest.raises(ValueError, match=r"neither an existing directory nor a zoo model.*smollm2-135m"):
        base.load_base("smollm3-9b")
    assert fake_zoo == []


def test_finetune_and_train_predictors_from_a_zoo_base(fake_zoo, tmp_path):
    from tokenizers import Tokenizer

    from experiments.configs import predictors_tiny
    from tokensparse import data

    c = finetune_tiny.get_config()
    c.base, c.method, c.progress = "smollm2-135m", "lemo", False
    c.data.vocab_size = 8192  # ignored: the base's own tokenizer is used
    c.train.steps, c.train.checkpoint_every = 2, 2
    c.lemo.block_size = 32
    summary = _finetune(c, tmp_path / "ft")
    assert math.isfinite(summary["val_loss"]) and math.isfinite(summary["val_sparse_loss"])
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())["model"]
    assert saved["rope_scaling"]["kind"] == "none"  # 256 fits the base's 512: no scaling
    used = Tokenizer.from_file(str(tmp_path / "ft" / "tokenizer.json"))
    assert used.to_str() == data.get_tokenizer(data.load_corpus("shakespeare"), 512).to_str()
    p = predictors_tiny.get_config()
    p.base, p.progress = "smollm2-135m", False
    p.train.steps, p.train.prune_until, p.train.checkpoint_every = 4, 3, 4
    assert predictors.train_predictors(run_configs.predictors_config(p), tmp_path / "pred")["steps"] == 4
    assert [name for name, _ in fake_zoo] == ["smollm2-135m"] * 2
