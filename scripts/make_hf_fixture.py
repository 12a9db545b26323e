"""Write the tiny Hugging Face Llama fixtures that ``tests/test_hf.py`` checks parity against.

Needs torch and transformers (made with torch==2.13.0+cpu, transformers==5.23.0) and must NOT import
tokensparse, so the reference logits come from an independent implementation. Run it once from the
repository root in a separate environment and commit the output (< 2 MB):

    python scripts/make_hf_fixture.py tests/fixtures/hf

Each case directory holds ``save_pretrained`` output plus ``reference.npz`` (``input_ids`` [2, T],
``logits`` [2, T, V] float32 from the eager-attention model in eval mode, and the library versions).

``--check-export DIR`` goes the other way: it loads a directory written by
``tokensparse.hf.save_llama`` with transformers and compares its logits with the ``reference.npz``
that was written next to it, exiting non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.08, hidden_act="silu", bos_token_id=1, eos_token_id=2)
# 8 query heads of width 16 (q_dim 128 != hidden 64) exercise an explicit head_dim with 4:1 GQA.
WIDE_GQA = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

# name: (config overrides, sequence length, seed, save_pretrained kwargs)
CASES = {
    "gqa": (WIDE_GQA, 48, 0, {}),
    "tied": (dict(tie_word_embeddings=True, num_key_value_heads=4, rms_norm_eps=3e-4,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), 40, 1, {}),
    "linear_rope_4x": (dict(rms_norm_eps=1e-6, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), 128, 2, {}),
    "sharded": (WIDE_GQA, 48, 0, dict(max_shard_size="150KB")),
    "llama3_rope": (dict(rms_norm_eps=1e-5, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0}), 80, 3, {}),
}


def build(overrides: dict, seed: int) -> transformers.LlamaForCausalLM:
    """A seeded float32 model whose RMSNorm weights are randomised (HF initialises them to ones)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**copy.deepcopy({**BASE, **overrides}),
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def reference_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(input_ids)).logits.float().numpy()


def versions() -> dict:
    return {"torch_version": np.array(torch.__version__),
            "transformers_version": np.array(transformers.__version__)}


def to_transformers_4x(path: pathlib.Path) -> None:
    """Rewrite config.json in the transformers 4.x style (top-level rope_theta, rope_scaling)."""
    config = json.loads((path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make(out: pathlib.Path) -> None:
    for name, (overrides, seq_len, seed, save_kwargs) in CASES.items():
        model = build(overrides, seed)
        rng = np.random.default_rng(100 + seed)
        input_ids = rng.integers(0, BASE["vocab_size"], size=(2, seq_len), dtype=np.int64)
        logits = reference_logits(model, input_ids)
        path = out / name
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, safe_serialization=True, **save_kwargs)
        for extra in ("generation_config.json",):
            (path / extra).unlink(missing_ok=True)
        if name == "linear_rope_4x":
            to_transformers_4x(path)
        np.savez_compressed(path / "reference.npz", input_ids=input_ids, logits=logits,
                            **versions())
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        print(f"{name}: T={seq_len} shards={shards} |logits|max={np.abs(logits).max():.3f}")


def check_export(path: pathlib.Path, tol: float) -> int:
    """Load a tokensparse export with transformers; compare with the logits saved beside it."""
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()
    ref = np.load(path / "reference.npz")
    logits = reference_logits(model, ref["input_ids"])
    diff = float(np.abs(logits - ref["logits"]).max())
    ok = diff <= tol
    print(f"{path}: transformers {transformers.__version__} loaded {type(model).__name__}, "
          f"rope={model.config.rope_parameters}, max |logits diff| = {diff:.3g} "
          f"({'OK' if ok else 'FAIL'}, tol {tol})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=pathlib.Path, help="fixture output directory")
    parser.add_argument("--check-export", type=pathlib.Path, nargs="+", metavar="DIR")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    if args.check_export:
        return max(check_export(p, args.tol) for p in args.check_export)
    if args.out is None:
        parser.error("give an output directory or --check-export DIR")
    make(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
