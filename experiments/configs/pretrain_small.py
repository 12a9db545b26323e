"""Pretrain the `small` preset (~9M parameters) on the Shakespeare + Milton corpus: minutes on CPU."""

from ml_collections import config_dict

from tokensparse.runs import mesh_config_dict, model_config_dict, train_config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    # The context it is pretrained at is its "original context"; fine-tuning extends it.
    c.model = model_config_dict("small", max_positions=256)
    c.data = config_dict.ConfigDict({"source": "shakespeare", "vocab_size": 8192})
    c.train = train_config_dict(steps=200, batch_size=8, seq_len=256, lr=2e-3, warmup_steps=20,
                                log_every=10, checkpoint_every=50, eval_batches=8)
    c.attention_backend = "auto"
    c.mesh = mesh_config_dict()  # e.g. --config.mesh.data=-1: every device, batch split over them
    c.progress = True
    return c
