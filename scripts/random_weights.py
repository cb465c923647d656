"""Random weights in a real model's shape, with SmolLM2's tokenizer: a generator folder for timing
`ragkit bench cache` where the real weights cannot be had (the GPU machines here reach no network),
for every family ragkit implements, built by transformers from the family's own config class.

Only the timings of such a model mean anything; its answers, agreement and KL do not. The `tiny-*`
shapes (hidden 64, 4 layers) run on a CPU in seconds: a family end to end through `ragkit bench cache`.

    python scripts/random_weights.py qwen3-8b /tmp/qwen3-8b-shape
    ragkit bench cache --set generator.model=/tmp/qwen3-8b-shape --sweep-questions 0 --requests 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import transformers

from generators.weights import resolve_model_dir
from ragkit.errors import RagkitError

# The published dimensions of each checkpoint; the vocabulary stays SmolLM2's, so its tokenizer serves.
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
PHI4_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
             "original_max_position_embeddings": 4096, "short_factor": [1.0] * 48,
             "long_factor": [1.0 + 0.6 * i for i in range(48)]}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {
    "smollm2-135m": ("LlamaConfig", {}),
    "llama3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                      max_position_embeddings=8192, tie_word_embeddings=False)),
    "llama3.1-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                        max_position_embeddings=131072, rope_parameters=LLAMA31,
                                        tie_word_embeddings=False)),
    "mistral-7b-v0.1": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
                                              max_position_embeddings=32768, tie_word_embeddings=False)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     max_position_embeddings=40960, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1000000.0},
                                     tie_word_embeddings=False)),
    "gemma3-12b": ("Gemma3TextConfig", dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                            num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                            query_pre_attn_scalar=256, sliding_window=1024,
                                            max_position_embeddings=131072, rope_parameters=GEMMA3_ROPE)),
    "phi4-mini": ("Phi3Config", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                     num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                                     max_position_embeddings=131072, original_max_position_embeddings=4096,
                                     rope_parameters=PHI4_ROPE, tie_word_embeddings=True)),
    "tiny-qwen3": ("Qwen3Config", dict(TINY, head_dim=16)),
    "tiny-gemma3": ("Gemma3TextConfig", dict(TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                                             layer_types=["sliding_attention", "full_attention"] * 2,
                                             rope_parameters=GEMMA3_ROPE)),
}
# Token ids of SmolLM2's vocabulary, whatever the family's own config class defaults to.
TOKENS = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", default="smollm2",
                        help="model whose tokenizer is kept (and, for smollm2-135m/llama3-8b, its config): the "
                             "bundled SmolLM2 or a folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    class_name, dims = SHAPES[args.shape]
    try:
        base = resolve_model_dir(args.base, "--base")
        if class_name == "LlamaConfig" and "rope_parameters" not in dims:  # the historical shapes keep the base
            config = transformers.AutoConfig.from_pretrained(base)
            for key, value in dims.items():
                setattr(config, key, value)
        else:
            config = getattr(transformers, class_name)(**TOKENS, **dims)
    except (RagkitError, OSError, ValueError) as exc:
        parser.exit(2, f"error: --base {args.base}: {str(exc).strip().splitlines()[0]}\n")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype))
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
