"""Experiment pipelines that take config dataclasses: pretraining, fine-tuning, predictor training.

- :mod:`~tokensparse.pipelines.pretrain`: ``PretrainConfig`` → ``pretrain(config, workdir)`` (a
  Llama, or a SUBLLM or its dense twin, from scratch).
- :mod:`~tokensparse.pipelines.finetune`: ``FinetuneConfig`` → ``finetune(config, workdir)`` (LoRA
  or LeMo at a longer context).
- :mod:`~tokensparse.pipelines.predictors`: ``PredictorsConfig`` → ``train_predictors(config,
  workdir)`` (LeMo's pattern predictors for a frozen base).
- :mod:`~tokensparse.pipelines.base`: loading a pretrained base (``load_base``) and pointing it at a
  longer context (``set_context``).
- :mod:`~tokensparse.pipelines.common`: what they share (mesh, data, evaluation, run files).

Every config is validated when it is built (``__post_init__``); ``check(config)`` in each module
adds what needs the machine (the mesh fits the devices, the base exists) without reading any data.
The absl scripts in ``experiments/`` build these configs from the command line and call the
pipelines.
"""
