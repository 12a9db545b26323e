"""LeMo's token movement: compiled bytes accessed and FLOPs of one sparse attention sub-layer.

    python -m experiments.bench.lemo_movement [--preset=llama2-7b --seq_len=8192 --keep=0.4]

One layer's ``DecoderBlock.attend_and_norm`` (bf16, LoRA r=8 on q, k, v, o, batch 1) on a fixed
block selection, forward and backward (the VJP in the LoRA weights and the layer input, for random
cotangents of ``h`` and ``post_attn_norm(h)``), lowered on abstract arguments and compiled; nothing
runs. One layer, not a scanned model: ``cost_analysis()`` counts a loop body once, so a scan over
layers would hide all but one. The input ``x`` is donated, as the previous layer's output is inside
a model. Rows, per attention core:

- ``token``: the selection expanded to token indices (row-wise gather and scatter-add, the path
  before block-granular movement, still the one for SUBLLM's token selections).
- ``block``: the same slots moved as whole [block_size, D] slabs by block index, with XLA's
  sorted / unique index hints (``routing`` with a block selection), input recovery off.
- ``block_recovery``: ``block`` plus the in-place add at the kept rows and backward input recovery
  (``llama._recovering_attend``): the default for block selections without a names-based remat.

Cores: ``chunked`` (the benchmarks' flash-style attention; ``cost_analysis()`` counts its loop
over key chunks once, which hides most of attention's own bytes but none of the movement, which
runs outside the loop), ``xla`` (dense attention with [K, K] scores: no loop, every byte counted,
dominated by the scores) and ``none`` (q + k + v in place of attention: what is left is movement,
norms and projections, where the rows differ).
Per row: ``bytes_accessed`` (``cost_analysis()``), ``flops`` (:func:`tokensparse.flops.compiled_flops`)
and ``temp_bytes``. ``--model_rows`` adds the whole compile-only LeMo step (``lowered_lora_step``,
elimination row, chunked attention, remat none) with recovery off and on: its ``temp_bytes`` is
the memory effect on a model (its bytes count every scanned layer body once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from experiments import _checks
from experiments.bench import write_result
from experiments.bench.inputs import lowered_lora_step
from tokensparse import lora, routing
from tokensparse.config import LeMoConfig, LoRAConfig, preset, preset_names
from tokensparse.flops import compiled_flops
from tokensparse.llama import DecoderBlock, input_recovery
from tokensparse.remat import remat_policy, tagging

_PRESET = flags.DEFINE_string("preset", "llama2-7b", "Model preset (shapes only).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Sequence length.")
_KEEP = flags.DEFINE_float("keep", 0.4, "Fraction of blocks the sparse layer keeps.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "Tokens per block.")
_CORES = flags.DEFINE_list("cores", ["chunked", "none"],
                           "Attention cores: chunked, xla (dense) or none (q + k + v).")
_MODEL_ROWS = flags.DEFINE_bool("model_rows", False, "Also compile the whole LeMo step.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_movement.json", "Where to write the JSON.")

_checks.one_of(_PRESET, preset_names())
_checks.one_of(_CORES, ("chunked", "xla", "none"))
_checks.in_range(_KEEP, 0.0, 1.0)
_checks.at_least(_BLOCK, 1)
_checks.at_least(_SEQ_LEN, 1)

VARIANTS = ("token", "block", "block_recovery")


def _abstract_block(config, backend: str):
    def build():
        block = DecoderBlock(config, layer=0, attention_backend=backend, rngs=nnx.Rngs(0))
        for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj):
            d_in, d_out = linear.kernel.shape
            linear.adapter = lora.LoRA(d_in, d_out, LoRAConfig(), param_dtype=jnp.float32,
                                       dtype=linear.dtype, axes=(None, None), rngs=nnx.Rngs(1))
        return block
    return nnx.split(nnx.eval_shape(build), lora.LoRAParam, ...)


def _sum_core(q, k, v, *args):
    """q + k + v (KV heads repeated): attention's data flow at elementwise cost."""
    rep = q.shape[2] // k.shape[2]
    return q + jnp.repeat(k, rep, axis=2) + jnp.repeat(v, rep, axis=2)


def measure_layer(config, seq_len: int, keep: float, block_size: int, variant: str, core: str,
                  remat: str = "none") -> dict:
    graphdef, lora_state, rest = _abstract_block(config, "xla" if core == "none" else core)
    n_blocks = seq_len // block_size
    k_blocks = routing.capacity(n_blocks, keep, rounding="floor")

    def step(lora_state, rest, x, block_idx, block_valid, positions, ct_h, ct_normed):
        sel = routing.expand_blocks(routing.Selection(block_idx, block_valid), block_size)
        if variant == "token":
            sel = sel.tokens()

        def fwd(lora_state, x):
            block = nnx.merge(graphdef, lora_state, rest)
            return block.attend_and_norm(x, positions, None, sel,
                                         core=_sum_core if core == "none" else None)
        if remat != "none":
            fwd = jax.checkpoint(fwd, policy=remat_policy(remat))
        _, vjp = jax.vjp(fwd, lora_state, x)
        return vjp((ct_h, ct_normed))

    act = jax.ShapeDtypeStruct((1, seq_len, config.d_model), config.compute_dtype)
    args = (lora_state, rest, act, jax.ShapeDtypeStruct((1, k_blocks), jnp.int32),
            jax.ShapeDtypeStruct((1, k_blocks), bool),
            jax.ShapeDtypeStruct((1, seq_len), jnp.int32), act, act)
    with input_recovery(variant == "block_recovery"), tagging(False):
        compiled = jax.jit(step, donate_argnums=2).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    return {"scope": "layer", "variant": variant, "core": core, "remat": remat,
            "kept_tokens": k_blocks * block_size,
            "bytes_accessed": int(cost["bytes accessed"]), "flops": compiled_flops(compiled),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "sorted_index_ops": hlo.count("indices_are_sorted=true")}


def measure_model(config, seq_len: int, lemo: LeMoConfig, recovery: bool, remat: str) -> dict:
    with input_recovery(recovery):
        compiled = lowered_lora_step(config, seq_len, "lemo_elimination", lemo=lemo,
                                     remat=remat).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"scope": "model", "variant": "block_recovery" if recovery else "block", "remat": remat,
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "flops": compiled_flops(compiled), "bytes_accessed_loop_bodies_once":
            int(cost["bytes accessed"])}


def main(argv):
    del argv
    if _SEQ_LEN.value % _BLOCK.value:
        _checks.fail(f"--seq_len={_SEQ_LEN.value} must be a multiple of --block_size="
                     f"{_BLOCK.value}.")
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    rows, summary = [], {}
    for core in _CORES.value:
        by = {}
        for variant in VARIANTS:
            row = measure_layer(config, _SEQ_LEN.value, _KEEP.value, _BLOCK.value, variant, core)
            rows.append(row)
            by[variant] = row
            print(f"layer core={core:4s} {variant:15s} bytes {row['bytes_accessed'] / 2**30:7.3f} GiB"
                  f"  flops {row['flops'] / 1e9:8.1f} G  temp {row['temp_bytes'] / 2**20:7.1f} MiB",
                  flush=True)
        for variant in VARIANTS[1:]:
            summary[f"bytes_ratio_token/{variant}@{core}"] = (by["token"]["bytes_accessed"]
                                                              / by[variant]["bytes_accessed"])
            summary[f"flops_ratio_token/{variant}@{core}"] = by["token"]["flops"] / by[variant]["flops"]
    if _MODEL_ROWS.value:
        lemo = LeMoConfig(keep_ratio=_KEEP.value, block_size=_BLOCK.value)
        for remat in ("none",):  # under any remat the layer loop switches recovery off
            pair = [measure_model(config, _SEQ_LEN.value, lemo, rec, remat) for rec in (False, True)]
            rows.extend(pair)
            for row in pair:
                print(f"model remat={remat:4s} {row['variant']:15s} temp "
                      f"{row['temp_bytes'] / 2**30:7.3f} GiB  flops {row['flops'] / 1e12:7.2f} T",
                      flush=True)
            summary[f"model_temp_ratio_block/block_recovery@{remat}"] = (pair[0]["temp_bytes"]
                                                                         / pair[1]["temp_bytes"])
    write_result(_OUT.value, "lemo_movement", rows, summary, png=False,
                 settings={"preset": _PRESET.value, "seq_len": _SEQ_LEN.value, "keep": _KEEP.value,
                           "block_size": _BLOCK.value, "dtype": "bfloat16", "batch": 1,
                           "lora": "r=8 on q, k, v, o", "x_donated": True})


if __name__ == "__main__":
    _checks.run(main)
