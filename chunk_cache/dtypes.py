"""The one list of precisions a decoder computes and a KV cache stores in (names of torch dtypes).

`auto` is a generator setting, not a stored precision: bf16 on CUDA, fp32 on the CPU. Kept free of
torch so that config validation can read it without loading torch.
"""

KV_DTYPES = ("float32", "bfloat16", "float16")
GENERATOR_DTYPES = ("auto", *KV_DTYPES)
