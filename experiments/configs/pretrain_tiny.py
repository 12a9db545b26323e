"""Pretrain the `tiny` preset briefly (tests, smoke runs): seconds on CPU."""

from ml_collections import config_dict

from tokensparse.runs import mesh_config_dict, model_config_dict, train_config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = model_config_dict("tiny", max_positions=128)
    c.data = config_dict.ConfigDict({"source": "shakespeare", "vocab_size": 512})
    c.train = train_config_dict(steps=40, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=5,
                                log_every=5, checkpoint_every=10, eval_batches=2)
    c.attention_backend = "auto"
    c.mesh = mesh_config_dict()  # e.g. --config.mesh.data=-1: every device, batch split over them
    c.progress = True
    return c
