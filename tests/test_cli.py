"""The command lines: --help, bad values failing before anything is built, and Ctrl-C.

The flag validators and config checks are tested in-process (fast); a few end-to-end runs check that
the real entry points use them: exit 1, the flag's name on stderr, nothing written."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from _env import subprocess_env
from absl import flags

from experiments import _checks, _cli
from experiments.configs import finetune_small, predictors_small, pretrain_subllm_small, pretrain_tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, cwd=ROOT, timeout=300):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


HELP = {
    "experiments.pretrain": ("Pretrain", "--config", "--workdir"),
    "experiments.finetune": ("LoRA fine-tuning", "--config", "--workdir"),
    "experiments.train_predictors": ("predictors", "--config", "--workdir"),
    "experiments.analyze_sparsity": ("sparse", "--seq_lens", "--windows", "--out"),
    "experiments.demo": ("demo", "--preset", "--seq_len"),
    "experiments.plots": ("Figures", "bench_results"),
    "experiments.bench.lemo_memory": ("memory", "--seq_lens", "--remat", "--out"),
    "experiments.bench.lemo_speed": ("wall time", "--seq_lens", "--reps", "--out"),
    "experiments.bench.lemo_quality": ("perplexity", "--steps", "--seq_len", "--out"),
    "experiments.bench.lemo_predictor": ("recall", "--config", "--base_seq_len", "--out"),
    "experiments.bench.subllm_speed": ("throughput", "--seq_lens", "--decode_tokens", "--out"),
    "experiments.bench.lemo_window_agreement": ("local", "--window_blocks", "--output_norms", "--out"),
    "experiments.bench.subllm_quality": ("held-out loss", "--steps", "--seq_len", "--out"),
    "experiments.bench.sharded_memory": ("mesh", "--meshes", "--seq_len", "--out"),
    "experiments.bench.kernels": ("correctness sweep", "--seq_lens", "--kernels", "--out"),
}


@pytest.mark.parametrize("module", sorted(HELP))
def test_help_exits_0_with_the_docstring_and_the_main_flags(module):
    done = _run(module, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    for text in HELP[module]:
        assert text in done.stdout, (module, text)


# Validators, in-process on a private FlagValues.
def _parse(define, validate, *argv):
    fv = flags.FlagValues()
    holders = define(fv)
    validate(*holders)
    fv(["prog", *argv])
    return holders


def _lists(fv):
    return (flags.DEFINE_list("seq_lens", ["2048"], "", flag_values=fv),
            flags.DEFINE_list("windows", ["1"], "", flag_values=fv))


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq_lens=abc"], "'abc' is not an integer"),
    (["--seq_lens=2048,100"], "100 must be a multiple of 64 (whole blocks)"),
    (["--seq_lens=0"], "0 must be >= 1"),
    (["--seq_lens="], "at least one value"),
])
def test_int_list_names_the_flag_and_the_bad_entry(argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match="--seq_lens") as e:
        _parse(_lists, lambda s, w: _checks.int_list(s, multiple_of=64, why="whole blocks"), *argv)
    assert message in str(e.value)


def test_int_list_accepts_good_values():
    seq_lens, _ = _parse(_lists, lambda s, w: _checks.int_list(s, multiple_of=64), "--seq_lens=64,4096")
    assert seq_lens.value == ["64", "4096"]


def test_other_validators():
    def number(fv):
        return (flags.DEFINE_integer("steps", 1, "", flag_values=fv),)

    with pytest.raises(flags.IllegalFlagValueError, match=r"--steps=-2: -2 must be >= 1"):
        _parse(number, lambda s: _checks.at_least(s, 1), "--steps=-2")
    with pytest.raises(flags.IllegalFlagValueError, match="96 must be a multiple of 64"):
        _parse(number, lambda s: _checks.at_least(s, 64, multiple_of=64), "--steps=96")

    def name(fv):
        return (flags.DEFINE_list("remat", ["none"], "", flag_values=fv),)

    with pytest.raises(flags.IllegalFlagValueError, match="--remat.*'bogus' is not one of none, full"):
        _parse(name, lambda r: _checks.one_of(r, ("none", "full")), "--remat=full,bogus")
    with pytest.raises(flags.IllegalFlagValueError, match="--windows has 1 entries, --seq_lens 2"):
        _parse(_lists, _checks.same_length, "--seq_lens=64,128")


@pytest.mark.parametrize(("include_high", "value", "ok"), [
    (False, "1.0", False), (True, "1.0", True), (True, "0.75", True), (True, "0.0", False),
    (True, "1.5", False)])
def test_in_range_may_include_its_upper_end(include_high, value, ok):
    def capacity(fv):
        return (flags.DEFINE_float("infer_capacity", 0.75, "", flag_values=fv),)

    def parse():
        return _parse(capacity, lambda c: _checks.in_range(c, 0.0, 1.0, include_high=include_high),
                      f"--infer_capacity={value}")[0].value
    if ok:
        assert parse() == float(value)
    else:
        with pytest.raises(flags.IllegalFlagValueError,
                           match=r"must be in \(0, 1\]" if include_high else r"must be in \(0, 1\)"):
            parse()


# Config checks, in-process: each error names the flag that set the bad value.
def _config_error(kind, c):
    with pytest.raises(ValueError) as e:
        _cli.check_config(kind, c)
    return _checks.flag_for_config_error(str(e.value))


def test_config_checks_name_the_flag(tmp_path):
    c = pretrain_tiny.get_config()
    _cli.check_config("pretrain", c)  # the shipped configs pass
    c.train.remat = "bogus"
    assert _config_error("pretrain", c).startswith("flag --config.train.remat='bogus' must be one of")
    c = pretrain_tiny.get_config()
    c.train.steps = -1
    assert _config_error("pretrain", c) == "flag --config.train.steps=-1 must be >= 1."
    c = pretrain_tiny.get_config()
    c.model.preset = "nope"
    assert _config_error("pretrain", c).startswith("flag --config.model.preset='nope' is not a preset")
    c = pretrain_subllm_small.get_config()
    _cli.check_config("pretrain", c)
    c.model = "sparse"
    assert _config_error("pretrain", c).startswith("flag --config.model='sparse' must be one of")
    c = pretrain_subllm_small.get_config()
    c.subllm.eval_modes = ["bogus"]
    assert "--config.subllm.eval_modes" in _config_error("pretrain", c)

    c = finetune_small.get_config()
    assert "--config.base is empty" in _config_error("finetune", c)
    c.base = str(tmp_path / "missing")
    assert "neither an existing directory nor a zoo model" in _config_error("finetune", c)
    c.base, c.method = str(tmp_path), "lemo"
    _cli.check_config("finetune", c)
    c.train.seq_len = 100
    assert _config_error("finetune", c).startswith("flag --config.train.seq_len=100 must be a multiple "
                                                   "of config.lemo.block_size=64")
    c = finetune_small.get_config()
    c.base, c.method = str(tmp_path), "sparse"
    assert _config_error("finetune", c).startswith("flag --config.method='sparse'")
    c.method, c.lora.targets = "lora", ["q", "nope"]
    assert _config_error("finetune", c).startswith("flag --config.lora: LoRAConfig.targets")
    c.lora.targets, c.attention_backend = ["q"], "bogus"
    assert _config_error("finetune", c).startswith("flag --config.attention_backend='bogus'")

    c = predictors_small.get_config()
    c.base = "smollm2-135m"  # a zoo name passes without reading any weights
    _cli.check_config("train_predictors", c)
    c.train.seq_len = 100
    assert _config_error("train_predictors", c).startswith("flag --config.train.seq_len=100 must be a "
                                                           "positive multiple of block_size=64")


def test_unknown_config_field_message_names_the_override():
    error = KeyError("'stepz'\nDid you mean \"steps\" instead of \"stepz\"?")
    argv = ["prog", "--workdir=x", "--config.train.stepz=3"]
    assert _checks.unknown_field_message(AttributeError(str(error)), argv) == (
        "flag --config.train.stepz: the config has no field 'stepz'; did you mean 'steps'?")


# End to end: the real entry points exit 1 before building anything.
@pytest.mark.parametrize(("module", "args", "flag"), [
    ("experiments.pretrain", ["--config.train.remat=bogus"], "--config.train.remat='bogus'"),
    ("experiments.finetune", ["--config.base=TMP", "--config.method=lemo",
                              "--config.train.seq_len=100"], "--config.train.seq_len=100"),
    ("experiments.finetune", ["--config.base=TMP", "--config.method=lemo",
                              "--config.lemo.selector_weights=TMP/none.npz"],
     "--config.lemo.selector_weights="),
    ("experiments.finetune", ["--config.base=TMP", "--config.lemo.selector_weights=TMP/none.npz"],
     "--config.lemo.selector_weights="),
    ("experiments.train_predictors", ["--config.base=TMP", "--config.train.steps=-5"],
     "--config.train: PredictorTrainConfig: steps"),
    ("experiments.bench.lemo_memory", ["--seq_lens=100"], "--seq_lens"),
    ("experiments.bench.subllm_speed", ["--seq_lens=abc"], "--seq_lens"),
])
def test_bad_values_fail_before_anything_is_built(tmp_path, module, args, flag):
    workdir, out = tmp_path / "run", tmp_path / "out.json"
    is_run = module.split(".")[-1] in _cli.CHECKS
    extra = [f"--workdir={workdir}", "--config.progress=False"] if is_run else [f"--out={out}"]
    args = [a.replace("TMP", str(tmp_path)) for a in args]  # a base that exists
    start = time.perf_counter()
    done = _run(module, *extra, *args)
    assert done.returncode == 1, done.stdout[-2000:]
    assert f"FATAL Flags parsing error: flag {flag}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not workdir.exists() and not out.exists()
    assert time.perf_counter() - start < 60


def test_window_agreement_output_norms_parse_rank_r():
    from experiments.bench.lemo_window_agreement import output_norm_rank

    assert [output_norm_rank(n) for n in ("exact", "head_gram", "head", "rank1", "rank192")] == [
        None, None, None, 1, 192]
    for bad in ("rank", "rank0", "rank-3", "rankx", "svd64", "Exact"):
        with pytest.raises(ValueError, match=f"unknown '{bad}'"):
            output_norm_rank(bad)


# Ctrl-C: the interrupted run leaves a checkpoint and a rerun continues from it.
@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_the_predictor_run_resumes_from(tmp_path):
    base = tmp_path / "base"
    done = _run("experiments.pretrain", f"--workdir={base}", "--config.train.steps=2",
                "--config.progress=False", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    args = ["-m", "experiments.train_predictors", f"--workdir={tmp_path / 'pred'}",
            f"--config={ROOT / 'experiments/configs/predictors_tiny.py'}", f"--config.base={base}",
            "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
            "--config.train.prune_every=0", "--config.progress=False"]
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, *args, "--config.train.steps=100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pred" / "metrics.jsonl"
    deadline = time.time() + 300
    while (time.time() < deadline and proc.poll() is None
           and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]  # 128 + SIGINT: a scheduler sees it did not finish
    saved = sorted(int(p.name) for p in (tmp_path / "pred" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 3 <= saved[-1] < 100000
    assert not (tmp_path / "pred" / "summary.json").exists()  # only a finished run has one
    logged = len(metrics.read_text().splitlines())
    again = subprocess.run([sys.executable, *args, f"--config.train.steps={saved[-1] + 2}"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line)["step"] for line in metrics.read_text().splitlines()[logged:]]
    assert resumed == [saved[-1] + 1, saved[-1] + 2]  # continued, not restarted
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["steps"] == saved[-1] + 2 and summary["interrupted"] is False
