"""Write the small reference arrays that ``tests/test_gguf.py`` checks SmolLM2-135M GGUF parity against.

The reference is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``: its
dequantisation, q/k un-permutation, config mapping and tokenizer), never tokensparse. Run it in a
separate Python 3.11 environment and must NOT import tokensparse (made with torch==2.13.0+cpu,
transformers==5.23.0, gguf==0.19.0, accelerate==1.15.0):

    python3.11 -m venv /tmp/gguf311
    /tmp/gguf311/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
    /tmp/gguf311/bin/pip install transformers gguf accelerate
    GGUF=$(.venv/bin/python -c "from tokensparse import zoo; print(zoo.fetch('smollm2-135m'))")
    /tmp/gguf311/bin/python scripts/make_gguf_fixture.py "$GGUF" tests/fixtures/gguf/smollm2_reference.npz

Only small arrays are written (a few KB): the token ids and per-token NLL of a ~100-token passage,
the top-20 logits and a fixed vocabulary slice at a few positions, a few weight slices as
transformers dequantised them, and the reference tokenizer's ids for a few passages.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from importlib.metadata import version as _version

import numpy as np

# Set before importing the Hugging Face libraries: they read it at import time (no hub access).
os.environ["HF_HUB_OFFLINE"] = "1"

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

NLL_PASSAGE = (
    "The lighthouse keeper had not spoken to another person in three weeks. Each morning he climbed "
    "the spiral stairs, polished the great lens, and wrote the weather in a leather book that nobody "
    "would ever read. When the supply boat finally appeared on the horizon, he found that he had "
    "forgotten how to begin a conversation, and he rehearsed the word hello until it sounded strange. "
    "The captain waved from the deck, and the keeper, after a long pause, simply waved back."
)

TOKENIZER_PASSAGES = {
    "prose": "It was the best of times, it was the worst of times; the age of wisdom, the age of "
             "foolishness. She said: \"Don't stop!\" and we'll see what's next.",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
            "fibonacci(n - 2)\n\n\tprint({'a': [1, 2, 3]})  # 12345 + 0x1F\r\n",
    "unicode": "Café naïve façade — 東京タワー, Здравствуй мир! 🚀✨ ünïcödé ½ ∑x² → ∞",
    "numbers": "In 2024, 3.14159 and 1,000,000 ate 42 apples; call 555-0199 at 10:30pm.",
    "whitespace": "  leading spaces,\n\n\nthree newlines,   inner   gaps and trailing   ",
    "special": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
}

POSITIONS = (0, 10, 40, -1)   # logits are kept at these positions of the NLL passage
TOP_K = 20
VOCAB_SLICE = slice(1000, 1100)  # and at these vocabulary ids (fixed, independent of the values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("gguf", type=pathlib.Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("out", type=pathlib.Path, help="output .npz")
    args = parser.parse_args()
    directory, name = str(args.gguf.parent), args.gguf.name

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()

    ids = tokenizer(NLL_PASSAGE, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens).logits[0].float()
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp[:-1].gather(-1, tokens[0, 1:, None]).squeeze(-1)

    positions = [p % len(ids) for p in POSITIONS]
    top = torch.topk(logits[positions], TOP_K, dim=-1)
    state = model.state_dict()
    arrays = {
        "input_ids": np.asarray(ids, np.int32),
        "nll": nll.numpy().astype(np.float64),
        "positions": np.asarray(positions, np.int32),
        "top_ids": top.indices.numpy().astype(np.int32),
        "top_logits": top.values.numpy().astype(np.float32),
        "slice_ids": np.arange(VOCAB_SLICE.start, VOCAB_SLICE.stop, dtype=np.int32),
        "slice_logits": logits[positions][:, VOCAB_SLICE].numpy().astype(np.float32),
        # Dequantised weights as transformers reads them (HF [out, in] layout, un-permuted q/k).
        "w_embed": state["model.embed_tokens.weight"][:8, :16].numpy(),
        "w_q0": state["model.layers.0.self_attn.q_proj.weight"][:, :4].numpy(),
        "w_k0": state["model.layers.0.self_attn.k_proj.weight"][:, :4].numpy(),
        "w_down29": state["model.layers.29.mlp.down_proj.weight"][:8, :16].numpy(),
    }
    for key, text in TOKENIZER_PASSAGES.items():
        arrays[f"tok_{key}"] = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"],
                                          np.int32)
    # transformers maps tokenizer.ggml.pre='smollm' to plain GPT-2 splitting; llama.cpp (and the
    # original SmolLM2 tokenizer.json) first split off every numeric character (\p{N}). The two
    # differ only on non-ASCII numerals after a space (' ½'), so record the llama.cpp rule too,
    # still with transformers' vocabulary, merges and special tokens.
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for key, text in TOKENIZER_PASSAGES.items():
        arrays[f"tok_{key}_llamacpp"] = np.asarray(backend.encode(text, add_special_tokens=False).ids,
                                                   np.int32)
    config = model.config
    meta = {
        "passages": TOKENIZER_PASSAGES, "nll_passage": NLL_PASSAGE,
        "decoded_nll_passage": tokenizer.decode(ids),
        "config": {k: getattr(config, k, None) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings")} | {"rope_theta": (getattr(config, "rope_parameters", None) or {})
                                       .get("rope_theta", getattr(config, "rope_theta", None))},
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": _version("gguf"), "numpy": np.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(ids)} tokens, mean NLL {nll.mean():.4f}")
    print(json.dumps(meta, indent=1, default=str)[:2000])


if __name__ == "__main__":
    main()
