"""Random weights in a real model's shape, with SmolLM2's tokenizer: a generator folder for timing
`ragkit bench cache` where the real weights cannot be had (the GPU machines here reach no network).

Only the timings of such a model mean anything; its answers, agreement and KL do not.

    python scripts/random_weights.py llama3-8b /tmp/llama3-8b-shape
    ragkit bench cache --set generator.model=/tmp/llama3-8b-shape --sweep-questions 0 --requests 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import transformers

from generators.weights import resolve_model_dir
from ragkit.errors import RagkitError

# Llama 3 8B's dimensions; the vocabulary stays SmolLM2's, so its tokenizer serves.
SHAPES = {
    "smollm2-135m": {},
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", default="smollm2",
                        help="model whose config (vocabulary, RoPE) and tokenizer are kept: the bundled SmolLM2 or a folder")
    args = parser.parse_args()
    try:
        base = resolve_model_dir(args.base, "--base")
        config = transformers.AutoConfig.from_pretrained(base)
    except (RagkitError, OSError, ValueError) as exc:
        parser.exit(2, f"error: --base {args.base}: {str(exc).strip().splitlines()[0]}\n")
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    try:
        model.save_pretrained(args.out)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (base / name).exists():
                shutil.copy(base / name, args.out / name)
    except OSError as exc:
        parser.exit(2, f"error: {args.out}: {exc.strerror or exc}\n")
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B random parameters -> {args.out}")


if __name__ == "__main__":
    main()
