"""LoRA fine-tuning of a pretrained base at 2x its context (LeMo's recipe: r=8, α=16 on q,k,v,o;
AdamW β=(0.9, 0.95), 20 warm-up steps then constant; RoPE linear scaling to the target length).

Set ``--config.base`` to a pretraining workdir (e.g. from pretrain_small.py), a Hugging Face
directory, or a ``tokensparse.zoo`` model name (e.g. ``smollm2-135m``: its own tokenizer and 8K
context, so no RoPE scaling up to 8K).
"""

from ml_collections import config_dict

from tokensparse.runs import lemo_config_dict, mesh_config_dict, train_config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.base = ""
    c.method = "lora"  # or "lemo": contextual token elimination (c.lemo)
    c.lemo = lemo_config_dict()
    c.lora = config_dict.ConfigDict({"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                     "targets": ["q", "k", "v", "o"]})
    c.data = config_dict.ConfigDict({"source": "shakespeare", "vocab_size": 8192})
    c.train = train_config_dict(steps=100, batch_size=1, seq_len=512, lr=1e-3, warmup_steps=20,
                                schedule="constant", weight_decay=0.0, log_every=10,
                                checkpoint_every=50, eval_batches=8, loss_segment=256)
    c.attention_backend = "auto"
    c.mesh = mesh_config_dict()  # e.g. --config.mesh.data=-1: every device, batch split over them
    c.progress = True
    return c
