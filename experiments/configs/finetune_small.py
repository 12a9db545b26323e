"""LoRA fine-tuning of a pretrained base at 2x its context (LeMo's recipe: r=8, α=16 on q,k,v,o;
AdamW β=(0.9, 0.95), 20 warm-up steps then constant; RoPE linear scaling to the target length).

Set ``--config.base`` to a pretraining workdir (e.g. from pretrain_small.py), a Hugging Face
directory, or a ``tokensparse.zoo`` model name (e.g. ``smollm2-135m``: its own tokenizer and 8K
context, so no RoPE scaling up to 8K). ``--config.method=lemo`` fine-tunes with LeMo (``config.lemo``).
"""

from experiments.run_configs import finetune_dict
from tokensparse.config import DataConfig, LoRAConfig, TrainConfig
from tokensparse.pipelines.finetune import FinetuneConfig


def get_config():
    return finetune_dict(FinetuneConfig(
        lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o")),
        data=DataConfig(source="shakespeare", vocab_size=8192),
        train=TrainConfig(steps=100, batch_size=1, seq_len=512, lr=1e-3, warmup_steps=20,
                          schedule="constant", weight_decay=0.0, log_every=10, checkpoint_every=50,
                          eval_every=25, eval_batches=8, loss_segment=256)))
