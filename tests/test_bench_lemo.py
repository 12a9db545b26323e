"""The LeMo quality and speed benchmarks end to end on the tiny preset: their JSON is complete."""

import itertools
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TOP_LEVEL = {"benchmark", "backend", "device", "jax", "git", "settings", "rows", "summary"}


def _bench(name, out, *args):
    env = subprocess_env()  # the bench package adds its own flags
    done = subprocess.run([sys.executable, "-m", f"experiments.bench.{name}", f"--out={out}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= TOP_LEVEL and result["benchmark"] == name
    return result, done.stdout


def _finite(row, keys):
    for key in keys:
        assert isinstance(row[key], int | float) and math.isfinite(row[key]), (key, row[key])


@pytest.fixture(scope="module")
def predictor_smoke(tmp_path_factory):
    """The predictor benchmark's smoke run; its base and predictors serve the quality smoke too."""
    tmp = tmp_path_factory.mktemp("lemo_predictor")
    result, stdout = _bench("lemo_predictor", tmp / "p.json", "--smoke", f"--workdir={tmp / 'run'}",
                            f"--base_workdir={tmp / 'base'}")
    return tmp, result, stdout


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_lemo_quality_smoke(tmp_path, predictor_smoke):
    # The mlp_drop=0.5 and recomputed-MLP runs (on by default) are tested on the fake zoo base.
    shared, _, _ = predictor_smoke
    result, stdout = _bench("lemo_quality", tmp_path / "q.json", "--smoke", "--nomlp_drop_ablation",
                            "--nomlp_recompute", f"--base_workdir={shared / 'base'}",
                            "--config.lemo.selector=oracle",  # a base pretrained here has no learned selector
                            # 3 steps leave attention nearly uniform: the default fill would make the
                            # sparse forward's loss equal the dense one to 1e-4, passing through does not
                            "--config.lemo.eliminated=pass",
                            f"--config.lemo.predictors={shared / 'run' / 'predictors'}")
    assert ("[lemo_quality] fine-tuning lemo_eliminatedpass_oracle_mlp_drop0.8 " in stdout
            and "drop0.5" not in stdout)
    summary = result["summary"]
    assert set(summary) == {"ppl_ratio", "sparse_ppl_ratio", "base_ppl@128",
                            "base_ppl_rope_scaled@256", "lora_ppl@256", "lemo_ppl@256", "lemo_mean_keep",
                            "predictor_ppl_ratio", "predictor_lora_ppl_ratio",
                            "lemo_predictor_ppl@256"}
    _finite(summary, summary)
    rows = result["rows"]
    assert [(r["method"], r["selector"], r["mlp_drop"], r["seq_len"]) for r in rows] == [
        ("base", None, None, 128), ("base", None, None, 256), ("lora", None, None, 256),
        ("lemo", "oracle", 0.8, 256), ("lemo", "predictor", 0.8, 256)]
    for row in rows:
        _finite(row, ("val_loss", "val_ppl", "val_tokens", "wall_s"))
    for row in rows[2:]:
        _finite(row, ("train_loss", "tokens_per_s"))
        assert row["steps"] == 3
    for row in rows[3:]:
        _finite(row, ("val_sparse_loss", "val_sparse_ppl"))
    # Every evaluation scores the same target tokens; the sparse forward changes the loss.
    assert len({r["val_tokens"] for r in rows}) == 1
    assert rows[3]["val_sparse_loss"] != pytest.approx(rows[3]["val_loss"], abs=1e-4)
    assert summary["predictor_ppl_ratio"] == pytest.approx(rows[4]["val_ppl"] / rows[3]["val_ppl"])


# ``lemo_quality --base=smollm2-135m`` in a process whose zoo.load returns a tiny random Llama
# (context 512, so the smoke's 256 needs no RoPE scaling, as 2K needs none for SmolLM2's 8K) and
# the corpus' 512-token BPE and learned-selector weights of the right shape (zero: every block ties),
# as the real zoo attaches: the zoo path end to end in seconds, without the 135M model.
_FAKE_ZOO = """
import runpy, sys
import experiments.bench  # noqa: F401  (XLA flags before jax)
from flax import nnx
from tokensparse import data, zoo
from tokensparse.config import preset
from tokensparse.lemo import learned_selector
from tokensparse.llama import Llama

def load(name, *, dtype=None, attention_backend="auto"):
    assert name == "smollm2-135m", name
    print("[fake zoo] load", flush=True)
    config = preset("tiny", vocab_size=512, max_positions=512)
    tokenizer = data.get_tokenizer(data.load_corpus("shakespeare"), 512)
    model = Llama(config, attention_backend=attention_backend, rngs=nnx.Rngs(0))
    learned_selector.attach(model, learned_selector.LearnedSelector(
        config.n_layers, config.d_model, layers=range(config.n_layers)))
    return model, config, tokenizer

zoo.load = load
sys.argv = [sys.argv[1], *sys.argv[2:]]
module = sys.argv[0] if "." in sys.argv[0] else f"experiments.bench.{sys.argv[0]}"
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _bench_with_fake_zoo(name, out, *args, check=True):
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-c", _FAKE_ZOO, name, f"--out={out}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return done
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_train_selector_on_a_zoo_base_reports_held_out_quality_and_reuses_its_data(tmp_path):
    from tokensparse.lemo import learned_selector

    args = ("--base=smollm2-135m", "--windows=4", "--eval_windows=1", "--english_windows=1",
            "--seq_len=128", "--block_size=16", "--steps=3", "--batch=256", "--hidden=8",
            "--layers=all", "--sparse_keeps=0.5", f"--data_cache={tmp_path / 'cache'}")
    out = tmp_path / "sel.npz"
    first = _bench_with_fake_zoo("experiments.train_selector", out, *args, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    selector = learned_selector.load(out)
    assert selector.layers == (0, 1) and selector.hidden == 8
    info = selector.info
    assert info["loss"] == "block" and info["weights_dtype"] == "float16"
    for key in ("validation", "validation_english"):
        quality = info[key]
        assert 0.0 <= quality["recall@0.4"] <= 1.0 and -1.0 <= quality["spearman"] <= 1.0
    assert "read train data" not in first.stdout
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == [
        "english", "train", "validation"]
    # Refitting with other fit settings reads the collected data back instead of collecting it.
    again = _bench_with_fake_zoo("experiments.train_selector", out, *args, "--loss=token",
                                 check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "collected" not in again.stdout and again.stdout.count("data from") == 3
    assert learned_selector.load(out).info["loss"] == "token"
    # More varied training text: its windows are collected (once) and join the training data.
    extra = tmp_path / "extra.txt"
    extra.write_text("The selector should see modern prose as well as verse. " * 60)
    mixed = _bench_with_fake_zoo("experiments.train_selector", out, *args, f"--extra_text={extra}",
                                 "--extra_windows=2", check=False)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert "collected 2/2 windows" in mixed.stdout and mixed.stdout.count("data from") == 3
    assert "+ 2 windows of 1 extra text files" in learned_selector.load(out).info["corpus"]


def test_window_agreement_reproduces_the_exact_rule_without_a_window(tmp_path):
    """The probe's windowed attention with no window is the exact rule (Spearman 1, recall 1); a
    window of none of the blocks before the query's own agrees less; every (set, heads, window)
    has a row."""
    result, _ = _bench("lemo_window_agreement", tmp_path / "w.json", "--smoke", "--layers=0-1",
                       "--seq_len=256", "--block_size=32", "--windows=2", "--window_blocks=0,all",
                       "--heads=all,0+1,2", "--output_norms=exact,head_gram,rank1,rank4096")
    norms = ("exact", "head_gram", "rank1", "rank4096")
    every = {(r["set"], r["window_blocks"], None if r["heads"] is None else tuple(r["heads"]),
              r["output_norm"]): r for r in result["rows"]}
    assert set(every) == {("english", w, h, n) for w in (0, None) for h in (None, (0, 1), (2,))
                          for n in norms}
    # One head has no cross-head terms: its Gram norm is the exact norm.
    for w in (0, None):
        one = [every[("english", w, (2,), n)] for n in ("exact", "head_gram")]
        assert one[0]["spearman"] == pytest.approx(one[1]["spearman"], abs=1e-6)
    # W_o at full rank (4096 >= D) is W_o; at rank 1 it ranks blocks differently.
    for key, row in every.items():
        if key[3] == "rank4096":
            exact = every[(*key[:3], "exact")]
            assert all(row[m] == pytest.approx(exact[m], abs=1e-6)
                       for m in exact if m.startswith(("spearman", "recall")))
    assert every[("english", None, None, "rank1")]["spearman"] < 0.99
    rows = {key[:3]: r for key, r in every.items() if key[3] == "exact"}
    exact = rows[("english", None, None)]
    assert exact["spearman"] > 0.999 and all(exact[f"recall@{k}"] > 0.99 for k in (0.4, 0.55, 0.7, 0.85))
    assert rows[("english", 0, None)]["spearman"] < 0.99
    assert rows[("english", None, (0, 1))]["spearman"] < 0.999  # half the heads: not the exact rule


def test_train_selector_refuses_the_held_out_english_as_extra_text(tmp_path):
    from tokensparse.data import heldout

    topic = tmp_path / "topic.txt"
    topic.write_text(heldout.english_text()[5000:9000])
    done = subprocess.run([sys.executable, "-m", "experiments.train_selector", f"--out={tmp_path / 'x.npz'}",
                           f"--extra_text={topic}", "--extra_windows=1"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "is (part of) the held-out English text" in done.stderr
    alone = subprocess.run([sys.executable, "-m", "experiments.train_selector", f"--out={tmp_path / 'x.npz'}",
                            f"--extra_text={topic}"], cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "--extra_text and --extra_windows go together" in alone.stderr


def _quality_with_fake_zoo(out, *args):
    return _bench_with_fake_zoo("lemo_quality", out, *args)


def test_lemo_quality_on_a_zoo_base_skips_pretraining_and_resumes(tmp_path):
    args = ("--smoke", "--nomlp_drop_ablation", "--nomlp_recompute", "--base=smollm2-135m",
            f"--workdir={tmp_path / 'w'}")
    result, stdout = _quality_with_fake_zoo(tmp_path / "q.json", *args)
    assert "[fake zoo] load" in stdout and "pretraining" not in stdout
    summary = result["summary"]
    assert set(summary) == {"ppl_ratio", "sparse_ppl_ratio", "base_ppl@256", "lora_ppl@256",
                            "lemo_ppl@256", "lemo_mean_keep"}
    _finite(summary, summary)
    rows = result["rows"]
    assert [(r["method"], r["selector"], r["mlp_drop"], r["seq_len"]) for r in rows] == [
        ("base", None, None, 256), ("lora", None, None, 256), ("lemo", "learned", 0.8, 256)]
    assert rows[0]["rope_factor"] == 1.0 and len({r["val_tokens"] for r in rows}) == 1
    assert summary["ppl_ratio"] == pytest.approx(rows[2]["val_ppl"] / rows[1]["val_ppl"])
    assert rows[1]["val_ppl"] < rows[0]["val_ppl"]  # fine-tuning moved the random base
    settings = result["settings"]
    assert settings["base"] == "smollm2-135m" and "preset" not in settings
    assert "base_workdir" not in settings and "vocab_size" not in settings
    # The corpus was tokenized with the base's tokenizer, not a BPE trained for the run.
    from tokenizers import Tokenizer

    used = Tokenizer.from_file(str(tmp_path / "w" / "lora" / "tokenizer.json"))
    assert used.get_vocab_size() == 512
    # A rerun with the same workdir reuses every finished step and gives the same result.
    again, stdout = _quality_with_fake_zoo(tmp_path / "q2.json", *args)
    assert "fine-tuning" not in stdout and stdout.count("[lemo_quality] reusing") == 3
    assert again["summary"] == summary
    # The tiny preset's 'half' schedule: layers L/2-1 .. L-2 keep 0.4, the others are dense.
    n_layers = json.loads((tmp_path / "w" / "lora" / "config.json").read_text())["model"]["n_layers"]
    half = [0.4 if n_layers // 2 - 1 <= i <= n_layers - 2 else 1.0 for i in range(n_layers)]
    assert rows[2]["keep_profile"] == half
    assert summary["lemo_mean_keep"] == pytest.approx(np.mean(half))
    # Another schedule is another LeMo run beside the first (base and LoRA rows reused). The
    # sensitivity schedule measures its profile once before fine-tuning; the mlp_drop 0.5 and
    # recomputed-MLP runs reuse it, and the rows report it. (Algorithm 1's tuning is the same path
    # through tokensparse.pipelines.finetune: tests/test_experiments.py.)
    budgeted, stdout = _quality_with_fake_zoo(
        tmp_path / "q4.json", *[a for a in args if a not in ("--nomlp_drop_ablation",
                                                             "--nomlp_recompute")],
        "--config.lemo.schedule=sensitivity", "--config.lemo.calibration_windows=1",
        "--config.lemo.keep_ratio=0.5", "--config.lemo.loss_budget=10")
    name = "lemo_sensitivity_keep0.5_budget10"
    assert stdout.count("[lemo_quality] reusing") == 2
    assert f"fine-tuning {name}_mlp_drop0.8 " in stdout and f"fine-tuning {name}_mlp_drop0.5 " in stdout
    assert f"{name}_mlp_drop0.5 uses the profile {name}_mlp_drop0.8 tuned" in stdout
    assert f"{name}_mlp_recompute uses the profile {name}_mlp_drop0.8 tuned" in stdout
    measured = json.loads((tmp_path / "w" / f"{name}_mlp_drop0.8" / "lemo_profile.json").read_text())
    assert measured["schedule"] == "sensitivity" and len(measured["costs"]) == n_layers
    assert measured["profile"] == [0.5] * n_layers  # a 10-nat budget affords every layer
    assert measured["profile_loss"] > measured["dense_loss"] - 1.0
    assert [r["keep_profile"] for r in budgeted["rows"][2:]] == [measured["profile"]] * 3
    assert [(r["mlp_drop"], r["mlp_mode"]) for r in budgeted["rows"][2:]] == [
        (0.8, "channel_sparse_bwd"), (0.5, "channel_sparse_bwd"), (None, "recompute")]
    summary = budgeted["summary"]
    assert set(summary) >= {"ppl_ratio", "ppl_ratio_mlp_drop0.5", "ppl_ratio_mlp_recompute"}
    lora_ppl = budgeted["rows"][1]["val_ppl"]
    assert summary["ppl_ratio_mlp_recompute"] == pytest.approx(budgeted["rows"][4]["val_ppl"] / lora_ppl)
    # A profile file: its keep ratios, as given.
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"profile": [1.0] + [0.75] * (n_layers - 1)}))
    fixed, stdout = _quality_with_fake_zoo(tmp_path / "q5.json", *args,
                                           "--config.lemo.schedule=profile", f"--lemo_profile={given}")
    assert "fine-tuning lemo_profile-given_mlp_drop0.8 " in stdout
    assert fixed["rows"][2]["keep_profile"] == [1.0] + [0.75] * (n_layers - 1)


def test_keep_profile_files_and_flags_are_checked(tmp_path):
    from experiments.bench import read_keep_profile

    with pytest.raises(ValueError, match="no such file"):
        read_keep_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"thresholds": [0.5]}))
    with pytest.raises(ValueError, match='"profile" list'):
        read_keep_profile(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps({"profile": [1, 0.5]}))
    assert read_keep_profile(tmp_path / "ok.json") == (1.0, 0.5)
    refused = _bench_with_fake_zoo("lemo_quality", tmp_path / "q.json", "--smoke",
                                   f"--lemo_profile={tmp_path / 'ok.json'}", check=False)
    assert refused.returncode != 0
    assert "must be given exactly when config.lemo.schedule='profile'" in refused.stderr
    assert not (tmp_path / "q.json").exists()


def test_reuse_or_run_recomputes_when_the_key_changes(tmp_path):
    from experiments.bench.lemo_quality import _reuse_or_run

    path = tmp_path / "row.json"
    assert _reuse_or_run(path, {"steps": 3}, lambda: {"ppl": 1.0}) == {"ppl": 1.0}
    assert _reuse_or_run(path, {"steps": 3}, lambda: {"ppl": 2.0}) == {"ppl": 1.0}
    assert _reuse_or_run(path, {"steps": 4}, lambda: {"ppl": 3.0}) == {"ppl": 3.0}


def test_lemo_speed_smoke(tmp_path):
    result, stdout = _bench("lemo_speed", tmp_path / "s.json", "--preset=tiny", "--seq_lens=256",
                            "--reps=5", "--warmup=1")
    assert set(result["summary"]) == {"step_speedup@256", "step_speedup_channel_sparse@256"}
    _finite(result["summary"], ["step_speedup@256"])
    rows = result["rows"]
    assert [(r["method"], r["seq_len"]) for r in rows] == [
        ("lora", 256), ("lemo_elimination", 256), ("lemo", 256)]
    # The headline times elimination with the baseline's (dense) MLP, as the paper's artifact does.
    assert [r["mlp_mode"] for r in rows] == ["dense", "dense", "channel_sparse_bwd"]
    for row in rows:
        _finite(row, ("step_s", "tokens_per_s", "temp_bytes", "arg_bytes", "warmup_loss"))
        assert len(row["times_s"]) == 5 and row["temp_bytes"] > 0
    assert rows[0]["step_s"] / rows[1]["step_s"] == pytest.approx(result["summary"]["step_speedup@256"])
    assert "step_speedup@256" in stdout


def _scored_targets(windows):
    return [int(w.tokens[0, j + 1]) for w in windows for j in np.flatnonzero(w.loss_mask[0])]


def test_short_windows_score_the_same_targets_as_long_ones():
    from experiments.bench.lemo_quality import windows_covering
    from tokensparse import data

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, n).astype(np.int32) for n in (5, 70, 1, 33, 140)]
    long = list(itertools.islice(data.eval_windows(docs, seq_len=32), 4))
    n_targets = int(sum(w.loss_mask.sum() for w in long))
    short = windows_covering(docs, 8, n_targets)
    assert all(w.tokens.shape == (1, 8) for w in short)
    assert _scored_targets(short) == _scored_targets(long) and len(_scored_targets(long)) == n_targets


def test_a_finished_base_is_reused(tmp_path):
    from experiments.bench.bases import pretrain_base

    (tmp_path / "summary.json").write_text(json.dumps({"train_loss": 1.0, "val_ppl": 2.0}))
    assert pretrain_base({}, tmp_path, log=lambda message: None) == {"train_loss": 1.0, "val_ppl": 2.0}


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_lemo_predictor_smoke(predictor_smoke):
    tmp, result, _ = predictor_smoke
    summary = result["summary"]
    assert set(summary) >= {"mean_recall@0.4", "mean_spearman", "params_kept_ratio", "overhead_ratio",
                            "oracle_overhead_ratio"}
    _finite(summary, summary)
    assert 0.0 <= summary["mean_recall@0.4"] <= 1.0 and 0.0 < summary["params_kept_ratio"] <= 1.0
    layers = [r for r in result["rows"] if r["kind"] == "layer"]
    assert [r["layer"] for r in layers] == [0] and layers[0]["sparse"]  # tiny: 2 layers
    timed = {r["variant"]: r for r in result["rows"] if r["kind"] == "timing"}
    assert set(timed) == {"predictor", "fixed", "oracle"}
    assert all(len(r["times_s"]) == 3 for r in timed.values())
    ratio = timed["predictor"]["step_s"] / timed["fixed"]["step_s"]
    assert summary["overhead_ratio"] == pytest.approx(ratio)
    assert (tmp / "run" / "predictors").is_dir()
    # A second run reuses the trained predictors.
    _, again = _bench("lemo_predictor", tmp / "p2.json", "--smoke", f"--workdir={tmp / 'run'}",
                      f"--base_workdir={tmp / 'base'}")
    assert "reusing the predictors" in again and "training predictors" not in again


def test_lemo_predictor_on_a_zoo_base(tmp_path):
    """``--base`` trains predictors for that model (its tokenizer, nothing pretrained) with the
    chosen loss and rate; a workdir trained with other settings is refused, not silently reused."""
    args = ("--smoke", "--base=smollm2-135m", f"--workdir={tmp_path / 'run'}",
            "--config.predictors.loss=smooth_l1", "--config.predictors.weight_decay=0.01",
            "--config.predictors.h2=32", "--config.predictors.sparse_only",
            f"--config.predictors.targets_dir={tmp_path / 'tg'}", "--config.predictors.lr=1e-3")
    result, stdout = _bench_with_fake_zoo("lemo_predictor", tmp_path / "p.json", *args)
    assert "[fake zoo] load" in stdout and "pretraining" not in stdout
    settings = result["settings"]
    assert settings["base"] == "smollm2-135m" and "preset" not in settings
    assert "base_workdir" not in settings and "vocab_size" not in settings
    trained = json.loads((tmp_path / "run" / "config.json").read_text())["experiment"]
    assert trained["base"] == "smollm2-135m"
    assert (trained["train"]["loss"], trained["train"]["lr"]) == ("smooth_l1", 1e-3)
    assert (trained["train"]["weight_decay"], trained["train"]["h2"]) == (0.01, 32)
    assert trained["train"]["sparse_only"] and trained["train"]["targets_dir"] == str(tmp_path / "tg")
    assert sorted(p.name for p in (tmp_path / "tg").iterdir()) == ["held_out", "train"]
    assert not (tmp_path / "run" / "targets").exists()
    assert settings["predictor_training"] == trained["train"]
    _finite(result["summary"], ("mean_recall@0.4", "overhead_ratio"))
    refused = _bench_with_fake_zoo("lemo_predictor", tmp_path / "p2.json", *args[:-1],
                                   "--config.predictors.lr=2e-3", check=False)
    assert refused.returncode != 0 and "trained with another 'train'" in refused.stderr
    assert not (tmp_path / "p2.json").exists()


def test_lemo_memory_with_a_keep_profile(tmp_path):
    """Compile-only memory on the tiny preset: the default schedule, then a profile that eliminates
    more (every layer keeps a quarter): the LoRA rows are the same, LeMo's activations shrink."""
    common = ("--preset=tiny", "--seq_lens=512", "--remat=none")
    default, _ = _bench("lemo_memory", tmp_path / "d.json", *common)
    n_layers = 2  # the tiny preset
    (tmp_path / "profile.json").write_text(json.dumps({"profile": [0.25] * n_layers}))
    sparser, _ = _bench("lemo_memory", tmp_path / "s.json", *common,
                        f"--lemo_profile={tmp_path / 'profile.json'}")
    rows = {(r["method"], name): r for name, result in (("d", default), ("s", sparser))
            for r in result["rows"]}
    assert rows["lora", "d"]["temp_bytes"] == rows["lora", "s"]["temp_bytes"]
    assert rows["lemo", "s"]["temp_bytes"] < rows["lemo", "d"]["temp_bytes"]
    assert sparser["summary"]["activation_ratio@512"] > default["summary"]["activation_ratio@512"] > 1
    assert sparser["settings"]["mean_keep"] == 0.25 and default["settings"]["mean_keep"] > 0.25
    assert "profile from" in sparser["settings"]["lemo"]
    # Keeping more MLP channels for the backward saves more of the MLP's activations.
    wider, _ = _bench("lemo_memory", tmp_path / "w.json", *common,
                      f"--lemo_profile={tmp_path / 'profile.json'}", "--config.lemo.mlp_drop=0.5")
    lemo_rows = [r for r in wider["rows"] if r["method"] == "lemo"]
    assert lemo_rows[0]["temp_bytes"] > rows["lemo", "s"]["temp_bytes"]
    assert "keeps 50% channels" in wider["settings"]["lemo"]
    assert "keeps 20% channels" in sparser["settings"]["lemo"]
    # The recomputed MLP saves only its input: less than the dense MLP backward's g and v.
    by_mode = {mode: _bench("lemo_memory", tmp_path / f"{mode}.json", *common,
                            f"--lemo_profile={tmp_path / 'profile.json'}",
                            f"--config.lemo.mlp_mode={mode}")[0]
               for mode in ("recompute", "dense")}
    temp = {mode: next(r["temp_bytes"] for r in result["rows"] if r["method"] == "lemo")
            for mode, result in by_mode.items()}
    assert temp["recompute"] < temp["dense"], temp
    assert "recomputed from its input" in by_mode["recompute"]["settings"]["lemo"]


def test_lemo_memory_gives_the_baseline_lemos_mlp_rematerialisation(tmp_path):
    """The fair split: with mlp_mode=recompute the LoRA baseline recomputes its MLP too, so the MLP
    row is the baseline itself and the whole saving is elimination's; with the channel-sparse
    backward (LeMo's own) the baseline keeps the plain MLP and the MLP row saves memory."""
    common = ("--preset=tiny", "--seq_lens=512", "--remat=none")
    recompute, _ = _bench("lemo_memory", tmp_path / "r.json", *common,
                          "--config.lemo.mlp_mode=recompute")
    plain, _ = _bench("lemo_memory", tmp_path / "p.json", *common)
    r = {row["method"]: row for row in recompute["rows"]}
    p = {row["method"]: row for row in plain["rows"]}
    assert list(r) == ["lora", "lemo_elimination", "lemo_mlp", "lemo"]
    assert r["lemo_mlp"]["same_as"] == "lora" and r["lemo"]["same_as"] == "lemo_elimination"
    assert recompute["settings"]["baseline_mlp_mode"] == "recompute"
    assert r["lora"]["temp_bytes"] < p["lora"]["temp_bytes"]  # the baseline got the remat
    assert recompute["summary"]["activation_ratio_mlp@512"] == 1.0
    assert recompute["summary"]["activation_ratio@512"] == recompute["summary"][
        "activation_ratio_elimination@512"] > 1.0
    assert plain["settings"]["baseline_mlp_mode"] == "dense"
    assert "same_as" not in p["lemo_mlp"] and p["lemo_mlp"]["temp_bytes"] < p["lora"]["temp_bytes"]
    assert p["lemo_elimination"]["temp_bytes"] < p["lora"]["temp_bytes"]


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_predictor_generalisation_script_scores_the_same_held_out_windows(predictor_smoke):
    """scripts/predictor_generalisation.py on the smoke's predictors: its held-out recall is the
    benchmark's, and its train and position-prior recalls are recalls."""
    tmp, result, _ = predictor_smoke
    done = subprocess.run([sys.executable, "scripts/predictor_generalisation.py", str(tmp / "run"),
                           "--train_windows=4"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    assert out["heldout_recall@0.4"] == pytest.approx(result["summary"]["mean_recall@0.4"])
    assert 0.0 <= out["train_recall@0.4"] <= 1.0 and 0.0 <= out["position_prior_recall@0.4"] <= 1.0
    assert out["train_windows_scored"] == 4 and list(out["per_layer"]) == ["0"]


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_predictor_input_slices_script_trains_both_layouts_on_stored_targets(predictor_smoke):
    """scripts/predictor_input_slices.py on the smoke run's stored targets (no model loaded): the
    spec's head-slice layout and the whole-block one, each with the spec's widths; bad requests
    fail clearly."""
    tmp, _, _ = predictor_smoke
    targets = tmp / "run" / "targets"
    script = [sys.executable, "scripts/predictor_input_slices.py", str(targets)]

    def run(*args):
        return subprocess.run(script + list(args), cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)

    done = run("--layers=0", "--windows=4", "--eval_windows=2", "--steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    manifest = json.loads((targets / "train" / "manifest.json").read_text())
    config, block = manifest["model"], manifest["block_size"]  # tiny: 4 heads of 16
    d, hd = config["d_model"], config["head_dim"]
    layouts = {r["slices"]: r for r in out["layouts"]}
    assert sorted(layouts) == [1, config["n_heads"]] and config["n_heads"] > 1
    for slices, r in layouts.items():
        in_dim = block * d // slices
        assert r["input_width"] == in_dim
        assert r["params_per_path"] == in_dim * 128 + 128 * block * hd + block * hd * hd
        assert 0.0 <= r["recall"]["0"] <= 1.0 and math.isfinite(r["final_loss"])
    assert out["loss"] == "column"
    tile = run("--layers=0", "--windows=4", "--eval_windows=2", "--steps=2", "--slices=1",
               "--loss=smooth_l1")
    assert tile.returncode == 0, tile.stderr[-3000:]
    tile = json.loads(tile.stdout[tile.stdout.index("{"):])
    assert tile["loss"] == "smooth_l1" and [r["slices"] for r in tile["layouts"]] == [1]
    assert "must divide d_model" in run("--layers=0", "--slices=3", "--windows=4",
                                        "--eval_windows=2").stderr
    assert "holds 4 windows" in run("--layers=0", "--windows=9", "--eval_windows=2").stderr


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_predictor_recall_ceiling_script_on_stored_targets(predictor_smoke):
    """scripts/predictor_recall_ceiling.py: noise rows fall with σ; with the base, ``exact`` recomputes
    the stored oracle (recall 1) and the estimators score; a model the targets are not from, or an
    unknown layer, is refused."""
    tmp, _, _ = predictor_smoke
    targets = tmp / "run" / "targets"
    script = [sys.executable, "scripts/predictor_recall_ceiling.py", str(targets), "--windows=2"]

    def run(*args):
        return subprocess.run(script + list(args), cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)

    done = run("--noise=0,0.3,100", f"--base={tmp / 'base'}")
    assert done.returncode == 0, done.stderr[-3000:]
    methods = json.loads(done.stdout[done.stdout.index("{"):])["methods"]
    assert list(methods) == ["noise0", "noise0.3", "noise100", "exact", "block_mean", "query_mean",
                             "top_norm"]
    assert methods["exact"]["mean_recall"] == methods["noise0"]["mean_recall"] == 1.0
    assert methods["noise0.3"]["mean_recall"] > methods["noise100"]["mean_recall"]
    for m in methods.values():
        assert 0.0 <= m["mean_recall"] <= 1.0 and set(m["recall"]) == set(m["spearman"])
    foreign = tmp / "foreign_targets"  # as if collected from another model
    shutil.copytree(targets, foreign, dirs_exist_ok=True)
    manifest = foreign / "held_out" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "weights": "0" * 32}))
    refused = subprocess.run([sys.executable, "scripts/predictor_recall_ceiling.py", str(foreign),
                              "--windows=2", f"--base={tmp / 'base'}"], cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "weights digest differs" in refused.stderr, refused.stderr[-2000:]
    assert "are not in" in run("--layers=99").stderr


@pytest.mark.xdist_group("test_bench_lemo:predictor_smoke")
def test_mlp_backward_fidelity_script(predictor_smoke):
    """scripts/mlp_backward_fidelity.py on the smoke's base: the recomputed MLP and a backward that
    drops nothing give the exact LoRA gradients (cosine 1); dropping 90% of channels does not."""
    tmp, _, _ = predictor_smoke

    def run(*args):
        return subprocess.run([sys.executable, "scripts/mlp_backward_fidelity.py",
                               f"--base={tmp / 'base'}", *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)

    done = run("--seq_len=128", "--drops=0,0.9")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    v = out["variants"]
    assert list(v) == ["channel_sparse_bwd@0", "channel_sparse_bwd@0.9", "recompute", "per_token@0",
                       "per_token_equal_memory@0", "per_token@0.9", "per_token_equal_memory@0.9"]
    for exact in ("recompute", "channel_sparse_bwd@0", "per_token@0"):
        assert v[exact]["cosine"] > 1 - 1e-6 and v[exact]["norm_ratio"] == pytest.approx(1, abs=1e-4)
    for lossy in ("channel_sparse_bwd@0.9", "per_token@0.9", "per_token_equal_memory@0.9"):
        assert -1 <= v[lossy]["cosine"] < 0.999, (lossy, v[lossy])
    n_layers = json.loads((tmp / "base" / "hf" / "config.json").read_text())["num_hidden_layers"]
    assert all(len(r["layer_cosine"]) == n_layers for r in v.values())
    assert "multiple of 64" in run("--seq_len=100").stderr
