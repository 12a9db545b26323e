"""LeMo predictor training for a `small` base (spec §2.3, scaled to CPU): 2K windows of the train
split, 400 steps at batch 1, elastic pruning every 100 steps; recall measured at keep 0.4.

Set ``--config.base`` to a pretraining workdir (e.g. from pretrain_small.py) or a Hugging Face
directory; fine-tune with ``--config.lemo.predictors=<workdir>/predictors``.
"""

import dataclasses

from ml_collections import config_dict

from tokensparse.lemo.predictor_training import PredictorTrainConfig


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.base = ""
    c.data = config_dict.ConfigDict({"source": "shakespeare", "vocab_size": 8192})
    train = dataclasses.asdict(PredictorTrainConfig(seq_len=2048, steps=400, train_windows=128,
                                                    eval_windows=16))
    train["layers"] = list(train["layers"])
    c.train = config_dict.ConfigDict(train)
    c.attention_backend = "auto"
    c.progress = True
    return c
