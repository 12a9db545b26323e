"""Command-line configs generated from the config dataclasses: every field documented, the round trip
back to the dataclasses, list-valued overrides through absl, and errors that name the config path."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest
from _env import subprocess_env
from absl import flags

from experiments import _cli, config_dicts, run_configs
from experiments.configs import (
    finetune_small,
    finetune_tiny,
    predictors_small,
    pretrain_small,
    pretrain_subllm_tiny,
    pretrain_tiny,
)
from tokensparse.config import DataConfig, LeMoConfig, LoRAConfig, TrainConfig
from tokensparse.lemo.predictor_training import PredictorTrainConfig
from tokensparse.pipelines.finetune import FinetuneConfig
from tokensparse.pipelines.predictors import PredictorsConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"pretrain": (pretrain_tiny, pretrain_small, pretrain_subllm_tiny),
           "finetune": (finetune_tiny, finetune_small), "train_predictors": (predictors_small,)}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_field_of_every_config_file_has_help(kind):
    for module in CONFIGS[kind]:
        c = module.get_config()
        text = run_configs.describe(kind, c)
        assert "(undocumented)" not in text, (module.__name__, text)
        assert text.count("--config.") == sum(1 for _ in config_dicts.leaves(c))
        run_configs.BUILDERS[kind](c)  # the shipped configs build


def test_dataclasses_round_trip_through_config_dicts():
    run = FinetuneConfig(base="b", method="lemo", lora=LoRAConfig(rank=4, targets=("q", "v")),
                         lemo=LeMoConfig(schedule="profile", profile=(1.0, 0.5), block_size=32,
                                         selector="predictor"),
                         predictors="p", data=DataConfig(vocab_size=512),
                         train=TrainConfig(steps=3, seq_len=64, remat_names=("qkv",)))
    assert run_configs.finetune_config(run_configs.finetune_dict(run)) == run
    run = PredictorsConfig(base="b", train=PredictorTrainConfig(seq_len=128, block_size=32, layers=(0, 1)))
    assert run_configs.predictors_config(run_configs.predictors_dict(run)) == run
    c = pretrain_subllm_tiny.get_config()
    built = run_configs.pretrain_config(c)
    assert built.kind == "subllm" and built.vocab_from_tokenizer
    assert built.model.model.max_positions == 128 and built.subllm.eval_modes == ("infer", "topk")
    c.model = "dense"
    assert run_configs.pretrain_config(c).kind == "dense"


def test_selector_auto_follows_the_predictors_directory():
    c = finetune_tiny.get_config()
    c.method, c.lemo.selector = "lemo", "auto"  # (finetune_tiny itself selects with the oracle)
    assert run_configs.finetune_config(c).lemo.selector == LeMoConfig().selector == "learned"
    c.lemo.predictors = "DIR"
    run = run_configs.finetune_config(c)
    assert (run.lemo.selector, run.predictors) == ("predictor", "DIR")


def _parse(config_file, *args):
    """``--config=config_file`` and ``args`` parsed as an entry point parses them (a private
    FlagValues); the ConfigDict after the overrides."""
    fv = flags.FlagValues()
    argv = ["prog", f"--config={ROOT / 'experiments/configs' / config_file}", *args]
    config, _ = _cli.define_config(config_file, flag_values=fv, sys_argv=argv)
    fv(argv)
    return config.value


@pytest.mark.parametrize("targets", ["q,v", "[q, v]", "['q', 'v']", '["q", "v"]', "(q,v)"])
def test_list_fields_take_overrides_from_the_command_line(targets):
    c = _parse("finetune_tiny.py", "--config.method=lemo", "--config.lemo.schedule=profile",
               "--config.lemo.profile=[1.0, 0.5]", f"--config.lora.targets={targets}",
               "--config.train.remat_names=qkv")
    run = run_configs.finetune_config(c)
    assert run.lemo.profile == (1.0, 0.5) and run.lemo.keep_ratios(2) == (1.0, 0.5)
    assert run.lora.targets == ("q", "v") and run.train.remat_names == ("qkv",)


def test_repeated_list_flags_and_empty_lists():
    c = _parse("finetune_tiny.py", "--config.lora.targets=q", "--config.lora.targets=o",
               "--config.lemo.profile=[]")
    run = run_configs.finetune_config(c)
    assert run.lora.targets == ("q", "o") and run.lemo.profile is None
    c = _parse("pretrain_subllm_tiny.py", "--config.subllm.level_keep=[0.75, 0.5]",
               "--config.subllm.eval_modes=infer")
    run = run_configs.pretrain_config(c)
    assert run.model.keep == (0.75, 0.5) and run.subllm.eval_modes == ("infer",)
    c = _parse("predictors_tiny.py", "--config.train.layers=0,1")
    assert run_configs.predictors_config(c).train.layers == (0, 1)


@pytest.mark.parametrize(("kind", "config_file", "args", "message"), [
    ("finetune", "finetune_tiny.py", ["--config.method=lemo", "--config.lemo.profile=[1.0, 0.5]"],
     "config.lemo.profile=(1.0, 0.5) must be given exactly when config.lemo.schedule='profile'"),
    ("finetune", "finetune_tiny.py", ["--config.lora.targets=q,x"],
     "config.lora: LoRAConfig.targets has unknown projections ['x']"),
    ("finetune", "finetune_tiny.py", ["--config.method=lemo", "--config.lemo.selector=predictor"],
     "config.lemo.selector='predictor' needs config.lemo.predictors=DIR"),
    ("pretrain", "pretrain_tiny.py", ["--config.model.overrides.rope_scaling.factor=0.5"],
     "config.model.overrides.rope_scaling.factor=0.5 must be >= 1.0."),
    ("pretrain", "pretrain_tiny.py", ["--config.model.overrides.n_kv_heads=3"],
     "config.model.overrides.n_heads=4 must be divisible by n_kv_heads=3"),
    ("pretrain", "pretrain_subllm_tiny.py", ["--config.subllm.scorer_lr_scale=0"],
     "config.subllm.scorer_lr_scale=0.0 must be positive."),
    ("pretrain", "pretrain_subllm_tiny.py", ["--config.subllm.eval_modes=[]"],
     "config.subllm.eval_modes=() must be a non-empty subset"),
])
def test_errors_name_the_config_path(kind, config_file, args, message):
    base = ["--config.base=smollm2-135m"] if kind == "finetune" else []  # a zoo name: no weights read
    c = _parse(config_file, *base, *args)
    with pytest.raises(ValueError) as e:
        run_configs.build(kind, c)
    assert str(e.value).startswith(message), str(e.value)


def test_unknown_keys_and_bad_types_are_refused():
    with pytest.raises(ValueError, match=r"config.train has unknown keys \['stepz'\]"):
        config_dicts.from_dict(TrainConfig, {"stepz": 3}, "config.train")
    with pytest.raises(ValueError, match=r"config.lemo.profile\[1\]='x' is not a float"):
        config_dicts.from_dict(LeMoConfig, {"schedule": "profile", "profile": [1.0, "x"]}, "config.lemo")
    assert config_dicts.from_dict(LeMoConfig, {"profile": []}, "config.lemo").profile is None


def test_every_field_is_in_the_generated_sections():
    c = finetune_small.get_config()
    for name, cls in (("lora", LoRAConfig), ("lemo", LeMoConfig), ("train", TrainConfig),
                      ("data", DataConfig)):
        assert {f.name for f in dataclasses.fields(cls)} <= set(c[name])
    assert {f.name for f in dataclasses.fields(PredictorTrainConfig)} == set(
        predictors_small.get_config().train)


def test_config_help_lists_every_field_with_overrides_applied():
    done = subprocess.run(
        [sys.executable, "-m", "experiments.finetune",
         f"--config={ROOT / 'experiments/configs/finetune_tiny.py'}", "--config_help",
         "--config.lemo.profile=[1.0, 0.5]", "--config.lora.targets=q,v"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "--config.lemo.profile=[1.0, 0.5]" in out and "--config.lora.targets=['q', 'v']" in out
    assert "--config.train.steps=10\n    Optimizer steps" in out
    assert "(undocumented)" not in out
    assert out.count("\n--config.") + 1 == sum(1 for _ in config_dicts.leaves(finetune_tiny.get_config()))
